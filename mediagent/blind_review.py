"""The blind A/B review's state for the review app (``mediagent review-app``): the review
questions from the test split, the seeded A/B order, the answers cached in
``review.answers_file`` and the judgments appended to ``review.judgments_file``.

Every reviewer sees the same questions, order and answer text; a judgment is on disk before
the next question is shown, and the file is the record (a restart resumes from it).
"""

from __future__ import annotations

import hashlib
import random
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from mediagent.chat_format import final_answer, last_question
from mediagent.errors import UserError
from mediagent.fileio import read_jsonl
from mediagent.judgments import CHOICES, ReviewFileError, append_jsonl, read_judgments, read_records
from mediagent.params import Params


class UIError(UserError):
    """Something to fix before or while serving the page; the message says what.

    ``code`` and ``values`` name the message ``error.<code>`` of messages.json, so that the
    page shows it in the reviewer's language; the English message stays for logs and API
    clients. Errors raised before the page is served (bind address, test split) need no code.
    """

    def __init__(self, message: str, code: str = "", **values):
        super().__init__(message)
        self.code = code
        self.values = values


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    reference: str


def load_questions(processed_dir: str | Path, limit: int) -> list[Question]:
    """The first ``limit`` distinct questions of the test split, each with its first reference answer."""
    path = Path(processed_dir) / "test.jsonl"
    if not path.is_file():
        raise UIError(f"{path}: not found; run `dvc repro process` to build the test split")
    seen: dict[str, Question] = {}
    for i, row in enumerate(read_jsonl(path), 1):
        try:
            question, answer = last_question(row["messages"]), final_answer(row["messages"])
            qid = str(row["question_id"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UIError(
                f"{path}:{i}: not a chat row of the process stage ({exc}); rerun `dvc repro process`"
            ) from exc
        seen.setdefault(qid, Question(qid, question, answer))
        if len(seen) >= limit:
            break
    if not seen:
        raise UIError(f"{path}: no questions; check process.test_ratio and rerun `dvc repro process`")
    return list(seen.values())


def ab_order(seed: int, question_id: str, pair: tuple[str, str]) -> tuple[str, str]:
    """(model shown as A, model shown as B): a seeded coin per question and pair, whoever picked them."""
    first, second = sorted(pair)
    coin = random.Random(f"{seed}\0{question_id}\0{first}\0{second}").random()
    return (first, second) if coin < 0.5 else (second, first)


def md5_text(text: str) -> str:
    return hashlib.md5(text.encode("utf-8")).hexdigest()


class AnswerCache:
    """Answers per (model, question id), loaded from and appended to ``review.answers_file``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._answers: dict[tuple[str, str], str] = {}
        for number, obj in read_records(self.path):
            if not all(isinstance(obj.get(k), str) for k in ("model", "question_id", "answer")):
                raise ReviewFileError(
                    f"{self.path}:{number}: needs string model, question_id and answer; fix or delete that line"
                )
            self._answers[(obj["model"], obj["question_id"])] = obj["answer"]
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, model: str, question: Question, generate) -> str:
        """The cached answer, or ``generate(model, question)`` once, saved before it is returned."""
        key = (model, question.id)
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # two reviewers asking at once: one generation, both see it
            if key not in self._answers:
                text = generate(model, question)
                append_jsonl(
                    self.path,
                    {
                        "model": model,
                        "question_id": question.id,
                        "answer": text,
                        "time": datetime.now(UTC).isoformat(timespec="seconds"),
                    },
                )
                self._answers[key] = text
            return self._answers[key]


class Review:
    """Questions, A/B order, answers and judgments of the blind review."""

    def __init__(self, params: Params, generate):
        self.cfg = params.review
        self.questions = load_questions(params.data.processed_dir, self.cfg.max_questions)
        self.by_id = {q.id: q for q in self.questions}
        self.answers = AnswerCache(self.cfg.answers_file)
        self.generate = generate
        self._write = threading.Lock()
        read_judgments(self.cfg.judgments_file)  # a bad line stops the app at start, not mid-review

    def judged(self, reviewer: str, pair: tuple[str, str]) -> set[str]:
        """Question ids this reviewer already judged for this pair (read from the file: the record)."""
        pair = tuple(sorted(pair))
        return {
            j.question_id for j in read_judgments(self.cfg.judgments_file) if j.reviewer == reviewer and j.pair == pair
        }

    def next_item(self, reviewer: str, pair: tuple[str, str]) -> dict:
        done = self.judged(reviewer, pair)
        todo = [q for q in self.questions if q.id not in done]
        if not todo:
            return {"done": True, "judged": len(done), "total": len(self.questions)}
        q = todo[0]
        model_a, model_b = ab_order(self.cfg.seed, q.id, pair)
        return {
            "done": False,
            "question_id": q.id,
            "question": q.question,
            "reference": q.reference,
            "answer_a": self.answers.get(model_a, q, self.generate),
            "answer_b": self.answers.get(model_b, q, self.generate),
            "position": len(done) + 1,
            "total": len(self.questions),
        }

    def record(
        self,
        reviewer: str,
        pair: tuple[str, str],
        question_id: str,
        choice: str,
        unsafe_labels: list[str],
        comment: str,
    ) -> dict:
        """Append one judgment (fsynced) and return it; a second judgment of the same item is refused."""
        if question_id not in self.by_id:
            raise UIError(
                f"question {question_id!r} is not among the review questions",
                code="unknown_question",
                question=question_id,
            )
        if choice not in CHOICES or not set(unsafe_labels) <= {"A", "B"}:
            raise UIError("choice must be A, B or tie and unsafe flags A and/or B", code="bad_choice")
        q = self.by_id[question_id]
        model_a, model_b = ab_order(self.cfg.seed, q.id, pair)
        with self._write:
            if question_id in self.judged(reviewer, pair):
                shown = " vs ".join(sorted(pair))
                raise UIError(
                    f"{reviewer} already judged question {question_id} for {shown}",
                    code="already_judged",
                    reviewer=reviewer,
                    question=question_id,
                    pair=shown,
                )
            record = {
                "reviewer": reviewer,
                "question_id": question_id,
                "model_a": model_a,
                "model_b": model_b,
                "choice": choice,
                "winner": {"A": model_a, "B": model_b}.get(choice),
                "unsafe": sorted({"A": model_a, "B": model_b}[label] for label in set(unsafe_labels)),
                "comment": comment.strip(),
                "seed": self.cfg.seed,
                "answer_md5": {m: md5_text(self.answers.get(m, q, self.generate)) for m in (model_a, model_b)},
                "time": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            append_jsonl(self.cfg.judgments_file, record)
        return record
