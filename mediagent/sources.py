"""A user's own data for the ``process`` stage: the files of a ``data.sources`` entry as dialogues.

Formats (keys of ``params.SOURCE_COLUMNS``; docs/data.md has a params.yaml snippet for each):

- ``alpaca``: JSON or JSON Lines records ``{instruction, input, output, system, history}``,
  ``history`` a list of earlier ``[question, answer]`` pairs;
- ``sharegpt``: ``{conversations: [{from: human|gpt|system, value}], system}``;
- ``messages``: ``{messages: [{role: user|assistant|system, content}]}`` (OpenAI's layout);
  in either, the turns may also be plain strings, user first and alternating, with an
  optional "问：" / "答：" mark;
- ``table``: CSV/TSV (UTF-8 with or without BOM, GBK, GB18030) or ``.xlsx``, one question
  and one answer column.

``columns`` maps a format key to the file's own field name where it differs (LLaMA-Factory's
``dataset_info.json`` convention). Every record becomes one dialogue: an optional system
message, then user/assistant turns alternating, ending with the assistant. Anything else
(a missing field, an unknown role, a dialogue ending with a user turn, an empty answer, a
malformed JSON line) raises ``ProcessError`` naming the file, line or row, the field and what
to write in params.yaml: a silent mis-mapping would train on empty or wrong answers.

JSON Lines are parsed line by line with orjson, so a malformed line is named by its number;
pandas reads CSV/TSV (after the shared encoding detection) and xlsx (openpyxl).
"""

from __future__ import annotations

import glob
import hashlib
import io
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa

from mediagent.data_params import SourceParams
from mediagent.encodings import detect_encoding
from mediagent.errors import ProcessError
from mediagent.params import ProcessParams
from mediagent.text_clean import clean_table, question_key

# Each format's field names when params.yaml maps none; only question/answer/messages (and a
# dialogue's role and content) must exist: the others are optional unless mapped explicitly.
DEFAULT_COLUMNS = {
    "alpaca": {
        "question": "instruction",
        "input": "input",
        "answer": "output",
        "system": "system",
        "history": "history",
        "id": "id",
    },
    "table": {"question": "question", "answer": "answer", "system": "system", "id": "id"},
    "sharegpt": {
        "messages": "conversations",
        "role": "from",
        "content": "value",
        "user": "human",
        "assistant": "gpt",
        "system_role": "system",
        "system": "system",
        "id": "id",
    },
    "messages": {
        "messages": "messages",
        "role": "role",
        "content": "content",
        "user": "user",
        "assistant": "assistant",
        "system_role": "system",
        "system": "system",
        "id": "id",
    },
}
OPTIONAL = ("input", "system", "history", "id")
# A dialogue given as a list of strings marks its turns "问：" (question) and "答：" (answer).
PREFIX = re.compile(r"^\s*[问答][：:]\s*")
SUFFIXES = {
    "table": (".csv", ".tsv", ".xlsx"),
    **dict.fromkeys(("alpaca", "sharegpt", "messages"), (".json", ".jsonl")),
}


class Dialogue(NamedTuple):
    ref: str  # the file and its line, record or row
    system: str | None  # the record's own system text, else the source's system_prompt, else None
    turns: list[tuple[str, str]]  # (role, text): user, assistant, user, ..., assistant


def source_files(src: SourceParams, where: str) -> list[Path]:
    """The files a source names: the file itself, a folder's files of the format, or a glob's matches."""
    suffixes = SUFFIXES[src.format]
    if any(c in src.path for c in "*?["):
        files = [Path(f) for f in sorted(glob.glob(src.path, recursive=True)) if Path(f).is_file()]
    elif Path(src.path).is_dir():
        files = sorted(f for f in Path(src.path).rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
    else:
        files = [Path(src.path)] if Path(src.path).is_file() else []
    if not files:
        raise ProcessError(
            f"{where}.path: {src.path!r} matches no file; name a file, a folder with "
            f"{'/'.join(suffixes)} files, or a glob such as data/raw/own/*{suffixes[0]}"
        )
    wrong = [f for f in files if f.suffix.lower() not in suffixes]
    if wrong:
        raise ProcessError(
            f"{wrong[0]}: format {src.format} reads {'/'.join(suffixes)} files; set {where}.format "
            f"to the file's format or narrow {where}.path"
        )
    return files


def decode(path: Path) -> tuple[str, str]:
    """A text file's content and its detected encoding (UTF-8, UTF-8 with BOM, GBK, GB18030)."""
    data = path.read_bytes()
    encoding = detect_encoding(data, str(path))
    return data.decode(encoding), encoding


def json_records(path: Path) -> tuple[list[tuple[str, object]], str]:
    """(ref, record) of a JSON array file or a JSON Lines file, and the file's encoding."""
    text, encoding = decode(path)
    if path.suffix.lower() == ".json" or text.lstrip().startswith("["):
        try:
            records = orjson.loads(text)
        except orjson.JSONDecodeError as e:
            raise ProcessError(
                f"{path}: not valid JSON ({e}); fix the file, or write one JSON object per line in a .jsonl file"
            ) from e
        if not isinstance(records, list):
            raise ProcessError(
                f"{path}: expected a JSON array of records [{{...}}, ...], got a "
                f"{type(records).__name__}; wrap the records in [ ]"
            )
        return [(f"{path} record {i + 1}", r) for i, r in enumerate(records)], encoding
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((f"{path} line {n}", orjson.loads(line)))
            except orjson.JSONDecodeError as e:
                raise ProcessError(
                    f"{path} line {n}: malformed JSON ({e}); fix that line (one JSON object per line) or delete it"
                ) from e
    return out, encoding


def table_records(path: Path, sheet: str, where: str) -> tuple[list[tuple[str, dict]], str]:
    """(ref, row) of a CSV/TSV/xlsx table (every cell as text, empty cells ""), and its encoding."""
    if path.suffix.lower() == ".xlsx":
        with pd.ExcelFile(path, engine="openpyxl") as book:
            if not sheet and len(book.sheet_names) > 1:
                raise ProcessError(
                    f"{path}: has sheets {book.sheet_names} and none is named; add "
                    f"`sheet: {book.sheet_names[0]}` (the one to read) to {where}"
                )
            if sheet and sheet not in book.sheet_names:
                raise ProcessError(f"{path}: no sheet {sheet!r} (sheets: {book.sheet_names}); fix {where}.sheet")
            df, encoding = book.parse(sheet or 0, dtype=str).fillna(""), "xlsx"
    else:
        text, encoding = decode(path)
        try:
            df = pd.read_csv(
                io.StringIO(text), sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype=str, keep_default_na=False
            )
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            raise ProcessError(
                f"{path}: cannot be read as a table ({e}); quote fields that contain the "
                f"delimiter, or save it as .tsv if it is tab-separated"
            ) from e
    df.columns = [str(c).strip() for c in df.columns]
    # Row numbers as a spreadsheet shows them: the header is row 1.
    return [(f"{path} row {i + 2}", r) for i, r in enumerate(df.to_dict("records"))], encoding


def _field(rec: dict, cols: dict, key: str, ref: str, where: str, explicit: set) -> object:
    """A record's value for a format key; None when an optional, unmapped field is absent."""
    name = cols[key]
    if name in rec:
        return rec[name]
    if key in OPTIONAL and key not in explicit:
        return None
    raise ProcessError(
        f"{ref}: no field {name!r} for the {key} (fields there: {', '.join(map(str, rec)) or 'none'}); "
        f"name the right one in params.yaml: {where}.columns.{key}: <field>"
    )


def _text(value: object, ref: str, what: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ProcessError(f"{ref}: the {what} is a {type(value).__name__}, not text; map a text field to it")


def single_turns(rec: dict, cols: dict, ref: str, where: str, explicit: set) -> list[tuple[str, str]]:
    """alpaca / table: history pairs (alpaca), then the question and its answer."""
    question = _text(_field(rec, cols, "question", ref, where, explicit), ref, "question")
    if "input" in cols and (extra := _text(_field(rec, cols, "input", ref, where, explicit), ref, "input")).strip():
        question = f"{question}\n{extra}"  # alpaca: the instruction, then its input
    turns = []
    history = _field(rec, cols, "history", ref, where, explicit) if "history" in cols else None
    for k, pair in enumerate(history or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise ProcessError(
                f"{ref}: history item {k + 1} is {pair!r}, not a [question, answer] pair; fix the "
                f"record or map {where}.columns.history to the right field"
            )
        turns += [
            ("user", _text(pair[0], ref, "history question")),
            ("assistant", _text(pair[1], ref, "history answer")),
        ]
    return [
        *turns,
        ("user", question),
        ("assistant", _text(_field(rec, cols, "answer", ref, where, explicit), ref, "answer")),
    ]


def dialogue_turns(rec: dict, cols: dict, ref: str, where: str, explicit: set) -> tuple[str | None, list]:
    """sharegpt / messages: the system turn (if first) and the user/assistant turns with their roles mapped."""
    turns = _field(rec, cols, "messages", ref, where, explicit)
    if not isinstance(turns, list):
        raise ProcessError(
            f"{ref}: {cols['messages']!r} is not a list of turns; map {where}.columns.messages "
            f"to the field holding them"
        )
    if turns and all(isinstance(turn, str) for turn in turns):  # ["问：…", "答：…", …]: user first, alternating
        return None, [("user" if k % 2 == 0 else "assistant", PREFIX.sub("", turn)) for k, turn in enumerate(turns)]
    roles = {cols["user"]: "user", cols["assistant"]: "assistant", cols["system_role"]: "system"}
    system, out = None, []
    for k, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise ProcessError(
                f"{ref}: turn {k} is {turn!r}, not an object with {cols['role']!r} and {cols['content']!r}"
            )
        role = _field(turn, cols, "role", f"{ref} turn {k}", where, explicit)
        if role not in roles:
            raise ProcessError(
                f"{ref} turn {k}: role {role!r} is neither {cols['user']!r} (user) nor "
                f"{cols['assistant']!r} (assistant); map it in params.yaml: {where}.columns.user: "
                f"<role> or {where}.columns.assistant: <role>"
            )
        text = _text(_field(turn, cols, "content", f"{ref} turn {k}", where, explicit), f"{ref} turn {k}", "content")
        if roles[role] == "system" and k == 1:
            system = text
        else:
            out.append((roles[role], text))
    return system, out


def check_dialogue(ref: str, turns: list[tuple[str, str]], where: str, cols: dict) -> None:
    """User/assistant alternating from the user, ending with a non-empty assistant answer each time."""
    for k, (role, text) in enumerate(turns):
        expected = "user" if k % 2 == 0 else "assistant"
        if role != expected:
            raise ProcessError(
                f"{ref}: turn {k + 1} is {role!r} where {expected!r} is expected; turns must alternate "
                f"user/assistant starting with the user (a system turn only first); fix the record"
            )
        if role == "assistant" and not text.strip():
            field = cols.get("content") or cols.get("answer")
            raise ProcessError(
                f"{ref}: assistant turn {k // 2 + 1} ({field!r}) is empty; fill it or drop the record, "
                f"or map {where}.columns to the field that holds the answers"
            )
    if not turns or turns[-1][0] != "assistant":
        raise ProcessError(
            f"{ref}: the dialogue ends with a user turn (or has none); the last turn must be the "
            f"assistant's answer: remove the unanswered question"
        )


def read_source(src: SourceParams, where: str, limit: int) -> tuple[list[Dialogue], dict]:
    """Every dialogue of a non-cMedQA2 source (the first ``limit`` if > 0) and what was read (files, rows, encodings)."""
    cols = {**DEFAULT_COLUMNS[src.format], **src.columns}
    explicit = set(src.columns)
    dialogues, info = [], {"format": src.format, "files": 0, "rows_read": 0, "encoding": {}}
    for path in source_files(src, where):
        if src.format == "table":
            records, encoding = table_records(path, src.sheet, where)
        else:
            records, encoding = json_records(path)
        info["files"] += 1
        info["rows_read"] += len(records)
        info["encoding"][str(path)] = encoding
        for ref, rec in records:
            if not isinstance(rec, dict):
                raise ProcessError(f"{ref}: expected a JSON object {{...}}, got {type(rec).__name__}")
            if (rid := _field(rec, cols, "id", ref, where, explicit)) not in (None, ""):
                ref = f"{ref} (id {rid})"  # errors name the record by the user's own id too
            if src.format in ("alpaca", "table"):
                system, turns = (
                    _field(rec, cols, "system", ref, where, explicit),
                    single_turns(rec, cols, ref, where, explicit),
                )
            else:
                (system, turns), own = (
                    dialogue_turns(rec, cols, ref, where, explicit),
                    _field(rec, cols, "system", ref, where, explicit),
                )
                system = system if system is not None else own
            check_dialogue(ref, turns, where, cols)
            system = _text(system, ref, "system").strip() or src.system_prompt or None
            dialogues.append(Dialogue(ref, system, turns))
            if limit and len(dialogues) == limit:
                return dialogues, info
    return dialogues, info


# Ids of examples from these sources: stable hashes above any cMedQA2 id (8 digits), so the
# two never collide and a question keeps its id (and split) whichever file carries it.
OWN_ID_BASE = 1 << 56


def stable_id(text: str) -> int:
    """OWN_ID_BASE + the first 7 bytes of the text's md5 (the same on every machine)."""
    return OWN_ID_BASE | int.from_bytes(hashlib.md5(text.encode()).digest()[:7], "big")


def _drop_reasons(chars: np.ndarray, is_user: np.ndarray, cfg: ProcessParams) -> np.ndarray:
    """Per turn: "" (kept) or the length reason, with the question bounds for user turns, the answer bounds else."""
    lo = np.where(is_user, cfg.min_question_chars, cfg.min_answer_chars)
    hi = np.where(is_user, cfg.max_question_chars, cfg.max_answer_chars)
    return np.select([chars == 0, chars < lo, chars > hi], ["empty", "too_short", "too_long"], "")


def dialogue_pairs(dialogues: list[Dialogue], cfg: ProcessParams, system_prompt: str, stats: dict) -> pd.DataFrame:
    """Dialogues cleaned and masked like cMedQA2 texts, as rows of the stage's pairs table.

    A dialogue with any turn outside the process.*_chars bounds is dropped whole (counted
    once, under its first such turn's reason); repeats of a dialogue are dropped as
    duplicate_pairs. Columns: question_id (``stable_id`` of the first question's
    ``question_key``: twins share it), ans_id (of the whole dialogue), question and answer
    (the final exchange), history (earlier turns as messages; ``weight: 0`` on their answers
    when process.train_on is last_turn), system, qkey, chars, question_chars, content_key.
    """
    n = np.array([len(d.turns) for d in dialogues], dtype=np.int64)
    flat = pa.table({"content": pa.array([t for d in dialogues for _, t in d.turns], pa.string())})
    texts = clean_table(flat, cfg.mask_pii, stats)["content"].tolist()
    is_user = np.array([r == "user" for d in dialogues for r, _ in d.turns], dtype=bool)
    reason = _drop_reasons(np.fromiter(map(len, texts), np.int64, len(texts)), is_user, cfg)
    starts = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)
    rows = []
    for i, d in enumerate(dialogues):
        turn = slice(starts[i], starts[i] + n[i])
        bad = np.flatnonzero(reason[turn])
        if len(bad):
            k = starts[i] + bad[0]
            stats["dropped"][f"{'question' if is_user[k] else 'answer'}_{reason[k]}"] += 1
            continue
        t = texts[turn]
        history = [{"role": "user" if j % 2 == 0 else "assistant", "content": text} for j, text in enumerate(t[:-2])]
        if cfg.train_on == "last_turn":  # earlier answers are context only (ChatFormat.encode honours weight 0)
            history = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in history]
        rows.append((t[0], t[-2], t[-1], history or None, d.system or system_prompt, "\x1f".join(t)))
    df = pd.DataFrame(rows, columns=["first", "question", "answer", "history", "system", "content_key"])
    df["qkey"] = question_key(df["first"])
    df["question_id"] = np.array([stable_id(k) for k in df["qkey"].tolist()], dtype=np.int64)
    df["ans_id"] = np.array([stable_id(k) for k in df["content_key"].tolist()], dtype=np.int64)
    df["chars"], df["question_chars"] = df["answer"].str.len(), df["question"].str.len()
    repeated = df["content_key"].duplicated().to_numpy()
    stats["dropped"]["duplicate_pairs"] += int(repeated.sum())
    return df[~repeated].drop(columns="first").reset_index(drop=True)
