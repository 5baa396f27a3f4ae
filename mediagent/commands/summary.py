"""The pipeline's headline numbers as a small table: `make demo` ends with it.

Reads  ``eval.metrics_file`` (and ``merge.metrics_file``, ``eval.report_path`` when present);
       params ``eval``, ``merge``, ``model``.
Writes the table to stdout: one row per model (random ranking, base, tuned), one column
       per headline metric, then the merge parity and serve-readiness in one line each, and for
       the tiny random-weights default a note on reading it.

Run: ``mediagent summary``. ``dvc metrics show`` / ``dvc exp show`` give every metric.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from mediagent.errors import UserError
from mediagent.params import Params, load_params

COLUMNS = (
    ("loss", "loss"),
    ("p_at_1", "P@1"),
    ("mrr", "MRR"),
    ("map", "MAP"),
    ("bleu4", "BLEU-4"),
    ("rouge_l", "ROUGE-L"),
)


# The tiny default's base is randomly initialised: a newcomer reading "tuned P@1 < base"
# should not take it for a broken pipeline.
RANDOM_WEIGHTS_NOTE = (
    "note: model.base tiny is random weights (20M parameters): a falling loss shows the plumbing "
    "learns; P@1/MRR/MAP on {n} questions are noise, and tuned can rank below base. "
    "A real model's figures: make quality (docs/real-weights.md)."
)


def table(metrics: dict) -> str:
    """Rows random/base/tuned; a metric a row lacks (random has no loss) shows as '-'."""
    rows = [["model", *(title for _, title in COLUMNS)]]
    for model in ("random", "base", "tuned"):
        values = metrics.get(model, {})
        rows.append([model, *(f"{values[k]:.4f}" if k in values else "-" for k, _ in COLUMNS)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows
    )


def main(params: Params) -> str:
    path = Path(params.eval.metrics_file)
    if not path.is_file():
        raise UserError(f"{path} not found: run `dvc repro` (the evaluate stage writes it)")
    metrics = json.loads(path.read_text(encoding="utf-8"))
    lines = [table(metrics)]
    merge = Path(params.merge.metrics_file)
    if merge.is_file():
        m = json.loads(merge.read_text(encoding="utf-8"))
        lines.append(f"merge parity: max |logit diff| {m['max_abs_diff']:.3g} (tolerance {m['tolerance']:g})")
    ready = metrics.get("serve_ready", {})
    if ready:
        checks = ", ".join(f"{k} {v}" for k, v in sorted(ready.items()) if k != "ready")
        lines.append(f"serve-ready: {'yes' if ready.get('ready') else 'NO'} ({checks})")
    if params.model.base == "tiny":
        report = Path(params.eval.report_path)
        counts = json.loads(report.read_text(encoding="utf-8")).get("counts", {}) if report.is_file() else {}
        lines.append(RANDOM_WEIGHTS_NOTE.format(n=counts.get("selection_questions", "a few")))
    text = "\n".join(lines)
    click.echo(text)
    return text


@click.command()
def command() -> None:
    """Print base vs tuned headline metrics (after `dvc repro`)."""
    main(load_params())
