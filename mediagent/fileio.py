"""Small I/O helpers shared by the stages: atomic outputs, JSON/JSONL, hashes.

Every stage writes its outs through ``atomic_path``: work happens in a temporary sibling
and is renamed into place only when it succeeded, so a failed run never leaves a
half-written out and never destroys the previous one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson


@contextlib.contextmanager
def atomic_path(target: str | Path, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success move it onto ``target``.

    Rename is atomic on one filesystem; for a directory the old one is first moved
    aside and removed only after the new one is in place.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the out should read like any other dir
    work = tmp if is_dir else tmp / target.name
    try:
        yield work
        if is_dir:
            old = None
            if target.exists():
                old = target.parent / f".{target.name}.old.{os.getpid()}"
                os.replace(target, old)
            os.replace(work, target)
            if old is not None:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(work, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> None:
    """Pretty, key-sorted JSON (stable bytes for DVC), written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def dump_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Write rows as UTF-8 JSON lines to an already-temporary path; return the count."""
    n = 0
    with open(path, "wb") as fh:
        for row in rows:
            fh.write(orjson.dumps(row))
            fh.write(b"\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, "rb") as fh:
        return [orjson.loads(line) for line in fh if line.strip()]


def git_blob_id(source: str | Path | bytes) -> str:
    """The id ``git hash-object`` prints (sha1 of ``b"blob <size>\\0"`` + content) of a file or bytes.

    GitHub raw files and the hub's etags for small files are named by it.
    """
    if isinstance(source, bytes):
        return hashlib.sha1(b"blob %d\0" % len(source) + source).hexdigest()
    h = hashlib.sha1(b"blob %d\0" % Path(source).stat().st_size)
    with open(source, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def md5_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def md5_dir(path: str | Path) -> str:
    """Content hash of a directory: md5 over sorted (relative path, file md5) pairs."""
    path = Path(path)
    h = hashlib.md5()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{md5_file(f)}\n".encode())
    return h.hexdigest()
