"""The `merge` stage: fold the LoRA adapter into the base model and prove nothing changed.

Reads  ``<model.dir>/<model.base>`` (base model), ``train.output_dir`` (adapter, tokenizer,
       chat template, lineage.json), ``<data.processed_dir>/test.jsonl`` (or val.jsonl)
       for held-out parity sequences; params ``model``, ``merge``.
Writes ``merge.output_dir``: safetensors shards in the base model's dtype, config,
       generation config, the adapter's tokenizer files (so the chat template is exactly
       the training one) and ``lineage.json`` = the adapter's lineage plus a ``merge``
       entry; ``merge.metrics_file``: the recorded logits parity.

Run: ``python -m mediagent.pipeline.merge`` (or ``dvc repro merge``).

Parity: the merged model is saved, reloaded from disk and its logits on
``merge.parity_prompts`` held-out prompt+answer sequences are compared with the unmerged
base + adapter (peft), both computed in the base's own dtype, so the check measures the
merge and nothing else (a float32 reference against a bfloat16 model would mostly measure
bfloat16 arithmetic). The bound: ``merge.tolerance`` (absolute) for float32 bases; for
16-bit bases, where the merged weights are rounded to the dtype,
``max(merge.tolerance, merge.relative_tolerance x max |reference logit|)``. Above it the
stage fails and nothing is moved into place (the previous merged model, if any, stays).
The measured diff, the bound, the dtype and the shard count go to ``merge.metrics_file``.

Multi-GB models and the DVC cache: DVC copies outputs into its cache by default
(``reflink,copy``), so a 16 GB merged Qwen3-8B would take 32 GB and a long copy. On a
filesystem without reflinks, let DVC link instead (per clone, so use ``--local``):

    dvc config --local cache.type reflink,hardlink,symlink,copy

Linked outputs are made read-only (``cache.protected`` is obsolete in DVC 3: links are
always protected); this stage never edits its output in place — it writes a new directory
and renames it — so that is safe. Keep the cache on the same filesystem as the workspace
(``dvc cache dir``) or hardlinks/reflinks fall back to copies. The tiny default is a few
dozen MB and the default copy is fine.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from mediagent.artifacts import check_adapter_files, check_lineage_base, read_lineage
from mediagent.chat_format import ChatFormat, resolve_template
from mediagent.errors import UserError, run_stage
from mediagent.fileio import atomic_path, md5_file, read_jsonl, write_json
from mediagent.loading import check_model_dir, load_model, load_tokenizer
from mediagent.params import MergeParams, ModelParams, Params

log = logging.getLogger(__name__)

# Files that make up a tokenizer and its chat template (whatever the adapter holds of them
# is copied, so the merged model renders prompts exactly like training did).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
# Parity sequences are cut here: enough to cover prompt and answer start, cheap on 8B.
PARITY_MAX_TOKENS = 512


class MergeError(UserError):
    """Inputs are missing or inconsistent; the message names the fix."""


class ParityError(MergeError):
    """The merged model's logits differ from base + adapter beyond merge.tolerance."""


# ---------------------------------------------------------------- input checks


def base_dtype(base_dir: Path) -> torch.dtype:
    """The dtype the base checkpoint is stored in; refuses quantized bases.

    Merging into quantized weights rounds the LoRA delta away (or fails); merge onto the
    full-precision checkpoint instead.
    """
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise MergeError(
            f"{base_dir} is quantized ({method}); merging into quantized weights loses the adapter. "
            f"Point model.base at the full-precision (bfloat16/float32) checkpoint"
        )
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise MergeError(f"{base_dir / 'config.json'}: unsupported dtype {name!r}")
    return dtype


def parity_sequences(processed_dir: Path, tokenizer, n: int, max_tokens: int = PARITY_MAX_TOKENS) -> list[list[int]]:
    """Token ids of the first ``n`` held-out examples (prompt + answer + the turn's end token).

    Full sequences, not prompts alone: the adapter changes what the model predicts inside
    the answer, which is where a wrong merge shows most.
    """
    for name in ("test.jsonl", "val.jsonl"):
        path = processed_dir / name
        if path.is_file() and path.stat().st_size:
            rows = read_jsonl(path)[:n]
            fmt = ChatFormat.of(tokenizer)
            return [fmt.encode(r["messages"], max_tokens).input_ids for r in rows]
    raise MergeError(f"no held-out examples in {processed_dir} (test.jsonl/val.jsonl): run `dvc repro process`")


# ---------------------------------------------------------------- pure model functions


@torch.no_grad()
def sequence_logits(model, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Float32 logits per sequence, one forward each (no padding that could blur a diff)."""
    device = next(model.parameters()).device
    return [model(torch.tensor([seq], device=device)).logits[0].float().cpu() for seq in sequences]


def logits_parity(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> dict:
    """Max and mean |difference| between two lists of logits tensors of equal shapes."""
    diffs = [(a - b).abs() for a, b in zip(reference, candidate, strict=True)]
    total = sum(d.numel() for d in diffs)
    return {
        "max_abs_diff": max(float(d.max()) for d in diffs),
        "mean_abs_diff": sum(float(d.sum()) for d in diffs) / total,
        "prompts": len(diffs),
        "tokens": sum(d.shape[0] for d in diffs),
    }


def parity_bound(logit_scale: float, dtype: torch.dtype, tolerance: float, relative: float) -> float:
    """The largest acceptable |logit diff|: absolute in float32, relative to the logits in 16 bits.

    Rounding a merged weight to bfloat16 changes it by up to 2^-8 of its size; the logits
    move by a similar fraction of their own scale, whatever that scale is. A fixed absolute
    bound would be too loose for small logits and fail for large ones.
    """
    if dtype == torch.float32:
        return tolerance
    return max(tolerance, relative * logit_scale)


def check_parity(stats: dict, bound: float, dtype: torch.dtype) -> None:
    if not stats["max_abs_diff"] <= bound:  # also catches NaN
        fix = "merge.relative_tolerance" if dtype != torch.float32 else "merge.tolerance"
        raise ParityError(
            f"merge parity failed: max |logit diff| {stats['max_abs_diff']:.3g} > bound {bound:.3g} "
            f"(mean {stats['mean_abs_diff']:.3g} over {stats['prompts']} sequences, both computed in "
            f"{str(dtype).removeprefix('torch.')}): merged weights do not reproduce base + adapter. "
            f"If a looser bound is acceptable, raise {fix}."
        )


def check_tied_embeddings(model) -> None:
    """A tied model must come back tied (lm_head sharing the input embedding)."""
    if getattr(model.config, "tie_word_embeddings", False):
        out, inp = model.get_output_embeddings().weight, model.get_input_embeddings().weight
        if out.data_ptr() != inp.data_ptr():
            raise MergeError("merged model has tie_word_embeddings but lm_head is not tied after reload")


def merge_to_dir(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    sequences: Sequence[Sequence[int]],
    model: ModelParams,
    max_shard_size: str,
    after_reload: Callable[[torch.nn.Module], None] | None = None,
    quantized_reference: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
) -> tuple[torch.dtype, dict]:
    """Merge, save with the adapter's tokenizer into ``out_dir``, reload, measure parity.

    Returns (base dtype, parity stats incl. the largest |reference logit|).

    ``after_reload`` sees the reloaded merged model before its logits are taken; tests use
    it to tamper with a weight and prove the parity check fails. ``quantized_reference``:
    logits of the adapter on the 4-bit base it was trained on, and of that base alone;
    stats["quantized"] then holds the first's difference from the merged model's, and
    ``base_rounding`` the second's from the unquantized base's (what 4-bit rounding alone does).
    """
    from peft import PeftModel

    dtype = base_dtype(base_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # One copy of the model in memory at a time, in the base's dtype: base + adapter gives
    # the reference logits, is merged in place, saved, then the saved model is reloaded.
    peft_model = PeftModel.from_pretrained(load_model(base_dir, model, dtype).to(device), str(adapter_dir))
    peft_model.eval()
    reference = sequence_logits(peft_model, sequences)
    if quantized_reference is not None:
        with peft_model.disable_adapter():
            base_reference = sequence_logits(peft_model, sequences)
    merged = peft_model.merge_and_unload()
    # transformers 5 always writes safetensors; tied weights are stored once.
    merged.save_pretrained(out_dir, max_shard_size=max_shard_size)
    del merged, peft_model
    copy_tokenizer(adapter_dir, out_dir)

    reloaded = load_model(out_dir, model, dtype).to(device)
    check_tied_embeddings(reloaded)
    if after_reload is not None:
        after_reload(reloaded)
    merged_logits = sequence_logits(reloaded, sequences)
    stats = logits_parity(reference, merged_logits)
    stats["reference_max_abs_logit"] = max(float(r.abs().max()) for r in reference)
    if quantized_reference is not None:
        tuned_4bit, base_4bit = quantized_reference
        stats["quantized"] = logits_parity(tuned_4bit, merged_logits)
        stats["quantized"]["base_rounding"] = logits_parity(base_4bit, base_reference)["max_abs_diff"]
    return dtype, stats


def quantized_logits(
    base_dir: Path, adapter_dir: Path, sequences, model: ModelParams, dtype: torch.dtype, quantization: str
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Logits of the adapter on the quantized base it was trained on (QLoRA), to compare with
    the merged model: what the adapter did in training vs what merge, evaluate and serve use;
    and of that quantized base alone, to measure what the rounding by itself changes."""
    from peft import PeftModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = load_model(base_dir, model, dtype, quantization=quantization)
    peft_model = PeftModel.from_pretrained(base if device == "cpu" else base.to(device), str(adapter_dir)).eval()
    tuned = sequence_logits(peft_model, sequences)
    with peft_model.disable_adapter():
        untuned = sequence_logits(peft_model, sequences)
    del peft_model, base
    return tuned, untuned


def check_quantized_parity(stats: dict, factor: float) -> float:
    """The bound for merged vs adapter-on-4-bit logits; fail above it. Returns the bound.

    The bound is ``factor`` x what 4-bit rounding alone does to the untuned base on the same
    sequences (``base_rounding``), not a share of the logits: that rounding depends on the
    model and on the CPU/GPU kernels that dequantize, so only a figure measured on the same
    machine says whether the adapter itself leans on the rounding.
    """
    q = stats["quantized"]
    bound = factor * q["base_rounding"]
    if not q["max_abs_diff"] <= bound:
        raise ParityError(
            f"merged model vs the adapter on its 4-bit training base: max |logit diff| {q['max_abs_diff']:.3g} > "
            f"bound {bound:.3g} (merge.quantized_rounding_factor {factor} x {q['base_rounding']:.3g}, what 4-bit "
            f"rounding alone changes in the untuned base): the adapter behaves differently off the 4-bit base; "
            f"train without quantization or raise the factor"
        )
    return bound


def check_chat_template(tokenizer, adapter_dir: Path, params: Params) -> None:
    """The adapter's template must be the one ``model.chat_template`` names (the training
    format): the merged model copies it, and vLLM serves what it says."""
    m = params.model
    expected = resolve_template(m.chat_template, m.chat_template_kwargs, load_tokenizer(m.path, m.trust_remote_code))
    if tokenizer.chat_template != expected:
        raise MergeError(
            f"the chat template in {adapter_dir} is not the format model.chat_template={m.chat_template!r} gives; "
            f"retrain with `dvc repro train`"
        )
    ChatFormat.of(tokenizer).end_id  # noqa: B018 - fails now, not at serving, on a template without an end token


def copy_tokenizer(adapter_dir: Path, out_dir: Path) -> None:
    """The adapter's tokenizer files byte for byte, so the merged model renders prompts alike."""
    for name in TOKENIZER_FILES:
        if (adapter_dir / name).is_file():
            shutil.copyfile(adapter_dir / name, out_dir / name)


def merge_lineage(lineage: dict, adapter_dir: Path, dtype: torch.dtype, params: Params) -> dict:
    """The adapter's lineage plus how it was merged (no timings: same inputs, same bytes)."""
    return {
        **lineage,
        "merge": {
            "adapter_md5": md5_file(adapter_dir / "adapter_model.safetensors"),
            "dtype": str(dtype).removeprefix("torch."),
            "max_shard_size": params.merge.max_shard_size,
            "parity_prompts": params.merge.parity_prompts,
            "tolerance": params.merge.tolerance,
            "relative_tolerance": params.merge.relative_tolerance,
        },
    }


def check_merge_parity(stats: dict, dtype: torch.dtype, merge: MergeParams, quantization: str | None) -> float:
    """Log and check the merged model's parity with base + adapter; returns the bound it met.

    With `quantization` (an adapter trained on a 4-bit base) the merged model is also checked
    against the adapter on that base, and stats["quantized"] gets its bound and quantization.
    """
    bound = parity_bound(stats["reference_max_abs_logit"], dtype, merge.tolerance, merge.relative_tolerance)
    log.info(
        "parity (%s): max |diff| %.3g, mean %.3g over %d sequences (%d tokens), bound %.3g",
        str(dtype).removeprefix("torch."),
        stats["max_abs_diff"],
        stats["mean_abs_diff"],
        stats["prompts"],
        stats["tokens"],
        bound,
    )
    check_parity(stats, bound, dtype)
    if quantization is not None:
        stats["quantized"]["bound"] = check_quantized_parity(stats, merge.quantized_rounding_factor)
        stats["quantized"]["quantization"] = quantization
        log.info(
            "merged vs adapter on the %s base: max |diff| %.3g, mean %.3g, bound %.3g (the base's own rounding %.3g)",
            quantization,
            stats["quantized"]["max_abs_diff"],
            stats["quantized"]["mean_abs_diff"],
            stats["quantized"]["bound"],
            stats["quantized"]["base_rounding"],
        )
    return bound


def main(params: Params, after_reload: Callable[[torch.nn.Module], None] | None = None) -> None:
    base_dir = params.model.path
    adapter_dir = Path(params.train.output_dir)
    out_dir = Path(params.merge.output_dir)
    log.info("merge params: %s", params.merge)

    check_model_dir(base_dir)
    check_adapter_files(adapter_dir)
    lineage = read_lineage(adapter_dir, "adapter", "rerun `dvc repro train`")
    check_lineage_base(lineage, params.model, f"adapter {adapter_dir}")
    base_dtype(base_dir)  # refuse a quantized base before loading anything
    tokenizer = load_tokenizer(adapter_dir)
    check_chat_template(tokenizer, adapter_dir, params)
    sequences = parity_sequences(Path(params.data.processed_dir), tokenizer, params.merge.parity_prompts)

    # QLoRA: the adapter was trained on a 4-bit base; it is merged onto the unquantized one
    # (never onto the 4-bit weights), and measured against what it was trained on as well.
    quantization = (lineage.get("plan") or {}).get("quantization", "none")
    reference_4bit = None
    if quantization != "none":
        reference_4bit = quantized_logits(
            base_dir, adapter_dir, sequences, params.model, base_dtype(base_dir), quantization
        )
    with atomic_path(out_dir, is_dir=True) as tmp:
        dtype, stats = merge_to_dir(
            base_dir,
            adapter_dir,
            tmp,
            sequences,
            params.model,
            params.merge.max_shard_size,
            after_reload,
            reference_4bit,
        )
        bound = check_merge_parity(stats, dtype, params.merge, quantization if reference_4bit is not None else None)
        write_json(tmp / "lineage.json", merge_lineage(lineage, adapter_dir, dtype, params))
        shards = len(list(tmp.glob("*.safetensors")))
    write_json(
        params.merge.metrics_file,
        {
            **stats,
            "tolerance": bound,
            "dtype": str(dtype).removeprefix("torch."),
            "shards": shards,
        },
    )
    log.info("merged %s + %s -> %s (%s)", base_dir, adapter_dir, out_dir, dtype)


if __name__ == "__main__":
    run_stage(main)
