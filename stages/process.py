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

The work is columnar (pyarrow compute, RE2 regexes) so the full 226k-answer corpus takes
seconds; pandas is not needed and not imported. Any bad input raises ``ProcessError``
naming the file, column or row and the fix, before anything is written.
"""

from __future__ import annotations

import codecs
import hashlib
import html
import io
import logging
import sys
import time
import zipfile
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
# verified by decoding the whole file, so a wrong guess cannot slip through.
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

# PII. RE2 has no lookarounds, so "not inside a longer digit run" is matched as a captured
# neighbour and put back. Two numbers separated by one character share that neighbour, so
# a second pass catches the ones the first pass skipped (see mask_pii).
PII_PATTERNS = (
    # 18-digit mainland ID card, last char may be X. Before phones: an ID holds 11-digit runs.
    ("id_card", r"(^|[^0-9A-Za-z])[1-9][0-9]{16}[0-9Xx]([^0-9A-Za-z]|$)", "[ID]"),
    ("phone", r"(^|[^0-9])1[3-9][0-9]{9}([^0-9]|$)", "[PHONE]"),
    ("email", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}", "[EMAIL]"),
)


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


def _is_utf8(data: bytes) -> bool:
    """Validate UTF-8 without building a Python str (pyarrow's SIMD check on a zero-copy view)."""
    offsets = pa.array(np.array([0, len(data)], dtype=np.int64)).buffers()[1]
    arr = pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(data)])
    try:
        arr.cast(pa.large_string())
    except pa.ArrowInvalid:
        return False
    return True


def _decode_error(path: str, data: bytes, encoding: str, err: UnicodeDecodeError) -> ProcessError:
    line = data.count(b"\n", 0, err.start) + 1
    bad = data[err.start : err.start + 4]
    return ProcessError(
        f"{path}: undecodable bytes {bad!r} at byte offset {err.start} (line {line}, counting the header "
        f"as line 1) as {encoding}; the file mixes encodings or is damaged. Fix that line, or re-save the "
        f"whole file as UTF-8 (e.g. `iconv -f GB18030 -t UTF-8`)"
    )


def detect_encoding(data: bytes, path: str = "input") -> str:
    """Codec of a table: one of utf-8, utf-8-sig, gbk, gb18030.

    chardet guesses from the first 64 KB; the guess is verified by decoding the whole file.
    Fallbacks are tried only where the guess is weak: an all-ASCII head says nothing about
    later bytes (utf-8, then gbk, then its superset gb18030), and GBK text with a character
    outside GBK needs gb18030. A head that is real UTF-8 Chinese with a bad byte later is
    damage, not another encoding: re-reading it as GB18030 would turn the whole file into
    mojibake, so that is an error.
    """
    if data.startswith(codecs.BOM_UTF8):
        candidates = ["utf-8-sig"]
    else:
        head = data[:DETECT_BYTES]
        if head.isascii():
            candidates = ["utf-8", "gbk", "gb18030"]
        else:
            import chardet  # imported here: only needed for non-ASCII heads

            guess = (chardet.detect(head)["encoding"] or "").lower()
            if guess in ("utf-8", "ascii"):
                candidates = ["utf-8"]
            elif guess in GB_FAMILY:
                candidates = ["gbk", "gb18030"]
            elif guess.startswith(("utf-16", "utf-32")):
                raise ProcessError(f"{path}: looks like {guess.upper()}; re-save it as UTF-8 (or GBK)")
            else:
                log.warning("%s: chardet guessed %r; trying UTF-8, GBK, GB18030", path, guess or None)
                candidates = ["utf-8", "gbk", "gb18030"]
    errors: list[tuple[str, UnicodeDecodeError]] = []
    for enc in candidates:
        if enc == "utf-8" and _is_utf8(data):
            return enc
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


def _check_header(path: str, data: bytes, columns: tuple[str, ...]) -> list[str]:
    first = data.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "replace")
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
    return header


def _parse_csv(path: str, data: bytes, columns: tuple[str, ...], n_header_cols: int) -> pa.Table:
    convert = pcsv.ConvertOptions(
        include_columns=list(columns),
        column_types={c: pa.string() for c in columns},
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    try:
        return pcsv.read_csv(io.BytesIO(data), convert_options=convert)
    except pa.ArrowInvalid as e:
        # The threaded reader does not say which row broke; the serial one does.
        try:
            pcsv.read_csv(io.BytesIO(data), convert_options=convert, read_options=pcsv.ReadOptions(use_threads=False))
            detail = str(e)
        except pa.ArrowInvalid as serial:
            detail = str(serial)
        hint = f"every row needs {n_header_cols} comma-separated fields; quote fields that contain commas"
        if "got 1" in detail and ("\t" in detail or ";" in detail):
            hint = "rows look tab- or semicolon-separated; the file must be comma-separated"
        raise ProcessError(f"{path}: {detail.replace('CSV parse error: ', 'CSV parse error at ')} ({hint})") from e


def _int_column(path: str, table: pa.Table, col: str) -> pa.Array:
    values = pc.utf8_trim_whitespace(table[col]).combine_chunks()
    ok = pc.match_substring_regex(values, r"^[0-9]{1,18}$")
    if not pc.all(ok).as_py():
        row = int(pc.index(ok, False).as_py())
        raise ProcessError(
            f"{path}: column {col!r} must hold non-negative integer ids; data row {row + 1} "
            f"(header not counted) has {values[row].as_py()!r}. Fix or remove that row"
        )
    return values.cast(pa.int64())


def read_table(path: Path, columns: tuple[str, ...], int_columns: tuple[str, ...]) -> tuple[pa.Table, str]:
    """One input table with the wanted columns (ids as int64, texts as str) and its encoding."""
    raw = read_raw(path)
    if not raw.strip():
        raise ProcessError(f"{path}: file is empty; expected a header {','.join(columns)} followed by rows")
    encoding = detect_encoding(raw, str(path))
    data = to_utf8(raw, encoding)
    header = _check_header(str(path), data, columns)
    if not data.split(b"\n", 1)[1:] or not data.split(b"\n", 1)[1].strip():
        raise ProcessError(f"{path}: has a header but no data rows")
    table = _parse_csv(str(path), data, columns, len(header))
    cols = {c: (_int_column(str(path), table, c) if c in int_columns else table[c].combine_chunks()) for c in columns}
    return pa.table(cols), encoding


# ----------------------------------------------------------------------------- clean


def _unescape_html(texts: pa.Array) -> pa.Array:
    # Entities are rare, so Python's complete html.unescape runs only on rows with "&".
    has_amp = pc.match_substring(texts, "&")
    n = pc.sum(has_amp).as_py() or 0
    if not n:
        return texts
    rows = texts.filter(has_amp).to_pylist()
    return pc.replace_with_mask(texts, has_amp, pa.array([html.unescape(t) for t in rows], pa.string()))


def clean_texts(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Unescape HTML entities, strip tags, delete invisible characters, collapse whitespace, trim."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    texts = _unescape_html(texts)
    texts = pc.replace_substring_regex(texts, RE_TAG, " ")
    texts = pc.replace_substring_regex(texts, RE_INVISIBLE, "")
    texts = pc.replace_substring_regex(texts, RE_SPACES, " ")
    return pc.utf8_trim(texts, " ")


def mask_pii(texts: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, dict[str, int]]:
    """Replace ID card numbers, mobile numbers and e-mail addresses by placeholders.

    Returns the masked texts and how many of each kind were replaced (counted as new
    placeholders, so text that already said "[PHONE]" is not counted).
    """
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    counts = {}
    for kind, pattern, placeholder in PII_PATTERNS:
        before = pc.sum(pc.count_substring(texts, placeholder)).as_py() or 0
        has = pc.match_substring_regex(texts, pattern)
        if pc.any(has).as_py():
            sub = texts.filter(has)
            repl = rf"\1{placeholder}\2" if kind != "email" else placeholder
            for _ in range(2):  # second pass: numbers that shared a neighbour with the previous one
                sub = pc.replace_substring_regex(sub, pattern, repl)
            texts = pc.replace_with_mask(texts, has, sub)
        counts[kind] = (pc.sum(pc.count_substring(texts, placeholder)).as_py() or 0) - before
    return texts, counts


@dataclass
class Stats:
    """Everything the metrics file reports; filled as the stage goes."""

    rows_read: dict[str, int] = field(default_factory=dict)
    encoding: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    pii_masked: dict[str, int] = field(default_factory=dict)
    other: dict[str, object] = field(default_factory=dict)

    def drop(self, reason: str, n: int) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + int(n)


def _keep_first(table: pa.Table, keys: list[str]) -> pa.Table:
    """Rows whose key occurs for the first time (file order kept)."""
    t = table.append_column("_row", pa.array(np.arange(len(table), dtype=np.int64)))
    first = t.group_by(keys, use_threads=False).aggregate([("_row", "min")])["_row_min"]
    mask = np.zeros(len(table), dtype=bool)
    mask[first.to_numpy()] = True
    return table.filter(pa.array(mask))


def dedupe_ids(path: str, table: pa.Table, id_col: str, what: str, stats: Stats) -> pa.Table:
    """Drop repeated rows of one id; the same id with different content is an error."""
    ids = table[id_col].to_numpy()
    if len(np.unique(ids)) == len(ids):
        return table
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
    """Drop empty, too-short and too-long texts, counting each reason."""
    n = pc.utf8_length(table[col]).to_numpy()
    empty, short, long_ = n == 0, (n > 0) & (n < lo), n > hi
    stats.drop(f"{what}_empty", empty.sum())
    stats.drop(f"{what}_too_short", short.sum())
    stats.drop(f"{what}_too_long", long_.sum())
    return table.filter(pa.array(~(empty | short | long_)))


# ----------------------------------------------------------------------------- split


def split_ids(qids: np.ndarray, seed: int, val_ratio: float, test_ratio: float) -> np.ndarray:
    """0/1/2 (train/val/test) per question id, from md5(f"{seed}:{qid}").

    A question's split depends only on its id and the seed: all its answers land together,
    and adding or removing other questions never moves it.
    """
    u = np.fromiter(
        (int.from_bytes(hashlib.md5(f"{seed}:{q}".encode()).digest()[:8], "big") for q in qids.tolist()),
        dtype=np.uint64,
        count=len(qids),
    ) / float(2**64)
    return np.where(u < test_ratio, 2, np.where(u < test_ratio + val_ratio, 1, 0)).astype(np.int8)


def official_split(qids: np.ndarray, dev_ids: np.ndarray, test_ids: np.ndarray) -> np.ndarray:
    """0/1/2 per question id: official dev ids -> val, test ids -> test, the rest -> train."""
    out = np.zeros(len(qids), dtype=np.int8)
    out[np.isin(qids, dev_ids)] = 1
    out[np.isin(qids, test_ids)] = 2
    return out


# ----------------------------------------------------------------------------- format


def _json_escape(texts: pa.Array) -> pa.Array:
    # Cleaned texts hold no control characters, so '\' and '"' are all JSON needs escaped;
    # the result equals orjson's output byte for byte (a test checks it).
    return pc.replace_substring(pc.replace_substring(texts, "\\", "\\\\"), '"', '\\"')


def chatml_lines(pairs: pa.Table, system_prompt: str) -> pa.Array:
    """One JSON line (with trailing newline) per pair, in the data contract's ChatML layout.

    Built column-wise: per-row dicts and json.dumps would cost more than all the cleaning.
    """
    head = '{"messages":[{"role":"system","content":' + orjson.dumps(system_prompt).decode()
    head += '},{"role":"user","content":"'
    return pc.binary_join_element_wise(
        head,
        _json_escape(pairs["question"]),
        '"},{"role":"assistant","content":"',
        _json_escape(pairs["answer"]),
        '"}],"question_id":',
        pc.cast(pairs["question_id"], pa.string()),
        ',"ans_id":',
        pc.cast(pairs["ans_id"], pa.string()),
        "}\n",
        "",  # separator
    )


def write_lines(path: Path, lines: pa.Array | pa.ChunkedArray) -> None:
    """Write strings that already end in a newline, straight from Arrow's buffers."""
    with open(path, "wb") as fh:
        chunks = lines.chunks if isinstance(lines, pa.ChunkedArray) else [lines]
        for chunk in chunks:
            if not len(chunk):
                continue
            chunk = chunk.cast(pa.large_string())  # 64-bit offsets: no 2 GB limit
            offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64)[chunk.offset : chunk.offset + len(chunk) + 1]
            fh.write(memoryview(chunk.buffers()[2])[offsets[0] : offsets[-1]])


# ----------------------------------------------------------------------------- candidates


def official_candidates(
    cands: pa.Table, questions: dict[int, str], answers: dict[int, str], test_qids: np.ndarray, stats: Stats
) -> list[dict]:
    """Official lists of the test questions (those of ``test_qids``), with cleaned texts.

    Candidates whose answer was dropped in cleaning are removed; a list left without its
    question text or without any true answer cannot be scored and is dropped. Labels are
    the official ones, and the order is the file's (true answers first): breaking score
    ties fairly is the evaluator's job.
    """
    cands = cands.filter(pc.is_in(cands["question_id"], pa.array(test_qids)))
    # Group by question without trusting the file to keep each list contiguous; the stable
    # sort keeps every list's own order.
    cands = cands.take(pa.array(np.argsort(cands["question_id"].to_numpy(), kind="stable")))
    out: list[dict] = []
    missing_answers = dropped_no_question = dropped_no_positive = 0
    qids = cands["question_id"].to_numpy()
    aids = cands["ans_id"].to_pylist()
    labels = cands["label"].to_pylist()
    if not len(qids):
        return out
    starts = np.flatnonzero(np.r_[True, qids[1:] != qids[:-1]])
    ends = np.r_[starts[1:], len(qids)]
    for s, e in zip(starts.tolist(), ends.tolist()):
        qid = int(qids[s])
        if qid not in questions:
            dropped_no_question += 1
            continue
        items = []
        for aid, label in zip(aids[s:e], labels[s:e]):
            content = answers.get(aid)
            if content is None:
                missing_answers += 1
                continue
            items.append({"ans_id": aid, "content": content, "label": int(label)})
        if not any(c["label"] for c in items):
            dropped_no_positive += 1
            continue
        out.append({"question_id": qid, "question": questions[qid], "candidates": items})
    stats.drop("candidates_answer_missing", missing_answers)
    stats.drop("candidate_lists_question_missing", dropped_no_question)
    stats.drop("candidate_lists_no_positive", dropped_no_positive)
    return out


def sampled_candidates(
    test_pairs: pa.Table, pool: pa.Table, num_negatives: int, seed: int, stats: Stats
) -> list[dict]:
    """Each test question's true answers plus ``num_negatives`` answers of other held-out questions.

    Negatives come from the val+test answers only, so no list shows a training answer, and
    never from the question itself. The list is shuffled with the seed so a true answer's
    position says nothing.
    """
    rng = np.random.default_rng(seed)
    pool_qid = pool["question_id"].to_numpy()
    pool_aid = pool["ans_id"].to_pylist()
    pool_text = pool["answer"].to_pylist()
    qids = test_pairs["question_id"].to_numpy()
    aids = test_pairs["ans_id"].to_pylist()
    questions = test_pairs["question"].to_pylist()
    answers = test_pairs["answer"].to_pylist()
    if not len(qids):
        return []
    starts = np.flatnonzero(np.r_[True, qids[1:] != qids[:-1]])
    ends = np.r_[starts[1:], len(qids)]
    # Draw everyone's indices in one call; a few extra per question cover rejected ones.
    draws = rng.integers(0, len(pool_qid), size=(len(starts), 2 * num_negatives + 8)) if len(pool_qid) else None
    out, short_lists = [], 0
    for i, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
        qid = int(qids[s])
        chosen: list[int] = []
        seen: set[int] = set()
        for j in draws[i].tolist() if draws is not None else []:
            if pool_qid[j] != qid and j not in seen:
                seen.add(j)
                chosen.append(j)
                if len(chosen) == num_negatives:
                    break
        if len(chosen) < num_negatives:  # tiny pools: take what the others have
            others = [j for j in rng.permutation(len(pool_qid)).tolist() if pool_qid[j] != qid and j not in seen]
            chosen += others[: num_negatives - len(chosen)]
            short_lists += len(chosen) < num_negatives
        items = [{"ans_id": aids[k], "content": answers[k], "label": 1} for k in range(s, e)]
        items += [{"ans_id": pool_aid[j], "content": pool_text[j], "label": 0} for j in chosen]
        order = rng.permutation(len(items)).tolist()
        out.append({"question_id": qid, "question": questions[s], "candidates": [items[k] for k in order]})
    stats.other["candidate_lists_short"] = short_lists
    return out


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
        if key in tables and not pc.all(pc.is_in(tables[key]["label"], pa.array([0, 1], pa.int64()))).as_py():
            raise ProcessError(f"{raw_dir}/{key}: column 'label' must be 0 or 1")
    return tables["question"], tables["answer"], tables.get("dev_candidates"), tables.get("test_candidates")


def main(params: Params) -> None:
    data: DataParams = params.data
    cfg: ProcessParams = params.process
    log.info("process params: %s; data: %s", cfg, data)
    t_start = time.perf_counter()
    raw_dir, out_dir = Path(data.raw_dir), Path(data.processed_dir)
    stats = Stats()

    questions, answers, dev_cands, test_cands = load_inputs(raw_dir, stats)
    qfile = str(find_input(raw_dir, QUESTION_NAMES))
    afile = str(find_input(raw_dir, ANSWER_NAMES))

    # Orphans are a property of the files, so they are counted before the limit and cleaning.
    q_ids, a_qids = questions["question_id"], answers["question_id"]
    stats.other["answers_without_questions"] = int(len(a_qids) - (pc.sum(pc.is_in(a_qids, q_ids)).as_py() or 0))
    stats.other["questions_without_answers"] = int(len(q_ids) - (pc.sum(pc.is_in(q_ids, a_qids)).as_py() or 0))

    questions = questions.set_column(1, "content", clean_texts(questions["content"]))
    answers = answers.set_column(2, "content", clean_texts(answers["content"]))
    questions = dedupe_ids(qfile, questions, "question_id", "question", stats)
    answers = dedupe_ids(afile, answers, "ans_id", "answer", stats)

    if cfg.limit:
        questions = questions.slice(0, cfg.limit)
        answers = answers.filter(pc.is_in(answers["question_id"], questions["question_id"]))
        log.info("process.limit=%d: %d questions, %d answers kept", cfg.limit, len(questions), len(answers))
    input_qids = questions["question_id"]  # before the length filters: what cleaning may lose

    if cfg.mask_pii:
        q_masked, q_counts = mask_pii(questions["content"])
        a_masked, a_counts = mask_pii(answers["content"])
        questions = questions.set_column(1, "content", q_masked)
        answers = answers.set_column(2, "content", a_masked)
        stats.pii_masked = {k: q_counts[k] + a_counts[k] for k in q_counts}

    questions = length_filter(questions, "content", cfg.min_question_chars, cfg.max_question_chars, "question", stats)
    answers = length_filter(answers, "content", cfg.min_answer_chars, cfg.max_answer_chars, "answer", stats)

    # Merge: inner join through an index lookup (deterministic order, unlike a hash join).
    idx = pc.index_in(answers["question_id"], value_set=questions["question_id"])
    has_q = pc.is_valid(idx)
    stats.drop("answer_question_missing", len(answers) - (pc.sum(has_q).as_py() or 0))
    kept = answers.filter(has_q)
    pairs = pa.table({
        "question_id": kept["question_id"],
        "ans_id": kept["ans_id"],
        "question": questions["content"].take(idx.filter(has_q)),
        "answer": kept["content"],
    }).sort_by([("question_id", "ascending"), ("ans_id", "ascending")])
    before = len(pairs)
    pairs = _keep_first(pairs, ["question", "answer"])
    stats.drop("duplicate_pairs", before - len(pairs))
    if not len(pairs):
        raise ProcessError(
            f"no question/answer pairs left after cleaning {raw_dir} (drops: {stats.dropped}, answers without "
            f"questions: {stats.other['answers_without_questions']}); check that the two files belong together "
            f"and the process.*_chars bounds"
        )

    pair_qids = pairs["question_id"].to_numpy()
    uniq_qids, inverse = np.unique(pair_qids, return_inverse=True)
    if dev_cands is not None:
        split_of_q = official_split(uniq_qids, dev_cands["question_id"].to_numpy(), test_cands["question_id"].to_numpy())
        stats.other["split_method"] = "official"
    else:
        split_of_q = split_ids(uniq_qids, cfg.seed, cfg.val_ratio, cfg.test_ratio)
        stats.other["split_method"] = "hash"
    pair_split = split_of_q[inverse]

    examples = pairs
    if cfg.answers_per_question == "first":
        # Pairs are sorted by (question_id, ans_id): the first row of each question is its first answer.
        first = np.r_[True, pair_qids[1:] != pair_qids[:-1]]
        stats.drop("answer_not_first", int((~first).sum()))
        examples = pairs.filter(pa.array(first))
        ex_split = pair_split[first]
    else:
        ex_split = pair_split

    test_pairs = pairs.filter(pa.array(pair_split == 2))
    if dev_cands is not None:
        q_text = dict(zip(questions["question_id"].to_pylist(), questions["content"].to_pylist()))
        a_text = dict(zip(answers["ans_id"].to_pylist(), answers["content"].to_pylist()))
        official_test = np.unique(test_cands["question_id"].to_numpy())
        test_qids = official_test[np.isin(official_test, input_qids.to_numpy())]
        stats.other["official_test_questions_not_in_input"] = int(len(official_test) - len(test_qids))
        lists = official_candidates(test_cands, q_text, a_text, test_qids, stats)
    else:
        if cfg.max_candidate_questions:
            cap_qids = np.unique(test_pairs["question_id"].to_numpy())[: cfg.max_candidate_questions]
            test_pairs = test_pairs.filter(pc.is_in(test_pairs["question_id"], pa.array(cap_qids)))
        pool = pairs.filter(pa.array(pair_split >= 1))
        lists = sampled_candidates(test_pairs, pool, cfg.num_negatives, cfg.seed, stats)
    if cfg.max_candidate_questions:
        lists = lists[: cfg.max_candidate_questions]
    if not lists:
        log.warning("no test question has a candidate list (see dropped.candidate_* in %s)", cfg.metrics_file)

    split_counts = {name: int((ex_split == i).sum()) for i, name in enumerate(SPLITS)}
    if not split_counts["train"]:
        raise ProcessError(
            f"no training examples: all {len(uniq_qids)} questions fell into val/test (check process.val_ratio/"
            f"test_ratio, or the candidate files in {raw_dir})"
        )
    for name in ("val", "test"):
        if not split_counts[name]:
            log.warning("the %s split is empty (%d questions in all)", name, len(uniq_qids))

    with atomic_path(out_dir, is_dir=True) as tmp:
        for i, name in enumerate(SPLITS):
            write_lines(tmp / f"{name}.jsonl", chatml_lines(examples.filter(pa.array(ex_split == i)), cfg.system_prompt))
        with open(tmp / "test_candidates.jsonl", "wb") as fh:
            for rec in lists:
                rec = {"question_id": rec["question_id"], "system": cfg.system_prompt,
                       "question": rec["question"], "candidates": rec["candidates"]}
                fh.write(orjson.dumps(rec) + b"\n")

    q_len = pc.utf8_length(questions.filter(pc.is_in(questions["question_id"], pa.array(uniq_qids)))["content"]).to_numpy()
    a_len = pc.utf8_length(examples["answer"]).to_numpy()
    metrics = {
        "rows_read": stats.rows_read,
        "encoding": stats.encoding,
        **stats.other,
        "dropped": stats.dropped,
        "pii_masked": stats.pii_masked,
        "examples": split_counts,
        "questions": {name: int((split_of_q == i).sum()) for i, name in enumerate(SPLITS)},
        "candidate_questions": len(lists),
        "candidates": sum(len(r["candidates"]) for r in lists),
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
