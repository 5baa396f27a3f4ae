"""Static serve-readiness checks of a trained adapter: can vLLM serve its rank, does it save
whole modules (``modules_to_save``), and does every configured target module match the base.

Used by the `evaluate` stage for ``serve_ready`` in its metrics and report.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mediagent.artifacts import adapter_rank, read_adapter_config, vllm_problems, vllm_rank


def adapter_checks(adapter_dir: Path, base_dir: Path) -> tuple[dict, dict]:
    """Static serve checks of the adapter: (flags, reasons).

    The LoRA is injected into a weightless (meta) copy of the base, so it costs nothing
    even for an 8B base; every configured target name must match at least one module.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = read_adapter_config(adapter_dir)
    problems = vllm_problems(config)
    flags = {"rank_servable": "rank" not in problems, "no_modules_to_save": "modules_to_save" not in problems}
    rank = adapter_rank(config)
    reasons = {
        "rank_servable": problems.get("rank") or f"rank {rank} servable by vLLM (--max-lora-rank {vllm_rank(rank)})",
        "no_modules_to_save": problems.get("modules_to_save", "no modules_to_save"),
    }

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as fh:
        saved = {k.split(".lora_A")[0] for k in fh.keys() if ".lora_A" in k}
    targets = config.get("target_modules") or []
    try:
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(base_dir)))
            lora = LoraConfig(**{k: v for k, v in config.items() if k in ("r", "lora_alpha", "target_modules")})
            inject_adapter_in_model(lora, meta)
        wrapped = [n for n, m in meta.named_modules() if isinstance(m, LoraLayer)]
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        wrapped, error = [], str(exc).splitlines()[0]
    else:
        error = ""
    if isinstance(targets, str):  # a regex: it matched something or nothing
        unmatched = [] if wrapped else [targets]
    else:
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in wrapped)]
    flags["targets_matched"] = bool(wrapped) and bool(saved) and not unmatched
    flags["lora_modules"] = len(wrapped)
    if flags["targets_matched"]:
        reasons["targets_matched"] = f"{len(wrapped)} modules wrapped, {len(saved)} saved with LoRA weights"
    else:
        reasons["targets_matched"] = (error or f"target_modules {unmatched} match no module of the base") + (
            "" if saved else "; the adapter file holds no LoRA weights"
        )
    return flags, reasons
