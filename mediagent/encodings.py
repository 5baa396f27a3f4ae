"""Encodings of input text files: UTF-8 (with or without BOM), GBK and GB18030, detected per file.

chardet reads a file's head only (it is slow); the guess is then verified by decoding the
whole file, and undecodable bytes are named by offset and line. Used by every reader of
the ``process`` stage (cMedQA2 tables and a user's own sources).
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import zipfile
from pathlib import Path

import chardet

from mediagent.errors import ProcessError

log = logging.getLogger(__name__)

DETECT_BYTES = 64 * 1024  # chardet reads the head only (it is slow); the whole file is then verified
GB_FAMILY = ("gb2312", "gbk", "gb18030", "hz-gb-2312", "iso-2022-cn")


def read_raw(path: Path) -> bytes:
    """Bytes of a file, or of the single CSV/TXT member of a .zip."""
    if path.suffix.lower() != ".zip":
        return path.read_bytes()
    try:
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.infolist() if not m.is_dir() and not m.filename.startswith("__MACOSX")]
            tables = [m for m in members if m.filename.lower().endswith((".csv", ".txt"))]
            if len(tables) != 1:
                raise ProcessError(
                    f"{path}: expected exactly one .csv/.txt file inside, found "
                    f"{[m.filename for m in members]}; unzip it and keep the table next to it"
                )
            return zf.read(tables[0])
    except zipfile.BadZipFile as e:
        raise ProcessError(f"{path}: not a valid zip archive ({e}); download it again with `make data`") from e


def guess_encodings(data: bytes, path: str = "input") -> list[str]:
    """Codecs worth trying for data, most likely first (a BOM, a UTF-8 head, else chardet on 64 KB).

    Fallbacks are listed only where the guess is weak: an all-ASCII head says nothing about
    later bytes (utf-8, then gbk, then its superset gb18030), and GBK text with a character
    outside GBK needs gb18030. A head that is real UTF-8 Chinese gets no fallback: a bad
    byte later is damage, and re-reading the file as GB18030 would turn it into mojibake.
    """
    if data.startswith(codecs.BOM_UTF8):
        return ["utf-8-sig"]
    head = data[:DETECT_BYTES]
    if head.isascii():
        return ["utf-8", "gbk", "gb18030"]
    with contextlib.suppress(UnicodeDecodeError):
        # Non-ASCII text that is valid UTF-8 is UTF-8 (GB Chinese practically never is), and
        # chardet's statistics are skipped. final=False: a cut character at the end is fine.
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        return ["utf-8"]
    guess = (chardet.detect(head)["encoding"] or "").lower()
    if guess in ("utf-8", "ascii"):
        return ["utf-8"]
    if guess in GB_FAMILY:
        return ["gbk", "gb18030"]
    if guess.startswith(("utf-16", "utf-32")):
        raise ProcessError(f"{path}: looks like {guess.upper()}; re-save it as UTF-8 (or GBK)")
    log.warning("%s: chardet guessed %r; trying UTF-8, GBK, GB18030", path, guess or None)
    return ["utf-8", "gbk", "gb18030"]


def detect_encoding(data: bytes, path: str = "input") -> str:
    """Codec of a table, verified by decoding the whole file: utf-8, utf-8-sig, gbk or gb18030.

    GBK when it decodes the file (chardet says GB18030 for any GB text), GB18030 when a
    character outside GBK needs it. Raises ProcessError naming the byte offset and line.
    """
    errors: list[tuple[str, UnicodeDecodeError]] = []
    for enc in guess_encodings(data, path):
        try:
            data.decode(enc)
            return enc
        except UnicodeDecodeError as e:
            errors.append((enc, e))
    # Report the codec that read furthest: its first failure is most likely the real damage.
    enc, err = max(errors, key=lambda item: item[1].start)
    line = data.count(b"\n", 0, err.start) + 1
    raise ProcessError(
        f"{path}: undecodable bytes {data[err.start : err.start + 4]!r} at byte offset {err.start} (line {line}, "
        f"counting the header as line 1) as {enc}; the file mixes encodings or is damaged. Fix that line, or "
        f"re-save the whole file as UTF-8 (e.g. `iconv -f GB18030 -t UTF-8`)"
    )


def to_utf8(data: bytes, encoding: str) -> bytes:
    """The table re-encoded as UTF-8 without BOM (what the CSV parser reads)."""
    return data.removeprefix(codecs.BOM_UTF8) if encoding.startswith("utf-8") else data.decode(encoding).encode()
