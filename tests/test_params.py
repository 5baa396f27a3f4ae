"""params.yaml loads into every section's dataclass, and dvc.yaml only names params that exist."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml

from mediagent.params import ParamsError, load_params, parse_params, with_overrides
from tests.conftest import ROOT


def _lookup(raw: dict, dotted: str):
    node = raw
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"{dotted} is not in params.yaml"
        node = node[part]
    return node


def test_repo_params_load(repo_params):
    assert repo_params.model.base == "tiny"
    assert str(repo_params.model.path) == "models/base/tiny"


def test_every_param_named_in_dvc_yaml_exists():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    text = (ROOT / "dvc.yaml").read_text(encoding="utf-8")
    interpolated = set(re.findall(r"\$\{([^}]+)\}", text))
    assert interpolated, "dvc.yaml should take its paths from params.yaml"
    for key in interpolated:
        _lookup(raw, key)
    stages = yaml.safe_load(text)["stages"]
    for stage in stages.values():
        for entry in stage.get("params", []):
            _lookup(raw, entry)
        module = stage["cmd"].removeprefix("python -m ")
        assert module.startswith("mediagent.pipeline."), "one module per stage"
        assert (ROOT / f"{module.replace('.', '/')}.py").is_file()


def test_unknown_keys_and_bad_values_are_all_reported(repo_params):
    with pytest.raises(ParamsError) as err:
        with_overrides(repo_params, lora={"r": 24, "target": ["q_proj"]}, train={"learning_rate": "fast"})
    msg = str(err.value)
    assert "lora.target: unknown param" in msg
    assert "lora.r: 24 cannot be served by vLLM" in msg
    assert "train.learning_rate: expected float" in msg


def test_values_below_their_least_are_each_named_with_why(repo_params):
    with pytest.raises(ParamsError) as err:
        with_overrides(
            repo_params,
            process={"limit": -1, "num_negatives": 0},
            train={"max_seq_length": 8, "logging_steps": 0, "weight_decay": -0.1},
            eval={"bootstrap_resamples": 10, "batch_size": 0},
            serve={"max_model_len": 15},
        )
    problems = str(err.value).splitlines()
    for line in (
        "process.limit: must be >= 0 (0 = all rows)",
        "process.num_negatives: must be >= 1",
        "train.max_seq_length: must be >= 16 tokens",
        "train.logging_steps: must be >= 1",
        "train.weight_decay: must be >= 0",
        "eval.bootstrap_resamples: must be >= 100 (percentile intervals need a few hundred)",
        "eval.batch_size: must be >= 1",
        "serve.max_model_len: must be >= 16 tokens",
    ):
        assert any(p.strip().endswith(line) for p in problems), (line, problems)
    assert not any("eval.max_questions" in p or "serve.cpu_kv_cache_gib" in p for p in problems)


def test_missing_and_unknown_sections(repo_params):
    raw = repo_params.to_dict()
    del raw["train"]
    raw["trian"] = {}
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert "train: missing section" in str(err.value)
    assert "trian: unknown section" in str(err.value)


def test_missing_params_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")


def test_every_key_is_required(repo_params):
    """params.yaml is the only source of values: a deleted key is an error naming it, never a default."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for section, values in raw.items():
        for key in values:
            trimmed = {
                s: ({k: v for k, v in vals.items() if k != key} if s == section else vals) for s, vals in raw.items()
            }
            with pytest.raises(ParamsError, match=rf"{section}\.{key}: missing required param"):
                parse_params(trimmed)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("train", "loss", "foo", "train.loss: 'foo' is not one of: chunked, full"),
        ("train", "optim", "adam", "train.optim: 'adam' is not one of: adamw_torch_fused, adamw_torch, adafactor"),
        ("model", "dtype", "fp32", "model.dtype: 'fp32' is not one of: auto, float32, bfloat16, float16"),
        ("lora", "bias", "all", "lora.bias: 'all' is not one of: none"),
        ("eval", "selection_score", "best", "eval.selection_score: 'best' is not one of: mean, pmi"),
        ("train", "micro_batch_size", "big", "train.micro_batch_size: expected int or auto, got 'big'"),
        ("train", "gradient_checkpointing", "yes", "train.gradient_checkpointing: expected bool or auto, got 'yes'"),
        ("launch", "processes", True, "launch.processes: expected int or auto, got True"),
    ],
)
def test_a_choice_outside_its_type_names_the_allowed_values(repo_params, section, key, value, message):
    with pytest.raises(ParamsError) as err:
        with_overrides(repo_params, **{section: {key: value}})
    assert message in str(err.value)


def test_a_bad_choice_is_the_stage_s_last_line(tmp_path):
    """From params.yaml to the one `error:` line, before any data or model is touched."""
    text = (ROOT / "params.yaml").read_text(encoding="utf-8")
    (tmp_path / "params.yaml").write_text(text.replace("loss: chunked ", "loss: foo "), encoding="utf-8")
    out = subprocess.run(
        [sys.executable, "-m", "mediagent.pipeline.train"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert last == "error: invalid params in params.yaml: train.loss: 'foo' is not one of: chunked, full"


def test_the_types_decide_what_loads(repo_params):
    p = with_overrides(
        repo_params,
        train={"micro_batch_size": 4, "memory_budget": 24, "gradient_checkpointing": True},
        launch={"processes": 2},
    )
    assert (p.train.micro_batch_size, p.train.memory_budget, p.train.gradient_checkpointing) == (4, 24, True)
    assert p.launch.processes == 2


def test_a_float_written_without_a_dot_is_read_as_a_float(repo_params):
    # PyYAML reads `1e-8` as a string; JSON and `dvc exp run -S` write floats that way.
    raw = yaml.safe_load("adam_epsilon: 1e-8\nlearning_rate: 2e-4\n")
    assert raw == {"adam_epsilon": "1e-8", "learning_rate": "2e-4"}
    params = with_overrides(repo_params, train=raw)
    assert (params.train.adam_epsilon, params.train.learning_rate) == (1e-8, 2e-4)
    with pytest.raises(ParamsError, match="train.adam_epsilon: expected float, got 'tiny'"):
        with_overrides(repo_params, train={"adam_epsilon": "tiny"})
