"""Curves a person can see offline: the plots of `dvc plots show` as PNGs and as an HTML page
that loads nothing from the network.

`dvc plots show` writes a page that loads Vega, Vega-Lite and Vega-Embed from a CDN, so on a
network without internet access it stays blank. This command takes the same Vega-Lite specs,
data included (``dvc plots show --json``), and draws them with vl-convert, which bundles
Vega and runs it locally; the page gets the same libraries inlined through a template.

Reads  the plots dvc.yaml declares: the training curves under ``train.dvclive_dir``, base vs
       tuned in ``eval.plots_dir``, the review win rates in ``review.plots_file``.
Writes into ``--out`` (default ``plots/``; the folder is replaced as a whole):
       ``<train|eval|review>-<name>.png``, one per plot (training curves need two steps);
       ``index.html``, the page of ``dvc plots show`` with the JavaScript inlined;
       ``offline_template.html``, its template, for ``dvc plots diff --html-template``.

Run: ``mediagent plots`` (``make plots``) after ``dvc repro``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click

from mediagent.errors import UserError
from mediagent.fileio import atomic_path
from mediagent.params import Params, load_params

TEMPLATE_NAME = "offline_template.html"
# review.plots_file before any clinician has judged: the same axes as dvc.yaml's win-rate plot.
NO_JUDGMENTS = {
    "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
    "data": {"values": []},
    "mark": "bar",
    "width": 480,
    "height": 80,
    "encoding": {
        "x": {"field": "win_rate", "type": "quantitative", "scale": {"domain": [0, 1]}},
        "y": {"field": "pair", "type": "nominal"},
    },
}
# The stage that writes each family's data, for the message when it is missing.
STAGES = {"train": "train", "eval": "evaluate", "review": "review"}
DVC_TIMEOUT_S = 300

# DVC fills {plot_divs} with one <div> per plot whose inline script calls vegaEmbed() as the
# page is parsed, so the libraries go in <head>. There is no {scripts} placeholder: that is
# where DVC would put its CDN <script src> tags.
TEMPLATE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>MediAgent-Engine plots</title>
<script>
{bundle}
</script>
<style>
body {{ font-family: sans-serif; }}
table {{ border-spacing: 15px; }}
</style>
</head>
<body>
{{plot_divs}}
</body>
</html>
"""


def sources(params: Params) -> dict[str, Path]:
    """Where each family's data lies; the training curves are dvclive's step files."""
    return {
        "train": Path(params.train.dvclive_dir) / "plots" / "metrics",
        "eval": Path(params.eval.plots_dir),
        "review": Path(params.review.plots_file),
    }


def check_inputs(src: dict[str, Path]) -> None:
    missing = [f"- {path} (the {STAGES[family]} stage writes it)" for family, path in src.items() if not path.exists()]
    if missing:
        raise UserError("plot data not found: run `dvc repro` first\n" + "\n".join(missing))


def check_out(out: Path) -> None:
    """--out is replaced as a whole: refuse a folder holding anything this command did not write."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a folder")
    foreign = sorted(
        p.name
        for p in out.iterdir()
        if not (p.is_file() and (p.suffix == ".png" or p.name in ("index.html", TEMPLATE_NAME)))
    )
    if foreign:
        raise UserError(
            f"--out {out} holds {', '.join(foreign[:3])}, which `mediagent plots` did not write, and the "
            "folder is replaced as a whole: pass a new or empty folder"
        )


def import_vl_convert():
    try:
        import vl_convert
    except ImportError as exc:
        raise UserError("vl-convert-python is not installed: run `make install` (requirements.txt pins it)") from exc
    return vl_convert


def dvc(*args: str) -> str:
    """Run the DVC of this Python (the venv's) and return its stdout."""
    # An offline command: no usage report either (it would wait on the network).
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    cmd = [sys.executable, "-m", "dvc", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=DVC_TIMEOUT_S)
    if out.returncode:
        detail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        raise UserError(
            f"`dvc {' '.join(args)}` exited {out.returncode}: {' / '.join(detail)} — run it from the "
            "repository root (where dvc.yaml is)"
        )
    return out.stdout


def png_name(plot_id: str, src: dict[str, Path]) -> tuple[str, str]:
    """(family, file stem): ``train-eval-loss`` for <dvclive_dir>/plots/metrics/eval/loss.tsv,
    ``eval-ranks``, ``review-win_rates``; a plot outside the three keeps its path."""
    path = Path(plot_id)
    family, parts = "", list(path.with_suffix("").parts)
    for name, root in src.items():
        if path == root:  # a single file, such as review.plots_file
            family, parts = name, [name, path.stem]
            break
        if root in path.parents:
            family, parts = name, [name, *path.relative_to(root).with_suffix("").parts]
            break
    return family, re.sub(r"[^\w.-]", "_", "-".join(parts))


def render_pngs(plots: dict, src: dict[str, Path], folder: Path, scale: float) -> tuple[list[Path], list[str]]:
    """One PNG per plot of ``dvc plots show --json``; (written files, notes on skipped plots)."""
    vl_convert = import_vl_convert()
    written, notes = [], []
    for plot_id, renderers in plots.items():
        family, name = png_name(plot_id, src)
        specs = [r["content"] for r in renderers if r.get("type") == "vega"]
        if not specs and family == "review":  # DVC draws nothing from an empty list of pairs
            specs = [NO_JUDGMENTS]
        if not specs:
            notes.append(f"{plot_id}: not a Vega plot (an image), nothing to draw")
            continue
        spec = specs[0]
        rows = spec.get("data", {}).get("values", [])
        if not rows and family == "review":
            # A fresh clone has no judgments: the chart says so instead of going missing.
            spec = {
                **spec,
                "title": "Blind review win rates: no judgments yet (make ui, Blind review tab, then dvc repro review)",
            }
            notes.append(f"{plot_id}: no judgments yet, drawn empty")
        elif not rows:
            notes.append(f"{plot_id}: no data")
            continue
        if family == "train" and len(rows) < 2:
            notes.append(f"{plot_id}: one step, not a curve")
            continue
        # The data is inline; allowing no base URL makes sure nothing is fetched.
        png = vl_convert.vegalite_to_png(spec, scale=scale, allowed_base_urls=[])
        target = folder / f"{name}.png"
        target.write_bytes(png)
        written.append(target)
    return written, notes


def offline_template() -> str:
    """The HTML template with Vega, Vega-Lite and Vega-Embed as vl-convert bundles them."""
    bundle = import_vl_convert().javascript_bundle()
    # In a function, the bundle's top-level names stay out of the page's global scope (DVC's
    # plot divs declare `var spec`); it publishes window.vegaEmbed itself. "</script" would end
    # the <script> element early; "<\/script" means the same inside JavaScript strings.
    bundle = bundle.replace("</script", "<\\/script")
    return TEMPLATE.format(bundle=f"(function () {{\n{bundle}\n}})();")


def main(params: Params, out: Path, scale: float) -> list[Path]:
    src = sources(params)
    check_inputs(src)
    check_out(out)
    import_vl_convert()
    shown = json.loads(dvc("plots", "show", "--json"))
    # A plot DVC could not read (a malformed file) is reported, not fatal: the others still draw.
    notes = [
        f"{e.get('source') or e.get('name') or e.get('rev')}: {e.get('msg') or e.get('type')}"
        for e in shown.get("errors", [])
    ]
    with atomic_path(out, is_dir=True) as tmp:
        written, skipped = render_pngs(shown.get("data", {}), src, tmp, scale)
        if not written:
            raise UserError("no plot had data to draw: run `dvc repro` first\n" + "\n".join(f"- {n}" for n in skipped))
        template = tmp / TEMPLATE_NAME
        template.write_text(offline_template(), encoding="utf-8")
        dvc("plots", "show", "--html-template", str(template.resolve()), "-o", str(tmp.resolve()))
        names = [p.name for p in written] + ["index.html", TEMPLATE_NAME]
    for note in notes + skipped:
        click.echo(f"skipped {note}", err=True)
    files = [out / name for name in names]
    for path in files:
        click.echo(str(path))
    return files


@click.command()
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("plots"),
    show_default=True,
    help="Folder for the PNGs and the HTML page; replaced as a whole.",
)
@click.option(
    "--scale",
    type=click.FloatRange(0.5, 8),
    default=2.0,
    show_default=True,
    help="Pixel scale of the PNGs (2 stays sharp on high-DPI screens).",
)
def command(out: Path, scale: float) -> None:
    """Render the pipeline's plots offline: PNGs and an HTML page that needs no CDN (after `dvc repro`)."""
    main(load_params(), out, scale)
