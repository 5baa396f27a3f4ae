"""`mediagent summary`: the demo's closing table, one row per model."""

from __future__ import annotations

import json

from mediagent.commands.summary import main
from mediagent.params import with_overrides


def test_table_has_one_row_per_model_and_marks_missing_values(tmp_path, repo_params, capsys):
    metrics = {
        "random": {"p_at_1": 0.125, "mrr": 0.33, "map": 0.31},
        "base": {"loss": 11.9, "p_at_1": 0.1667, "mrr": 0.29, "map": 0.25, "bleu4": 0.0, "rouge_l": 0.0},
        "tuned": {"loss": 11.7, "p_at_1": 0.5, "mrr": 0.6, "map": 0.55, "bleu4": 0.35, "rouge_l": 0.05},
        "serve_ready": {"ready": False, "vllm_parity": False, "rank_servable": True},
    }
    (tmp_path / "eval.json").write_text(json.dumps(metrics))
    params = with_overrides(
        repo_params,
        model={"base": "Qwen/Qwen3-8B"},
        eval={"metrics_file": str(tmp_path / "eval.json")},
        merge={"metrics_file": str(tmp_path / "missing.json")},
    )
    lines = main(params).splitlines()
    assert lines[0].split() == ["model", "loss", "P@1", "MRR", "MAP", "BLEU-4", "ROUGE-L"]
    assert lines[1].split() == ["random", "-", "0.1250", "0.3300", "0.3100", "-", "-"]
    assert lines[3].split()[:3] == ["tuned", "11.7000", "0.5000"]
    assert lines[4].startswith("serve-ready: NO") and "vllm_parity False" in lines[4]
    assert len(lines) == 5  # no merge line without merge metrics, no note for a real base
    assert capsys.readouterr().out.strip() == "\n".join(lines)


def test_the_tiny_defaults_table_says_its_ranking_is_noise(tmp_path, repo_params):
    (tmp_path / "eval.json").write_text(json.dumps({"base": {"p_at_1": 0.25}, "tuned": {"p_at_1": 0.08}}))
    (tmp_path / "report.json").write_text(json.dumps({"counts": {"selection_questions": 12}}))
    params = with_overrides(
        repo_params,
        model={"base": "tiny"},
        eval={"metrics_file": str(tmp_path / "eval.json"), "report_path": str(tmp_path / "report.json")},
        merge={"metrics_file": str(tmp_path / "missing.json")},
    )
    note = main(params).splitlines()[-1]
    assert note.startswith("note: model.base tiny is random weights")
    assert "on 12 questions are noise, and tuned can rank below base" in note and "make quality" in note
