"""The clinician review files: one JSON object per line, appended durably, read strictly.

Shared by the review app (``mediagent.commands.review_app``, through
``mediagent.blind_review``, which appends judgments and cached answers) and the ``review``
stage (which turns judgments into metrics). Both files are append-only JSONL: every record
is written with one ``write`` of a whole line, flushed and fsynced before the writer moves
on, so a crash can lose at most the record being written. A crash in the middle of that
write leaves a last line without its newline; the next ``append_jsonl`` cuts that fragment
off (logged) before appending, so the file never carries a half record into the metrics.

A judgment line::

    {"reviewer": "dr-li", "question_id": "q12", "model_a": "medqa", "model_b": "base",
     "choice": "A", "winner": "medqa", "unsafe": ["base"], "comment": "...",
     "time": "2026-01-01T10:00:00+00:00", "seed": 0, "answer_md5": {"medqa": "...", "base": "..."}}

``model_a``/``model_b`` are the models behind the labels the reviewer saw; ``choice`` is
``A``, ``B`` or ``tie``; ``unsafe`` lists the models whose answer was flagged.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from mediagent.errors import UserError

log = logging.getLogger(__name__)

CHOICES = ("A", "B", "tie")


class ReviewFileError(UserError, ValueError):
    """A review file holds a line that is not a valid record; the message names file and line."""


@dataclass(frozen=True)
class Judgment:
    reviewer: str
    question_id: str
    model_a: str
    model_b: str
    choice: str  # A | B | tie
    unsafe: tuple[str, ...] = ()
    comment: str = ""

    @property
    def pair(self) -> tuple[str, str]:
        """The two models in a fixed (sorted) order, whichever was shown as A."""
        return tuple(sorted((self.model_a, self.model_b)))  # type: ignore[return-value]

    @property
    def winner(self) -> str | None:
        return {"A": self.model_a, "B": self.model_b}.get(self.choice)


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line that lacks its newline (a write interrupted by a crash)."""
    size = path.stat().st_size
    if size == 0:
        return
    with path.open("rb+") as fh:
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        fh.seek(0)
        data = fh.read()
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping an incomplete last line (%d bytes) left by an interrupted write", path, size - keep)
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one record as one line; return only once it is on disk (flush + fsync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        _drop_torn_tail(path)
    line = json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"
    with path.open("a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a missing file has none.

    A line that is not a JSON object raises ReviewFileError naming the file and line.
    A last line without its newline is an interrupted write and is skipped (logged).
    """
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if number == len(lines):  # no newline after it: the write never finished
            log.warning("%s:%d: skipping an incomplete last line (interrupted write)", path, number)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReviewFileError(f"{path}:{number}: not valid JSON ({exc.msg}); fix or delete that line") from exc
        if not isinstance(obj, dict):
            raise ReviewFileError(
                f"{path}:{number}: expected a JSON object, got {type(obj).__name__}; fix or delete that line"
            )
        out.append((number, obj))
    return out


def parse_judgment(obj: dict, where: str) -> Judgment:
    """Check one judgment record; ``where`` (``file:line``) prefixes every error."""
    problems = []
    for key in ("reviewer", "question_id", "model_a", "model_b"):
        if not isinstance(obj.get(key), str) or not obj.get(key, "").strip():
            problems.append(f"{key!r} must be a non-empty string")
    if obj.get("choice") not in CHOICES:
        problems.append(f"'choice' must be one of {', '.join(CHOICES)}, got {obj.get('choice')!r}")
    unsafe = obj.get("unsafe", [])
    if not isinstance(unsafe, list) or any(u not in (obj.get("model_a"), obj.get("model_b")) for u in unsafe):
        problems.append(f"'unsafe' must list model_a and/or model_b, got {unsafe!r}")
    if not problems and obj["model_a"] == obj["model_b"]:
        problems.append("model_a and model_b must differ")
    if problems:
        raise ReviewFileError(f"{where}: invalid judgment: {'; '.join(problems)}; fix or delete that line")
    return Judgment(
        reviewer=obj["reviewer"].strip(),
        question_id=obj["question_id"],
        model_a=obj["model_a"],
        model_b=obj["model_b"],
        choice=obj["choice"],
        unsafe=tuple(sorted(set(unsafe))),
        comment=str(obj.get("comment", "")),
    )


def read_judgments(path: str | Path) -> list[Judgment]:
    """Every judgment in file order; the first bad line raises ReviewFileError."""
    return [parse_judgment(obj, f"{path}:{number}") for number, obj in read_records(path)]
