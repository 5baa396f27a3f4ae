"""`mediagent plots`: curves a person can see without internet access.

A small DVC project gets its plot data from the pipeline's own writers (dvclive for the
training curves, eval_metrics for base vs tuned, the review stage's summary for win rates),
at paths other than the repo's so that only params.yaml can lead the command to them. The
command runs as a subprocess; its PNGs are decoded here, and its HTML page is opened in
headless Chromium with every network request failing (the `chromium` fixture of the UI
tests installs Debian's chromium and chromium-driver, or skips the browser test).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import yaml

from mediagent.eval_metrics import plot_rows, rank_csv
from mediagent.fileio import write_json
from mediagent.judgments import Judgment
from mediagent.pipeline.review import summarise
from tests.conftest import ROOT
from tests.test_ui import CHROME_FLAGS, CHROMEDRIVER, CHROMIUM, chromium  # noqa: F401

# dvc.yaml's plots draw the workspace revision in this colour (DVC's first).
DATA_RGB = (0x94, 0x5D, 0xD6)
# Chromium with no network: a proxy that refuses and no name resolving. file:// still loads.
OFFLINE_FLAGS = [
    "--proxy-server=127.0.0.1:9",
    "--proxy-bypass-list=<-loopback>",
    "--host-resolver-rules=MAP * ~NOTFOUND",
]
PATHS = {
    "train": {"dvclive_dir": "runs/live"},
    "eval": {"plots_dir": "results/eval-plots"},
    "review": {"plots_file": "results/review/wins.json"},
}


def _env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "DVC_NO_ANALYTICS": "1",
    }


def _mediagent(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mediagent", *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=_env()
    )


def _params(root: Path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for section, values in PATHS.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plots-project")
    _params(root)
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True, env=_env())

    from dvclive import Live

    # As the train stage logs: the step pinned to the trainer's global step.
    live = Live(dir=str(root / PATHS["train"]["dvclive_dir"]), save_dvc_exp=False, dvcyaml=False, report=None)
    for step in range(0, 61, 10):
        live.step = step
        live.log_metric("loss", 3.0 - step / 40)
        if step % 20 == 0:
            live.log_metric("eval/loss", 3.2 - step / 50)
    live.log_metric("train/loss", 2.2)  # the run's summary: one step, not a curve
    live.end()

    results = {
        "random": {"p_at_1": 0.1, "mrr": 0.29, "map": 0.29},
        "base": {"p_at_1": 0.25, "mrr": 0.43, "map": 0.4, "rouge_l": 0.05, "distinct_2": 0.3},
        "tuned": {"p_at_1": 0.5, "mrr": 0.62, "map": 0.6, "rouge_l": 0.12, "distinct_2": 0.4},
    }
    plots_dir = root / PATHS["eval"]["plots_dir"]
    plots_dir.mkdir(parents=True)
    (plots_dir / "selection.json").write_text(json.dumps(plot_rows(results), indent=2) + "\n", encoding="utf-8")
    labels = [[1] + [0] * 9] * 6
    (plots_dir / "ranks.csv").write_text(
        rank_csv({"base": [1, 3, 2, 5, 1, 10], "tuned": [1, 1, 2, 1, 3, 1]}, labels), encoding="utf-8"
    )

    judgments = [
        Judgment("dr-li", f"q{i}", "base", "tuned", choice) for i, choice in enumerate(["B", "B", "A", "tie", "B", "B"])
    ]
    judgments += [Judgment("dr-wang", f"q{i}", "tuned", "medqa-v2", choice) for i, choice in enumerate("ABBA")]
    write_json(root / PATHS["review"]["plots_file"], summarise(judgments)[1])
    return root


@pytest.fixture(scope="module")
def plotted(project) -> tuple[Path, list[str]]:
    out = _mediagent(project, "plots", "--scale", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "train/loss.tsv: one step" in out.stderr, out.stderr
    return project / "plots", out.stdout.split()


# ---------------------------------------------------------------- PNG


def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, RGBA rows) of an 8-bit RGB or RGBA PNG, without image libraries."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 4 if colour == 6 else 3
    raw = zlib.decompress(idat)
    stride = width * bpp
    assert len(raw) == height * (stride + 1)
    rows, prev = [], bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for x in range(stride):  # undo the row filter (PNG spec, section 9)
            a = line[x - bpp] if x >= bpp else 0
            b = prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            if kind == 1:
                line[x] = (line[x] + a) & 255
            elif kind == 2:
                line[x] = (line[x] + b) & 255
            elif kind == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line) if bpp == 4 else bytes(v for i in range(0, stride, 3) for v in (*line[i : i + 3], 255)))
        prev = line
    return width, height, rows


def test_pngs_of_the_three_families(plotted):
    folder, listed = plotted
    written = {p.name for p in folder.glob("*.png")}
    assert {
        "train-loss.png",
        "train-eval-loss.png",
        "eval-selection.png",
        "eval-ranks.png",
        "review-wins.png",
    } <= written, written
    assert "train-train-loss.png" not in written  # one step: skipped, said so on stderr
    assert {Path(p).name for p in listed} == written | {"index.html", "offline_template.html"}
    assert not list(folder.parent.glob(".plots.*")), "the temporary folder was left behind"

    for name in ("train-loss.png", "eval-selection.png", "review-wins.png"):
        data = (folder / name).read_bytes()
        assert 5_000 < len(data) < 2_000_000, (name, len(data))
        width, height, rows = decode_png(data)
        assert 200 <= width <= 2000 and 200 <= height <= 2000, (name, width, height)
        pixels = {row[i : i + 4] for row in rows for i in range(0, len(row), 4)}
        assert len(pixels) > 20, f"{name}: {len(pixels)} colours, not a chart"  # text is anti-aliased
        assert bytes((*DATA_RGB, 255)) in pixels, f"{name}: no mark in the data colour"


def test_page_renders_in_a_browser_without_network(plotted, chromium):  # noqa: F811
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    folder, _ = plotted
    html = (folder / "index.html").read_text(encoding="utf-8")
    assert "<script src" not in html and "cdn.jsdelivr" not in html
    assert "window.vegaEmbed" in (folder / "offline_template.html").read_text(encoding="utf-8")

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS + OFFLINE_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(60)
        # The network is really gone: an http page does not load.
        with pytest.raises(WebDriverException, match="ERR_"):
            driver.get("http://example.com/")
        driver.get((folder / "index.html").as_uri())
        # vega-embed draws each plot into an element of class `marks` (canvas by default).
        done = (
            "const divs = [...document.querySelectorAll('body > div')];"
            "return divs.length && divs.every(d => d.querySelector('.marks')) ? divs.length : 0;"
        )
        n = WebDriverWait(driver, 60, poll_frequency=0.2).until(
            lambda d: d.execute_script(done), message="plots not drawn"
        )
        assert n >= 5, n
        # Every plot shows data, not just axes: a pixel in the data colour on each canvas.
        coloured = driver.execute_script(
            """
            const [r, g, b] = arguments[0];
            return [...document.querySelectorAll('body > div')].map(div => {
                const c = div.querySelector('canvas.marks');
                if (!c) return div.querySelector('svg.marks') ? 1 : 0;
                const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let hits = 0;
                for (let i = 0; i < px.length; i += 4)
                    if (px[i] === r && px[i + 1] === g && px[i + 2] === b) hits++;
                return hits;
            });""",
            list(DATA_RGB),
        )
        assert all(coloured), coloured
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "example.com" not in e["message"]]
        assert not errors, errors
    finally:
        driver.quit()


# ---------------------------------------------------------------- expected errors


def _error_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    return out.stderr.strip().splitlines()[-1]


def test_no_data_yet(tmp_path):
    _params(tmp_path)
    last = _error_line(_mediagent(tmp_path, "plots"))
    assert last.startswith("error: plot data not found: run `dvc repro`"), last
    assert "runs/live/plots/metrics" in last and "results/review/wins.json" in last, last


def test_refuses_to_replace_a_folder_it_did_not_write(project):
    last = _error_line(_mediagent(project, "plots", "--out", "."))
    assert "dvc.yaml" in last or "params.yaml" in last, last
    assert (project / "params.yaml").is_file()
