"""Benchmark of serving (`make bench-serve`). Not a test.

The same chat prompts (questions from ``<data.raw_dir>/question.csv``, the training system
prompt) at concurrency 1, 8 and 32, every request forced to exactly ``--max-tokens`` new
tokens (vLLM ``ignore_eos``, transformers ``min_new_tokens``) so that all setups do the same
work, against:

  (a) lora    ``mediagent serve``: vLLM on the base + the adapter (LoRA module)
  (b) merged  ``mediagent serve --merged``: vLLM on the merged model
  (c) naive   transformers ``generate`` on the merged model, one request at a time
              behind a lock (what a minimal Flask-style server does), greedy, float32

It prints requests/s, p50/p95 latency and tokens/s per setup and concurrency, each
setup's throughput as a multiple of (c) at the same concurrency, and the LoRA overhead
(a) vs (b). Targets: (a) and (b) at least 5x (c) at concurrency 32.

Models: ``<model.dir>/<model.base>`` (made with ``python -m mediagent.pipeline.base_model`` if missing), the
adapter ``train.output_dir`` (a random non-zero rank-``lora.r`` adapter in a temp folder if
none was trained) and ``merge.output_dir`` (merged here with peft ``merge_and_unload`` when
it is missing or belongs to another adapter). Servers are started and stopped in turn;
clients run in threads on the same machine, so on few cores they take CPU from the server.

    python bench/serve.py [--max-tokens 32] [--requests-per-level 16,32,64]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

from mediagent.params import Params, load_params, with_overrides  # noqa: E402

LEVELS = (1, 8, 32)


def questions(params: Params, n: int) -> list[str]:
    path = ROOT / params.data.raw_dir / "question.csv"
    if not path.is_file():
        path = ROOT / "data" / "sample" / "question.csv"
    with path.open(encoding="utf-8", newline="") as fh:
        qs = [r["content"] for r in csv.DictReader(fh) if r.get("content")]
    return [qs[i % len(qs)] for i in range(n)]


def ensure_models(params: Params, work: Path) -> tuple[Path, Path, Path]:
    """(base, adapter, merged) directories, creating what is missing under ``work``."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from mediagent.fileio import md5_file
    from mediagent.loading import load_tokenizer
    from mediagent.pipeline.base_model import provision

    base = ROOT / params.model.path
    if not base.is_dir():
        print(f"building the base model at {base}")
        provision(params.model, params.tiny)
    adapter = ROOT / params.train.output_dir
    if not (adapter / "adapter_model.safetensors").is_file() or not (adapter / "lineage.json").is_file():
        adapter = work / "adapter"
        print(f"no trained adapter at {params.train.output_dir}: a random rank-{params.lora.r} adapter in {adapter}")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        cfg = LoraConfig(
            r=params.lora.r,
            lora_alpha=params.lora.lora_alpha,
            target_modules=list(params.lora.target_modules),
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
        get_peft_model(model, cfg).save_pretrained(str(adapter))
        load_tokenizer(base).save_pretrained(str(adapter))
        (adapter / "lineage.json").write_text(
            json.dumps(
                {
                    "name": "medqa-bench000-random00",
                    "base": {
                        "id": params.model.base,
                        "revision": params.model.revision,
                        "config_md5": md5_file(base / "config.json"),
                    },
                }
            )
        )
    lineage = json.loads((adapter / "lineage.json").read_text())
    merged = ROOT / params.merge.output_dir
    merged_lineage = merged / "lineage.json"
    if not merged_lineage.is_file() or json.loads(merged_lineage.read_text()).get("name") != lineage["name"]:
        merged = work / "merged"
        print(f"merging {adapter} into {merged} (peft merge_and_unload)")
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        model.save_pretrained(str(merged), safe_serialization=True)
        load_tokenizer(adapter).save_pretrained(str(merged))
        (merged / "lineage.json").write_text(json.dumps({**lineage, "merge": {"by": "bench/serve.py"}}))
    return base, adapter, merged


def run_level(call: Callable[[str], int], prompts: list[str], concurrency: int) -> dict:
    """Send every prompt with ``concurrency`` workers; latency per request, overall rate."""

    def one(q: str) -> tuple[float, int]:
        t = time.perf_counter()
        n = call(q)
        return time.perf_counter() - t, n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, prompts))
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    return {
        "requests": len(prompts),
        "wall_s": wall,
        "rps": len(prompts) / wall,
        "p50_s": statistics.median(lat),
        "p95_s": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
        "tok_s": sum(r[1] for r in results) / wall,
    }


def measure(name: str, call: Callable[[str], int], prompts_per_level: dict[int, list[str]]) -> dict[int, dict]:
    call(prompts_per_level[1][0])  # warm-up: first-request costs are not throughput
    # Other work on the machine slows every setup; the load average says how much there was.
    print(f"  {name}: load average before {os.getloadavg()[0]:.1f}", flush=True)
    out = {}
    for c, prompts in prompts_per_level.items():
        out[c] = run_level(call, prompts, c)
        r = out[c]
        print(
            f"  {name:7s} c={c:2d}: {r['rps']:7.2f} req/s  p50 {r['p50_s']:6.3f} s  p95 {r['p95_s']:6.3f} s  "
            f"{r['tok_s']:8.1f} tok/s  ({r['requests']} requests, {r['wall_s']:.1f} s)",
            flush=True,
        )
    return out


def served(
    project: Path,
    args: list[str],
    model: str,
    system: str,
    max_tokens: int,
    prompts_per_level: dict[int, list[str]],
    name: str,
) -> dict[int, dict]:
    """Start ``mediagent.commands.serve`` in ``project``, measure one model, stop it."""
    from mediagent.client import ModelClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("API_KEY", "VLLM_API_KEY")}
    env["PYTHONPATH"] = str(ROOT)
    log = project / f"{name}.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mediagent", "serve", "--port", str(port), *args],
            cwd=project,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"mediagent.commands.serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except (urllib.error.URLError, OSError):
                time.sleep(1)
        print(f"  {name}: server ready in {time.perf_counter() - t0:.0f} s", flush=True)
        client = ModelClient(f"{url}/v1", timeout=600)

        def call(q: str) -> int:
            messages = [{"role": "system", "content": system}, {"role": "user", "content": q}]
            return client.complete(model, messages, max_tokens, 0, extra_body={"ignore_eos": True}).completion_tokens

        return measure(name, call, prompts_per_level)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def naive(merged: Path, system: str, max_tokens: int, prompts_per_level: dict[int, list[str]]) -> dict[int, dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from mediagent.loading import load_tokenizer

    tok = load_tokenizer(merged)
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    lock = threading.Lock()  # one generate at a time, as a naive server does

    def call(q: str) -> int:
        ids = tok.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": q}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with lock, torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        return out.shape[1] - ids["input_ids"].shape[1]

    return measure("naive", call, prompts_per_level)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--requests-per-level", default="16,32,64", help="requests at concurrency 1,8,32")
    args = ap.parse_args()
    counts = [int(x) for x in args.requests_per_level.split(",")]
    os.chdir(ROOT)
    params = load_params(ROOT / "params.yaml")
    system = params.process.system_prompt
    qs = questions(params, sum(counts))
    prompts, i = {}, 0
    for c, n in zip(LEVELS, counts):
        prompts[c], i = qs[i : i + n], i + n

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        base, adapter, merged = ensure_models(params, work)
        p = with_overrides(
            params,
            model={"dir": str(base.parent)},
            train={"output_dir": str(adapter)},
            merge={"output_dir": str(merged)},
        )
        (work / "params.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(p.to_dict())), allow_unicode=True))
        print(
            f"base {base}\nadapter {adapter}\nmerged {merged}\n{args.max_tokens} new tokens per request, "
            f"cores {len(os.sched_getaffinity(0))}",
            flush=True,
        )
        results = {
            "lora": served(work, [], params.serve.alias, system, args.max_tokens, prompts, "lora"),
            "merged": served(work, ["--merged"], params.serve.alias, system, args.max_tokens, prompts, "merged"),
            "naive": naive(merged, system, args.max_tokens, prompts),
        }

    print("\nsetup    conc    req/s    p50 s    p95 s    tok/s   x naive")
    for name in ("lora", "merged", "naive"):
        for c in LEVELS:
            r = results[name][c]
            print(
                f"{name:7s} {c:5d} {r['rps']:8.2f} {r['p50_s']:8.3f} {r['p95_s']:8.3f} {r['tok_s']:8.1f} "
                f"{r['rps'] / results['naive'][c]['rps']:8.1f}x"
            )
    lora32, merged32, naive32 = (results[n][32]["rps"] for n in ("lora", "merged", "naive"))
    print(
        f"\nLoRA overhead vs merged (throughput at concurrency 32): {100 * (merged32 / lora32 - 1):+.1f}% "
        f"(merged {merged32:.2f} vs lora {lora32:.2f} req/s); at concurrency 1: "
        f"{100 * (results['merged'][1]['rps'] / results['lora'][1]['rps'] - 1):+.1f}%"
    )
    for name, rps in (("lora", lora32), ("merged", merged32)):
        verdict = "met" if rps >= 5 * naive32 else "NOT met"
        print(f"target {name} >= 5x naive at concurrency 32: {rps / naive32:.1f}x -> {verdict}")


if __name__ == "__main__":
    main()
