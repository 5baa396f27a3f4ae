"""Model loading shared by every stage: where a checkpoint is complete, which dtype to use.

Weights load only from safetensors and ``trust_remote_code`` is off unless
``model.trust_remote_code`` says otherwise. The dtype rule lives here once: ``auto`` is
bfloat16 on a GPU that supports it, float32 elsewhere (CPU matmuls in bf16 are slow, and
float32 keeps vLLM's answers equal to peft's); transformers and vLLM both follow it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mediagent.errors import UserError
from mediagent.params import ModelParams

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


class BaseModelError(UserError):
    """The model directory is missing or unusable; the message says which command fixes it."""


def check_model_dir(path: Path) -> None:
    """Fail early, naming the fix, if ``path`` is not a usable safetensors checkpoint."""
    if not path.is_dir():
        raise BaseModelError(
            f"base model not found at {path}: run `make base` (downloads model.base), "
            f"or copy the checkpoint there, or set model.base=tiny"
        )
    missing = [n for n in ("config.json", "tokenizer_config.json") if not (path / n).is_file()]
    if not any((path / n).is_file() for n in WEIGHT_FILES):
        if list(path.glob("*.bin")) or list(path.glob("*.pt")):
            raise BaseModelError(f"{path} holds pickle weights (.bin/.pt); only safetensors are loaded")
        missing.append("model.safetensors")
    if missing:
        raise BaseModelError(f"{path} is not a complete checkpoint: missing {', '.join(missing)}; rerun `make base`")


def gpu_available() -> bool:
    return torch.cuda.is_available()


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_dtype(model: ModelParams, gpu: bool | None = None) -> torch.dtype:
    """``model.dtype``, with auto = bfloat16 on a bf16-capable GPU, else float32."""
    if model.dtype != "auto":
        return getattr(torch, model.dtype)
    gpu = gpu_available() if gpu is None else gpu
    if gpu and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16`` (what vLLM's --dtype and config.json call it)."""
    return str(dtype).removeprefix("torch.")


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def load_model(path: str | Path, model: ModelParams, dtype: torch.dtype | None = None, quantization: str = "none"):
    """A causal LM from safetensors only (no pickle), in eval mode.

    ``quantization="nf4"``: the decoder's linear layers in 4-bit NF4 with double-quantised
    constants (bitsandbytes, the QLoRA recipe), computing in ``dtype``. Only training uses
    it; merge, evaluate and serve load the unquantized base.
    """
    from transformers import AutoModelForCausalLM

    check_model_dir(Path(path))
    dtype = dtype or resolve_dtype(model)
    kwargs = {}
    if quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    elif quantization != "none":
        raise ValueError(f"unknown quantization {quantization!r}")
    return AutoModelForCausalLM.from_pretrained(
        str(path),
        dtype=dtype,
        use_safetensors=True,
        trust_remote_code=model.trust_remote_code,
        **kwargs,
    ).eval()
