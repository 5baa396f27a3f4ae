"""`mediagent summary`: the demo's closing table, one row per model."""

from __future__ import annotations

import json

from mediagent.params import with_overrides
from mediagent.commands.summary import main


def test_table_has_one_row_per_model_and_marks_missing_values(tmp_path, repo_params, capsys):
    metrics = {
        "random": {"p_at_1": 0.125, "mrr": 0.33, "map": 0.31},
        "base": {"loss": 11.9, "p_at_1": 0.1667, "mrr": 0.29, "map": 0.25, "bleu4": 0.0, "rouge_l": 0.0},
        "tuned": {"loss": 11.7, "p_at_1": 0.5, "mrr": 0.6, "map": 0.55, "bleu4": 0.35, "rouge_l": 0.05},
        "serve_ready": {"ready": False, "vllm_parity": False, "rank_servable": True},
    }
    (tmp_path / "eval.json").write_text(json.dumps(metrics))
    params = with_overrides(repo_params, eval={"metrics_file": str(tmp_path / "eval.json")},
                            merge={"metrics_file": str(tmp_path / "missing.json")})
    lines = main(params).splitlines()
    assert lines[0].split() == ["model", "loss", "P@1", "MRR", "MAP", "BLEU-4", "ROUGE-L"]
    assert lines[1].split() == ["random", "-", "0.1250", "0.3300", "0.3100", "-", "-"]
    assert lines[3].split()[:3] == ["tuned", "11.7000", "0.5000"]
    assert lines[4].startswith("serve-ready: NO") and "vllm_parity False" in lines[4]
    assert len(lines) == 5  # no merge line without merge metrics
    assert capsys.readouterr().out.strip() == "\n".join(lines)
