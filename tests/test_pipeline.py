"""The whole pipeline through real DVC in a temporary git repo.

`dvc repro` runs process -> base -> train -> merge -> evaluate on the embedded default;
a second `dvc repro` runs nothing; `dvc exp run -S lora.r=32` reruns train and what
depends on it but not process; `dvc metrics diff` shows what it changed; `dvc exp show`
lists both experiments.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import copy_repo

STAGES = ["process", "base", "train", "merge", "evaluate"]


def run_ok(args: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{out[-4000:]}"
    return out


def _ran(output: str) -> set[str]:
    return {s for s in STAGES if f"Running stage '{s}'" in output}


def shrink(repo: Path) -> None:
    """Keep the tiny default but fewer steps, so the test costs about a minute per run."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text(encoding="utf-8"))
    params["train"].update(max_steps=8, eval_steps=4, save_steps=4, logging_steps=2, max_seq_length=160)
    params["eval"].update(max_questions=6, max_generations=2, max_new_tokens=8, backend="hf")
    params["merge"].update(parity_prompts=2)
    path.write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")


def git_env() -> dict:
    """The venv's dvc and mediagent first on PATH, no analytics, a git identity for commits."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }


def test_repro_then_experiment(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    shrink(repo)
    env = git_env()
    dvc = [sys.executable, "-m", "dvc"]
    run_ok(["git", "init", "-q"], repo, env)
    run_ok(["git", "add", "-A"], repo, env)
    run_ok(["git", "commit", "-qm", "init"], repo, env)

    first = run_ok(dvc + ["repro"], repo, env)
    assert _ran(first) == set(STAGES)
    processed = repo / "data" / "processed"
    assert sorted(p.name for p in processed.iterdir()) == [
        "test.jsonl",
        "test_candidates.jsonl",
        "train.jsonl",
        "val.jsonl",
    ]
    lineage = json.loads((repo / "models" / "adapter" / "lineage.json").read_text())
    assert lineage["params"]["lora"]["r"] == 16
    assert (repo / "models" / "merged" / "lineage.json").is_file()
    for name in ("process", "train", "merge", "eval"):
        assert (repo / "metrics" / f"{name}.json").is_file()
    evaluation = json.loads((repo / "metrics" / "eval.json").read_text())
    assert {"base", "tuned"} <= set(evaluation)

    again = run_ok(dvc + ["repro"], repo, env)
    assert _ran(again) == set(), again

    # A change to the shared model-loading code makes every stage that loads a model stale,
    # and only those: the code deps in dvc.yaml are complete.
    loading = repo / "mediagent" / "loading.py"
    original = loading.read_text(encoding="utf-8")
    loading.write_text(original.replace("use_safetensors=True,", "use_safetensors=True,  # edited"), encoding="utf-8")
    assert loading.read_text(encoding="utf-8") != original
    stale = json.loads(run_ok(dvc + ["status", "--json"], repo, env))
    assert {name.split(":")[-1] for name in stale} == {"base", "train", "merge", "evaluate"}, stale
    loading.write_text(original, encoding="utf-8")
    assert json.loads(run_ok(dvc + ["status", "--json"], repo, env)) == {}

    run_ok(["git", "add", "-A"], repo, env)
    run_ok(["git", "commit", "-qm", "baseline"], repo, env)
    exp = run_ok(dvc + ["exp", "run", "-S", "lora.r=32"], repo, env)
    assert _ran(exp) == {"train", "merge", "evaluate"}, exp
    config = json.loads((repo / "models" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 32

    # The experiment sits in the workspace: diff it against the committed r=16 baseline.
    diff = json.loads(run_ok(dvc + ["metrics", "diff", "--json"], repo, env))
    changed = diff["metrics/eval.json"]
    assert changed["tuned.loss"]["old"] != changed["tuned.loss"]["new"]
    assert "base.loss" not in changed  # the base model did not change

    shown = json.loads(run_ok(dvc + ["exp", "show", "--json"], repo, env))
    ranks = set()
    for commit in shown:
        for exp_entry in [commit] + [e for e in (commit.get("experiments") or [])]:
            for rev in exp_entry.get("revs", [exp_entry]):
                data = rev.get("data") or {}
                lora = (((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}).get("lora")
                if lora:
                    ranks.add(lora["r"])
    assert ranks >= {16, 32}, shown
