"""The `evaluate` stage's vLLM engine: a float32 offline engine on the base (with one LoRA slot)
and greedy generation from token ids, comparable with transformers' ``generate``.

The stage re-exports both (bench/evaluate.py times them as ``evaluate.open_vllm``/``generate_vllm``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mediagent.artifacts import read_adapter_config, vllm_rank
from mediagent.vllm_engine import kv_cache_bytes, lora_request, open_llm


def open_vllm(
    base_dir: Path,
    adapter_dir: Path | None,
    rank: int,
    max_model_len: int,
    max_seqs: int,
    seed: int,
    prefix_caching: bool = False,
):
    """A float32 vLLM engine on the base, with one LoRA slot when ``adapter_dir`` is given.

    ``prefix_caching``: candidates of one question share their prompt's KV blocks (the
    vLLM scorer). The CPU backend takes blocks in multiples of 32 and defaults to 128,
    longer than most question prompts, so 32 there. It runs in vLLM's own worker process;
    close it with ``close_llm``.
    """
    options = {"enable_prefix_caching": prefix_caching}
    if prefix_caching and not torch.cuda.is_available():
        options["block_size"] = 32
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the HF models of this process are gone; hand their memory back
    else:
        options["kv_cache_memory_bytes"] = kv_cache_bytes(base_dir, max_seqs * max_model_len)
    if adapter_dir is not None:
        options.update(enable_lora=True, max_lora_rank=vllm_rank(rank), max_loras=1)
        targets = read_adapter_config(adapter_dir).get("target_modules")
        if isinstance(targets, list):
            # only the adapted modules: a LoRA-wrapped LM head is slower and its CPU kernel
            # fails on prompt log-probs (one row per prompt token, not per request)
            options["lora_target_modules"] = targets
    # float32 so that greedy answers are comparable with peft's (the parity check); eager:
    # no graph capture/compilation at startup, which would cost more than a few dozen
    # evaluation answers take to generate. Prompts go in as token ids; the tokenizer only
    # decodes, and the base's has the same vocabulary.
    return open_llm(base_dir, "float32", max_model_len, seed, tokenizer=str(base_dir), enforce_eager=True, **options)


def generate_vllm(
    llm,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos: list[int],
    adapter_dir: Path | None = None,
    min_new_tokens: int = 0,
) -> list[list[int]]:
    """Greedy continuations (with the LoRA when ``adapter_dir`` is given).

    Prompts go in as token ids, so vLLM sees exactly what transformers sees.
    """
    from vllm import SamplingParams

    # greedy with no penalty, as generate_hf (scoring.GREEDY); vLLM never reads the base's generation config here
    sampling = SamplingParams(
        temperature=0.0,
        repetition_penalty=1.0,
        max_tokens=max_new_tokens,
        min_tokens=min_new_tokens,
        stop_token_ids=eos,
        skip_special_tokens=False,
    )
    lora = lora_request("tuned", adapter_dir) if adapter_dir is not None else None
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, lora_request=lora, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


# ---------------------------------------------------------------- main
