"""Floor for bench/process.py: read both CSVs with pyarrow, write ChatML JSONL with orjson.

Nothing else (no encoding detection, cleaning, checks, split or candidates): the least
any implementation of the stage has to pay in one Python process.

    python bench/process_floor.py RAW_DIR OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import orjson
import pyarrow.csv as pcsv

SYSTEM = "你是一个专业的医疗助手，能够提供准确的医疗咨询。"


def run(raw: Path, out: Path) -> None:
    questions = pcsv.read_csv(raw / "question.csv")
    answers = pcsv.read_csv(raw / "answer.csv")
    text = dict(zip(questions["question_id"].to_pylist(), questions["content"].to_pylist()))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "wb") as fh:
        for aid, qid, content in zip(
            answers["ans_id"].to_pylist(), answers["question_id"].to_pylist(), answers["content"].to_pylist()
        ):
            fh.write(
                orjson.dumps(
                    {
                        "messages": [
                            {"role": "system", "content": SYSTEM},
                            {"role": "user", "content": text[qid]},
                            {"role": "assistant", "content": content},
                        ],
                        "question_id": qid,
                        "ans_id": aid,
                    }
                )
            )
            fh.write(b"\n")


if __name__ == "__main__":
    run(Path(sys.argv[1]), Path(sys.argv[2]))
