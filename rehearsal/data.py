"""The official cMedQA2 file layout, built from the real 500-pair sample.

The official ``question.zip`` / ``answer.zip`` are not at hand offline; the real
``dev_candidates.zip`` / ``test_candidates.zip`` are. The sample's questions carry official
question ids (32 of them are dev/test questions), but its answers have local ids, and
the official candidate lists name official answer ids that are not in the sample. To make
every list of a sample dev/test question resolve to its 100 candidates:

- the question's first official positive id gets the sample's real answer (its local-id
  row is dropped); further positives and all negatives referenced by those lists get the
  text of another sample answer, chosen by id (deterministic). Their labels stay the
  official ones, so the answer selection is scored on the real list structure with
  placeholder texts: the figures prove the plumbing, not answer quality.
- negatives belong to questions outside the sample in the official data; here they are
  attached to question id 0, which no question has, so they never become training pairs.

Every other sample question keeps its real answer under its local id.
"""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

ORPHAN_QUESTION = 0  # owner of filler negatives: absent from question.csv


def _read_csv(data: bytes) -> list[dict]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))


def _zip_member(path: Path) -> bytes:
    with zipfile.ZipFile(path) as zf:
        (name,) = [n for n in zf.namelist() if not n.endswith("/")]
        return zf.read(name)


def _zip_bytes(name: str, text: str) -> bytes:
    buf = io.BytesIO()
    # A fixed timestamp: the same inputs give the same zip, hence the same git blob id.
    info = zipfile.ZipInfo(name, date_time=(2018, 11, 8, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(info, text)
    return buf.getvalue()


def _csv_text(header: list[str], rows: list[list]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def official_layout(sample_dir: Path, candidates_dir: Path) -> tuple[dict[str, bytes], dict]:
    """{zip name: bytes} of the four official archives, and a summary of what was filled."""
    questions = _read_csv((sample_dir / "question.csv").read_bytes())
    answers = _read_csv((sample_dir / "answer.csv").read_bytes())
    qids = {int(q["question_id"]) for q in questions}
    answer_of = {int(a["question_id"]): a["content"] for a in answers}
    texts = [a["content"] for a in answers]

    lists: dict[int, list[tuple[int, int]]] = {}  # sample dev/test qid -> [(ans_id, label)]
    for name in ("dev_candidates.zip", "test_candidates.zip"):
        for row in _read_csv(_zip_member(candidates_dir / name)):
            qid = int(row["question_id"])
            if qid in qids:
                lists.setdefault(qid, []).append((int(row["ans_id"]), int(row["label"])))

    rows: dict[int, list] = {}
    for qid, cands in sorted(lists.items()):
        first_positive = next(a for a, label in cands if label == 1)
        for ans_id, label in cands:
            if ans_id in rows:
                continue
            if ans_id == first_positive:
                rows[ans_id] = [ans_id, qid, answer_of[qid]]
            else:
                rows[ans_id] = [ans_id, qid if label == 1 else ORPHAN_QUESTION, texts[ans_id % len(texts)]]
    for a in answers:  # the other questions keep their real answer under its local id
        if int(a["question_id"]) not in lists:
            rows[int(a["ans_id"])] = [int(a["ans_id"]), int(a["question_id"]), a["content"]]

    question_csv = _csv_text(["question_id", "content"], [[q["question_id"], q["content"]] for q in questions])
    answer_csv = _csv_text(["ans_id", "question_id", "content"], [rows[k] for k in sorted(rows)])
    files = {
        "question.zip": _zip_bytes("question.csv", question_csv),
        "answer.zip": _zip_bytes("answer.csv", answer_csv),
        "dev_candidates.zip": (candidates_dir / "dev_candidates.zip").read_bytes(),
        "test_candidates.zip": (candidates_dir / "test_candidates.zip").read_bytes(),
    }
    summary = {
        "questions": len(questions),
        "answers": len(rows),
        "dev_test_questions": len(lists),
        "filled_answer_ids": sum(len(c) for c in lists.values()) - len(lists),
    }
    return files, summary
