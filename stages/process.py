"""The `process` stage: cMedQA2 CSV tables -> ChatML JSONL splits and test candidate lists.

Reads  ``<data.raw_dir>/question.csv`` (``question_id,content``) and ``answer.csv``
       (``ans_id,question_id,content``); ``questions.csv``/``answers.csv`` or a ``.zip``
       holding one of them are accepted too. Encodings UTF-8 (with or without BOM), GBK and
       GB18030 are detected per file. When the official ``dev_candidates`` and
       ``test_candidates`` files are there (``.txt``/``.csv`` as `make data` unzips them,
       or the ``.zip`` itself), their question ids are the val and test splits.
Writes ``<data.processed_dir>/`` = ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (one
       ChatML example per line) and ``test_candidates.jsonl`` (one answer-selection list per
       test question), all built in a temporary directory and renamed into place; then
       ``<process.metrics_file>`` (row counts, encodings, drops by reason, split sizes,
       text lengths, PII masks).
Run    ``python -m stages.process`` (or ``dvc repro process``); for a quick run on part of
       the data: ``dvc exp run -S process.limit=1000``.

The work is columnar (pyarrow compute with RE2 regexes, numpy), so the full 226k-answer
corpus takes seconds; pandas is not needed and not imported. Any bad input raises
``ProcessError`` naming the file, column or row and the fix, before anything is written.
"""

from __future__ import annotations

import codecs
import gc
import logging
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from stages.fileio import atomic_path, write_json
from stages.params import DataParams, Params, ParamsError, ProcessParams, load_params

log = logging.getLogger(__name__)


class ProcessError(ValueError):
    """The input data cannot be processed; the message names the file/column/row and the fix."""


# Accepted file names, most specific first. `make data` unzips the official archives, whose
# members are question.csv, answer.csv, dev_candidates.txt and test_candidates.txt.
QUESTION_NAMES = ("question.csv", "questions.csv", "question.zip", "questions.zip")
ANSWER_NAMES = ("answer.csv", "answers.csv", "answer.zip", "answers.zip")
DEV_NAMES = ("dev_candidates.txt", "dev_candidates.csv", "dev_candidates.zip")
TEST_NAMES = ("test_candidates.txt", "test_candidates.csv", "test_candidates.zip")

QUESTION_COLUMNS = ("question_id", "content")
ANSWER_COLUMNS = ("ans_id", "question_id", "content")
CANDIDATE_COLUMNS = ("question_id", "ans_id", "label")  # `cnt` (0..99) is not needed

OUTPUT_FILES = ("train.jsonl", "val.jsonl", "test.jsonl", "test_candidates.jsonl")
SPLITS = ("train", "val", "test")

# Detection looks at the head only (chardet is slow on whole files); the choice is then
# verified on the whole file, so a wrong guess cannot slip through.
DETECT_BYTES = 64 * 1024
GB_FAMILY = ("gb2312", "gbk", "gb18030", "hz-gb-2312", "iso-2022-cn")

# Cleaning patterns, RE2 syntax (pyarrow compute). Format characters (zero-width space,
# joiners, BOM, LRM) and control characters other than whitespace are deleted; every run of
# whitespace, Unicode spaces included (U+3000 ideographic space, U+00A0 from &nbsp;), becomes
# one ASCII space. cMedQA2 texts are single-line forum posts, so line breaks are scraping
# artefacts, not formatting.
RE_INVISIBLE = r"[\p{Cf}\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f]"
RE_SPACES = r"[\pZ\t\n\v\f\r\x{85}]+"
# Only real tags: "<" must be followed by a letter, "/" or "!--", so "血糖<7" or "体温>38"
# survive.
RE_TAG = r"<!--.*?-->|</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>"
# Any character one of the steps above could change. Most texts have none, so one scan
# picks the few rows the (costlier) replacements run on.
RE_NEEDS_CLEANING = r"[<&\p{Cf}\pZ\x00-\x1f\x7f-\x9f]"

# PII. RE2 has no lookarounds, so "not inside a longer digit run" is matched as a captured
# neighbour and put back. Two numbers separated by one character share that neighbour, so
# a second pass catches the ones the first pass skipped (see mask_pii).
PII_PATTERNS = (
    # 18-digit mainland ID card, last char may be X. Before phones: an ID holds 11-digit runs.
    ("id_card", r"(^|[^0-9A-Za-z])[1-9][0-9]{16}[0-9Xx]([^0-9A-Za-z]|$)", "[ID]"),
    ("phone", r"(^|[^0-9])1[3-9][0-9]{9}([^0-9]|$)", "[PHONE]"),
    ("email", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}", "[EMAIL]"),
)
RE_PII_HINT = r"[0-9]{11}|@"  # every pattern above needs one of these


# pyarrow imports pandas (~0.3 s of start-up and ~100 MB) the first time pa.array(),
# pa.scalar() or Array.to_numpy() runs. The stage never needs pandas, so numpy <-> Arrow
# conversions go through the buffers instead (zero-copy both ways for numbers).
_NUMPY_TYPES = {pa.int8(): np.int8, pa.int16(): np.int16, pa.int32(): np.int32, pa.int64(): np.int64,
                pa.uint8(): np.uint8, pa.uint16(): np.uint16, pa.uint32(): np.uint32, pa.uint64(): np.uint64,
                pa.float32(): np.float32, pa.float64(): np.float64}


def _np(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Numbers or booleans as numpy (values in null slots are unspecified)."""
    if isinstance(values, pa.ChunkedArray):
        parts = [_np(c) for c in values.chunks]
        if parts:
            return np.concatenate(parts)
        return np.zeros(0, dtype=bool if values.type == pa.bool_() else _NUMPY_TYPES[values.type])
    if values.type == pa.bool_():
        bits = np.frombuffer(values.buffers()[1], dtype=np.uint8) if len(values) else np.zeros(0, np.uint8)
        return np.unpackbits(bits, bitorder="little", count=values.offset + len(values))[values.offset :].astype(bool)
    dtype = _NUMPY_TYPES[values.type]
    if not len(values):
        return np.zeros(0, dtype=dtype)
    return np.frombuffer(values.buffers()[1], dtype=dtype)[values.offset : values.offset + len(values)]


def _arrow(values: np.ndarray) -> pa.Array:
    """A numpy array of numbers or booleans as an Arrow array."""
    values = np.ascontiguousarray(values)
    if values.dtype == bool:
        return pa.Array.from_buffers(pa.bool_(), len(values), [None, pa.py_buffer(np.packbits(values, bitorder="little"))])
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def _strings(texts: list[str]) -> pa.Array:
    """A list of str as an Arrow string array."""
    data = [t.encode("utf-8") for t in texts]
    offsets = np.zeros(len(data) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in data], out=offsets[1:])
    return pa.Array.from_buffers(pa.large_string(), len(data), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))]).cast(pa.string())


def _lit(text: str) -> pa.Scalar:
    """A string scalar (for the literal pieces of binary_join_element_wise)."""
    return _strings([text])[0]


def _array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _per_chunk(fn, values: pa.Array | pa.ChunkedArray):
    """fn applied to each chunk: no concatenation (a full copy) of a chunked column."""
    if isinstance(values, pa.Array):
        return fn(values)
    return pa.chunked_array([fn(c) for c in values.chunks], type=values.type)


def _match_regex(texts: pa.Array | pa.ChunkedArray, pattern: str) -> pa.Array | pa.ChunkedArray:
    """pc.match_substring_regex, with the chunks split over Arrow's CPU threads.

    A regex scan runs one chunk after another on one core; the kernel releases the GIL, so
    a thread per slice of chunks uses the others (the scans are the costliest cleaning step).
    """
    workers = min(pa.cpu_count(), texts.num_chunks if isinstance(texts, pa.ChunkedArray) else 1)
    if workers < 2:
        return pc.match_substring_regex(texts, pattern)
    chunks = texts.chunks
    parts = [chunks[i::workers] for i in range(workers)]  # interleaved: equal shares of the bytes
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda part: [pc.match_substring_regex(c, pattern) for c in part], parts))
    out = [None] * len(chunks)
    for i, part in enumerate(results):
        out[i::workers] = part
    return pa.chunked_array(out, type=pa.bool_())


def _count(mask: pa.Array | pa.ChunkedArray) -> int:
    return int(pc.sum(mask).as_py() or 0)


# ----------------------------------------------------------------------------- ingest


def find_input(raw_dir: Path, names: tuple[str, ...]) -> Path | None:
    """First of ``names`` that exists in raw_dir, or None."""
    for name in names:
        if (raw_dir / name).is_file():
            return raw_dir / name
    return None


def read_raw(path: Path) -> bytes:
    """Bytes of a file, or of the single CSV/TXT member of a .zip."""
    if path.suffix.lower() != ".zip":
        return path.read_bytes()
    import zipfile  # here: only zipped inputs need it, and every import costs start-up time

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


def _decode_error(path: str, data: bytes, encoding: str, err: UnicodeDecodeError) -> ProcessError:
    line = data.count(b"\n", 0, err.start) + 1
    bad = data[err.start : err.start + 4]
    return ProcessError(
        f"{path}: undecodable bytes {bad!r} at byte offset {err.start} (line {line}, counting the header "
        f"as line 1) as {encoding}; the file mixes encodings or is damaged. Fix that line, or re-save the "
        f"whole file as UTF-8 (e.g. `iconv -f GB18030 -t UTF-8`)"
    )


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
    try:
        # Non-ASCII text that is valid UTF-8 is UTF-8 (GBK/GB18030 Chinese practically never is);
        # this skips chardet's statistical models on the common case. A cut multi-byte char at
        # the end of the head is fine.
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        return ["utf-8"]
    except UnicodeDecodeError:
        pass
    import chardet  # only needed for heads that are neither ASCII nor UTF-8

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

    GBK is reported when it decodes the file (chardet says GB18030 for any GB text);
    GB18030 when a character outside GBK needs it.

    Raises:
        ProcessError: no candidate decodes the file; names the byte offset and line.
    """
    errors: list[tuple[str, UnicodeDecodeError]] = []
    for enc in guess_encodings(data, path):
        try:
            data.decode(enc)
        except UnicodeDecodeError as e:
            errors.append((enc, e))
            continue
        return enc
    # Report the codec that read furthest: its first failure is most likely the real damage.
    enc, err = max(errors, key=lambda item: item[1].start)
    raise _decode_error(path, data, enc, err)


def to_utf8(data: bytes, encoding: str) -> bytes:
    """The table re-encoded as UTF-8 without BOM (what the CSV parser reads)."""
    if encoding == "utf-8":
        return data
    if encoding == "utf-8-sig":
        return data[len(codecs.BOM_UTF8) :]
    return data.decode(encoding).encode("utf-8")


def _header_line(data: bytes) -> bytes:
    end = data.find(b"\n")
    return (data if end < 0 else data[:end]).rstrip(b"\r")


def _check_header(path: str, data: bytes, columns: tuple[str, ...], complete: bool = True) -> list[str]:
    """Header fields of a table; ``data`` is the (UTF-8) file or, if not ``complete``, its head."""
    first = _header_line(data).decode("utf-8", "replace")
    header = [h.strip().strip('"').strip() for h in first.split(",")]
    missing = [c for c in columns if c not in header]
    if missing:
        for delim, word in (("\t", "tab"), (";", "semicolon"), ("|", "pipe")):
            if delim in first and "," not in first:
                raise ProcessError(
                    f"{path}: header {first!r} is {word}-separated; expected comma-separated columns "
                    f"{','.join(columns)} (cMedQA2 layout). Re-save the file with ',' as the delimiter"
                )
        raise ProcessError(
            f"{path}: missing column(s) {', '.join(missing)} (header is {first!r}); expected columns "
            f"{','.join(columns)} (cMedQA2 layout). Rename the header's column(s) accordingly"
        )
    end = data.find(b"\n")
    if complete and (end < 0 or not _NON_SPACE.search(data, end + 1)):
        raise ProcessError(f"{path}: has a header but no data rows")
    return header


_NON_SPACE = re.compile(rb"\S")


class _NotUtf8(Exception):
    """The CSV parser found bytes that are not UTF-8 (the guessed codec was wrong)."""


def _int_check(path: str, values: pa.Array, col: str) -> None:
    values = pc.utf8_trim_whitespace(values)
    ok = pc.match_substring_regex(values, r"^[0-9]{1,18}$")
    if not pc.all(ok).as_py():
        row = int(pc.index(ok, False).as_py())
        raise ProcessError(
            f"{path}: column {col!r} must hold non-negative integer ids; data row {row + 1} "
            f"(header not counted) has {values[row].as_py()!r}. Fix or remove that row"
        )


def _parse_csv(
    path: str, data: bytes | Path, columns: tuple[str, ...], int_columns: tuple[str, ...], n_fields: int
) -> pa.Table:
    """Parse UTF-8 CSV from bytes, or from a file (read by Arrow itself: no Python copy of it)."""
    types = {c: (pa.int64() if c in int_columns else pa.string()) for c in columns}

    def read(types: dict, threads: bool = True) -> pa.Table:
        convert = pcsv.ConvertOptions(
            include_columns=list(columns), column_types=types,
            strings_can_be_null=False, quoted_strings_can_be_null=False,
        )
        # A path, not a memory map: Arrow's own reads reuse their buffers, while faulting in
        # a mapped file costs more system time than the copy it saves.
        source = str(data) if isinstance(data, Path) else pa.BufferReader(data)
        return pcsv.read_csv(source, convert_options=convert, read_options=pcsv.ReadOptions(use_threads=threads))

    try:
        return read(types)
    except pa.ArrowInvalid as e:
        msg = str(e)
    if "invalid UTF8" in msg:
        raise _NotUtf8(msg)
    if "conversion error" in msg and "int64" in msg:
        # Find the offending row with the ids read as text.
        try:
            table = read({c: pa.string() for c in columns})
        except pa.ArrowInvalid as e:
            if "invalid UTF8" in str(e):
                raise _NotUtf8(str(e)) from e
            raise
        for col in int_columns:
            _int_check(path, _array(table[col]), col)
        return table.cast(pa.schema([(c, types[c]) for c in columns]))
    # The threaded reader does not say which row broke; the serial one does.
    try:
        read(types, threads=False)
    except pa.ArrowInvalid as serial:
        msg = str(serial)
    hint = f"every row needs {n_fields} comma-separated fields; quote fields that contain commas"
    if "got 1" in msg and ("\t" in msg or ";" in msg):
        hint = "rows look tab- or semicolon-separated; the file must be comma-separated"
    raise ProcessError(f"{path}: {msg.replace('CSV parse error: ', 'CSV parse error at ')} ({hint})")


def read_table(path: Path, columns: tuple[str, ...], int_columns: tuple[str, ...]) -> tuple[pa.Table, str]:
    """One input table (ids int64, texts str, only ``columns``) and the encoding it was in.

    When the head looks like UTF-8 the file is parsed straight from disk, and the
    CSV parser's own UTF-8 validation is the whole-file check (decoding it separately would
    cost as much as the parse). Only if that fails, or for other encodings, is the whole
    file decoded: to pick the codec and convert it, or to name the bad byte.
    """
    raw: bytes | None = None
    if path.suffix.lower() == ".zip":
        raw = read_raw(path)
        head, size = raw[:DETECT_BYTES], len(raw)
    else:
        with path.open("rb") as fh:
            head = fh.read(DETECT_BYTES)
        size = path.stat().st_size
    if not head or (size <= len(head) and head.isspace()):
        raise ProcessError(f"{path}: file is empty; expected a header {','.join(columns)} followed by rows")
    encoding = guess_encodings(head, str(path))[0]
    table = None
    if encoding in ("utf-8", "utf-8-sig"):
        header = _check_header(str(path), to_utf8(head, encoding), columns, complete=size <= len(head))
        try:  # the parser skips a UTF-8 BOM itself
            table = _parse_csv(str(path), path if raw is None else raw, columns, int_columns, len(header))
        except _NotUtf8:
            table = None
    if table is None:
        raw = path.read_bytes() if raw is None else raw
        encoding = detect_encoding(raw, str(path))  # raises with the offset unless some codec fits
        data = to_utf8(raw, encoding)
        header = _check_header(str(path), data, columns)
        table = _parse_csv(str(path), data, columns, int_columns, len(header))
    if not len(table):
        raise ProcessError(f"{path}: has a header but no data rows")
    # Ids in one chunk (cheap); texts stay in the parser's chunks: concatenating would copy them.
    return pa.table({c: table[c] if c == "content" else _array(table[c]) for c in columns}), encoding


# ----------------------------------------------------------------------------- clean


def _unescape_html(texts: pa.Array) -> pa.Array:
    # Entities are rare, so Python's complete html.unescape runs only on rows with "&".
    import html  # here: its entity table is a large import few runs need

    has_amp = pc.match_substring(texts, "&")
    if not pc.any(has_amp).as_py():
        return texts
    rows = texts.filter(has_amp).to_pylist()
    return pc.replace_with_mask(texts, has_amp, _strings([html.unescape(t) for t in rows]))


def _clean(texts: pa.Array) -> pa.Array:
    texts = _unescape_html(texts)
    texts = pc.replace_substring_regex(texts, RE_TAG, " ")
    texts = pc.replace_substring_regex(texts, RE_INVISIBLE, "")
    texts = pc.replace_substring_regex(texts, RE_SPACES, " ")
    return pc.utf8_trim(texts, " ")


def _mask(texts: pa.Array) -> tuple[pa.Array, dict[str, int]]:
    counts = {}
    for kind, pattern, placeholder in PII_PATTERNS:
        before = int(pc.sum(pc.count_substring(texts, placeholder)).as_py() or 0)
        repl = placeholder if kind == "email" else rf"\1{placeholder}\2"
        for _ in range(2):  # second pass: numbers that shared a neighbour with the previous one
            texts = pc.replace_substring_regex(texts, pattern, repl)
        counts[kind] = int(pc.sum(pc.count_substring(texts, placeholder)).as_py() or 0) - before
    return texts, counts


def _scatter(texts: pa.Array | pa.ChunkedArray, where: pa.Array | pa.ChunkedArray, sub: pa.Array):
    """texts with the rows flagged in ``where`` replaced by ``sub`` (in order), chunk by chunk."""
    if isinstance(texts, pa.Array):
        return pc.replace_with_mask(texts, _array(where), sub)
    out, pos = [], 0
    for chunk, flags in zip(texts.chunks, _rechunk(where, texts)):
        k = _count(flags)
        out.append(pc.replace_with_mask(chunk, flags, sub.slice(pos, k)) if k else chunk)
        pos += k
    return pa.chunked_array(out, type=texts.type)


def _rechunk(values: pa.Array | pa.ChunkedArray, like: pa.ChunkedArray) -> list[pa.Array]:
    """values cut into the chunk lengths of ``like`` (zero-copy slices)."""
    lengths = [len(c) for c in like.chunks]
    if isinstance(values, pa.ChunkedArray) and [len(c) for c in values.chunks] == lengths:
        return values.chunks
    flat, out, pos = _array(values), [], 0
    for n in lengths:
        out.append(flat.slice(pos, n))
        pos += n
    return out


def prepare_texts(texts: pa.Array | pa.ChunkedArray, mask: bool) -> tuple[pa.Array | pa.ChunkedArray, dict[str, int]]:
    """clean_texts, then mask_pii if ``mask``, in one pass: both run only on the rows that need them.

    One regex scan of the whole column finds those rows (usually a small share); the
    replacements, each a full scan too, then run once on that subset, which is put back
    chunk by chunk (no copy of the whole column into one piece).
    """
    counts = {kind: 0 for kind, _, _ in PII_PATTERNS}
    needs = _match_regex(texts, RE_NEEDS_CLEANING + ("|" + RE_PII_HINT if mask else ""))
    if not _count(needs):
        return texts, counts
    sub = _clean(_array(texts.filter(needs)))
    if mask:
        sub, counts = _mask(sub)
    return _scatter(texts, needs, sub), counts


def clean_texts(texts: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Unescape HTML entities, strip tags, delete invisible characters, collapse whitespace, trim."""
    return prepare_texts(texts, mask=False)[0]


def mask_pii(texts: pa.Array | pa.ChunkedArray) -> tuple[pa.Array | pa.ChunkedArray, dict[str, int]]:
    """Replace ID card numbers, mobile numbers and e-mail addresses by placeholders.

    Returns the masked texts and how many of each kind were replaced (counted as new
    placeholders, so text that already said "[PHONE]" is not counted).
    """
    hint = _match_regex(texts, RE_PII_HINT)
    if not _count(hint):
        return texts, {kind: 0 for kind, _, _ in PII_PATTERNS}
    sub, counts = _mask(_array(texts.filter(hint)))
    return _scatter(texts, hint, sub), counts


# Every reason a row can be dropped for; all are reported (0 when unused) so the metric keys
# are the same in every run and `dvc metrics diff` lines up.
DROP_REASONS = (
    "question_duplicate_rows", "answer_duplicate_rows",  # the same row repeated
    "question_empty", "question_too_short", "question_too_long",
    "answer_empty", "answer_too_short", "answer_too_long",
    "answer_question_missing",  # its question is not in the file or was dropped
    "duplicate_pairs",  # same question text and answer text under other ids
    "answer_not_first",  # process.answers_per_question: first
    "candidates_answer_missing", "candidate_lists_question_missing", "candidate_lists_no_positive",
)


@dataclass
class Stats:
    """Everything the metrics file reports; filled as the stage goes."""

    rows_read: dict[str, int] = field(default_factory=dict)
    encoding: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    pii_masked: dict[str, int] = field(default_factory=dict)
    other: dict[str, object] = field(default_factory=dict)

    def drop(self, reason: str, n: int) -> None:
        self.dropped[reason] += int(n)  # KeyError for a reason missing from DROP_REASONS


def _keep_first(table: pa.Table, keys: list[str]) -> pa.Table:
    """Rows whose key occurs for the first time (file order kept)."""
    t = table.append_column("_row", _arrow(np.arange(len(table), dtype=np.int64)))
    first = t.group_by(keys, use_threads=False).aggregate([("_row", "min")])["_row_min"]
    mask = np.zeros(len(table), dtype=bool)
    mask[_np(first)] = True
    return table.filter(_arrow(mask))


def dedupe_ids(path: str, table: pa.Table, id_col: str, what: str, stats: Stats) -> pa.Table:
    """Drop repeated rows of one id; the same id with different content is an error."""
    if pc.count_distinct(table[id_col]).as_py() == len(table):
        return table
    ids = _np(table[id_col])
    value_cols = [c for c in table.column_names if c != id_col]
    unique_rows = _keep_first(table, table.column_names)
    per_id = unique_rows.group_by([id_col], use_threads=False).aggregate([(id_col, "count")])
    conflicting = per_id.filter(pc.greater(per_id[f"{id_col}_count"], 1))[id_col]
    if len(conflicting):
        examples = []
        for qid in conflicting.to_pylist()[:3]:
            rows = (np.flatnonzero(ids == qid) + 1).tolist()
            examples.append(f"{id_col} {qid} on data rows {rows[:5]}")
        raise ProcessError(
            f"{path}: {len(conflicting)} {id_col} value(s) appear more than once with different "
            f"{'/'.join(value_cols)} ({'; '.join(examples)}; header not counted). Each {what} id must be "
            f"unique: remove or renumber the duplicates"
        )
    stats.drop(f"{what}_duplicate_rows", len(table) - len(unique_rows))
    return _keep_first(table, [id_col])


def length_filter(table: pa.Table, col: str, lo: int, hi: int, what: str, stats: Stats) -> pa.Table:
    """Drop empty, too-short and too-long texts, counting each reason.

    Adds the lengths as column ``chars`` (reused by the stats, not measured twice).
    """
    lengths = pc.utf8_length(table[col])
    n = _np(lengths)
    empty, short, long_ = n == 0, (n > 0) & (n < lo), n > hi
    stats.drop(f"{what}_empty", empty.sum())
    stats.drop(f"{what}_too_short", short.sum())
    stats.drop(f"{what}_too_long", long_.sum())
    drop = empty | short | long_
    table = table.append_column("chars", lengths)
    return table.filter(_arrow(~drop)) if drop.any() else table  # a filter copies every column


def factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct values in order of first appearance, index of each one's first row, code of each row).

    Hash-based (Arrow's dictionary encoding): linear time, unlike np.unique's sort.
    """
    encoded = pc.dictionary_encode(_arrow(values))
    codes = _np(encoded.indices).astype(np.int64)
    first = np.empty(len(encoded.dictionary), dtype=np.int64)
    first[codes[::-1]] = np.arange(len(codes) - 1, -1, -1)  # the last write wins: the first row
    return _np(encoded.dictionary), first, codes


def text_codes(texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Equal texts get equal integer codes (Arrow's dictionary encoding)."""
    encoded = pc.dictionary_encode(texts)  # one dictionary for all chunks: indices are global
    chunks = encoded.chunks if isinstance(encoded, pa.ChunkedArray) else [encoded]
    if not chunks:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([_np(c.indices) for c in chunks]).astype(np.int64)


def unique_pairs(question_codes: np.ndarray, answers: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Mask keeping the first of the pairs with the same question text and answer text.

    ``question_codes`` are text_codes of each pair's question (equal texts, equal codes,
    under any ids). Only pairs that share the question text and the answer's byte length
    can be equal, and those are few: their answers alone are compared, through text codes.
    Hashing every answer would cost a copy of the whole column.
    """
    keep = np.ones(len(question_codes), dtype=bool)
    if not len(keep):
        return keep
    alen = _np(pc.binary_length(answers)).astype(np.int64)
    _, _, codes = factorize(question_codes * (int(alen.max()) + 1) + alen)
    maybe = np.flatnonzero(np.bincount(codes)[codes] > 1)
    if len(maybe):
        candidates = np.zeros(len(keep), dtype=bool)
        candidates[maybe] = True
        ac = text_codes(answers.filter(_arrow(candidates)))  # filter works per chunk; take would concatenate
        _, first = np.unique(question_codes[maybe] * (int(ac.max()) + 1) + ac, return_index=True)
        keep[maybe] = False
        keep[maybe[first]] = True
    return keep


# ----------------------------------------------------------------------------- split


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fixed, well-mixed 64-bit hash (numpy uint64 wraps like C)."""
    x = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def split_ids(qids: np.ndarray, seed: int, val_ratio: float, test_ratio: float) -> np.ndarray:
    """0/1/2 (train/val/test) per question id, from a seeded hash of the id.

    A question's split depends only on its id and the seed: all its answers land together,
    and adding or removing other questions never moves it. The hash is splitmix64 on
    ``id ^ mix(seed)``, vectorised (an md5 per id costs a Python loop over 120k ids).
    """
    salt = _mix64(np.array([seed % 2**64], dtype=np.uint64))[0]
    u = (_mix64(qids.astype(np.uint64) ^ salt) >> np.uint64(11)).astype(np.float64) / float(2**53)
    return np.where(u < test_ratio, 2, np.where(u < test_ratio + val_ratio, 1, 0)).astype(np.int8)


def official_split(qids: np.ndarray, dev_ids: np.ndarray, test_ids: np.ndarray) -> np.ndarray:
    """0/1/2 per question id: official dev ids -> val, test ids -> test, the rest -> train."""
    out = np.zeros(len(qids), dtype=np.int8)
    out[np.isin(qids, dev_ids)] = 1
    out[np.isin(qids, test_ids)] = 2
    return out


# ----------------------------------------------------------------------------- format


def _offsets(texts: pa.Array) -> np.ndarray:
    """The (int64) offsets of a string array's values in its data buffer."""
    dtype = np.int64 if pa.types.is_large_string(texts.type) else np.int32
    return np.frombuffer(texts.buffers()[1], dtype=dtype)[texts.offset : texts.offset + len(texts) + 1].astype(np.int64)


def _rows_with_bytes(texts: pa.Array, values: bytes, block: int = 1 << 22) -> np.ndarray:
    """Boolean mask of the strings that contain any of the given ASCII bytes.

    Scans Arrow's UTF-8 data buffer with bytes.find (memchr), a few MB at a time: ASCII
    bytes never occur inside multi-byte characters, so a byte hit is a character hit, and
    the few hits are mapped to rows through the offsets. Far cheaper than a regex or
    substring kernel over every row.
    """
    mask = np.zeros(len(texts), dtype=bool)
    if not len(texts):
        return mask
    offsets = _offsets(texts)
    view = memoryview(texts.buffers()[2])
    hits = []
    for start in range(int(offsets[0]), int(offsets[-1]), block):
        data = view[start : min(start + block, int(offsets[-1]))].tobytes()
        for v in values:
            pos = data.find(v)
            while pos >= 0:
                hits.append(start + pos)
                pos = data.find(v, pos + 1)
    if hits:
        mask[np.searchsorted(offsets, np.array(hits, dtype=np.int64), side="right") - 1] = True
    return mask


def _json_escape(texts: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    # Cleaned texts hold no control characters, so '\' and '"' are all JSON needs escaped;
    # the result equals orjson's output byte for byte (a test checks it).
    def one(chunk: pa.Array) -> pa.Array:
        mask = _rows_with_bytes(chunk, b'"\\')
        if not mask.any():
            return chunk
        sub = chunk.filter(_arrow(mask))
        sub = pc.replace_substring(pc.replace_substring(sub, "\\", "\\\\"), '"', '\\"')
        return pc.replace_with_mask(chunk, _arrow(mask), sub.cast(chunk.type))

    return _per_chunk(one, texts)


def _chatml_lines(qids, aids, questions_json, answers_json, system_prompt: str) -> pa.Array:
    head = '{"messages":[{"role":"system","content":' + orjson.dumps(system_prompt).decode()
    head += '},{"role":"user","content":"'
    return pc.binary_join_element_wise(
        _lit(head), questions_json, _lit('"},{"role":"assistant","content":"'), answers_json,
        _lit('"}],"question_id":'), pc.cast(qids, pa.string()), _lit(',"ans_id":'), pc.cast(aids, pa.string()),
        _lit("}\n"), _lit(""),  # the last one is the separator
    )


def chatml_lines(pairs: pa.Table, system_prompt: str) -> pa.Array:
    """One JSON line (with trailing newline) per pair, in the data contract's ChatML layout.

    ``pairs`` has question_id, ans_id, question, answer. Built column-wise: per-row dicts
    and json.dumps would cost more than all the cleaning.
    """
    return _chatml_lines(pairs["question_id"], pairs["ans_id"], _json_escape(pairs["question"]),
                         _json_escape(pairs["answer"]), system_prompt)


def _chunk_views(lines: pa.Array | pa.ChunkedArray):
    """(offsets relative to the data view, data view) of each non-empty chunk of strings."""
    for chunk in lines.chunks if isinstance(lines, pa.ChunkedArray) else [lines]:
        if not len(chunk):
            continue
        offsets = _offsets(chunk)
        yield offsets - offsets[0], memoryview(chunk.buffers()[2])[offsets[0] : offsets[-1]]


def write_lines(path: Path, lines: pa.Array | pa.ChunkedArray) -> None:
    """Write strings that already end in a newline, straight from Arrow's buffers."""
    with open(path, "wb") as fh:
        for _, view in _chunk_views(lines):
            fh.write(view)


def write_examples(
    paths: list[Path], examples: pa.Table, split: np.ndarray, questions_json: pa.Array, system_prompt: str,
    block: int = 1 << 14,
) -> None:
    """Write example i's ChatML line to paths[split[i]], in order, a block of rows at a time.

    ``examples`` has question_id, ans_id, answer and qpos (row of the question in
    ``questions_json``, the JSON-escaped question texts). Lines are built per block and
    written as runs of consecutive rows: the memory of one block is reused by the next,
    where building all lines first (or reordering them by split) would take fresh memory
    for every byte of output.
    """
    handles = [open(p, "wb") for p in paths]
    try:
        for start in range(0, len(examples), block):
            part = examples.slice(start, block)
            lines = _chatml_lines(part["question_id"], part["ans_id"], questions_json.take(part["qpos"]),
                                  _json_escape(part["answer"]), system_prompt)
            row = start
            for offsets, view in _chunk_views(lines):
                n = len(offsets) - 1
                s = split[row : row + n]
                starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
                ends = np.r_[starts[1:], n]
                for a, b, k in zip(offsets[starts].tolist(), offsets[ends].tolist(), s[starts].tolist()):
                    handles[k].write(view[a:b])
                row += n
    finally:
        for fh in handles:
            fh.close()


# ----------------------------------------------------------------------------- candidates


@dataclass
class CandidateLists:
    """Answer-selection lists, flat: list i holds the rows where ``group == i`` (in order)."""

    qids: np.ndarray  # per list
    questions: pa.Array  # per list
    group: np.ndarray  # per candidate, non-decreasing
    ans_ids: np.ndarray
    contents: pa.Array
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.qids)

    def head(self, n: int) -> CandidateLists:
        keep = self.group < n
        return CandidateLists(self.qids[:n], self.questions[:n], self.group[keep], self.ans_ids[keep],
                              self.contents.filter(_arrow(keep)), self.labels[keep])


def _group_starts(sorted_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start index of each run of equal ids, and each row's run number."""
    new = np.r_[True, sorted_ids[1:] != sorted_ids[:-1]] if len(sorted_ids) else np.zeros(0, bool)
    return np.flatnonzero(new), np.cumsum(new) - 1


def official_candidates(
    cands: pa.Table, questions: pa.Table, answers: pa.Table, test_qids: np.ndarray, stats: Stats
) -> CandidateLists:
    """Official lists of the questions in ``test_qids``, with cleaned texts.

    Candidates whose answer was dropped in cleaning are removed; a list left without its
    question text or without any true answer cannot be scored and is dropped. Labels are
    the official ones, and each list keeps the file's order (true answers first): breaking
    score ties fairly is the evaluator's job. Lists come out by question id.
    """
    cands = cands.filter(pc.is_in(cands["question_id"], _arrow(np.asarray(test_qids, dtype=np.int64))))
    # Group without trusting the file to keep each list contiguous; stable keeps list order.
    cands = cands.take(_arrow(np.argsort(_np(cands["question_id"]), kind="stable")))
    cq, ca, cl = (_np(cands[c]) for c in ("question_id", "ans_id", "label"))
    qpos = _array(pc.index_in(cands["question_id"], value_set=questions["question_id"]))
    apos = _array(pc.index_in(cands["ans_id"], value_set=answers["ans_id"]))
    q_ok = _np(qpos.is_valid())
    a_ok = _np(apos.is_valid())
    starts, gid = _group_starts(cq)
    has_question = q_ok[starts] if len(starts) else np.zeros(0, bool)
    in_list = has_question[gid]
    keep = in_list & a_ok
    positives = np.bincount(gid[keep & (cl == 1)], minlength=len(starts))
    list_ok = has_question & (positives > 0)
    stats.drop("candidates_answer_missing", int((in_list & ~a_ok).sum()))
    stats.drop("candidate_lists_question_missing", int((~has_question).sum()))
    stats.drop("candidate_lists_no_positive", int((has_question & (positives == 0)).sum()))
    keep &= list_ok[gid]
    new_gid = np.cumsum(list_ok) - 1
    return CandidateLists(
        qids=cq[starts][list_ok],
        questions=_array(questions["content"]).take(_arrow(_np(qpos)[starts][list_ok].astype(np.int64))),
        group=new_gid[gid[keep]],
        ans_ids=ca[keep],
        contents=_array(answers["content"]).take(_arrow(_np(apos)[keep].astype(np.int64))),
        labels=cl[keep],
    )


def sampled_candidates(test_pairs: pa.Table, pool: pa.Table, num_negatives: int, seed: int, stats: Stats) -> CandidateLists:
    """Each test question's true answers plus ``num_negatives`` answers of other held-out questions.

    ``test_pairs`` is sorted by question id. Negatives come from the val+test answers only,
    so no list shows a training answer, and never from the question itself; each list is
    shuffled with the seed so a true answer's position says nothing.
    """
    rng = np.random.default_rng(seed)
    tq = _np(test_pairs["question_id"])
    starts, pos_group = _group_starts(tq)
    n_lists = len(starts)
    list_qids = tq[starts] if n_lists else tq[:0]
    pool_q = _np(pool["question_id"])
    if n_lists and len(pool_q):
        # Everyone's draws at once; a few spare columns cover own answers and repeats.
        draws = rng.integers(0, len(pool_q), size=(n_lists, 2 * num_negatives + 8))
        order = np.argsort(draws, axis=1, kind="stable")
        sorted_draws = np.take_along_axis(draws, order, axis=1)
        repeat_sorted = np.zeros_like(draws, dtype=bool)
        repeat_sorted[:, 1:] = sorted_draws[:, 1:] == sorted_draws[:, :-1]
        repeat = np.empty_like(repeat_sorted)
        np.put_along_axis(repeat, order, repeat_sorted, axis=1)
        ok = (pool_q[draws] != list_qids[:, None]) & ~repeat
        take = ok & (np.cumsum(ok, axis=1) <= num_negatives)
        neg_group, col = np.nonzero(take)
        neg_idx = draws[neg_group, col]
        short = np.flatnonzero(take.sum(axis=1) < num_negatives)
    else:
        neg_group = neg_idx = np.zeros(0, np.int64)
        short = np.arange(n_lists) if len(pool_q) else np.zeros(0, np.int64)
    if len(short):  # small pools: the remaining other answers in a seeded order
        extra_g, extra_i = [neg_group[~np.isin(neg_group, short)]], [neg_idx[~np.isin(neg_group, short)]]
        for g in short.tolist():
            others = [j for j in rng.permutation(len(pool_q)).tolist() if pool_q[j] != list_qids[g]]
            extra_g.append(np.full(min(num_negatives, len(others)), g))
            extra_i.append(np.array(others[:num_negatives], dtype=np.int64))
        neg_group, neg_idx = np.concatenate(extra_g), np.concatenate(extra_i)
    stats.other["candidate_lists_short"] = int(sum(
        1 for g in short.tolist() if (neg_group == g).sum() < num_negatives))
    group = np.r_[pos_group, neg_group].astype(np.int64)
    ans_ids = np.r_[_np(test_pairs["ans_id"]), _np(pool["ans_id"])[neg_idx]]
    labels = np.r_[np.ones(len(pos_group), np.int64), np.zeros(len(neg_group), np.int64)]
    contents = pa.concat_arrays([_array(test_pairs["answer"]), _array(pool["answer"]).take(_arrow(neg_idx.astype(np.int64)))])
    order = np.lexsort((rng.random(len(group)), group))  # shuffle within each list
    return CandidateLists(
        qids=list_qids,
        questions=_array(test_pairs["question"]).take(_arrow(starts.astype(np.int64))),
        group=group[order],
        ans_ids=ans_ids[order],
        contents=contents.take(_arrow(order.astype(np.int64))),
        labels=labels[order],
    )


def build_candidates(
    cfg: ProcessParams, pairs: pa.Table, pair_split: np.ndarray, question_texts: pa.Array,
    test_cands: pa.Table | None, questions: pa.Table, answers: pa.Table, input_qids: np.ndarray, stats: Stats,
) -> CandidateLists:
    """The test questions' lists: official ones when ``test_cands`` is given, else sampled.

    ``pairs`` (question_id, ans_id, qpos, answer) and ``pair_split`` are the cleaned pairs
    and their split; ``input_qids`` the question ids before the length filters (an official
    list whose question was lost in cleaning is counted as dropped, one whose question was
    never in the input is not).
    """
    if test_cands is not None:
        official_test = np.unique(_np(test_cands["question_id"]))
        test_qids = official_test[np.isin(official_test, input_qids)]
        stats.other["official_test_questions_not_in_input"] = int(len(official_test) - len(test_qids))
        lists = official_candidates(test_cands, questions, answers, test_qids, stats)
    else:
        test_pairs = pairs.filter(_arrow(pair_split == 2))  # filter per chunk, then sort the few rows
        test_pairs = test_pairs.take(_arrow(np.argsort(_np(test_pairs["question_id"]), kind="stable")))
        test_pairs = test_pairs.append_column("question", question_texts.take(test_pairs["qpos"]))
        if cfg.max_candidate_questions:  # cap before sampling: no work for lists that are cut
            cap = np.unique(_np(test_pairs["question_id"]))[: cfg.max_candidate_questions]
            test_pairs = test_pairs.filter(pc.is_in(test_pairs["question_id"], _arrow(cap)))
        pool = pairs.filter(_arrow(pair_split >= 1))
        lists = sampled_candidates(test_pairs, pool, cfg.num_negatives, cfg.seed, stats)
    return lists.head(cfg.max_candidate_questions) if cfg.max_candidate_questions else lists


def candidate_lines(lists: CandidateLists, system_prompt: str) -> pa.Array:
    """One JSON line per list: {"question_id", "system", "question", "candidates": [...]}."""
    items = pc.binary_join_element_wise(
        _lit('{"ans_id":'), pc.cast(_arrow(lists.ans_ids.astype(np.int64)), pa.string()),
        _lit(',"content":"'), _json_escape(lists.contents),
        _lit('","label":'), pc.cast(_arrow(lists.labels.astype(np.int64)), pa.string()),
        _lit("}"), _lit(""),
    )
    offsets = np.r_[0, np.cumsum(np.bincount(lists.group, minlength=len(lists)))].astype(np.int32)
    joined = pc.binary_join(pa.ListArray.from_arrays(_arrow(offsets), items), _lit(","))
    return pc.binary_join_element_wise(
        _lit('{"question_id":'), pc.cast(_arrow(np.asarray(lists.qids, dtype=np.int64)), pa.string()),
        _lit(',"system":' + orjson.dumps(system_prompt).decode() + ',"question":"'), _json_escape(lists.questions),
        _lit('","candidates":['), joined, _lit("]}\n"), _lit(""),
    )


# ----------------------------------------------------------------------------- main


def _percentiles(prefix: str, lengths: np.ndarray) -> dict[str, float]:
    if not len(lengths):
        return {f"{prefix}_p50": 0, f"{prefix}_p95": 0, f"{prefix}_max": 0}
    p50, p95 = np.percentile(lengths, [50, 95])
    return {f"{prefix}_p50": round(float(p50), 1), f"{prefix}_p95": round(float(p95), 1), f"{prefix}_max": int(lengths.max())}


def load_inputs(raw_dir: Path, stats: Stats) -> tuple[pa.Table, pa.Table, pa.Table | None, pa.Table | None]:
    """Read and check every input table before any work is done."""
    if not raw_dir.is_dir():
        raise ProcessError(f"data.raw_dir {str(raw_dir)!r} is not a directory; run `make data` or set data.raw_dir")
    found = {}
    for key, names in (("question", QUESTION_NAMES), ("answer", ANSWER_NAMES)):
        found[key] = find_input(raw_dir, names)
        if found[key] is None:
            raise ProcessError(
                f"{raw_dir}: no {key} table (looked for {', '.join(names)}); put the cMedQA2 files there "
                f"(`make data`) or point data.raw_dir at a folder that has them"
            )
    dev_path, test_path = find_input(raw_dir, DEV_NAMES), find_input(raw_dir, TEST_NAMES)
    if (dev_path is None) != (test_path is None):
        have, lack = (dev_path, "test_candidates") if dev_path else (test_path, "dev_candidates")
        raise ProcessError(
            f"{have} is present but {lack} (.txt/.csv/.zip) is not in {raw_dir}; the official split needs "
            f"both. Add it (`make data`) or remove {have.name} to use the seeded hash split"
        )
    tables = {}
    specs = [("question", found["question"], QUESTION_COLUMNS, ("question_id",)),
             ("answer", found["answer"], ANSWER_COLUMNS, ("ans_id", "question_id"))]
    if dev_path is not None:
        specs += [("dev_candidates", dev_path, CANDIDATE_COLUMNS, CANDIDATE_COLUMNS),
                  ("test_candidates", test_path, CANDIDATE_COLUMNS, CANDIDATE_COLUMNS)]
    for key, path, columns, int_cols in specs:
        t0 = time.perf_counter()
        table, enc = read_table(path, columns, int_cols)
        stats.rows_read[key] = len(table)
        stats.encoding[key] = enc
        log.info("read %s: %d rows, %s (%.2fs)", path, len(table), enc, time.perf_counter() - t0)
        tables[key] = table
    for key in ("dev_candidates", "test_candidates"):
        if key in tables and not pc.all(pc.is_in(tables[key]["label"], _arrow(np.array([0, 1], dtype=np.int64)))).as_py():
            raise ProcessError(f"{raw_dir}/{key}: column 'label' must be 0 or 1")
    return tables["question"], tables["answer"], tables.get("dev_candidates"), tables.get("test_candidates")


def main(params: Params) -> None:
    # The stage makes few Python objects but many collections would be triggered by
    # passing allocations, each scanning every imported module's objects: ~10% of the run.
    enabled = gc.isenabled()
    gc.disable()
    try:
        _main(params)
    finally:
        if enabled:
            gc.enable()


def _main(params: Params) -> None:
    data: DataParams = params.data
    cfg: ProcessParams = params.process
    log.info("process params: %s; data: %s", cfg, data)
    t_start = time.perf_counter()
    raw_dir, out_dir = Path(data.raw_dir), Path(data.processed_dir)
    stats = Stats()
    stats.other.update(candidate_lists_short=0, official_test_questions_not_in_input=0)

    questions, answers, dev_cands, test_cands = load_inputs(raw_dir, stats)
    qfile = str(find_input(raw_dir, QUESTION_NAMES))
    afile = str(find_input(raw_dir, ANSWER_NAMES))

    # Orphans are a property of the files, so they are counted before the limit and cleaning.
    q_ids, a_qids = questions["question_id"], answers["question_id"]
    stats.other["answers_without_questions"] = len(a_qids) - _count(pc.is_in(a_qids, q_ids))
    stats.other["questions_without_answers"] = len(q_ids) - _count(pc.is_in(q_ids, a_qids))

    # Cleaning (and masking) before the duplicate checks: rows that differ only in spacing or
    # markup are the same row, not a conflict.
    stats.pii_masked = {kind: 0 for kind, _, _ in PII_PATTERNS}
    for col, name in ((1, "question"), (2, "answer")):
        table = questions if name == "question" else answers
        texts, counts = prepare_texts(table["content"], mask=cfg.mask_pii)
        table = table.set_column(col, "content", texts)
        questions, answers = (table, answers) if name == "question" else (questions, table)
        stats.pii_masked = {k: stats.pii_masked[k] + counts[k] for k in counts}
    questions = dedupe_ids(qfile, questions, "question_id", "question", stats)
    answers = dedupe_ids(afile, answers, "ans_id", "answer", stats)

    if cfg.limit:
        questions = questions.slice(0, cfg.limit)
        answers = answers.filter(pc.is_in(answers["question_id"], questions["question_id"]))
        log.info("process.limit=%d: %d questions, %d answers kept", cfg.limit, len(questions), len(answers))
    input_qids = _np(questions["question_id"])  # before the length filters: what cleaning may lose

    questions = length_filter(questions, "content", cfg.min_question_chars, cfg.max_question_chars, "question", stats)
    answers = length_filter(answers, "content", cfg.min_answer_chars, cfg.max_answer_chars, "answer", stats)

    # Merge: inner join through an index lookup; pairs keep answer.csv's order, and point at
    # their question's row (qpos) instead of copying its text.
    idx = _array(pc.index_in(answers["question_id"], value_set=questions["question_id"]))
    has_q = idx.is_valid()
    n_pairs = _count(has_q)
    stats.drop("answer_question_missing", len(answers) - n_pairs)
    if n_pairs < len(answers):
        answers_kept, idx = answers.filter(has_q), idx.filter(has_q)
    else:
        answers_kept = answers
    pairs = pa.table({
        "question_id": answers_kept["question_id"],
        "ans_id": answers_kept["ans_id"],
        "qpos": idx.cast(pa.int64()),
        "answer": answers_kept["content"],
        "chars": answers_kept["chars"],
    })
    keep = unique_pairs(text_codes(questions["content"])[_np(pairs["qpos"])], pairs["answer"])
    stats.drop("duplicate_pairs", int((~keep).sum()))
    if not keep.all():
        pairs = pairs.filter(_arrow(keep))
    if not len(pairs):
        raise ProcessError(
            f"no question/answer pairs left after cleaning {raw_dir} (drops: {stats.dropped}, answers without "
            f"questions: {stats.other['answers_without_questions']}); check that the two files belong together "
            f"and the process.*_chars bounds"
        )
    q_text = _array(questions["content"])

    pair_qids = _np(pairs["question_id"])
    uniq_qids, first_pair, inverse = factorize(pair_qids)
    if dev_cands is not None:
        split_of_q = official_split(uniq_qids, _np(dev_cands["question_id"]), _np(test_cands["question_id"]))
        stats.other["split_method"] = "official"
    else:
        split_of_q = split_ids(uniq_qids, cfg.seed, cfg.val_ratio, cfg.test_ratio)
        stats.other["split_method"] = "hash"
    pair_split = split_of_q[inverse]

    examples, ex_split = pairs, pair_split
    if cfg.answers_per_question == "first":
        # The first answer of a question is its first row in answer.csv (official ids ascend).
        first = np.zeros(len(pairs), dtype=bool)
        first[first_pair] = True
        stats.drop("answer_not_first", int((~first).sum()))
        examples, ex_split = pairs.filter(_arrow(first)), pair_split[first]

    split_counts = {name: int((ex_split == i).sum()) for i, name in enumerate(SPLITS)}
    if not split_counts["train"]:
        raise ProcessError(
            f"no training examples: all {len(uniq_qids)} questions fell into val/test (check process.val_ratio/"
            f"test_ratio, or the candidate files in {raw_dir})"
        )
    for name in ("val", "test"):
        if not split_counts[name]:
            log.warning("the %s split is empty (%d questions in all)", name, len(uniq_qids))

    with atomic_path(out_dir, is_dir=True) as tmp, ThreadPoolExecutor(1) as worker:
        # The candidate lists are built (mostly in Arrow/numpy, without the GIL) while this
        # thread writes the examples.
        candidates = worker.submit(lambda: (
            lists := build_candidates(cfg, pairs, pair_split, q_text, test_cands, questions, answers, input_qids, stats),
            candidate_lines(lists, cfg.system_prompt),
        ))
        # Questions are escaped once per question, not once per answer.
        write_examples([tmp / f"{name}.jsonl" for name in SPLITS], examples, ex_split, _array(_json_escape(q_text)),
                       cfg.system_prompt)
        lists, lines = candidates.result()
        write_lines(tmp / "test_candidates.jsonl", lines)
    if not len(lists):
        log.warning("no test question has a candidate list (see dropped.candidate_* in %s)", cfg.metrics_file)

    q_len = _np(_array(questions["chars"]).take(_arrow(_np(pairs["qpos"])[first_pair])))
    a_len = _np(examples["chars"])
    metrics = {
        "rows_read": stats.rows_read,
        "encoding": stats.encoding,
        **stats.other,
        "dropped": stats.dropped,
        "pii_masked": stats.pii_masked,
        "examples": split_counts,
        "questions": {name: int((split_of_q == i).sum()) for i, name in enumerate(SPLITS)},
        "candidate_questions": len(lists),
        "candidates": len(lists.group),
        "length": {**_percentiles("question", q_len), **_percentiles("answer", a_len)},
    }
    write_json(cfg.metrics_file, metrics)
    log.info(
        "wrote %s: train %d / val %d / test %d examples, %d candidate lists (%.2fs)",
        out_dir, split_counts["train"], split_counts["val"], split_counts["test"], len(lists), time.perf_counter() - t_start,
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main(load_params())
    except (ProcessError, ParamsError) as e:
        sys.exit(f"process failed: {e}")
