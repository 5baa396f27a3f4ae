"""DVC experiments served side by side, and adapters loaded into / removed from a running server.

One temporary git + DVC repository (the project copied, training shrunk to 2 steps) runs
`dvc exp run train -S lora.r=8` and `-S lora.r=32`; one vLLM server per module is started
there with ``--exp r8,r32 --runtime-lora`` and an API key. The tests then load a further
adapter under a new name while streamed requests to another model are in flight, compare
its greedy answer with peft's, unload it, and check what the load command refuses before
the server sees it. The server is stopped when the module ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_repo
from tests.test_serve import (
    API_KEY,
    MAX_TOKENS,
    QUESTION,
    SYSTEM,
    chat,
    free_port,
    make_adapter,
    peft_greedy,
    running_server,
    stage_env,
    vllm_skip_reason,
)

EXPERIMENTS = {"r8": 8, "r32": 32}


def _run(args: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc.stdout + proc.stderr


def _command(repo: Path, *args: str, api_key: str | None = API_KEY) -> subprocess.CompletedProcess:
    env = stage_env(**({"API_KEY": api_key} if api_key else {}))
    return subprocess.run(
        [sys.executable, "-m", "mediagent", "serve", *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def exp_repo(tmp_path_factory) -> Path:
    """A git repo of the project with two DVC experiments (train only, 2 steps each)."""
    reason = vllm_skip_reason()
    if reason:
        pytest.skip(reason)
    repo = copy_repo(tmp_path_factory.mktemp("exp") / "repo")
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text(encoding="utf-8"))
    params["train"].update(
        max_steps=2,
        eval_steps=2,
        save_steps=2,
        logging_steps=1,
        max_seq_length=64,
        max_eval_examples=2,
        per_device_train_batch_size=2,
    )
    path.write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "init"], repo, env)
    t = time.monotonic()
    for name, r in EXPERIMENTS.items():
        _run([sys.executable, "-m", "dvc", "exp", "run", "train", "-n", name, "-S", f"lora.r={r}"], repo, env)
    print(f"\ntwo experiments in {time.monotonic() - t:.0f} s")
    return repo


@pytest.fixture(scope="module")
def base(exp_repo) -> Path:
    return exp_repo / "models" / "base" / "tiny"


@pytest.fixture(scope="module")
def server(exp_repo, tmp_path_factory):
    latest = json.loads((exp_repo / "models" / "adapter" / "lineage.json").read_text())["name"]
    log = tmp_path_factory.mktemp("hot-log") / "serve.log"
    with running_server(
        exp_repo, ["--exp", ",".join(EXPERIMENTS), "--runtime-lora"], log, latest, API_KEY=API_KEY
    ) as srv:
        srv.port, srv.cwd = srv.url.rsplit(":", 1)[1], exp_repo
        yield srv


def _models(server) -> set[str]:
    return {m.id for m in server.client().models.list().data}


def _experiment_dir(repo: Path, name: str) -> Path:
    """Where the server found an experiment's adapter: its --lora-modules entry, read from the process."""
    import psutil

    for p in psutil.Process().children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if "--lora-modules" in cmd and str(repo) in " ".join(cmd):
            entries = dict(e.split("=", 1) for e in cmd[cmd.index("--lora-modules") + 1 :] if "=" in e)
            return Path(entries[name])
    raise AssertionError("vLLM's command line not found")


def _prompt(base: Path) -> list[int]:
    from mediagent.chat_format import ChatFormat, conversation
    from mediagent.loading import load_tokenizer

    return ChatFormat.of(load_tokenizer(base)).prompt_ids(conversation(SYSTEM, QUESTION))


# ---------------------------------------------------------------- experiments side by side (make serve EXP=)


def test_experiments_listed_and_each_answers_like_peft(server, exp_repo, base):
    assert _models(server) == {"base", server.adapter_name, "medqa", *EXPERIMENTS}
    prompt = _prompt(base)
    for name, r in EXPERIMENTS.items():
        path = _experiment_dir(exp_repo, name)
        # the adapter of that experiment, copied out of the DVC cache into serve.experiments_dir
        assert path.parent == (exp_repo / "models" / "experiments").resolve()
        assert json.loads((path / "adapter_config.json").read_text())["r"] == r
        reply = chat(server.client(), name, extra_body={"return_token_ids": True}).choices[0]
        assert reply.message.content and reply.finish_reason in ("stop", "length")
        assert list(reply.token_ids) == peft_greedy(base, path, prompt, MAX_TOKENS)


def test_unknown_experiment_fails_fast_and_lists_the_known(exp_repo):
    t = time.monotonic()
    out = _command(exp_repo, "--port", str(free_port()), "--exp", "r8,nope")
    assert out.returncode == 1
    assert "no DVC experiment called nope; experiments here: r32, r8" in out.stderr
    assert "starting vLLM" not in out.stderr and time.monotonic() - t < 60
    out = _command(exp_repo, "load", "--exp", "nope", "--port", str(free_port()))
    assert out.returncode == 1 and "experiments here: r32, r8" in out.stderr


# ---------------------------------------------------------------- runtime loading


@pytest.fixture(scope="module")
def hot_adapter(base, tmp_path_factory) -> Path:
    """A second adapter the server has never seen: non-zero LoRA, another seed and rank."""
    return make_adapter(base, tmp_path_factory.mktemp("hot") / "adapter", r=16, seed=7)


def test_load_while_requests_stream(server, hot_adapter):
    client = server.client()
    results, errors, stop = [], [], threading.Event()

    def stream_forever():
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                text = "".join(
                    c.choices[0].delta.content or ""
                    for c in chat(client, "r32", stream=True, max_tokens=32)
                    if c.choices
                )
                results.append((t0, time.monotonic(), text))
            except Exception as exc:  # every failure is collected and fails the test below
                errors.append(repr(exc))

    threads = [threading.Thread(target=stream_forever) for _ in range(3)]
    for th in threads:
        th.start()
    try:
        while not results and not errors:
            time.sleep(0.1)
        t0 = time.monotonic()
        out = _command(server.cwd, "load", "--adapter", str(hot_adapter), "--name", "hot", "--port", server.port)
        t1 = time.monotonic()
        time.sleep(1)  # let the streams run on after the load too
    finally:
        stop.set()
        for th in threads:
            th.join(timeout=120)
    assert out.returncode == 0, out.stderr
    assert "loaded hot" in out.stdout
    assert errors == []
    overlapping = [r for r in results if r[0] < t1 and r[1] > t0]
    print(f"\nload took {t1 - t0:.1f} s; {len(results)} streamed requests, {len(overlapping)} during the load")
    assert overlapping and all(text for _, _, text in results)
    assert "hot" in _models(server)


def test_loaded_adapter_answers_like_peft(server, hot_adapter, base):
    prompt = _prompt(base)
    reply = chat(server.client(), "hot", extra_body={"return_token_ids": True}).choices[0]
    base_reply = chat(server.client(), "base", extra_body={"return_token_ids": True}).choices[0]
    assert list(reply.token_ids) == peft_greedy(base, hot_adapter, prompt, MAX_TOKENS)
    assert list(reply.token_ids) != list(base_reply.token_ids)  # the adapter is really applied


def test_load_experiment_under_a_new_name(server):
    from dvc.repo import Repo

    # while DVC's repository lock is held, as during a `dvc exp run`
    with Repo(str(server.cwd)) as repo, repo.lock:
        out = _command(server.cwd, "load", "--exp", "r8", "--name", "r8-again", "--port", server.port)
    assert out.returncode == 0, out.stderr
    assert "r8-again" in _models(server)
    again = chat(server.client(), "r8-again", extra_body={"return_token_ids": True}).choices[0]
    first = chat(server.client(), "r8", extra_body={"return_token_ids": True}).choices[0]
    assert list(again.token_ids) == list(first.token_ids)


def test_bad_adapters_refused_before_the_server_sees_them(server, base, tmp_path):
    before = _models(server)
    too_big = make_adapter(base, tmp_path / "r64", r=64, seed=3)
    out = _command(server.cwd, "load", "--adapter", str(too_big), "--name", "big", "--port", server.port)
    assert out.returncode == 1
    assert "LoRA rank 64 > --max-lora-rank 32 (the server's limit)" in out.stderr
    other = make_adapter(base, tmp_path / "other", r=8, seed=4, base_id="Qwen/Qwen3-8B")
    out = _command(server.cwd, "load", "--adapter", str(other), "--name", "other", "--port", server.port)
    assert out.returncode == 1
    assert "trained on base 'Qwen/Qwen3-8B' but model.base is 'tiny'" in out.stderr
    # a name already served: the server refuses, the command says why
    out = _command(server.cwd, "load", "--exp", "r32", "--name", "hot", "--port", server.port)
    assert out.returncode == 1 and "already been loaded" in out.stderr
    # without the key the load endpoint is closed like every /v1 route
    out = _command(server.cwd, "load", "--exp", "r32", "--name", "nokey", "--port", server.port, api_key=None)
    assert out.returncode == 1 and "refused the API key" in out.stderr
    assert _models(server) == before
    assert chat(server.client(), "medqa").choices[0].message.content


def test_unload_then_404(server):
    import openai

    out = _command(server.cwd, "unload", "--name", "hot", "--port", server.port)
    assert out.returncode == 0 and "unloaded hot" in out.stdout, out.stderr
    with pytest.raises(openai.NotFoundError) as e:
        chat(server.client(), "hot")
    assert e.value.status_code == 404
    assert "hot" not in _models(server)
    out = _command(server.cwd, "unload", "--name", "hot", "--port", server.port)
    assert out.returncode == 1 and "cannot be found" in out.stderr
    assert chat(server.client(), "r32").choices[0].message.content  # the rest still serves
