"""The vLLM server's command line and environment for ``mediagent serve``: which model and
adapters it serves under which names, its LoRA slots, and the variables it runs with.

Pure functions (nothing is started here), so the dry run and the tests see exactly what a
real start would run.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from mediagent.artifacts import Adapter, Merged, vllm_rank
from mediagent.errors import UserError
from mediagent.loading import dtype_name, resolve_dtype
from mediagent.params import Params
from mediagent.vllm_engine import base_env, cpu_env, lora_target_modules

VLLM_SERVER = "vllm.entrypoints.launchers.api_server.entry"


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
    model_dir, names, template = served_model(params, adapters, merged)
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
        str(params.serve.max_model_len),
        "--dtype",
        dtype,
        "--chat-template",
        str(template),
    ]
    if params.model.trust_remote_code:
        cmd.append("--trust-remote-code")
    cmd += lora_args(params, adapters, merged, max_lora_rank, runtime_lora)
    # vLLM's own scale-out: shards of one model over GPUs (TP) and replicas (DP).
    if tensor_parallel > 1:
        cmd += ["--tensor-parallel-size", str(tensor_parallel)]
    if data_parallel > 1:
        cmd += ["--data-parallel-size", str(data_parallel)]
    return cmd


def served_model(params: Params, adapters: Sequence[Adapter], merged: Merged | None) -> tuple[Path, list[str], Path]:
    """(model dir, its served names, chat template): the merged model, or the base.

    The template is the one saved with the merged model or the first adapter (what it was
    trained with), else the model dir's own.
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
    return model_dir, names, template


def lora_args(
    params: Params,
    adapters: Sequence[Adapter],
    merged: Merged | None,
    max_lora_rank: int | None,
    runtime_lora: bool,
) -> list[str]:
    """The LoRA part of the command line (none without adapters or runtime loading)."""
    serve = params.serve
    if runtime_lora and merged is not None:
        raise ServeError("--runtime-lora loads adapters of the base; the merged model takes none: drop --merged")
    if not (adapters or runtime_lora):
        return []
    if max_lora_rank is not None:
        rank = max_lora_rank
    elif runtime_lora:
        rank = serve.runtime_max_lora_rank
    else:
        rank = vllm_rank(max(a.rank for a in adapters))
    modules = lora_modules(adapters, serve.alias)
    cmd = [
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
    return cmd


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
