"""`make serve` end to end: the real vLLM server on the tiny base + a non-zero LoRA adapter.

One server per module (start-up dominates: ~1 min on 2 cores), started through
``mediagent serve`` with an API key, then queried with the official openai client.
The last test stops it with SIGTERM and checks that no process is left. Pre-start checks
and the pure command-building functions run without vLLM.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from mediagent.params import Params, with_overrides
from tests.adapter_kit import write_adapter

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-key-0123"
QUESTION = "头疼怎么办？"
MAX_TOKENS = 16
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------- helpers shared with test_infer


@functools.cache  # one import check per session (test_infer shares it)
def vllm_skip_reason() -> str | None:
    """None when vLLM imports in the project's python; else why the vLLM tests skip."""
    if importlib.util.find_spec("vllm") is None:
        return "vllm not installed (make install puts it in the venv; VLLM=none skips it)"
    # In a subprocess: importing vLLM here would configure logging/multiprocessing for every test.
    out = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, text=True, timeout=300)
    if out.returncode:
        return f"vllm does not import: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}"
    return None


def make_adapter(base: Path, out: Path, r: int = 8, base_id: str = "tiny", seed: int = 0) -> Path:
    """A non-zero LoRA on every projection, in the train stage's layout (see adapter_kit)."""
    return write_adapter(base, out, r=r, target_modules=LORA_TARGETS, seed=seed, base_id=base_id)


def write_project(dst: Path, params: Params, base: Path, adapter: Path) -> Path:
    """A directory whose params.yaml points the stages at the test's base and adapter."""
    p = with_overrides(
        params,
        model={"dir": str(base.parent), "base": "tiny"},
        train={"output_dir": str(adapter)},
        merge={"output_dir": str(dst / "merged")},
    )
    dst.mkdir(parents=True, exist_ok=True)
    # json round trip: tuples -> lists, which safe_dump writes
    (dst / "params.yaml").write_text(
        yaml.safe_dump(json.loads(json.dumps(p.to_dict())), allow_unicode=True), encoding="utf-8"
    )
    return dst


def stage_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("API_KEY", "VLLM_API_KEY")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def peft_greedy(base: Path, adapter: Path | None, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Reference greedy continuation: transformers generate in float32 (+ peft adapter)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
        )
    gen = out[0, len(prompt_ids) :].tolist()
    eos = set(model.generation_config.eos_token_id or [])
    for i, t in enumerate(gen):  # vLLM does not return the stop token; transformers does
        if t in eos:
            return gen[:i]
    return gen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory) -> Path:
    return make_adapter(tiny_base, tmp_path_factory.mktemp("adapter"), r=8)


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_params, tiny_base, adapter) -> Path:
    return write_project(tmp_path_factory.mktemp("project"), repo_params, tiny_base, adapter)


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path
    adapter_name: str
    startup_s: float

    def client(self, api_key: str | None = API_KEY):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key or "none", max_retries=0, timeout=120)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def prompt_ids(self, messages: list[dict], model: str = "medqa") -> list[int]:
        """The token ids the server builds for these messages (vLLM's /tokenize, chat template applied)."""
        body = json.dumps({"model": model, "messages": messages, "add_generation_prompt": True}).encode()
        req = urllib.request.Request(
            f"{self.url}/tokenize",
            data=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())["tokens"]


@contextlib.contextmanager
def serving_run(params, root: Path, tmp_path: Path):
    """`mediagent serve` on a pipeline run's outputs (its params written as a project's params.yaml)."""
    project = tmp_path / "project"
    project.mkdir()
    # json round trip: tuples -> lists, which safe_dump writes
    (project / "params.yaml").write_text(
        yaml.safe_dump(json.loads(json.dumps(params.to_dict())), allow_unicode=True), encoding="utf-8"
    )
    name = json.loads((root / "adapter" / "lineage.json").read_text())["name"]
    with running_server(project, [], tmp_path / "serve.log", name, API_KEY=API_KEY) as srv:
        yield srv


@contextlib.contextmanager
def running_server(cwd: Path, args: list[str], log: Path, adapter_name: str, **env: str):
    """``mediagent serve <args>`` in ``cwd``, ready (``/health``) when entered, SIGTERMed on exit."""
    port = free_port()
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mediagent", "serve", "--port", str(port), *args],
            cwd=cwd,
            env=stage_env(**env),
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    try:
        while True:
            assert proc.poll() is None, (
                f"mediagent.commands.serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
            )
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() - start < 300, f"server not ready in 300 s:\n{log.read_text()[-4000:]}"
            time.sleep(1)
        srv = Server(proc, url, log, adapter_name, time.monotonic() - start)
        print(f"\nserver ready in {srv.startup_s:.1f} s")
        yield srv
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def server(project, adapter, tmp_path_factory):
    reason = vllm_skip_reason()
    if reason:
        pytest.skip(reason)
    name = json.loads((adapter / "lineage.json").read_text())["name"]
    with running_server(project, [], tmp_path_factory.mktemp("serve-log") / "serve.log", name, API_KEY=API_KEY) as srv:
        yield srv


SYSTEM = "你是一个专业的医疗助手。"


def chat(client, model: str, question: str = QUESTION, system: str = SYSTEM, **kw):
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
        max_tokens=kw.pop("max_tokens", MAX_TOKENS),
        temperature=0,
        **kw,
    )


# ---------------------------------------------------------------- server tests (in order; the last stops it)


def test_lists_base_lineage_name_and_alias(server):
    ids = {m.id for m in server.client().models.list().data}
    assert ids == {"base", server.adapter_name, "medqa"}


def test_adapter_answer_equals_peft_greedy_and_differs_from_base(server, tiny_base, adapter):
    from mediagent.chat_format import ChatFormat, conversation
    from mediagent.loading import load_tokenizer

    client = server.client()
    tok = load_tokenizer(adapter)
    prompt = ChatFormat.of(tok).prompt_ids(conversation(SYSTEM, QUESTION))
    replies = {
        m: chat(client, m, extra_body={"return_token_ids": True}).choices[0]
        for m in ("base", "medqa", server.adapter_name)
    }
    # the served chat template renders exactly the training prompt
    got_prompt = chat(client, "medqa", max_tokens=1, extra_body={"return_token_ids": True}).prompt_token_ids
    assert got_prompt == prompt
    lora_ids = list(replies["medqa"].token_ids)
    assert lora_ids == list(replies[server.adapter_name].token_ids)  # alias and lineage name: same adapter
    assert lora_ids != list(replies["base"].token_ids)
    assert replies["medqa"].message.content != replies["base"].message.content
    assert lora_ids == peft_greedy(tiny_base, adapter, prompt, MAX_TOKENS)
    assert list(replies["base"].token_ids) == peft_greedy(tiny_base, None, prompt, MAX_TOKENS)
    assert getattr(replies["medqa"].message, "reasoning", None) is None  # no reasoning parser: all in content


def test_streaming_matches_non_streaming(server):
    client = server.client()
    whole = chat(client, "medqa").choices[0].message.content
    chunks = [
        c.choices[0].delta.content
        for c in chat(client, "medqa", stream=True)
        if c.choices and c.choices[0].delta.content
    ]
    assert len(chunks) > 1
    assert "".join(chunks) == whole


def _post(url: str, body: bytes, key: str | None = API_KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_bad_requests_get_4xx_and_server_stays_up(server):
    import openai

    client = server.client()
    good = json.dumps({"model": "medqa", "max_tokens": 4, "messages": [{"role": "user", "content": QUESTION}]}).encode()

    def still_up():
        code, body = _post(server.url, good)
        assert code == 200 and body["choices"][0]["message"]["content"] is not None

    with pytest.raises(openai.NotFoundError) as e:
        chat(client, "no-such-model")
    assert e.value.status_code == 404
    still_up()
    code, _ = _post(server.url, b'{"model": "medqa", "messages": [')  # truncated JSON
    assert code == 400
    still_up()
    code, _ = _post(server.url, json.dumps({"model": "medqa", "messages": "not a list"}).encode())
    assert code == 400
    still_up()
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "medqa", question="头疼" * 2100)  # > serve.max_model_len (2048) tokens
    assert e.value.status_code == 400 and "context length" in str(e.value)
    still_up()
    code, _ = _post(server.url, good, key=None)
    assert code == 401
    with pytest.raises(openai.AuthenticationError):
        chat(server.client(api_key="wrong-key"), "medqa")
    still_up()


def test_32_concurrent_requests(server):
    client = server.client()

    def one(i: int) -> float:
        t = time.perf_counter()
        r = chat(client, ("medqa", "base")[i % 2], question=f"{QUESTION} {i}")
        assert r.choices[0].message.content is not None and r.usage.completion_tokens > 0
        return time.perf_counter() - t

    t0 = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        lat = sorted(pool.map(one, range(32)))
    wall = time.perf_counter() - t0
    p50, p95 = statistics.median(lat), lat[int(0.95 * (len(lat) - 1))]
    print(f"\n32 concurrent: wall {wall:.2f} s, p50 {p50:.3f} s, p95 {p95:.3f} s, {32 / wall:.1f} req/s")
    assert len(lat) == 32
    assert 0 < p50 <= p95 <= wall < 120


def test_chat_client_one_shot(server, project, repo_params):
    # the client sends process.system_prompt
    expected = chat(server.client(), "medqa", system=repo_params.process.system_prompt).choices[0].message.content
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mediagent",
            "chat",
            "--base-url",
            f"{server.url}/v1",
            "--question",
            QUESTION,
            "--temperature",
            "0",
            "--max-tokens",
            str(MAX_TOKENS),
        ],
        cwd=project,
        env=stage_env(API_KEY=API_KEY),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n"
    # without the key: a clear message, non-zero exit
    out = subprocess.run(
        [sys.executable, "-m", "mediagent", "chat", "--base-url", f"{server.url}/v1", "-q", "x"],
        cwd=project,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and "API key" in out.stderr


def test_runtime_loading_is_off_without_the_flag(server, adapter, project):
    body = json.dumps({"lora_name": "x", "lora_path": str(adapter)}).encode()
    for route in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        req = urllib.request.Request(
            f"{server.url}{route}",
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
        assert e.value.code in (404, 405), route
    # the load command says so, after its own checks passed
    port = server.url.rsplit(":", 1)[1]
    out = subprocess.run(
        [sys.executable, "-m", "mediagent", "serve", "load", "--adapter", str(adapter), "--port", port],
        cwd=project,
        env=stage_env(API_KEY=API_KEY),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and "runtime LoRA loading off" in out.stderr, out.stderr
    assert {m.id for m in server.client().models.list().data} == {"base", server.adapter_name, "medqa"}


def test_sigterm_stops_everything(server):
    import psutil

    serve = psutil.Process(server.proc.pid)
    children = serve.children(recursive=True)
    assert len(children) >= 2, "expected vLLM's server and engine processes under mediagent serve"
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=90) == 0, server.log_tail()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], f"left behind: {[(p.pid, p.name()) for p in alive]}"
    assert "vLLM stopped" in server.log.read_text()


# ---------------------------------------------------------------- pre-start checks (no vLLM needed)


def _serve_cli(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mediagent", "serve", "--port", str(free_port()), *args],
        cwd=project,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_missing_adapter_fails_before_vllm(project, tmp_path):
    out = _serve_cli(project, "--adapter", str(tmp_path / "nope"))
    assert out.returncode == 1
    assert f"no adapter at {tmp_path / 'nope'}" in out.stderr and "dvc repro train" in out.stderr
    assert "starting vLLM" not in out.stderr


def test_rank_above_flag_fails_before_vllm(project):
    out = _serve_cli(project, "--max-lora-rank", "1")
    assert out.returncode == 1
    assert "LoRA rank 8 > --max-lora-rank 1" in out.stderr and "starting vLLM" not in out.stderr


def test_lineage_base_mismatch_fails_before_vllm(project, adapter, tmp_path):
    other = shutil.copytree(adapter, tmp_path / "other")
    lineage = json.loads((other / "lineage.json").read_text())
    lineage["base"]["id"] = "Qwen/Qwen3-8B"
    (other / "lineage.json").write_text(json.dumps(lineage))
    out = _serve_cli(project, "--adapter", str(other))
    assert out.returncode == 1
    assert "trained on base 'Qwen/Qwen3-8B' but model.base is 'tiny'" in out.stderr
    assert "starting vLLM" not in out.stderr


def test_runtime_lora_needs_loopback_or_key(project):
    out = _serve_cli(project, "--host", "0.0.0.0", "--runtime-lora")
    assert out.returncode == 1 and "--runtime-lora on 0.0.0.0" in out.stderr and "API_KEY" in out.stderr
    assert "starting vLLM" not in out.stderr
    for args, env in ((["--host", "0.0.0.0"], {"API_KEY": "k"}), ([], {})):  # with a key, or on loopback
        out = subprocess.run(
            [sys.executable, "-m", "mediagent", "serve", "--runtime-lora", "--dry-run", *args],
            cwd=project,
            env=stage_env(**env),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in out.stdout


def test_open_host_needs_a_key_or_an_explicit_opt_out(project):
    """make serve HOST=0.0.0.0: refused without API_KEY, before vLLM; with a key or ALLOW_NO_AUTH=1 it goes on."""
    env = {k: v for k, v in stage_env().items() if k not in ("API_KEY", "VLLM_API_KEY", "ALLOW_NO_AUTH")}
    out = subprocess.run(
        [sys.executable, "-m", "mediagent", "serve", "--host", "0.0.0.0"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 1 and last.startswith("error: refusing to serve on 0.0.0.0 without an API key")
    assert "API_KEY" in last and "ALLOW_NO_AUTH=1" in last and "starting vLLM" not in out.stderr
    keyed = subprocess.run(
        [sys.executable, "-m", "mediagent", "serve", "--host", "0.0.0.0", "--dry-run"],
        cwd=project,
        env={**env, "API_KEY": "k"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert keyed.returncode == 0 and "--host 0.0.0.0" in keyed.stdout and "VLLM_API_KEY=***" in keyed.stdout
    opted = subprocess.run(
        [sys.executable, "-m", "mediagent", "serve", "--host", "0.0.0.0", "--dry-run"],
        cwd=project,
        env={**env, "ALLOW_NO_AUTH": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert opted.returncode == 0 and "WITHOUT an API key" in opted.stderr and "VLLM_API_KEY" not in opted.stdout
    recipe = subprocess.run(
        ["make", "-n", "serve", "HOST=0.0.0.0", "ALLOW_NO_AUTH=1", "TP=2", "DP=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "--allow-no-auth" in recipe and "--tensor-parallel 2" in recipe and "--data-parallel 1" in recipe


def test_tensor_parallel_needs_the_gpus(project):
    """make serve TP=2 on a machine without two GPUs: an error line before vLLM starts."""
    out = _serve_cli(project, "--tensor-parallel", "2")
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 1 and last.startswith("error: TP=2 x DP=1 needs 2 GPUs, this machine has 0")
    assert "starting vLLM" not in out.stderr and "Traceback" not in out.stderr


def test_parallel_flags_reach_the_vllm_command(repo_params, tiny_base, adapter):
    from mediagent.artifacts import check_adapter
    from mediagent.vllm_command import build_command

    params = with_overrides(repo_params, model={"dir": str(tiny_base.parent), "base": "tiny"})
    a = check_adapter(adapter, params.model, None)
    cmd = build_command(params, [a], None, "127.0.0.1", 8000, tensor_parallel=4, data_parallel=2)
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "4" and cmd[cmd.index("--data-parallel-size") + 1] == "2"
    assert "--tensor-parallel-size" not in build_command(params, [a], None, "127.0.0.1", 8000)


def test_merged_missing_fails_before_vllm(project):
    out = _serve_cli(project, "--merged")
    assert out.returncode == 1 and "no merged model at" in out.stderr and "dvc repro merge" in out.stderr


def test_command_and_env(repo_params, tiny_base, adapter, tmp_path):
    from mediagent.artifacts import Merged, check_adapter
    from mediagent.vllm_command import ServeError, build_command, lora_modules, server_env

    params = with_overrides(repo_params, model={"dir": str(tiny_base.parent)})
    a = check_adapter(adapter, params.model)
    assert (a.name, a.rank) == (json.loads((adapter / "lineage.json").read_text())["name"], 8)
    b16 = check_adapter(make_adapter(tiny_base, tmp_path / "b", r=12, seed=1), params.model)
    assert b16.rank == 12

    cmd = build_command(params, [a, b16], None, "127.0.0.1", 8123)
    flag = lambda name: cmd[cmd.index(name) + 1]  # noqa: E731
    assert flag("--max-lora-rank") == "16"  # smallest vLLM rank holding r=12
    assert flag("--max-loras") == "3"  # two adapters + the alias
    assert lora_modules([a, b16], "medqa") == [f"{a.name}={a.path}", f"{b16.name}={b16.path}", f"medqa={a.path}"]
    i = cmd.index("--lora-target-modules")
    assert cmd[i + 1 : i + 8] == sorted(LORA_TARGETS)  # only what the adapters adapt: not the LM head
    assert cmd[cmd.index("--lora-modules") + 1 :] == lora_modules([a, b16], "medqa")
    assert (flag("--served-model-name"), flag("--host"), flag("--port"), flag("--dtype")) == (
        "base",
        "127.0.0.1",
        "8123",
        "float32",
    )
    assert flag("--chat-template") == str(adapter.resolve() / "chat_template.jinja")
    assert flag("--max-model-len") == str(params.serve.max_model_len)
    with pytest.raises(ServeError, match="would be called"):
        lora_modules([a, a], "medqa")

    # runtime loading: slots for later adapters, the runtime rank, every module training adapts
    rcmd = build_command(params, [a], None, "127.0.0.1", 8123, runtime_lora=True)
    rflag = lambda name: rcmd[rcmd.index(name) + 1]  # noqa: E731
    assert rflag("--max-lora-rank") == str(params.serve.runtime_max_lora_rank)
    assert rflag("--max-loras") == str(2 + params.serve.runtime_max_loras)
    i = rcmd.index("--lora-target-modules")
    assert rcmd[i + 1 : rcmd.index("--lora-modules")] == sorted(params.lora.target_modules)

    merged = Merged(path=tmp_path, name="medqa-m", lineage={}, chat_template=tmp_path / "t.jinja")
    mcmd = build_command(params, [], merged, "0.0.0.0", 9000)
    assert "--enable-lora" not in mcmd
    i = mcmd.index("--served-model-name")
    assert mcmd[i + 1 : i + 3] == ["medqa-m", "medqa"]

    env = server_env(params, "s3cret", gpu=False, environ={"PATH": "/bin", "VLLM_API_KEY": "old"}, cpus=[0, 1])
    assert env["VLLM_API_KEY"] == "s3cret" and "s3cret" not in " ".join(cmd)
    assert (env["VLLM_CPU_OMP_THREADS_BIND"], env["VLLM_CPU_NUM_OF_RESERVED_CPU"]) == ("0,1", "0")
    assert env["VLLM_CPU_KVCACHE_SPACE"] == str(params.serve.cpu_kv_cache_gib)
    assert "VLLM_API_KEY" not in server_env(params, None, False, {"VLLM_API_KEY": "old"}, [0, 1])
    # runtime updating only through --runtime-lora, never left on by a stray variable
    stray = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in server_env(params, None, False, stray, [0, 1])
    assert server_env(params, None, False, {}, [0, 1], runtime_lora=True)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    big = server_env(params, None, gpu=False, environ={}, cpus=list(range(64)))
    assert "VLLM_CPU_OMP_THREADS_BIND" not in big  # vLLM's NUMA-aware default on big machines
    assert "VLLM_CPU_KVCACHE_SPACE" not in server_env(params, None, gpu=True, environ={}, cpus=[0, 1])


def test_make_aliases_pass_the_options():
    """`make serve/load/unload` are thin aliases: each variable becomes its option."""

    def recipe(*args: str) -> str:  # -n prints the recipes without running them
        out = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return [line for line in out.stdout.splitlines() if "mediagent serve" in line][-1]

    assert recipe("serve", "EXP=r8,r32", "RUNTIME_LORA=1", "PORT=9001").split("mediagent serve", 1)[1].split() == [
        "--port",
        "9001",
        "--exp",
        "r8,r32",
        "--runtime-lora",
    ]
    assert recipe("load", "EXP=r8", "NAME=x").split("mediagent serve", 1)[1].split() == [
        "load",
        "--exp",
        "r8",
        "--name",
        "x",
    ]
    assert recipe("load", "ADAPTER=a/b").split("mediagent serve", 1)[1].split() == ["load", "--adapter", "a/b"]
    assert recipe("unload", "NAME=x", "PORT=9001").split("mediagent serve", 1)[1].split() == [
        "unload",
        "--name",
        '"x"',
        "--port",
        "9001",
    ]
