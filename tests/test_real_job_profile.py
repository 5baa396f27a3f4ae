"""The real-job profile (configs/profiles/qwen3-8b-a10.yaml) and the fractional step keys it uses.

`warmup_steps`, `eval_steps` and `save_steps` take transformers' own meaning: a value below 1
is a fraction of the run's optimizer steps, so the profile holds for any data size.
"""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch

from mediagent.commands.profile import apply
from mediagent.params import ParamsError, load_params, with_overrides
from mediagent.pipeline.train import main, training_arguments
from tests.conftest import ROOT
from tests.test_train import small, workdir  # noqa: F401 (workdir: the train tests' fixture)

PROFILE = ROOT / "configs" / "profiles" / "qwen3-8b-a10.yaml"


def test_profile_switches_to_the_real_job_with_practitioner_values(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    apply(PROFILE, params)
    p = load_params(params)
    assert (p.model.base, p.model.dtype, p.data.raw_dir) == ("Qwen/Qwen3-8B", "bfloat16", "data/raw")
    assert 1e-4 <= p.train.learning_rate <= 2e-4 and p.lora.lora_dropout > 0
    assert p.train.max_steps <= 0 and p.train.num_train_epochs >= 1  # epochs decide, not steps
    plan = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 4, "gradient_checkpointing": True}
    args = training_arguments(p.train, torch.bfloat16, plan)
    # transformers receives the fractions unchanged and resolves them against the run's steps
    assert (args.warmup_steps, args.eval_steps, args.save_steps) == (0.03, 0.05, 0.05)
    assert args.max_steps == -1 and args.num_train_epochs == 1


def test_step_keys_accept_counts_and_fractions_only(repo_params):
    ok = with_overrides(repo_params, train={"warmup_steps": 0, "eval_steps": 0.1, "save_steps": 50})
    assert (ok.train.warmup_steps, ok.train.eval_steps, ok.train.save_steps) == (0, 0.1, 50)
    with pytest.raises(ParamsError) as err:
        with_overrides(repo_params, train={"warmup_steps": -1, "eval_steps": 1.5, "save_steps": 0})
    msg = str(err.value)
    for bad in ("train.warmup_steps: -1", "train.eval_steps: 1.5", "train.save_steps: 0"):
        assert f"{bad} must be a step count" in msg


@pytest.mark.usefixtures("workdir")
def test_fractions_resolve_against_the_run_in_the_train_stage(repo_params):
    # 8 optimizer steps, eval every quarter of the run: steps 2, 4, 6, 8 (and 0, before training)
    main(small(repo_params, max_steps=8, eval_steps=0.25, save_steps=0.5, warmup_steps=0.25))
    eval_curve = pd.read_csv("dvclive/train/plots/metrics/eval/loss.tsv", sep="\t")
    assert eval_curve["step"].tolist() == [0, 2, 4, 6, 8]
