"""vLLM settings shared by the server (`serve`), offline answers (`infer`, `chat --offline`)
and generation in `evaluate`: CPU threading and KV cache, quiet logs, LoRA slots, the
offline engine itself.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mediagent import compat
from mediagent.artifacts import Adapter, check_adapter, check_merged, vllm_rank
from mediagent.chat_format import ChatFormat
from mediagent.loading import dtype_name, gpu_available, resolve_dtype
from mediagent.params import Params

# On machines with few CPUs vLLM's automatic binding keeps one core for itself and
# computes on the rest: on 2 cores that halves throughput. Above this count its NUMA- and
# SMT-aware default is the better choice, so it is left alone.
SMALL_MACHINE_CPUS = 8


def cpu_env(kv_cache_gib: int, environ: Mapping[str, str], cpus: Sequence[int]) -> dict[str, str]:
    """vLLM CPU settings not already in ``environ``: KV cache size and thread binding."""
    env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}
    if len(cpus) <= SMALL_MACHINE_CPUS:
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, sorted(cpus)))
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    return {k: v for k, v in env.items() if k not in environ}


def base_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Offline hub and warnings-only logs, unless the user set either (VLLM_LOGGING_LEVEL=INFO)."""
    env = {"HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    return {k: v for k, v in env.items() if k not in environ}


def prepare_process_env(kv_cache_gib: int, gpu: bool) -> None:
    """Set vLLM's environment for an engine in this process (read at engine start-up)."""
    os.environ.update(base_env(os.environ))
    if not gpu:
        os.environ.update(cpu_env(kv_cache_gib, os.environ, sorted(os.sched_getaffinity(0))))


def lora_target_modules(adapters: Sequence[Adapter]) -> list[str] | None:
    """The modules any adapter adapts, or None when one names them by pattern.

    Without this list vLLM wraps every supported layer, the LM head included, and its
    CPU LoRA kernels then copy the LM head's (vocabulary x rank) weights for every token
    of the batch: 3-4x slower decoding on the tiny model for modules no adapter touches.
    """
    if not adapters or any(a.target_modules is None for a in adapters):
        return None
    return sorted({m for a in adapters for m in a.target_modules})


def lora_options(adapters: Sequence[Adapter], slots: int | None = None) -> dict:
    """LoRA engine arguments for these adapters: rank rounded up, one slot each, their modules."""
    if not adapters:
        return {}
    options = {
        "enable_lora": True,
        "max_lora_rank": vllm_rank(max(a.rank for a in adapters)),
        "max_loras": slots or len(adapters),
    }
    targets = lora_target_modules(adapters)
    if targets:
        options["lora_target_modules"] = targets
    return options


def vllm_status() -> tuple[bool, str]:
    """(importable, reason) for the vLLM backend."""
    try:
        importlib.import_module("vllm")
    except Exception as exc:  # a broken install raises more than ImportError
        return False, "vllm not installed" if isinstance(exc, ModuleNotFoundError) else f"vllm import failed: {exc}"
    return True, "vllm importable"


def kv_cache_bytes(model_dir: Path, tokens: int, dtype_bytes: int = 4) -> int:
    """KV-cache room for ``tokens`` tokens (vLLM on CPU otherwise reserves ~90% of RAM)."""
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    per_token = 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes
    return max(64 << 20, 2 * tokens * per_token)


def open_llm(
    model_dir: Path,
    dtype: str,
    max_model_len: int,
    seed: int = 0,
    adapters: Sequence[Adapter] = (),
    trust_remote_code: bool = False,
    **options,
):
    """vLLM's offline engine on ``model_dir`` with LoRA slots for ``adapters``."""
    from vllm import LLM

    return LLM(
        model=str(model_dir),
        dtype=dtype,
        max_model_len=max_model_len,
        seed=seed,
        trust_remote_code=trust_remote_code,
        **lora_options(adapters),
        **options,
    )


@dataclass
class Engine:
    """vLLM's offline engine with the LoRA request (None for a merged model) to use."""

    llm: Any
    lora: Any
    name: str  # what answers are attributed to: lineage name
    model_dir: Path
    tokenizer_dir: Path


def open_engine(params: Params, adapter: str | Path | None = None, merged: bool = False) -> Engine:
    """Check the model like `serve` does, then start vLLM's offline engine on it in this process."""
    gpu = gpu_available()
    prepare_process_env(params.serve.cpu_kv_cache_gib, gpu)
    if not gpu:
        # On CPU a separate engine process only costs a second vLLM start-up (~half the
        # load time) and competes for the same cores.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    common = dict(
        dtype=dtype_name(resolve_dtype(params.model, gpu)),
        max_model_len=params.serve.max_model_len,
        trust_remote_code=params.model.trust_remote_code,
    )
    if merged:
        m = check_merged(params.merge.output_dir, params.model)
        return Engine(open_llm(m.path, **common), None, m.name, m.path, m.path)
    a = check_adapter(adapter or params.train.output_dir, params.model)
    llm = open_llm(params.model.path, adapters=[a], **common)
    return Engine(llm, lora_request(a.name, a.path), a.name, params.model.path, a.path)


def close_llm(llm) -> None:
    """Stop the engine's worker process now (not at interpreter exit) and free its memory."""
    compat.shutdown_engine(llm)
    gc.collect()


def lora_request(name: str, path: str | Path, slot: int = 1):
    """vLLM's handle on an adapter folder (``slot``: its integer id in the engine)."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(name, slot, str(path))


def sampling_params(tokenizer, max_tokens: int, temperature: float = 0.0, seed: int = 0, **options):
    from vllm import SamplingParams

    return SamplingParams(
        temperature=temperature,
        max_tokens=max_tokens,
        seed=seed,
        stop_token_ids=ChatFormat.of(tokenizer).stop_ids,
        **options,
    )
