"""`make rehearse`: the real job's commands, end to end, offline, with only the remotes made local.

In a fresh clone of this repository (HEAD) in a temporary folder, with the Qwen3-8B-
structured rehearsal checkpoint on a loopback hub (Hugging Face, or ModelScope with
``--source modelscope``) and the official cMedQA2 layout on a loopback host:

1. ``make base`` (``dvc repro base``) with ``model.base``/``model.revision``/``model.source``
   pinned (the real ``huggingface_hub`` or ``modelscope`` client), then ``make base`` again,
   which must make no request;
2. ``make data`` with ``download.mirrors`` and the blob ids of the rebuilt archives;
3. ``dvc exp run -S model.dtype=bfloat16 ...`` through process, train, merge, evaluate (base
   is up to date and makes no request; bf16 merge parity, sharded BF16 merged model, 100 candidates per question), while the
   train stage's peak RSS is measured;
4. ``make serve`` (adapter) and ``make serve MERGED=1`` answer the model client (mediagent/client.py), with the
   project's chat template;
5. ``dvc exp run --queue -S lora.r=8``, ``... -S lora.r=32``, ``dvc queue start``: both
   experiments complete, ``dvc exp show`` lists their metrics, the hub sees no request.

Writes a JSON report (``--report``, default rehearsal/report.json) and exits non-zero on
the first failure (the report then holds what was measured so far and the error).

Run: ``python -m rehearsal.run [--report PATH] [--source huggingface|modelscope] [--keep]``
(or ``make rehearse [SOURCE=modelscope]``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

from mediagent import errors
from mediagent.fileio import git_blob_id
from rehearsal.checkpoint import build_checkpoint
from rehearsal.data import official_layout
from rehearsal.hosts import FileHost, LoopbackHub, LoopbackModelScope

log = logging.getLogger("rehearsal")

ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "rehearsal/Qwen3-8B-small"
COMMIT = "5d2f9c1e0b7a4c3d8e6f1a2b3c4d5e6f7a8b9c0d"  # a fixed, made-up commit sha of that repo
STAGES = ("process", "base", "train", "merge", "evaluate")
# model.source -> the loopback stand-in that serves the checkpoint as that source's API does
REMOTES = {"huggingface": LoopbackHub, "modelscope": LoopbackModelScope}
SHARED = Path(os.environ.get("MEDQA_SHARED_DATA", ROOT.parent / "shared" / "data" / "cmedqa2"))
# What official_layout reads there: the real sample and the two official candidate archives.
DATA_FILES = ("sample/question.csv", "sample/answer.csv", "dev_candidates.zip", "test_candidates.zip")

# Sizes that keep the whole rehearsal within ~20 minutes on two CPU cores. Each is a -S
# override of the real command; nothing else about the commands changes.
OVERRIDES = {
    "model.dtype": "bfloat16",
    "data.raw_dir": "data/raw",
    "train.max_steps": 6,
    "train.per_device_train_batch_size": 4,
    "train.max_seq_length": 128,
    "train.eval_steps": 3,
    "train.save_steps": 3,
    "train.logging_steps": 1,
    "train.warmup_steps": 1,
    "train.max_eval_examples": 8,
    # 4 x 128 eval tokens: in-training evaluation's logits stay below the train step's, so
    # the memory budget below decides the micro-batch
    "train.per_device_eval_batch_size": 4,
    "train.learning_rate": 0.01,
    "merge.parity_prompts": 2,
    "merge.max_shard_size": "30MB",
    "eval.backend": "hf",  # vLLM is exercised by the two serve checks
    "eval.max_questions": 3,
    "eval.max_generations": 1,
    "eval.max_new_tokens": 8,
    "eval.max_seq_length": 160,
    "eval.batch_size": 50,
    "serve.max_model_len": 512,
}


class RehearsalError(RuntimeError):
    pass


class RehearsalDataError(errors.UserError):
    """The real cMedQA2 files the rehearsal builds its data from are not there."""


def check_data(folder: Path) -> None:
    """Fail before anything is cloned or built when a file official_layout reads is missing."""
    missing = [name for name in DATA_FILES if not (folder / name).is_file()]
    if missing:
        raise RehearsalDataError(
            f"cMedQA2 files missing in {folder}: {', '.join(missing)} — put cMedQA2's dev_candidates.zip and "
            "test_candidates.zip (https://github.com/zhangsheng93/cMedQA2) in that folder and real question.csv "
            "and answer.csv in its sample/, or set MEDQA_SHARED_DATA to a folder that has them; "
            "`make demo` needs none of this"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Runner:
    """Runs commands in the clone with the rehearsal environment; logs and checks each."""

    def __init__(self, repo: Path, env: dict):
        self.repo, self.env = repo, env

    def __call__(self, args: list[str], timeout: float = 1200, check: bool = True, watch=None) -> str:
        log.info("$ %s", " ".join(args))
        t0 = time.monotonic()
        proc = subprocess.Popen(
            args,
            cwd=self.repo,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        stop = threading.Event()
        watcher = threading.Thread(target=watch, args=(proc.pid, stop), daemon=True) if watch else None
        if watcher:
            watcher.start()
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            raise RehearsalError(f"{' '.join(args)} timed out after {timeout}s:\n{out[-3000:]}") from None
        except BaseException:  # Ctrl-C: the command runs in its own session, stop it too
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            stop.set()
            if watcher:
                watcher.join()
        log.info("  exit %d in %.1fs", proc.returncode, time.monotonic() - t0)
        if check and proc.returncode != 0:
            raise RehearsalError(f"{' '.join(args)} failed (exit {proc.returncode}):\n{out[-4000:]}")
        return out


class PeakRSS:
    """Peak resident memory of the process (with its children) whose command line holds ``marker``.

    Polls the process tree of the command it watches every 0.1 s (psutil): DVC starts each
    stage as a child, so only the stage's own tree counts, not DVC itself.
    """

    def __init__(self, marker: str):
        self.marker, self.peak = marker, 0

    def __call__(self, pid: int, stop: threading.Event) -> None:
        import psutil

        try:
            root = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return
        while not stop.is_set():
            try:
                for p in root.children(recursive=True):
                    try:
                        if any(self.marker in part for part in p.cmdline()):
                            tree = [p, *p.children(recursive=True)]
                            self.peak = max(self.peak, sum(q.memory_info().rss for q in tree))
                    except psutil.Error:
                        continue
            except psutil.Error:
                pass
            stop.wait(0.1)


def ran(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def set_params(path: Path, values: dict) -> None:
    """Set dotted keys in params.yaml (what a user edits by hand before committing)."""
    params = yaml.safe_load(path.read_text(encoding="utf-8"))
    for key, value in values.items():
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")


def wait_for_server(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RehearsalError(f"the server exited with {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise RehearsalError(f"no answer from {url} within {timeout}s")


def serve_check(run: Runner, make: list[str], merged: bool, repo: Path, logs: Path) -> dict:
    """Start `make serve [MERGED=1]`, ask one question through the model client, check the prompt format."""
    from mediagent.chat_format import ChatFormat
    from mediagent.client import ModelClient

    port = free_port()
    args = make + ["serve", f"PORT={port}"] + (["MERGED=1"] if merged else [])
    log.info("$ %s", " ".join(args))
    logf = (logs / f"serve{'-merged' if merged else ''}.log").open("w")
    proc = subprocess.Popen(args, cwd=repo, env=run.env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    try:
        wait_for_server(url, proc, timeout=420)
        startup = time.monotonic() - t0
        client = ModelClient(f"{url}/v1")
        messages = [
            {"role": "system", "content": "你是一个专业的医疗助手，能够提供准确的医疗咨询。"},
            {"role": "user", "content": "孩子发烧38.5度需要去医院吗？"},
        ]
        reply = client.complete("medqa", messages, 16, 0)
        # The prompt the server builds must be the training one (project template, empty think block).
        body = json.dumps({"model": "medqa", "messages": messages, "add_generation_prompt": True}).encode()
        req = urllib.request.Request(f"{url}/tokenize", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            served_ids = json.loads(r.read())["tokens"]
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(repo / "models" / ("merged" if merged else "adapter")))
        want = ChatFormat.of(tok).prompt_ids(messages)
        return {
            "ok": reply.finish_reason in ("stop", "length"),
            "template_ok": served_ids == want,
            "answer": reply.text,
            "startup_s": round(startup, 1),
        }
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        logf.close()


def sweep(run: Runner, dvc: list[str], hub: LoopbackHub | LoopbackModelScope, logs: Path) -> dict:
    before = hub.count()
    for r in (8, 32):
        run(dvc + ["exp", "run", "--queue", "-S", f"lora.r={r}"])
    # The queue's workers outlive `dvc queue start` and would hold a stdout pipe open.
    with (logs / "queue.log").open("w") as fh:
        subprocess.run(
            dvc + ["queue", "start", "-j", "1"],
            cwd=run.repo,
            env=run.env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            check=True,
            timeout=120,
        )
    deadline = time.monotonic() + 900
    while True:
        status = run(dvc + ["queue", "status"], check=False)
        if not any(w in status for w in ("Queued", "Running")):
            break
        if time.monotonic() > deadline:
            raise RehearsalError(f"queued experiments did not finish:\n{status}")
        time.sleep(20)  # each `dvc queue status` costs a second or two of CPU
    if "Failed" in status:
        failed = [line.split()[0] for line in status.splitlines() if "Failed" in line]
        logs = "".join(run(dvc + ["queue", "logs", name], check=False)[-3000:] for name in failed)
        raise RehearsalError(f"a queued experiment failed:\n{status}\n{logs}")
    # The idle worker would otherwise linger and write into the clone while it is removed.
    run(dvc + ["queue", "stop"], check=False)
    shown = json.loads(run(dvc + ["exp", "show", "--json"]))
    experiments = []
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", [exp]):
                data = rev.get("data") or {}
                params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
                metrics = ((data.get("metrics") or {}).get("metrics/eval.json") or {}).get("data") or {}
                experiments.append(
                    {
                        "name": rev.get("name") or exp.get("name"),
                        "lora.r": (params.get("lora") or {}).get("r"),
                        "tuned.p_at_1": (metrics.get("tuned") or {}).get("p_at_1"),
                        "tuned.loss": (metrics.get("tuned") or {}).get("loss"),
                    }
                )
    done = [e for e in experiments if e["lora.r"] in (8, 32) and e["tuned.loss"] is not None]
    if len(done) < 2:
        raise RehearsalError(f"dvc exp show lists {experiments}, expected the r=8 and r=32 runs with metrics")
    return {"experiments": done, "base_refetch_requests": hub.count() - before, "status": status.strip()}


def bf16_shards(merged: Path) -> dict:
    from safetensors import safe_open

    dtypes, shards = set(), sorted(merged.glob("*.safetensors"))
    for shard in shards:
        with safe_open(shard, "pt") as f:
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
    return {"files": [s.name for s in shards], "header_dtypes": sorted(dtypes)}


def budget_forcing_micro_batches(repo: Path, base_dir: Path, overrides: dict) -> float:
    """A train.memory_budget (GiB) between what half the batch and the whole batch need, so
    that the plan must train in micro-batches of half the batch, with twice the accumulation.

    Priced by the pre-flight itself (mediagent.memory) from the base's config.json and the
    clone's params with the rehearsal's overrides; the model is never loaded for it.
    """
    from mediagent import memory
    from mediagent.params import load_params, with_overrides

    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    sections: dict = {}
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        sections.setdefault(section, {})[name] = value
    params = with_overrides(
        load_params(repo / "params.yaml"), **{k: v for k, v in sections.items() if k in ("train", "model")}
    )
    batch = params.train.per_device_train_batch_size
    arch = memory.Arch.from_config(config)
    need = {
        m: memory.train_plan(arch, params, "bfloat16", micro_batch=m, gradient_checkpointing=False)["peak"]
        + memory.RUNTIME_BYTES[memory.training_device()]
        for m in (batch, batch // 2)
    }
    if not need[batch // 2] < need[batch]:
        raise RehearsalError(f"half the batch needs as much as the whole ({need}): no budget can force micro-batches")
    return round((need[batch] + need[batch // 2]) / 2 / (1 - memory.MARGIN) / memory.GIB, 4)


def remote_env(source: str, url: str, work: Path) -> dict:
    """What points the source's real client at the stand-in (and keeps its state in work)."""
    if source == "modelscope":
        return {
            "MODELSCOPE_ENDPOINT": url,
            "MODELSCOPE_CACHE": str(work / "modelscope_cache"),
            "MODELSCOPE_HOME": str(work / "modelscope_home"),
        }
    return {
        "HF_ENDPOINT": url,
        "HF_HOME": str(work / "hf_home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }


def rehearse(work: Path, report: dict, source: str = "huggingface") -> None:
    venv = (ROOT / ".venv").resolve()
    repo = work / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    report["commit"] = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True
    ).stdout.strip()
    (repo / ".venv").symlink_to(venv, target_is_directory=True)

    t = time.monotonic()
    hub_dir = build_checkpoint(work / "hub" / REPO_ID)
    files, data_summary = official_layout(SHARED / "sample", SHARED)
    report["timings_s"] = {"checkpoint": round(time.monotonic() - t, 1)}

    with REMOTES[source](REPO_ID, COMMIT, hub_dir) as hub, FileHost(files) as host:
        env = {
            **os.environ,
            **remote_env(source, hub.url, work),
            "DVC_NO_ANALYTICS": "1",
            "TQDM_DISABLE": "1",
            "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
            "GIT_AUTHOR_NAME": "rehearsal",
            "GIT_AUTHOR_EMAIL": "rehearsal@localhost",
            "GIT_COMMITTER_NAME": "rehearsal",
            "GIT_COMMITTER_EMAIL": "rehearsal@localhost",
        }
        for name in ("HF_HUB_OFFLINE", "MODELSCOPE_DOMAIN", "MODELSCOPE_API_TOKEN"):
            env.pop(name, None)
        run = Runner(repo, env)
        # The venv is already installed: never let make reinstall it in the clone.
        make = ["make", "--no-print-directory", "-o", ".venv/.installed"]
        dvc = [str(venv / "bin" / "dvc")]

        # ---- 1-2. make base at a pinned revision, twice
        pinned = {"model.base": REPO_ID, "model.revision": COMMIT, "model.source": source, "model.dtype": "bfloat16"}
        set_params(repo / "params.yaml", pinned)
        t = time.monotonic()
        first_out = run(make + ["base"])
        base_dir = repo / "models" / "base" / REPO_ID
        fetch = json.loads((base_dir / "fetch.json").read_text())
        first = hub.count()
        second_out = run(make + ["base"])
        report["stages_run_make_base"] = [ran(first_out), ran(second_out)]
        report["base"] = {
            "source": fetch["source"],
            "repo": REPO_ID,
            "revision": fetch["revision"],
            "files": sorted(fetch["files"]),
            "requests": first,
            "downloaded": sorted(hub.downloads),
            "refetch_requests": hub.count() - first,
            # Hard links to the DVC cache (link count 2) or symlinks: the base is stored once.
            "shard_link_counts": sorted({p.stat().st_nlink for p in base_dir.glob("*.safetensors")}),
            "shards_are_symlinks": any(p.is_symlink() for p in base_dir.glob("*.safetensors")),
            "config": {
                k: json.loads((base_dir / "config.json").read_text())[k]
                for k in (
                    "tie_word_embeddings",
                    "torch_dtype",
                    "head_dim",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "rope_theta",
                    "vocab_size",
                    "max_position_embeddings",
                    "hidden_size",
                    "num_hidden_layers",
                )
            },
        }
        report["timings_s"]["make_base_x2"] = round(time.monotonic() - t, 1)
        if report["base"]["source"] != source:
            raise RehearsalError(f"fetch.json says the base came from {report['base']['source']}, not {source}")
        if report["base"]["refetch_requests"]:
            raise RehearsalError(f"second `make base` made {report['base']['refetch_requests']} requests")

        # ---- 3. make data of the official layout from the loopback host
        blobs = {name: git_blob_id(data) for name, data in files.items()}
        set_params(repo / "params.yaml", {"download.mirrors": [host.base_url], "download.files": blobs})
        t = time.monotonic()
        run(make + ["data"])
        report["data"] = {
            "files": sorted(p.name for p in (repo / "data" / "raw").iterdir() if not p.name.startswith(".")),
            "blob_ids": blobs,
            "layout": data_summary,
            "requests": host.count(),
        }
        report["timings_s"]["make_data"] = round(time.monotonic() - t, 1)
        run(["git", "add", "-A"])
        run(["git", "commit", "-qm", "Pin the base, track cMedQA2 raw data"])

        # ---- 4. the pipeline in bfloat16
        overrides = {"model.base": REPO_ID, "model.revision": COMMIT, "model.source": source, **OVERRIDES}
        # A device too small for the whole batch: the plan trains 2 x 2 instead of 4 x 1.
        overrides["train.memory_budget"] = budget_forcing_micro_batches(repo, base_dir, overrides)
        args = dvc + ["exp", "run"] + [a for k, v in overrides.items() for a in ("-S", f"{k}={v}")]
        peak = PeakRSS("mediagent.pipeline.train")
        before = hub.count()
        t = time.monotonic()
        out = run(args, timeout=1200, watch=peak)
        report["timings_s"]["pipeline"] = round(time.monotonic() - t, 1)
        report["command"] = " ".join(args[1:]).replace(str(venv / "bin" / ""), "")
        report["stages_run"] = ran(out)
        # `make base` already ran (and recorded) the base stage with these params.
        if report["stages_run"] != [s for s in STAGES if s != "base"]:
            raise RehearsalError(f"expected every stage but base to run, ran {report['stages_run']}:\n{out[-3000:]}")
        report["base"]["pipeline_requests"] = hub.count() - before
        if report["base"]["pipeline_requests"]:
            raise RehearsalError(
                f"the pipeline fetched the base again ({report['base']['pipeline_requests']} requests)"
            )
        merge_metrics = json.loads((repo / "metrics" / "merge.json").read_text())
        report["merge"] = {
            "max_abs_diff": merge_metrics["max_abs_diff"],
            "mean_abs_diff": merge_metrics["mean_abs_diff"],
            "tolerance": merge_metrics["tolerance"],
            "reference_max_abs_logit": merge_metrics["reference_max_abs_logit"],
            "dtype": merge_metrics["dtype"],
            "shards": merge_metrics["shards"],
            **bf16_shards(repo / "models" / "merged"),
        }
        if report["merge"]["header_dtypes"] != ["BF16"] or report["merge"]["shards"] < 2:
            raise RehearsalError(f"merged model is not sharded bf16: {report['merge']}")
        lists = [json.loads(line) for line in (repo / "data" / "processed" / "test_candidates.jsonl").open()]
        sizes = sorted({len(r["candidates"]) for r in lists})
        evaluation = json.loads((repo / "metrics" / "eval.json").read_text())
        report["eval"] = {
            "candidates_per_question": sizes[0] if len(sizes) == 1 else sizes,
            "test_lists": len(lists),
            "questions_scored": OVERRIDES["eval.max_questions"],
            "base": evaluation.get("base"),
            "tuned": evaluation.get("tuned"),
        }
        if sizes != [100]:
            raise RehearsalError(f"candidate lists of sizes {sizes}, expected 100 each")
        train_metrics = json.loads((repo / "metrics" / "train.json").read_text())
        report["train"] = {
            k: train_metrics.get(k)
            for k in (
                "train_loss",
                "eval_loss",
                "steps",
                "trainable_params",
                "total_params",
                "plan",
                "budget_bytes",
                "estimate_bytes",
                "peak_bytes",
            )
        }
        plan = train_metrics["plan"]
        if (
            plan["per_device_train_batch_size"] * 2 != OVERRIDES["train.per_device_train_batch_size"]
            or plan["gradient_accumulation_steps"] != 2
        ):
            raise RehearsalError(
                f"train.memory_budget {overrides['train.memory_budget']} GiB should force micro-batches "
                f"of half the batch, the plan was {plan}"
            )
        estimate = train_metrics["estimate_bytes"]  # peak + what the plan reserves for the runtime
        report["preflight"] = {
            "train_memory_budget_gib": overrides["train.memory_budget"],
            "train_measured_peak_bytes": peak.peak,  # RSS of the stage's process tree, polled
            "train_measured_vmhwm_bytes": train_metrics["peak_bytes"],  # the stage's own high-water mark
            "train_estimate_bytes": estimate,
            "estimate_over_measured": round(estimate / peak.peak, 3) if peak.peak else None,
        }
        # Commit the run as a user would before sweeping: queued runs see only git-tracked
        # files and the committed dvc.lock.
        run(["git", "add", "-A"])
        run(["git", "commit", "-qm", "bf16 rehearsal run"])

        # ---- 4b. serving, adapter then merged
        t = time.monotonic()
        adapter = serve_check(run, make, merged=False, repo=repo, logs=work)
        merged = serve_check(run, make, merged=True, repo=repo, logs=work)
        report["serve"] = {
            "adapter_ok": adapter["ok"] and adapter["template_ok"],
            "merged_ok": merged["ok"] and merged["template_ok"],
            "adapter": adapter,
            "merged": merged,
        }
        report["timings_s"]["serve"] = round(time.monotonic() - t, 1)
        if not (report["serve"]["adapter_ok"] and report["serve"]["merged_ok"]):
            raise RehearsalError(f"serving failed: {report['serve']}")

        # ---- 5. a sweep that reuses the base
        t = time.monotonic()
        report["sweep"] = sweep(run, dvc, hub, work)
        report["timings_s"]["sweep"] = round(time.monotonic() - t, 1)
        if report["sweep"]["base_refetch_requests"]:
            raise RehearsalError(f"the sweep made {report['sweep']['base_refetch_requests']} hub requests")
        report["hub_requests_total"] = hub.count()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report", default="rehearsal/report.json")
    parser.add_argument(
        "--source",
        default="huggingface",
        choices=sorted(REMOTES),
        help="where `make base` fetches the base from (model.source): its loopback stand-in",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone (its path is logged)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Up front, as one `error:` line: a missing file would otherwise surface minutes in, after the
    # clone and the checkpoint, as a bare FileNotFoundError (and the previous report is kept).
    errors.run(lambda: check_data(SHARED))
    work = Path(tempfile.mkdtemp(prefix="medqa-rehearsal-"))
    log.info("working in %s", work)
    report: dict = {"ok": False, "source": args.source}
    t0 = time.monotonic()
    try:
        rehearse(work, report, args.source)
        report["ok"] = True
    except Exception as e:  # the report must say what failed, whatever it was
        log.error("rehearsal failed: %s", e)
        report["error"] = f"{type(e).__name__}: {e}"
    finally:
        report["wall_s"] = round(time.monotonic() - t0, 1)
        path = Path(args.report)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        log.info("report: %s (%.0f s, ok=%s)", path, report["wall_s"], report["ok"])
        if args.keep:
            log.info("kept %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
