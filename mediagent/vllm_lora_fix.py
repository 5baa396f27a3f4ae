"""vLLM plugin: a base-model token never gets an adapter's LoRA delta on the CPU build.

vLLM marks a token of a request to the base model with LoRA index -1. Its CPU LoRA ops
(``vllm/lora/ops/torch_ops/lora_ops.py``: ``bgmv_shrink``, ``bgmv_expand``,
``bgmv_expand_slice``, reached from ``PunicaWrapperCPU`` directly and through the
``sgmv_*`` ops) index the stacked adapter weights with that index unmasked, and -1 selects
the last slot. Once every ``--max-loras`` slot has held an adapter, base requests that share
a batch with adapter requests are answered with the last slot's adapter. The GPU kernels
skip -1; fixes upstream are unreleased (vllm-project/vllm PRs 48421 and 49656).

:func:`register` is a ``vllm.general_plugins`` entry point (pyproject.toml), so vLLM runs
it in every process it starts — API server, engine core and workers — not only in ours. It
first checks whether the installed vLLM still has the bug (one op call on tiny tensors) and
patches only then, so a fixed vLLM runs untouched. The patched ops leave base tokens'
output rows exactly as they were, which is what the GPU kernels do by skipping them. GPU and XPU builds use other ops and are not touched.
"""

from __future__ import annotations

import functools
import logging

from mediagent import compat

log = logging.getLogger(__name__)


def has_negative_index_bug(shrink) -> bool:
    """True if ``shrink`` gives a token with index -1 the last slot's weights."""
    import torch

    inputs = torch.ones(1, 2)
    weights = torch.stack([torch.zeros(3, 2), torch.ones(3, 2)])  # slot 0 zero, last slot not
    out = torch.zeros(1, 3)
    shrink(inputs, weights, out, torch.tensor([-1]), 1.0)
    return bool(out.abs().sum() > 0)


def _base_rows(indices, rows: int):
    """Boolean mask of the output rows that belong to base tokens (index < 0)."""
    base = indices < 0
    if base.numel() == rows:
        return base
    # one index for every row (a single-sequence batch): all or nothing
    return base[:1].expand(rows)


def masked(original):
    """``original`` (any of ``compat.CPU_LORA_OPS``) with base tokens' output rows left exactly as they were.

    Their rows are computed with slot 0 (a valid index) and then restored: shrink writes
    its buffer, expand adds to or writes the layer output, and for base tokens neither may
    change — the GPU kernels skip them.
    """

    @functools.wraps(original)
    def op(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs):
        base = lora_indices_tensor < 0
        if not bool(base.any()):
            return original(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs)
        rows = _base_rows(lora_indices_tensor, output_tensor.shape[0])
        kept = output_tensor[rows].clone()
        original(inputs, lora_weights, output_tensor, lora_indices_tensor.clamp(min=0), *args, **kwargs)
        output_tensor[rows] = kept
        return None

    return op


def register() -> None:
    """Entry point (``vllm.general_plugins``): patch the CPU LoRA ops if they have the bug."""
    modules = compat.cpu_lora_op_modules()
    if modules is None:  # a vLLM without these modules: nothing to patch
        return
    lora_ops = modules[0]
    if getattr(lora_ops, "_mediagent_masked", False):
        return
    if not has_negative_index_bug(lora_ops.bgmv_shrink):
        log.debug("vLLM's CPU LoRA ops skip base tokens already; not patched")
        return
    patched = {name: masked(getattr(lora_ops, name)) for name in compat.CPU_LORA_OPS}
    for module in modules:  # every namespace that holds them (see compat.cpu_lora_op_modules)
        for name, fn in patched.items():
            if hasattr(module, name):
                setattr(module, name, fn)
    lora_ops._mediagent_masked = True
    log.info("vLLM CPU LoRA ops patched: base tokens (index -1) get no adapter delta")
