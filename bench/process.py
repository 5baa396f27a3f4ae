"""Benchmark of the `process` stage on cMedQA2-scale input (`make bench-process`). Not a test.

Builds 120,000 questions and 226,000 answers (the size of the released cMedQA2 tables) in a
temporary folder by recombining the real rows of the shared 500-question sample under fresh
ids, then times whole processes, median of 3 runs each, interleaved:

  (a) stage  ``python -m mediagent.pipeline.process`` with a params.yaml pointing at that data: real
             encoding detection, cleaning, PII masking, checks, split, candidates, stats
  (b) naive  bench/process_naive.py: chardet on whole files, pandas merge, iterrows,
             json.dumps per row
  (c) floor  bench/process_floor.py: pyarrow read + orjson write, nothing else
  (d) with ``--against REV``: the stage as it was at git revision REV, on the same data

and prints medians, ratios and each one's peak RSS. Targets: (a) at least 3x faster than
(b), at most 2x the time of (c) (or at most 1.5x that of (d)), peak RSS under 1.5 GB.

    python bench/process.py [--sample DIR] [--runs 3] [--against REV]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLE = ROOT / ".." / "shared" / "data" / "cmedqa2" / "sample"


def _rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _mix(texts: list[str], i: int) -> str:
    """Head of one real text + tail of another: distinct for i < len**2, lengths as real."""
    n = len(texts)
    a, b = texts[i % n], texts[(i // n + i) % n]
    return a[: len(a) // 2] + b[len(b) // 2 :]


def generate(sample: Path, out: Path, n_questions: int, n_answers: int, seed: int = 0) -> None:
    """question.csv + answer.csv in cMedQA2's layout; answer ids consecutive per question."""
    questions = [r["content"] for r in _rows(sample / "question.csv")]
    answers = [r["content"] for r in _rows(sample / "answer.csv")]
    rng = np.random.default_rng(seed)
    per_q = np.ones(n_questions, dtype=np.int64)
    np.add.at(per_q, rng.integers(0, n_questions, n_answers - n_questions), 1)
    # Distinct 8-digit ids, like cMedQA2's (drawn, not listed: a 90M-id range would cost 720 MB here,
    # and a forked child's peak RSS would count it).
    qids = np.unique(rng.integers(10**7, 10**8, size=2 * n_questions))
    qids = rng.permutation(qids)[:n_questions]
    out.mkdir(parents=True, exist_ok=True)
    with (
        (out / "question.csv").open("w", encoding="utf-8", newline="") as fq,
        (out / "answer.csv").open("w", encoding="utf-8", newline="") as fa,
    ):
        wq, wa = csv.writer(fq, lineterminator="\n"), csv.writer(fa, lineterminator="\n")
        wq.writerow(["question_id", "content"])
        wa.writerow(["ans_id", "question_id", "content"])
        aid = 0
        for i, (qid, k) in enumerate(zip(qids.tolist(), per_q.tolist())):
            wq.writerow([qid, _mix(questions, i)])
            for _ in range(k):
                wa.writerow([aid, qid, _mix(answers, aid)])
                aid += 1


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr.decode()[-3000:]}")
    return wall, usage.ru_maxrss / 1024  # ru_maxrss is in KB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE, help="folder with the real question.csv/answer.csv")
    ap.add_argument("--questions", type=int, default=120_000)
    ap.add_argument("--answers", type=int, default=226_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--against", metavar="REV", help="also time the stage as of this git revision")
    args = ap.parse_args()
    sample = args.sample.resolve()
    if not (sample / "question.csv").is_file() or not (sample / "answer.csv").is_file():
        sys.exit(f"no question.csv/answer.csv in {sample}; pass --sample DIR (the real cMedQA2 sample folder)")

    with tempfile.TemporaryDirectory(prefix="bench-process-") as tmp:
        tmp = Path(tmp)
        raw = tmp / "raw"
        t0 = time.perf_counter()
        generate(sample, raw, args.questions, args.answers)
        sizes = {f: (raw / f).stat().st_size / 1e6 for f in ("question.csv", "answer.csv")}
        print(
            f"input: {args.questions:,} questions, {args.answers:,} answers (question.csv {sizes['question.csv']:.1f} MB, "
            f"answer.csv {sizes['answer.csv']:.1f} MB) from {sample.name}/ in {time.perf_counter() - t0:.1f}s"
        )

        params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
        params["data"].update(raw_dir=str(raw), processed_dir=str(tmp / "stage" / "processed"))
        params["process"].update(metrics_file=str(tmp / "stage" / "process.json"))
        work = tmp / "stage"
        work.mkdir()
        (work / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        commands = {  # name: (command, working directory, environment)
            "stage": ([sys.executable, "-m", "mediagent.pipeline.process"], work, env),
            "naive": (
                [sys.executable, str(ROOT / "bench" / "process_naive.py"), str(raw), str(tmp / "naive")],
                tmp,
                env,
            ),
            "floor": (
                [sys.executable, str(ROOT / "bench" / "process_floor.py"), str(raw), str(tmp / "floor")],
                tmp,
                env,
            ),
        }
        if args.against:
            # The code of that revision (stages/ before the mediagent package), run on the same
            # data with its own outputs.
            old = tmp / "against"
            (old / "work").mkdir(parents=True)
            listed = subprocess.run(
                ["git", "-C", str(ROOT), "ls-tree", "--name-only", args.against],
                capture_output=True,
                check=True,
                text=True,
            ).stdout.split()
            package, module = (
                ("mediagent", "mediagent.pipeline.process") if "mediagent" in listed else ("stages", "stages.process")
            )
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", args.against, package], capture_output=True, check=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
            # ... with that revision's own params.yaml (its params.py rejects keys added since)
            then = yaml.safe_load(
                subprocess.run(
                    ["git", "-C", str(ROOT), "show", f"{args.against}:params.yaml"],
                    capture_output=True,
                    check=True,
                    text=True,
                ).stdout
            )
            old_params = {
                **then,
                "data": {**then["data"], "raw_dir": str(raw), "processed_dir": str(old / "processed")},
                "process": {**params["process"], "metrics_file": str(old / "process.json")},
            }
            (old / "work" / "params.yaml").write_text(yaml.safe_dump(old_params, allow_unicode=True), encoding="utf-8")
            commands["old"] = ([sys.executable, "-m", module], old / "work", {**os.environ, "PYTHONPATH": str(old)})
        walls = {k: [] for k in commands}
        rss = {k: 0.0 for k in commands}
        for _ in range(args.runs):
            for name, (cmd, cwd, run_env) in commands.items():
                wall, peak = timed(cmd, cwd, run_env)
                walls[name].append(wall)
                rss[name] = max(rss[name], peak)

        metrics = json.loads((work / "process.json").read_text(encoding="utf-8"))
        print(
            f"stage output: examples {metrics['examples']}, candidate lists {metrics['candidate_questions']}, "
            f"dropped {sum(metrics['dropped'].values())}"
        )
        print(f"{'run':<7}{'median s':>10}   {'runs (s)':<24}{'peak RSS MB':>12}")
        med = {k: statistics.median(v) for k, v in walls.items()}
        for name in commands:
            runs = " ".join(f"{w:.2f}" for w in walls[name])
            print(f"{name:<7}{med[name]:>10.2f}   {runs:<24}{rss[name]:>12.0f}")
        speedup, vs_floor = med["naive"] / med["stage"], med["stage"] / med["floor"]
        print(
            f"stage vs naive: {speedup:.2f}x faster, {1 / speedup:.2f}x its time   "
            f"(target >= 3x: {'ok' if speedup >= 3 else 'MISSED'}; review: <= 0.6x its time)"
        )
        print(
            f"stage vs floor: {vs_floor:.2f}x the floor's time   (target <= 2x: {'ok' if vs_floor <= 2 else 'MISSED'})"
        )
        if args.against:
            vs_old = med["stage"] / med["old"]
            print(
                f"stage vs {args.against}: {vs_old:.2f}x its time   (target <= 1.5x: {'ok' if vs_old <= 1.5 else 'MISSED'})"
            )
        print(
            f"stage peak RSS: {rss['stage']:.0f} MB   (target < 1536 MB: {'ok' if rss['stage'] < 1536 else 'MISSED'})"
        )


if __name__ == "__main__":
    main()
