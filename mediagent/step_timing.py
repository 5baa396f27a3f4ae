"""Seconds per optimizer step of the current setup, measured by running the train stage itself.

``mediagent preflight --measure N`` runs ``python -m mediagent.pipeline.train`` (the code and
memory plan of ``dvc repro train``) for N optimizer steps in a scratch folder, with params.yaml's
values except: ``train.max_steps`` = N, a log line per step, one evaluation and one checkpoint at
step N (after the last step's log line, so outside the timed span), and every output in the
scratch folder. The steps are timed by the stage's own line per logged step (seconds since its
first step began): the span from step 1's line to step N's covers steps 2..N; step 1 (lazy
initialisation, the longest batch with ``group_by_length``) is the warm-up left out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

import mediagent
from mediagent.errors import UserError
from mediagent.job_size import STEP_PATTERN
from mediagent.params import Params, with_overrides


def measure_params(params: Params, steps: int) -> Params:
    """params.yaml's values for a run of ``steps`` steps whose outputs stay in the current folder."""

    def absolute(path: str) -> str:
        return str(Path(path).resolve()) if path else path

    chat_template = params.model.chat_template
    return with_overrides(
        params,
        data={"processed_dir": absolute(params.data.processed_dir)},
        model={
            "dir": absolute(params.model.dir),
            "chat_template": absolute(chat_template) if Path(chat_template).is_file() else chat_template,
        },
        launch={"config": absolute(params.launch.config)},
        train={
            "max_steps": steps,
            "logging_steps": 1,
            "eval_steps": steps,
            "save_steps": steps,
            "output_dir": "adapter",
            "checkpoint_dir": "checkpoints",
            "metrics_file": "metrics/train.json",
            "dvclive_dir": "dvclive",
        },
    )


def step_seconds(lines) -> tuple[int, float]:
    """(steps timed, mean seconds per step) from the train stage's step lines, one per step; step 1 left out."""
    steps = [(int(m[1]), float(m[2])) for m in map(STEP_PATTERN.search, lines) if m]
    if not steps or [s for s, _ in steps] != list(range(1, len(steps) + 1)):
        raise ValueError(f"expected a step line for every step from 1, got steps {[s for s, _ in steps]}")
    (first, t0), (last, t1) = steps[0], steps[-1]
    return last - first, (t1 - t0) / (last - first)


def run_steps(params: Params, steps: int, workdir: Path) -> dict:
    """Run the train stage for ``steps`` steps in ``workdir``; its timing and what it trained on."""
    if steps < 3:
        raise UserError(f"--measure {steps}: give at least 3 steps (the first is a warm-up left out)")
    processed = Path(params.data.processed_dir) / "train.jsonl"
    if not processed.is_file() or not (params.model.path / "config.json").is_file():
        raise UserError(
            f"--measure trains on the current setup: needs {processed} and {params.model.path}; "
            f"run `dvc repro process base` (or `make base`) first"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    raw = measure_params(params, steps).to_dict()
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")
    # the same mediagent as this command's, also where it is not the installed one
    root = str(Path(mediagent.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    # its output goes on to the terminal as it comes, and is kept for the step lines
    proc = subprocess.Popen(
        [sys.executable, "-m", "mediagent.pipeline.train"],
        cwd=workdir,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        errors="replace",
    )
    lines = []
    for line in proc.stderr:
        sys.stderr.write(line)
        lines.append(line)
    if proc.wait():
        raise UserError(
            f"the train stage stopped with exit code {proc.returncode} after its own error above; "
            f"--measure runs only a setup that `dvc repro train` can run"
        )
    timed, seconds = step_seconds(lines)
    lineage = json.loads((workdir / "adapter" / "lineage.json").read_text(encoding="utf-8"))
    return {
        "steps": steps,
        "timed_steps": timed,
        "seconds_per_step": seconds,
        "world_size": lineage["world_size"],
        "metrics": json.loads((workdir / "metrics" / "train.json").read_text(encoding="utf-8")),
    }
