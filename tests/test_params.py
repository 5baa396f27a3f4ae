"""params.yaml loads into every section's dataclass, and dvc.yaml only names params that exist."""

from __future__ import annotations

import re

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
    for name, stage in stages.items():
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
            trimmed = {s: ({k: v for k, v in vals.items() if k != key} if s == section else vals)
                       for s, vals in raw.items()}
            with pytest.raises(ParamsError, match=rf"{section}\.{key}: missing required param"):
                parse_params(trimmed)
