"""Shared fixtures: the repo's params and sample data, the real cMedQA2 files beside the repo
(only tests whose subject is those files use them), a tiny base."""

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
        ".venv", ".git", "models", "__pycache__", ".pytest_cache", "processed", "raw",
        "dvclive", "eval", "metrics", "cache", "tmp", "dvc.lock",
    )
    shutil.copytree(ROOT, dst, ignore=ignore, dirs_exist_ok=True)
    return dst
