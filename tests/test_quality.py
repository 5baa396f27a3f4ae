"""`make quality` and its params profile: the parts that need neither the real data nor real weights."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mediagent.commands.profile import apply
from mediagent.errors import UserError
from mediagent.params import load_params
from quality.table import table

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "configs" / "profiles" / "gemma3-270m.yaml"


def test_profile_switches_params_and_keeps_comments(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    comments = [line for line in params.read_text(encoding="utf-8").splitlines() if line.lstrip().startswith("#")]
    values = apply(PROFILE, params)
    text = params.read_text(encoding="utf-8")
    assert comments == [line for line in text.splitlines() if line.lstrip().startswith("#")]
    p = load_params(params)
    assert (p.model.source, p.model.chat_template, p.model.chat_template_kwargs) == ("gguf", "gemma", {})
    assert p.process.num_negatives == 19 and p.eval.selection_score == "pmi"
    assert values["model.revision"] == p.model.revision and len(p.model.revision) == 64
    untouched = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))["serve"]["port"]
    assert p.serve.port == untouched


def test_a_bad_profile_leaves_params_yaml_as_it_was(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    before = params.read_bytes()
    for body, match in (
        ("train:\n  max_stepz: 3\n", "train.max_stepz is not a key"),
        ("eval:\n  selection_score: best\n", "eval.selection_score: .best. is not one of: mean, pmi"),
    ):
        bad = tmp_path / "bad.yaml"
        bad.write_text(body, encoding="utf-8")
        with pytest.raises(UserError, match=match):
            apply(bad, params)
        assert params.read_bytes() == before


def test_quality_without_data_is_one_error_line(tmp_path):
    env = {**os.environ, "MEDQA_SHARED_DATA": str(tmp_path / "nowhere"), "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "quality.run", "--report", str(tmp_path / "r.json")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 1 and last.startswith("error: cMedQA2 files not found"), out.stderr
    assert "make demo" in last and "Traceback" not in out.stderr
    assert not (tmp_path / "r.json").exists()


def test_table_shows_each_metric_with_its_interval():
    entry = {"value": 3.5, "ci95": [3.4, 3.6]}
    report = {m: {"loss": entry, "p_at_1": {"value": 0.25}} for m in ("base", "tuned", "delta")}
    lines = table(report).splitlines()
    assert (
        lines[2]
        == "| held-out loss (nats/token) | 3.500 [3.400, 3.600] | 3.500 [3.400, 3.600] | 3.500 [3.400, 3.600] |"
    )
    assert lines[3] == "| P@1 | 0.250 | 0.250 | 0.250 |"
    assert table(report, "zh").splitlines()[2].startswith("| 留出集损失")
