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
Run    ``python -m mediagent.pipeline.process`` (or ``dvc repro process``); for a quick run on part of
       the data: ``dvc exp run -S process.limit=1000``.

pyarrow reads the CSVs and cleans the texts (its RE2 regexes know Unicode classes such as
format characters, which Python's ``re`` does not); pandas does the table work (duplicates,
joins, splits); orjson writes every line. Any bad input raises ``ProcessError`` naming the
file, column or row and the fix, before anything is written.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import html
import io
import itertools
import logging
import re
import time
import zipfile
from pathlib import Path

import chardet
import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from mediagent.errors import UserError, run_stage
from mediagent.fileio import atomic_path, write_json
from mediagent.params import DataParams, Params, ProcessParams

log = logging.getLogger(__name__)


class ProcessError(UserError, ValueError):
    """The input data cannot be processed; the message names the file/column/row and the fix."""


# Input tables: accepted names, most specific first (`make data` unzips the official archives,
# whose members are question.csv, answer.csv, dev_candidates.txt and test_candidates.txt), the
# columns read and which are integer ids. The candidates' `cnt` (0..99) is not needed.
CANDIDATE_COLUMNS = ("question_id", "ans_id", "label")
INPUTS = {
    "question": (("question.csv", "questions.csv", "question.zip", "questions.zip"), ("question_id", "content"),
                 ("question_id",)),
    "answer": (("answer.csv", "answers.csv", "answer.zip", "answers.zip"), ("ans_id", "question_id", "content"),
               ("ans_id", "question_id")),
    **{key: ((f"{key}.txt", f"{key}.csv", f"{key}.zip"), CANDIDATE_COLUMNS, CANDIDATE_COLUMNS)
       for key in ("dev_candidates", "test_candidates")},
}
OUTPUT_FILES = ("train.jsonl", "val.jsonl", "test.jsonl", "test_candidates.jsonl")
SPLITS = ("train", "val", "test")

DETECT_BYTES = 64 * 1024  # chardet reads the head only (it is slow); the whole file is then verified
GB_FAMILY = ("gb2312", "gbk", "gb18030", "hz-gb-2312", "iso-2022-cn")

# Cleaning, RE2 syntax (pyarrow compute). Format characters (zero-width space, joiners, BOM,
# LRM) and control characters other than whitespace are deleted; every run of whitespace,
# Unicode spaces included (U+3000 ideographic space, U+00A0 from &nbsp;), becomes one ASCII
# space. cMedQA2 texts are single-line forum posts, so line breaks are scraping artefacts.
RE_INVISIBLE = r"[\p{Cf}\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f]"
RE_SPACES = r"[\pZ\t\n\v\f\r\x{85}]+"
# Only real tags: "<" must be followed by a letter, "/" or "!--", so "血糖<7" or "体温>38" survive.
RE_TAG = r"<!--.*?-->|</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>"
# Any character the cleaning could change, and what every PII pattern below needs.
RE_NEEDS_CLEANING = r"[<&\p{Cf}\pZ\x00-\x1f\x7f-\x9f]"
RE_PII_HINT = r"[0-9]{11}|@"

# PII, in this order: an ID card holds 11-digit runs, so IDs go before phones. The lookarounds
# ("not inside a longer digit run") are why masking uses Python's re: RE2 has none.
PII_PATTERNS = {
    "id_card": (re.compile(r"(?<![0-9A-Za-z])[1-9][0-9]{16}[0-9Xx](?![0-9A-Za-z])"), "[ID]"),
    "phone": (re.compile(r"(?<![0-9])1[3-9][0-9]{9}(?![0-9])"), "[PHONE]"),
    "email": (re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"), "[EMAIL]"),
}

# Every reason a row can be dropped for; all are reported (0 when unused) so the metric keys are
# the same in every run and `dvc metrics diff` lines up. duplicate_rows: the same row repeated;
# answer_question_missing: its question is not in the file or was dropped; duplicate_pairs: the
# same question and answer texts under other ids; answer_not_first: answers_per_question=first.
DROP_REASONS = (
    "question_duplicate_rows", "answer_duplicate_rows", "question_empty", "question_too_short", "question_too_long",
    "answer_empty", "answer_too_short", "answer_too_long", "answer_question_missing", "duplicate_pairs",
    "answer_not_first", "candidates_answer_missing", "candidate_lists_question_missing", "candidate_lists_no_positive",
)


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


def check_header(path: Path, head: bytes, columns: tuple[str, ...]) -> int:
    """Number of header fields of a UTF-8 table (``head``: its start); names a missing column or other delimiter."""
    first = head[:DETECT_BYTES].split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "replace")
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
    return len(header)


def parse_csv(path: Path, source: Path | bytes, columns: tuple[str, ...], int_columns: tuple[str, ...],
              n_fields: int) -> pa.Table:
    """A UTF-8 CSV file (or its bytes) as a table of ``columns``: ``int_columns`` int64, the rest text."""

    def read(types: dict, threads: bool = True) -> pa.Table:
        # null_values=[]: an empty id is an error, not a null that would join with nothing.
        convert = pcsv.ConvertOptions(include_columns=list(columns), column_types=types, null_values=[],
                                      strings_can_be_null=False, quoted_strings_can_be_null=False)
        try:
            return pcsv.read_csv(str(source) if isinstance(source, Path) else pa.BufferReader(source),
                                 read_options=pcsv.ReadOptions(use_threads=threads), convert_options=convert)
        except pa.ArrowInvalid as e:
            if "invalid UTF8" in str(e):  # the encoding guessed from the head was wrong
                raise UnicodeError(str(e)) from e
            raise

    types = {c: pa.int64() if c in int_columns else pa.string() for c in columns}
    try:
        return read(types)
    except pa.ArrowInvalid as e:
        msg = str(e)
    if "conversion error" in msg:  # Arrow names the value, not the row: find it with the ids as text
        as_text = read(dict.fromkeys(columns, pa.string()))
        for col in int_columns:
            for row, value in enumerate(as_text[col].to_pylist()):
                if not re.fullmatch(r"\s*[0-9]{1,18}\s*", value):
                    raise ProcessError(
                        f"{path}: column {col!r} must hold non-negative integer ids; data row {row + 1} "
                        f"(header not counted) has {value!r}. Fix or remove that row"
                    )
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
    """One input table (only ``columns``; ids int64, texts str) and the encoding it was in.

    A file whose head is UTF-8 is parsed straight from disk: the parser rejects bad UTF-8
    itself, and decoding 67 MB of answers in Python first would cost more than the parse
    (0.12 s against 0.09 s). The whole file is decoded only when that check fails or the
    head is in another encoding: to pick the codec and convert it, or to name the bad byte.
    """
    data = read_raw(path) if path.suffix.lower() == ".zip" else None
    with path.open("rb") if data is None else io.BytesIO(data) as fh:
        head = fh.read(DETECT_BYTES)
    if not head.strip():
        raise ProcessError(f"{path}: file is empty; expected a header {','.join(columns)} followed by rows")
    encoding, table = guess_encodings(head, str(path))[0], None
    if encoding in ("utf-8", "utf-8-sig"):
        n_fields = check_header(path, to_utf8(head, encoding), columns)
        with contextlib.suppress(UnicodeError):  # the parser skips a BOM itself
            table = parse_csv(path, path if data is None else data, columns, int_columns, n_fields)
    if table is None:
        data = read_raw(path) if data is None else data
        encoding = detect_encoding(data, str(path))  # raises with the offset unless some codec fits
        data = to_utf8(data, encoding)
        table = parse_csv(path, data, columns, int_columns, check_header(path, data, columns))
    if not len(table):
        raise ProcessError(f"{path}: has a header but no data rows")
    # One chunk per column: each later take (filter, join, sort) would concatenate the chunks again.
    return table.combine_chunks(), encoding


def load_inputs(raw_dir: Path, stats: dict) -> dict[str, tuple[Path, pa.Table]]:
    """Find, read and check every input table before any work is done: key -> (path, table)."""
    if not raw_dir.is_dir():
        raise ProcessError(f"data.raw_dir {str(raw_dir)!r} is not a directory; run `make data` or set data.raw_dir")
    paths = {key: next((raw_dir / n for n in names if (raw_dir / n).is_file()), None)
             for key, (names, _, _) in INPUTS.items()}
    for key in ("question", "answer"):
        if paths[key] is None:
            raise ProcessError(
                f"{raw_dir}: no {key} table (looked for {', '.join(INPUTS[key][0])}); put the cMedQA2 files "
                f"there (`make data`) or point data.raw_dir at a folder that has them"
            )
    dev_path, test_path = paths["dev_candidates"], paths["test_candidates"]
    if (dev_path is None) != (test_path is None):
        have, lack = (dev_path, "test_candidates") if dev_path else (test_path, "dev_candidates")
        raise ProcessError(
            f"{have} is present but {lack} (.txt/.csv/.zip) is not in {raw_dir}; the official split needs "
            f"both. Add it (`make data`) or remove {have.name} to use the seeded hash split"
        )
    tables = {}
    for key, path in paths.items():
        if path is None:
            continue
        table, stats["encoding"][key] = read_table(path, *INPUTS[key][1:])
        stats["rows_read"][key] = len(table)
        log.info("read %s: %d rows, %s", path, len(table), stats["encoding"][key])
        if key.endswith("candidates") and not pc.all(pc.is_in(table["label"], pa.array([0, 1]))).as_py():
            raise ProcessError(f"{raw_dir}/{key}: column 'label' must be 0 or 1")
        tables[key] = (path, table)
    return tables


def clean_texts(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Unescape HTML entities, strip tags, delete invisible characters, collapse whitespace, trim."""
    # Entities first (Python's table is complete), so an escaped tag ("&lt;b&gt;") goes too.
    texts = pa.array([html.unescape(t) for t in texts.to_pylist()], pa.string())
    texts = pc.replace_substring_regex(texts, RE_TAG, " ")
    texts = pc.replace_substring_regex(texts, RE_INVISIBLE, "")
    texts = pc.replace_substring_regex(texts, RE_SPACES, " ")
    return pc.utf8_trim(texts, " ")


def mask_pii(texts: list[str]) -> tuple[list[str], dict[str, int]]:
    """Replace ID card numbers, mobile numbers and e-mail addresses by placeholders.

    Returns the masked texts and how many of each kind were replaced (text that already
    said "[PHONE]" is not counted).
    """
    counts = dict.fromkeys(PII_PATTERNS, 0)
    out = []
    for text in texts:
        for kind, (pattern, placeholder) in PII_PATTERNS.items():
            text, n = pattern.subn(placeholder, text)
            counts[kind] += n
        out.append(text)
    return out, counts


def clean_table(table: pa.Table, mask: bool, stats: dict) -> pd.DataFrame:
    """The table as a DataFrame, its ``content`` cleaned and, if ``mask``, PII-masked (counted in stats).

    One regex scan finds the rows that need either: under 1% of real rows, and the scan
    (0.1 s for 226k answers) costs far less than the replacements on every row (0.3-0.7 s).
    """
    df = table.to_pandas()
    needs = pc.match_substring_regex(table["content"], RE_NEEDS_CLEANING + ("|" + RE_PII_HINT if mask else "")).to_numpy()
    if needs.any():
        texts = clean_texts(table["content"].filter(needs)).to_pylist()
        if mask:
            texts, counts = mask_pii(texts)
            stats["pii_masked"] = {k: stats["pii_masked"][k] + counts[k] for k in counts}
        df.loc[needs, "content"] = texts
    return df


def dedupe_ids(path: Path, df: pd.DataFrame, id_col: str, what: str, stats: dict) -> pd.DataFrame:
    """Drop repeated rows of one id; the same id with different content is an error."""
    if df[id_col].is_unique:
        return df
    repeated = df.duplicated()  # every column equal (after cleaning: spacing is no conflict)
    distinct = df[~repeated]
    conflicting = distinct[id_col][distinct[id_col].duplicated(keep=False)].unique()
    if len(conflicting):
        ids = df[id_col].to_numpy()
        examples = [f"{id_col} {i} on data rows {(np.flatnonzero(ids == i) + 1).tolist()[:5]}" for i in conflicting[:3]]
        raise ProcessError(
            f"{path}: {len(conflicting)} {id_col} value(s) appear more than once with different "
            f"{'/'.join(c for c in df.columns if c != id_col)} ({'; '.join(examples)}; header not counted). "
            f"Each {what} id must be unique: remove or renumber the duplicates"
        )
    stats["dropped"][f"{what}_duplicate_rows"] += int(repeated.sum())
    return distinct.reset_index(drop=True)


def length_filter(df: pd.DataFrame, lo: int, hi: int, what: str, stats: dict) -> pd.DataFrame:
    """Drop empty, too-short and too-long ``content``, counting each reason; adds its length as ``chars``."""
    chars = df["content"].str.len().to_numpy(dtype=np.int64)
    drops = {"empty": chars == 0, "too_short": (chars > 0) & (chars < lo), "too_long": chars > hi}
    for reason, rows in drops.items():
        stats["dropped"][f"{what}_{reason}"] += int(rows.sum())
    return df.assign(chars=chars)[~(drops["empty"] | drops["too_short"] | drops["too_long"])].reset_index(drop=True)


def make_pairs(questions: pd.DataFrame, answers: pd.DataFrame, stats: dict) -> pd.DataFrame:
    """Answers joined to their questions in answer.csv's order, less repeats of a (question, answer) text pair."""
    question_info = pd.DataFrame({"question_id": questions["question_id"], "question_chars": questions["chars"],
                                  "question_text": pd.factorize(questions["content"])[0]})  # equal texts, equal codes
    pairs = answers.rename(columns={"content": "answer"}).merge(question_info, on="question_id", validate="many_to_one")
    stats["dropped"]["answer_question_missing"] += int(len(answers) - len(pairs))
    # Equal pairs have equal answer lengths: answer texts are compared only where (question
    # text, answer length) repeats, which spares hashing every answer (0.3 s of 226k).
    duplicate = np.zeros(len(pairs), dtype=bool)
    maybe = pairs.duplicated(["question_text", "chars"], keep=False).to_numpy()
    duplicate[maybe] = pairs[maybe].duplicated(["question_text", "answer"])
    stats["dropped"]["duplicate_pairs"] += int(duplicate.sum())
    return pairs[~duplicate].reset_index(drop=True)


def official_heldout_ids(folder: Path) -> np.ndarray:
    """Question ids of the official dev/test candidate lists in ``folder`` (zip, txt or csv)."""
    files = [f for key in ("dev_candidates", "test_candidates") for f in sorted(folder.glob(f"{key}.*"))
             if f.suffix in (".zip", ".txt", ".csv")]
    if not files:
        raise ProcessError(f"process.heldout_candidates_dir: no dev_candidates/test_candidates (.zip/.txt/.csv) in "
                           f"{folder}; point it at the official files (`make data` puts them in data/raw) or set it to \"\"")
    try:
        return np.unique(np.concatenate([pd.read_csv(f, usecols=["question_id"])["question_id"].to_numpy() for f in files]))
    except (ValueError, OSError) as exc:
        raise ProcessError(f"process.heldout_candidates_dir: {files} unreadable ({exc}); expected the official "
                           f"question_id,ans_id,cnt,label tables") from exc


def split_ids(qids: np.ndarray, seed: int, val_ratio: float, test_ratio: float) -> np.ndarray:
    """0/1/2 (train/val/test) per question id, from a seeded hash of the id.

    A question's split depends only on its id and the seed: its answers land together, and
    other questions never move it. md5 is the same on every machine (str hash() is salted).
    """
    u = np.array([int.from_bytes(hashlib.md5(f"{seed}:{q}".encode()).digest()[:6], "big") for q in qids.tolist()],
                 dtype=np.float64) / 2**48  # 48 bits: exact in a float64, uniform in [0, 1)
    return np.select([u < test_ratio, u < test_ratio + val_ratio], [2, 1], 0).astype(np.int8)


# A candidates table: one row per candidate (question_id: its list's question), lists contiguous and in order.
CANDIDATE_FIELDS = ["question_id", "ans_id", "content", "label"]


def official_candidates(cands: pd.DataFrame, questions: pd.DataFrame, answers: pd.DataFrame, test_qids: np.ndarray,
                        stats: dict) -> pd.DataFrame:
    """Official lists of the questions in ``test_qids``, with the cleaned answer texts.

    Candidates whose answer was dropped in cleaning are removed; a list left without its
    question text or without any true answer cannot be scored and is dropped. Labels are
    the official ones, and each list keeps the file's order (true answers first): breaking
    score ties fairly is the evaluator's job. Lists come out by question id.
    """
    # Sorted without trusting the file to keep each list contiguous; stable keeps list order.
    c = cands[cands["question_id"].isin(test_qids)].sort_values("question_id", kind="stable")
    c = c.assign(content=c["ans_id"].map(answers.set_index("ans_id")["content"]))
    has_q, has_a, by_list = c["question_id"].isin(questions["question_id"]), c["content"].notna(), c["question_id"]
    list_has_q = has_q.groupby(by_list).first()
    positives = (has_a & (c["label"] == 1)).groupby(by_list).sum()
    stats["dropped"]["candidates_answer_missing"] += int((has_q & ~has_a).sum())
    stats["dropped"]["candidate_lists_question_missing"] += int((~list_has_q).sum())
    stats["dropped"]["candidate_lists_no_positive"] += int((list_has_q & (positives == 0)).sum())
    return c[has_a & by_list.map(list_has_q & (positives > 0))][CANDIDATE_FIELDS]


def sampled_candidates(pairs: pd.DataFrame, test_rows: np.ndarray, pool_rows: np.ndarray, num_negatives: int,
                       seed: int, stats: dict) -> pd.DataFrame:
    """Each test question's true answers plus ``num_negatives`` answers of other held-out questions.

    ``test_rows`` and ``pool_rows`` are positions in ``pairs``. Negatives come from the
    pool, the val+test answers, so no list shows a training answer, and never from the
    question itself; each list is shuffled with the seed so a true answer's position says nothing.
    """
    rng = np.random.default_rng(seed)
    qids = pairs["question_id"].to_numpy()
    lists, n_own = np.unique(qids[test_rows], return_counts=True)
    negatives = []
    for qid, n in zip(lists.tolist(), n_own.tolist()):
        # Enough distinct draws that num_negatives remain once the question's own answers
        # (all in the pool) are taken out; fewer only when the pool is that small.
        draw = pool_rows[rng.choice(len(pool_rows), size=min(len(pool_rows), num_negatives + n), replace=False)]
        negatives.append(draw[qids[draw] != qid][:num_negatives])
    stats["candidate_lists_short"] = sum(len(neg) < num_negatives for neg in negatives)
    rows = np.concatenate([test_rows, *negatives]).astype(np.int64)
    list_of = np.concatenate([qids[test_rows], np.repeat(lists, [len(neg) for neg in negatives])])
    labels = (np.arange(len(rows)) < len(test_rows)).astype(np.int64)  # the test rows are the true answers
    order = np.lexsort((rng.random(len(rows)), list_of))  # by list, shuffled within each
    cands = pairs.iloc[rows[order]].rename(columns={"answer": "content"})
    return cands.assign(question_id=list_of[order], label=labels[order])[CANDIDATE_FIELDS]


def build_candidates(cfg: ProcessParams, pairs: pd.DataFrame, pair_split: np.ndarray, test_cands: pd.DataFrame | None,
                     questions: pd.DataFrame, answers: pd.DataFrame, input_qids: np.ndarray, stats: dict) -> pd.DataFrame:
    """The test questions' lists: official ones when ``test_cands`` is given, else sampled.

    ``input_qids`` are the question ids before the length filters: an official list whose
    question was lost in cleaning is counted as dropped, one whose question was never in
    the input is not.
    """
    cap = cfg.max_candidate_questions
    if test_cands is not None:
        official_test = np.unique(test_cands["question_id"])
        test_qids = official_test[np.isin(official_test, input_qids)]
        stats["official_test_questions_not_in_input"] = len(official_test) - len(test_qids)
        cands = official_candidates(test_cands, questions, answers, test_qids, stats)
    else:
        test_rows = np.flatnonzero(pair_split == 2)
        if cap:  # before sampling: no work for lists that are cut
            test_qids = pairs["question_id"].to_numpy()[test_rows]
            test_rows = test_rows[np.isin(test_qids, np.unique(test_qids)[:cap])]
        cands = sampled_candidates(pairs, test_rows, np.flatnonzero(pair_split >= 1), cfg.num_negatives, cfg.seed, stats)
    if cap:
        cands = cands[cands["question_id"].isin(cands["question_id"].unique()[:cap])]
    return cands


def chatml_line(question_id: int, ans_id: int, question: str, answer: str, system_prompt: str) -> bytes:
    """One example as a JSON line in the data contract's ChatML layout."""
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": question},
                {"role": "assistant", "content": answer}]
    return orjson.dumps({"messages": messages, "question_id": question_id, "ans_id": ans_id},
                        option=orjson.OPT_APPEND_NEWLINE)


def candidate_lines(cands: pd.DataFrame, question_text: dict[int, str], system_prompt: str):
    """One JSON line per list: {"question_id", "system", "question", "candidates": [{"ans_id", "content", "label"}]}."""
    rows = zip(*(cands[c].tolist() for c in CANDIDATE_FIELDS))
    for qid, group in itertools.groupby(rows, key=lambda row: row[0]):
        yield orjson.dumps({
            "question_id": qid, "system": system_prompt, "question": question_text[qid],
            "candidates": [{"ans_id": a, "content": text, "label": label} for _, a, text, label in group],
        }, option=orjson.OPT_APPEND_NEWLINE)


def write_examples(paths: list[Path], examples: pd.DataFrame, split: np.ndarray, question_text: dict[int, str],
                   system_prompt: str) -> None:
    """Write example i's line to paths[split[i]], keeping the examples' order within each file."""
    rows = zip(split.tolist(), examples["question_id"].tolist(), examples["ans_id"].tolist(), examples["answer"].tolist())
    with contextlib.ExitStack() as stack:
        # 1 MB buffers: one write call per MB, not per 8 KB (0.17 s less for 226k lines).
        files = [stack.enter_context(open(p, "wb", buffering=1 << 20)) for p in paths]
        for k, qid, aid, answer in rows:
            files[k].write(chatml_line(qid, aid, question_text[qid], answer, system_prompt))


def _percentiles(prefix: str, lengths: np.ndarray) -> dict[str, float]:
    p50, p95 = np.percentile(lengths, [50, 95])  # never empty: main stops when no pair is left
    return {f"{prefix}_p50": round(float(p50), 1), f"{prefix}_p95": round(float(p95), 1), f"{prefix}_max": int(lengths.max())}


def main(params: Params) -> None:
    data: DataParams = params.data
    cfg: ProcessParams = params.process
    log.info("process params: %s; data: %s", cfg, data)
    t_start = time.perf_counter()
    raw_dir, out_dir = Path(data.raw_dir), Path(data.processed_dir)
    # The metrics file, filled as the stage goes.
    stats = {"rows_read": {}, "encoding": {}, "dropped": dict.fromkeys(DROP_REASONS, 0),
             "pii_masked": dict.fromkeys(PII_PATTERNS, 0), "candidate_lists_short": 0,
             "official_test_questions_not_in_input": 0}
    tables = load_inputs(raw_dir, stats)
    (qfile, questions), (afile, answers) = tables["question"], tables["answer"]
    # Cleaning (and masking) before the duplicate checks: rows that differ only in spacing or
    # markup are the same row, not a conflict.
    questions, answers = clean_table(questions, cfg.mask_pii, stats), clean_table(answers, cfg.mask_pii, stats)
    # Orphans are a property of the files: counted before duplicates and the limit go.
    stats["answers_without_questions"] = int((~answers["question_id"].isin(questions["question_id"])).sum())
    stats["questions_without_answers"] = int((~questions["question_id"].isin(answers["question_id"])).sum())
    questions = dedupe_ids(qfile, questions, "question_id", "question", stats)
    answers = dedupe_ids(afile, answers, "ans_id", "answer", stats)
    if cfg.limit:
        questions = questions.head(cfg.limit)
        answers = answers[answers["question_id"].isin(questions["question_id"])]
        log.info("process.limit=%d: %d questions, %d answers kept", cfg.limit, len(questions), len(answers))
    input_qids = questions["question_id"].to_numpy()  # before the length filters: what cleaning may lose
    questions = length_filter(questions, cfg.min_question_chars, cfg.max_question_chars, "question", stats)
    answers = length_filter(answers, cfg.min_answer_chars, cfg.max_answer_chars, "answer", stats)
    pairs = make_pairs(questions, answers, stats)
    if pairs.empty:
        raise ProcessError(
            f"no question/answer pairs left after cleaning {raw_dir} (drops: {stats['dropped']}, answers without "
            f"questions: {stats['answers_without_questions']}); check that the two files belong together "
            f"and the process.*_chars bounds"
        )

    codes, qids = pd.factorize(pairs["question_id"])  # qids in order of first appearance
    if "dev_candidates" in tables:
        # Official dev ids -> val, test ids -> test, the rest -> train.
        split_of_q = np.zeros(len(qids), dtype=np.int8)
        split_of_q[np.isin(qids, tables["dev_candidates"][1]["question_id"])] = 1
        split_of_q[np.isin(qids, tables["test_candidates"][1]["question_id"])] = 2
        stats["split_method"] = "official"
    else:
        split_of_q, stats["split_method"] = split_ids(qids, cfg.seed, cfg.val_ratio, cfg.test_ratio), "hash"
        if cfg.heldout_candidates_dir:
            official = np.isin(qids, official_heldout_ids(Path(cfg.heldout_candidates_dir)))
            split_of_q[official] = 2
            stats["official_heldout_questions"] = int(official.sum())
    pair_split = split_of_q[codes]
    first = ~pairs["question_id"].duplicated().to_numpy()  # each question's first answer (official ids ascend)
    examples, ex_split = pairs, pair_split
    if cfg.answers_per_question == "first":
        stats["dropped"]["answer_not_first"] += int((~first).sum())
        examples, ex_split = pairs[first], pair_split[first]
    split_counts = {name: int((ex_split == i).sum()) for i, name in enumerate(SPLITS)}
    if not split_counts["train"]:
        raise ProcessError(
            f"no training examples: all {len(qids)} questions fell into val/test (check process.val_ratio/"
            f"test_ratio, or the candidate files in {raw_dir})"
        )
    for name in ("val", "test"):
        if not split_counts[name]:
            log.warning("the %s split is empty (%d questions in all)", name, len(qids))

    test_cands = tables["test_candidates"][1].to_pandas() if "test_candidates" in tables else None
    cands = build_candidates(cfg, pairs, pair_split, test_cands, questions, answers, input_qids, stats)
    question_text = dict(zip(questions["question_id"].tolist(), questions["content"].tolist()))
    with atomic_path(out_dir, is_dir=True) as tmp:
        write_examples([tmp / f"{name}.jsonl" for name in SPLITS], examples, ex_split, question_text, cfg.system_prompt)
        with open(tmp / "test_candidates.jsonl", "wb") as fh:
            fh.writelines(candidate_lines(cands, question_text, cfg.system_prompt))
    n_lists = cands["question_id"].nunique()
    if not n_lists:
        log.warning("no test question has a candidate list (see dropped.candidate_* in %s)", cfg.metrics_file)

    stats.update(
        examples=split_counts, questions={name: int((split_of_q == i).sum()) for i, name in enumerate(SPLITS)},
        candidate_questions=n_lists, candidates=len(cands),
        length={**_percentiles("question", pairs["question_chars"].to_numpy()[first]),
                **_percentiles("answer", examples["chars"].to_numpy())},
    )
    write_json(cfg.metrics_file, stats)
    log.info(
        "wrote %s: train %d / val %d / test %d examples, %d candidate lists (%.2fs)",
        out_dir, split_counts["train"], split_counts["val"], split_counts["test"], n_lists, time.perf_counter() - t_start,
    )


if __name__ == "__main__":
    run_stage(main)
