"""Disk a training job needs, from the base's config.json and params, before anything downloads.

Used by ``mediagent preflight``. Sizes follow what the stages write:

- base and merged model: every weight in the base's 16-bit dtype (safetensors, headers aside);
- adapter: the LoRA matrices in float32 (peft keeps adapter weights in float32 on a 16-bit
  base: ``autocast_adapter_dtype``);
- checkpoints: per kept checkpoint (``train.save_total_limit``) the adapter plus AdamW's two
  float32 moments per trained parameter; scratch, emptied after a successful run;
- DVC cache: base, adapter and merged model once. ``.dvc/config`` links outs to the cache
  (``reflink,hardlink,symlink,copy``, first that works), so the workspace copies cost nothing
  more where a link works; where the cache and workspace sit on different filesystems (or a
  FUSE mount refuses links) DVC copies, and the same bytes count twice.
"""

from __future__ import annotations

from mediagent.memory import Arch, lora_param_count, weight_bytes
from mediagent.params import Params

GB = 1e9
LINK_ASSUMPTION = (
    "DVC links workspace outs to the cache (reflink/hardlink/symlink); with copy, add base+merged+adapter again"
)


def disk_bytes(config: dict, params: Params, weight_dtype_bytes: int = 2) -> dict[str, int | str]:
    """Bytes on disk for the base, merged model, adapter, checkpoints and DVC cache, and a total."""
    arch = Arch.from_config(config)
    base = weight_bytes(arch, weight_dtype_bytes)
    lora = lora_param_count(arch, params.lora.r, params.lora.target_modules)
    adapter = 4 * lora
    checkpoints = params.train.save_total_limit * (adapter + 8 * lora)
    cache = 2 * base + adapter  # base + merged model + adapter, stored once
    return {
        "base": base,
        "merged": base,
        "adapter": adapter,
        "checkpoints": checkpoints,
        "dvc_cache": cache,
        "total": cache + checkpoints,  # the workspace links to the cache: nothing more
        "assumes": LINK_ASSUMPTION,
    }


def format_disk(disk: dict[str, int | str]) -> str:
    parts = ", ".join(f"{k} {disk[k] / GB:.2f} GB" for k in ("base", "merged", "adapter", "checkpoints", "dvc_cache"))
    return f"disk: {parts}; total ~{disk['total'] / GB:.1f} GB ({disk['assumes']})"
