"""Shared fixtures: the repo's params and sample data, the real cMedQA2 files beside the repo
(only tests whose subject is those files use them), a tiny base; and the test tiers.

Tiers (markers registered in pyproject.toml, see docs/testing.md) are given here, by the
fixtures and modules a test uses, so that test files carry no tier decorations:
``vllm`` starts vLLM, ``browser`` drives headless Chromium, ``dvc`` runs ``dvc repro`` or
``dvc exp``, ``slow`` trains a model end to end (or otherwise takes tens of seconds).
``-m "not slow and not vllm and not browser and not dvc"`` is the fast tier.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from mediagent.params import Params, load_params

ROOT = Path(__file__).resolve().parents[1]
# Real cMedQA2 files live beside the repository (never inside it); override with
# MEDQA_SHARED_DATA to point elsewhere.
SHARED = Path(os.environ.get("MEDQA_SHARED_DATA", ROOT.parent / "shared" / "data" / "cmedqa2"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real cMedQA2 data not found at {path} (set MEDQA_SHARED_DATA to its folder)")
    return path


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """The repo's own illustrative data (102 questions, 129 answers; answer.csv in GBK)."""
    return ROOT / "data" / "sample"


@pytest.fixture(scope="session")
def shared_sample() -> Path:
    """Folder with 500 real cMedQA2 questions (question.csv) and one answer each (answer.csv)."""
    return _need(SHARED / "sample")


@pytest.fixture(scope="session")
def shared_candidates() -> Path:
    """Folder with the official dev_candidates.zip and test_candidates.zip."""
    _need(SHARED / "dev_candidates.zip")
    return _need(SHARED / "test_candidates.zip").parent


@pytest.fixture(scope="session")
def repo_params() -> Params:
    return load_params(ROOT / "params.yaml")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, repo_params) -> Path:
    """The default tiny Qwen3 base, built once per session by the real `base` stage code."""
    from mediagent.pipeline.base_model import build_tiny  # the stage's own builder: tests use what `dvc repro` makes

    out = tmp_path_factory.mktemp("base") / "tiny"
    build_tiny(repo_params.tiny, out)
    return out


def copy_repo(dst: Path) -> Path:
    """Copy the tracked project files (no venv, data or models) into dst for DVC tests."""
    # .dvc/cache and .dvc/tmp too: a run-cache hit would skip the very stages under test.
    ignore = shutil.ignore_patterns(
        ".venv",
        ".git",
        "models",
        "__pycache__",
        ".pytest_cache",
        "processed",
        "raw",
        "dvclive",
        "eval",
        "metrics",
        "cache",
        "tmp",
        "dvc.lock",
    )
    shutil.copytree(ROOT, dst, ignore=ignore, dirs_exist_ok=True)
    return dst


# ---------------------------------------------------------------- test tiers

# Fixtures by "<defining module>.<name>": two modules define a `server` (a vLLM server in
# test_serve/test_hot_load, a file server in test_download), so the name alone is ambiguous.
FIXTURE_TIERS = {
    "tests.test_serve.server": ("vllm",),
    "tests.test_hot_load.server": ("vllm",),
    "tests.test_mixed_traffic.served": ("vllm",),
    "tests.test_hot_load.exp_repo": ("dvc", "vllm"),  # `dvc exp run` twice; skips without vLLM
    "tests.test_ui.chromium": ("browser",),
    "tests.test_evaluate.trained": ("slow",),  # trains and merges a tiny model
    "tests.test_sources.mixed_run": ("slow",),  # process, train, merge, evaluate on two sources
}
# Modules whose every test is in a tier.
MODULE_TIERS = {
    "test_pipeline": ("dvc", "slow"),  # the whole pipeline through `dvc repro` and `dvc exp run`
    "test_distributed": ("slow",),  # DDP / FSDP / DeepSpeed trainings in several processes
    "test_qlora": ("slow", "vllm"),  # trains, merges, evaluates with vLLM when it imports
    "test_other_arch": ("slow", "vllm"),  # a tiny Gemma 3 through train, merge, evaluate and a vLLM server
    "test_remote": ("dvc",),  # dvc push / pull in a temporary repository against a loopback S3 server
}
# Single tests (every parametrization) whose tier their fixtures do not show. A renamed
# test must be renamed here, or it falls into the fast tier.
TEST_TIERS = {
    "test_process.py::test_dvc_repro_runs_once_then_skips": ("dvc",),
    "test_sources.py::test_mixed_run_serves_a_multi_turn_dialogue_as_trained": ("vllm",),
    "test_distributed.py::test_sweep_runs_queued_experiments_at_once_one_device_each": ("dvc",),
    "test_evaluate.py::test_vllm_scorer_equals_transformers_scorer": ("vllm",),
    "test_evaluate.py::test_main_writes_metrics_samples_plots_and_report": ("vllm",),  # vLLM backend when it imports
    "test_infer.py::test_answers_good_lines_reports_bad_ones": ("vllm",),
    # the real train stage to its last step (8-51 s each on 2 CPU cores)
    "test_train.py::test_training_lowers_heldout_loss": ("slow",),
    "test_train.py::test_same_seed_same_bytes_other_rank_other_adapter": ("slow",),
    "test_train.py::test_killed_run_resumes_from_its_checkpoint": ("slow",),
    "test_train.py::test_checkpoints_of_other_params_are_discarded": ("slow",),
    "test_train.py::test_micro_batches_train_the_same_adapter": ("slow",),
    "test_train.py::test_plan_picks_smaller_micro_batches_for_a_small_budget": ("slow",),
    "test_merge.py::test_untied_bf16_sharded_base_through_train_and_merge": ("slow",),
    "test_real_job_profile.py::test_fractions_resolve_against_the_run_in_the_train_stage": ("slow",),
    # measures 8 CPU trainings in subprocesses (10-31 s each)
    "test_preflight.py::test_estimate_within_20_percent_of_measured_cpu_training": ("slow",),
    # --measure and a full epoch of the tiny base, three times each, through the train stage in subprocesses
    "test_preflight_measure.py::test_measure_extrapolates_a_full_tiny_epoch_within_25_percent": ("slow",),
}


def _fixture_keys(item: pytest.Item) -> set[str]:
    # pytest keeps the resolved definitions in the private _fixtureinfo (checked with
    # pytest 9.2.0); a test outside any module (a doctest) has none.
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return set()
    return {f"{d.func.__module__}.{name}" for name, defs in info.name2fixturedefs.items() for d in defs[-1:]}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.path.stem
        test = f"{item.path.name}::{getattr(item, 'originalname', item.name)}"  # one name for every parametrization
        tiers = set(MODULE_TIERS.get(module, ())) | set(TEST_TIERS.get(test, ()))
        for key in _fixture_keys(item):
            tiers |= set(FIXTURE_TIERS.get(key, ()))
        for tier in sorted(tiers):
            item.add_marker(tier)
