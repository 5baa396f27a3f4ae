"""Resuming an interrupted `train` run: what identifies a run, and its checkpoints.

Checkpoints live in <train.checkpoint_dir> next to a run record (run.json) holding the
fingerprint of the params, data, base and launch that wrote them; a rerun resumes only from
checkpoints of the same fingerprint and discards the others.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from mediagent.fileio import md5_file
from mediagent.params import Params

# The run record next to the checkpoints: which params/data they belong to.
RUN_FILE = "run.json"
# Where every rank saves the final adapter before the main process publishes it.
STAGING = "final"

# Whole-file hashing of the base for the resume fingerprint stops being cheap above this;
# bigger checkpoints are identified by file names, sizes and mtimes instead.
HASH_BASE_WEIGHTS_BELOW = 1 << 30


def _md5_json(obj: Any) -> str:
    return hashlib.md5(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def params_hash(params: Params) -> str:
    """md5 over the params that define the adapter (lora, train, which base)."""
    return _md5_json(
        {
            "lora": dataclasses.asdict(params.lora),
            "train": dataclasses.asdict(params.train),
            "model": {"base": params.model.base, "revision": params.model.revision},
        }
    )


def base_identity(path: Path) -> dict[str, Any]:
    """What identifies the base checkpoint's content, as cheaply as its size allows."""
    weights = sorted(path.glob("*.safetensors"))
    ident: dict[str, Any] = {"config_md5": md5_file(path / "config.json")}
    if sum(f.stat().st_size for f in weights) < HASH_BASE_WEIGHTS_BELOW:
        ident["weights"] = {f.name: md5_file(f) for f in weights}
    else:  # conservative: a re-downloaded copy (new mtime) discards old checkpoints
        ident["weights"] = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in weights}
    return ident


def run_fingerprint(
    params: Params, data_md5: dict[str, str], base: dict[str, Any], world_size: int, plan: dict[str, Any] | None = None
) -> str:
    """Checkpoints are resumable only by a run with this same fingerprint."""
    return _md5_json(
        {
            "model": dataclasses.asdict(params.model),
            "lora": dataclasses.asdict(params.lora),
            "train": dataclasses.asdict(params.train),
            "data": data_md5,
            "base": base,
            "world_size": world_size,  # batches per step and optimizer shards depend on it
            "plan": plan,  # micro-batching and a 4-bit base change what a checkpoint holds
        }
    )


# ---------------------------------------------------------------- checkpoints


def _complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """checkpoint-N dirs, oldest first, that were fully written (trainer_state.json is saved last)."""
    found = [p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    found.sort(key=lambda p: int(p.name.split("-", 1)[1]))
    return [p for p in found if (p / "trainer_state.json").is_file()]


def clear_checkpoints(ckpt_dir: Path) -> None:
    """Remove what this stage put in the checkpoint dir (and nothing else a user may keep there)."""
    if not ckpt_dir.is_dir():
        return
    for p in list(ckpt_dir.glob("checkpoint-*")) + [ckpt_dir / STAGING]:
        if p.is_dir():
            shutil.rmtree(p)
    (ckpt_dir / RUN_FILE).unlink(missing_ok=True)
    if not any(ckpt_dir.iterdir()):
        ckpt_dir.rmdir()


def discard_stale_checkpoints(ckpt_dir: Path, fingerprint: str, log: logging.Logger) -> None:
    """Keep only checkpoints a run with this fingerprint can resume from (main process only).

    Checkpoints of other params/data (or without a run record) are removed, with the
    reason logged to `log` (the stage's logger, so the lines carry the stage's name);
    a checkpoint cut off mid-write is removed so the one before it is used.
    """
    if not ckpt_dir.is_dir() or not any(ckpt_dir.iterdir()):
        return
    record = _read_record(ckpt_dir)
    complete = _complete_checkpoints(ckpt_dir)
    if complete and record.get("fingerprint") == fingerprint:
        for p in sorted(ckpt_dir.glob("checkpoint-*")):
            if p.is_dir() and p not in complete:
                log.warning("removing incomplete %s (interrupted while saving)", p.name)
                shutil.rmtree(p)
        return
    why = (
        "no complete checkpoint"
        if not complete
        else "no run record"
        if not record
        else "they come from other params or data"
    )
    log.info("discarding old checkpoints in %s: %s", ckpt_dir, why)
    clear_checkpoints(ckpt_dir)


def resumable_checkpoint(ckpt_dir: Path, fingerprint: str) -> Path | None:
    """The latest complete checkpoint of a run with this fingerprint, or None."""
    complete = _complete_checkpoints(ckpt_dir) if ckpt_dir.is_dir() else []
    if complete and _read_record(ckpt_dir).get("fingerprint") == fingerprint:
        return complete[-1]
    return None


def _read_record(ckpt_dir: Path) -> dict:
    path = ckpt_dir / RUN_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
