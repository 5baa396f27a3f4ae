"""One command, one way to fail: `mediagent --help` lists everything, and an expected error
ends with one `error:` line on stderr, exit status 1 and no traceback (unless asked for)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT


def _project(tmp_path: Path, **sections) -> Path:
    """tmp_path with the repo's params.yaml, sections updated (paths stay relative to it)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for name, values in sections.items():
        params[name].update(values)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    return tmp_path


def _run(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )


def _expected_error(out: subprocess.CompletedProcess, *words: str) -> str:
    assert out.returncode == 1, (out.returncode, out.stderr[-2000:])
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    for word in words:
        assert word in last, last
    return last


def test_help_lists_every_stage_and_command(tmp_path):
    out = _run(tmp_path, "-m", "mediagent", "--help")
    assert out.returncode == 0, out.stderr
    listed = {line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ") and line.split()}
    assert {
        "serve",
        "chat",
        "infer",
        "review-app",
        "data",
        "preflight",
        "summary",
        "plots",
        "process",
        "base",
        "train",
        "merge",
        "evaluate",
        "review",
    } <= listed
    for command in ("serve", "chat", "infer", "review-app", "data", "preflight", "summary", "train"):
        sub = _run(tmp_path, "-m", "mediagent", command, "--help")
        assert sub.returncode == 0 and sub.stdout.startswith(f"Usage: mediagent {command}"), sub.stderr


def test_train_without_the_base(tmp_path):
    cwd = _project(tmp_path, model={"base": "Qwen/Qwen3-8B", "source": "huggingface"})
    _expected_error(_run(cwd, "-m", "mediagent.pipeline.train"), "Qwen3-8B")
    # the same through the command group
    _expected_error(_run(cwd, "-m", "mediagent", "train"), "Qwen3-8B")


@pytest.mark.parametrize("stage", ["process", "train", "merge", "evaluate", "review", "base_model"])
def test_unknown_param_key(tmp_path, stage):
    cwd = _project(tmp_path, train={"learning_rat": 1e-4}, lora={"rank": 8})
    # every stage reads the whole file, so a typo anywhere stops them all before any work
    _expected_error(_run(cwd, "-m", f"mediagent.pipeline.{stage}"), "learning_rat")


def test_process_without_its_input(tmp_path):
    cwd = _project(tmp_path, data={"raw_dir": "nowhere", "processed_dir": "processed"})
    last = _expected_error(_run(cwd, "-m", "mediagent.pipeline.process"), "nowhere")
    assert not (tmp_path / "processed").exists(), last


def test_chat_without_a_server(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = _run(_project(tmp_path), "-m", "mediagent", "chat", "--base-url", f"http://127.0.0.1:{port}/v1", "-q", "你好")
    _expected_error(out, "no model server", str(port), "make serve")


def test_bad_option_is_one_error_line(tmp_path):
    _expected_error(_run(tmp_path, "-m", "mediagent", "serve", "--prot", "1"), "--prot", "--help")


def test_debug_shows_the_traceback(tmp_path):
    cwd = _project(tmp_path, data={"raw_dir": "nowhere"})
    out = _run(cwd, "-m", "mediagent", "--debug", "process")
    assert out.returncode == 1 and "Traceback" in out.stderr
    out = _run(cwd, "-m", "mediagent.pipeline.process", MEDIAGENT_DEBUG="1")
    assert out.returncode == 1 and "Traceback" in out.stderr
