"""Baseline for bench/process.py: the straightforward script a first version would be.

chardet on each whole file, pandas read_csv + merge, ``iterrows`` and one ``json.dumps``
per row, a random split. No cleaning, no checks, no candidates: it does less than the
stage and is still the slow way.

    python bench/process_naive.py RAW_DIR OUT_DIR
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import chardet
import pandas as pd

SYSTEM = "你是一个专业的医疗助手，能够提供准确的医疗咨询。"


def read(path: Path) -> pd.DataFrame:
    encoding = chardet.detect(path.read_bytes())["encoding"]
    return pd.read_csv(path, encoding=encoding)


def run(raw: Path, out: Path) -> None:
    questions = read(raw / "question.csv")
    answers = read(raw / "answer.csv")
    merged = pd.merge(questions, answers, on="question_id", suffixes=("_q", "_a"))
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(42)
    files = {name: open(out / f"{name}.jsonl", "w", encoding="utf-8") for name in ("train", "val", "test")}
    for _, row in merged.iterrows():
        example = {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": str(row["content_q"]).strip()},
                {"role": "assistant", "content": str(row["content_a"]).strip()},
            ],
            "question_id": int(row["question_id"]),
            "ans_id": int(row["ans_id"]),
        }
        r = rng.random()
        name = "test" if r < 0.1 else "val" if r < 0.2 else "train"
        files[name].write(json.dumps(example, ensure_ascii=False) + "\n")
    for fh in files.values():
        fh.close()


if __name__ == "__main__":
    run(Path(sys.argv[1]), Path(sys.argv[2]))
