"""The metrics table of quality/report.json as Markdown (README, docs/real-weights.md).

Run: ``python -m quality.table [--report quality/report.json] [--lang en|zh]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = [  # key, English, Chinese, digits
    ("loss", "held-out loss (nats/token)", "留出集损失（nats/token）", 3),
    ("perplexity", "perplexity", "困惑度", 1),
    ("p_at_1", "P@1", "P@1", 3),
    ("mrr", "MRR", "MRR", 3),
    ("map", "MAP", "MAP", 3),
    ("bleu4", "BLEU-4 (characters)", "BLEU-4（按字）", 2),
    ("rouge_l", "ROUGE-L (characters)", "ROUGE-L（按字）", 3),
    ("mean_length", "answer length (characters)", "回答长度（字）", 0),
    ("loop_share", "answers that loop", "复读的回答比例", 2),
    ("echo_share", "answers that echo the question", "复述问题的回答比例", 2),
]
HEAD = {"en": ("metric", "base", "tuned", "tuned − base"), "zh": ("指标", "基座", "微调后", "微调后 − 基座")}


def cell(entry: dict, digits: int) -> str:
    value = f"{entry['value']:.{digits}f}"
    if "ci95" not in entry:
        return value
    lo, hi = entry["ci95"]
    return f"{value} [{lo:.{digits}f}, {hi:.{digits}f}]"


def table(report: dict, lang: str = "en") -> str:
    lines = ["| " + " | ".join(HEAD[lang]) + " |", "|---|---|---|---|"]
    for key, en, zh, digits in ROWS:
        if key in report["base"]:
            lines.append(
                f"| {en if lang == 'en' else zh} | {cell(report['base'][key], digits)} | "
                f"{cell(report['tuned'][key], digits)} | {cell(report['delta'][key], digits)} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, default=ROOT / "quality" / "report.json")
    parser.add_argument("--lang", choices=sorted(HEAD), default="en")
    args = parser.parse_args()
    print(table(json.loads(args.report.read_text(encoding="utf-8")), args.lang))


if __name__ == "__main__":
    main()
