"""Reading cMedQA2's CSV tables (``question.csv``, ``answer.csv``, the official candidate lists)
and joining the cleaned questions and answers into pairs.

pyarrow parses the CSVs; any bad input raises ``ProcessError`` naming the file, column or
row and the fix, before anything is written.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from mediagent.encodings import (
    DETECT_BYTES,
    detect_encoding,
    guess_encodings,
    read_raw,
    to_utf8,
)
from mediagent.errors import ProcessError
from mediagent.text_clean import question_key

log = logging.getLogger(__name__)

# Input tables: accepted names, most specific first (`make data` unzips the official archives,
# whose members are question.csv, answer.csv, dev_candidates.txt and test_candidates.txt), the
# columns read and which are integer ids. The candidates' `cnt` (0..99) is not needed.
CANDIDATE_COLUMNS = ("question_id", "ans_id", "label")
INPUTS = {
    "question": (
        ("question.csv", "questions.csv", "question.zip", "questions.zip"),
        ("question_id", "content"),
        ("question_id",),
    ),
    "answer": (
        ("answer.csv", "answers.csv", "answer.zip", "answers.zip"),
        ("ans_id", "question_id", "content"),
        ("ans_id", "question_id"),
    ),
    **{
        key: ((f"{key}.txt", f"{key}.csv", f"{key}.zip"), CANDIDATE_COLUMNS, CANDIDATE_COLUMNS)
        for key in ("dev_candidates", "test_candidates")
    },
}


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


def parse_csv(
    path: Path, source: Path | bytes, columns: tuple[str, ...], int_columns: tuple[str, ...], n_fields: int
) -> pa.Table:
    """A UTF-8 CSV file (or its bytes) as a table of ``columns``: ``int_columns`` int64, the rest text."""

    def read(types: dict, threads: bool = True) -> pa.Table:
        # null_values=[]: an empty id is an error, not a null that would join with nothing.
        convert = pcsv.ConvertOptions(
            include_columns=list(columns),
            column_types=types,
            null_values=[],
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        )
        try:
            return pcsv.read_csv(
                str(source) if isinstance(source, Path) else pa.BufferReader(source),
                read_options=pcsv.ReadOptions(use_threads=threads),
                convert_options=convert,
            )
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
    paths = {
        key: next((raw_dir / n for n in names if (raw_dir / n).is_file()), None)
        for key, (names, _, _) in INPUTS.items()
    }
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


def official_heldout_ids(folder: Path) -> np.ndarray:
    """Question ids of the official dev/test candidate lists in ``folder`` (zip, txt or csv)."""
    files = [
        f
        for key in ("dev_candidates", "test_candidates")
        for f in sorted(folder.glob(f"{key}.*"))
        if f.suffix in (".zip", ".txt", ".csv")
    ]
    if not files:
        raise ProcessError(
            f"process.heldout_candidates_dir: no dev_candidates/test_candidates (.zip/.txt/.csv) in "
            f'{folder}; point it at the official files (`make data` puts them in data/raw) or set it to ""'
        )
    try:
        return np.unique(
            np.concatenate([pd.read_csv(f, usecols=["question_id"])["question_id"].to_numpy() for f in files])
        )
    except (ValueError, OSError) as exc:
        raise ProcessError(
            f"process.heldout_candidates_dir: {files} unreadable ({exc}); expected the official "
            f"question_id,ans_id,cnt,label tables"
        ) from exc


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
    question_info = pd.DataFrame(
        {
            "question_id": questions["question_id"],
            "question_chars": questions["chars"],
            "question_text": pd.factorize(questions["content"])[0],  # equal texts, equal codes
            "qkey": question_key(questions["content"]),
        }
    )
    pairs = answers.rename(columns={"content": "answer"}).merge(question_info, on="question_id", validate="many_to_one")
    stats["dropped"]["answer_question_missing"] += int(len(answers) - len(pairs))
    # Equal pairs have equal answer lengths: answer texts are compared only where (question
    # text, answer length) repeats, which spares hashing every answer (0.3 s of 226k).
    duplicate = np.zeros(len(pairs), dtype=bool)
    maybe = pairs.duplicated(["question_text", "chars"], keep=False).to_numpy()
    duplicate[maybe] = pairs[maybe].duplicated(["question_text", "answer"])
    stats["dropped"]["duplicate_pairs"] += int(duplicate.sum())
    return pairs[~duplicate].reset_index(drop=True)
