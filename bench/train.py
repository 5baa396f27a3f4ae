"""Benchmark of the `train` stage's batching and loss (`make bench-train`). Not a test.

Trains the same LoRA on the same tiny Qwen3 base and the same real examples for the same
number of optimizer steps, twice, each in a fresh process:

  (a) stage     the stage's batching: length-grouped sampler + padding to each batch's
                longest example (labels padded with -100)
  (b) baseline  a plain Trainer setup: random order, every example padded to
                train.max_seq_length

and prints, for each, the fraction of non-pad tokens per batch, trained tokens per second
(non-pad tokens through forward+backward+optimizer per wall-clock second of
``trainer.train()``), and peak RSS; then the ratios. Targets: (a) >= 95% non-pad tokens and
>= 2x the trained-token throughput of (b).

Then the loss, at batch 8 x 512 (every batch padded to 512 tokens), same data order:

  (c) full     today's cross-entropy over the whole logits tensor (train.loss: full)
  (d) chunked  the LM head on learned tokens only, in chunks (train.loss: chunked)

Targets: peak memory (VmHWM) of (d) >= 2x lower than (c), tokens/s of (d) >= 0.9x (c),
the same final training loss.

Data: ChatML examples built from the real cMedQA2 sample (500 question/answer pairs,
``--sample``) when present, else data/processed/train.jsonl (the 104 illustrative
examples: too few batches for length grouping to show its real padding share). Base: models/base/tiny when present, else the
tiny base is built in a temporary folder from params.yaml's `tiny` section.

    python bench/train.py [--steps 12] [--batch-size N] [--max-seq-length N] [--loss-steps 4]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLE = ROOT / ".." / "shared" / "data" / "cmedqa2" / "sample"


def sample_examples(sample: Path, system_prompt: str) -> list[dict]:
    """ChatML examples (the process stage's format) from the shared question/answer CSVs."""
    import pandas as pd

    questions = pd.read_csv(sample / "question.csv", encoding="utf-8")
    answers = pd.read_csv(sample / "answer.csv", encoding="utf-8")
    rows = questions.merge(answers, on="question_id", suffixes=("_q", "_a")).sort_values("question_id")
    return [
        {
            "messages": [
                {"role": "system", "content": system_prompt},
                {"role": "user", "content": r.content_q},
                {"role": "assistant", "content": r.content_a},
            ]
        }
        for r in rows.itertuples()
    ]


class RecordingCollator:
    """Wraps a collator and records each batch's real and total token counts."""

    def __init__(self, inner):
        self.inner = inner
        self.batches: list[tuple[int, int]] = []

    def __call__(self, features):
        batch = self.inner(features)
        mask = batch["attention_mask"]
        self.batches.append((int(mask.sum()), mask.numel()))
        return batch


def run_arm(arm: str, base: str, examples: list[dict], steps: int, batch_size: int, max_len: int) -> dict:
    """One training run in this (fresh) process; returns its figures.

    Arms: stage / baseline (batching, full loss as before), full / chunked (the loss, every
    batch padded to max_len so each step is batch_size x max_len tokens).
    """
    import dataclasses

    import torch
    from transformers import DataCollatorForSeq2Seq

    from mediagent.loading import load_model, load_tokenizer
    from mediagent.loss import use_chunked_loss
    from mediagent.memory import measured_peak_bytes
    from mediagent.params import load_params, with_overrides
    from mediagent.pipeline.train import attach_lora, encode_split, make_trainer, training_arguments

    params = load_params(ROOT / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        params = with_overrides(
            params,
            train={
                "max_steps": steps,
                "per_device_train_batch_size": batch_size,
                "max_seq_length": max_len,
                "group_by_length": arm in ("stage", "full", "chunked"),
                "checkpoint_dir": f"{tmp}/ckpt",
                "output_dir": f"{tmp}/out",
                "dvclive_dir": f"{tmp}/live",
                "logging_steps": steps,
            },
        )
        tok = load_tokenizer(base)
        model = load_model(base, params.model, torch.float32)
        if arm == "chunked":
            use_chunked_loss(model)
        model = attach_lora(model, params.lora)
        features, _ = encode_split(tok, examples, max_len, "train.jsonl", progress=False)
        if arm == "stage":
            inner = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)
        else:
            inner = DataCollatorForSeq2Seq(tok, padding="max_length", max_length=max_len, label_pad_token_id=-100)
        collator = RecordingCollator(inner)
        plan = {
            "per_device_train_batch_size": batch_size,
            "gradient_accumulation_steps": 1,
            "gradient_checkpointing": False,
            "chunked_loss": arm == "chunked",
            "quantization": "none",
        }
        args = dataclasses.replace(
            training_arguments(params.train, torch.float32, plan),
            eval_strategy="no",
            save_strategy="no",
            disable_tqdm=True,
        )
        trainer = make_trainer(
            model=model, args=args, train_dataset=features, data_collator=collator, processing_class=tok
        )
        start = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - start
    # The dataloader collates one batch ahead; only the first `steps` batches were trained on.
    fractions = [r / t for r, t in collator.batches[: steps * params.train.gradient_accumulation_steps]]
    real = trainer.real_tokens  # counted by the stage's trainer in each training step
    return {
        "arm": arm,
        "batches": len(fractions),
        "nonpad_mean": statistics.fmean(fractions),
        "nonpad_min": min(fractions),
        "nonpad_total": real / trainer.batch_tokens,
        "tokens": real,
        "seconds": seconds,
        "tokens_per_s": real / seconds,
        "peak_rss_mb": measured_peak_bytes() / 2**20,
        "train_loss": output.training_loss,
    }


def main() -> None:
    from mediagent.params import load_params

    params = load_params(ROOT / "params.yaml")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=params.train.per_device_train_batch_size)
    ap.add_argument("--max-seq-length", type=int, default=params.train.max_seq_length)
    ap.add_argument("--loss-steps", type=int, default=4, help="steps of the full/chunked loss arms (8 x 512 each)")
    ap.add_argument(
        "--sample", type=Path, default=Path(os.environ.get("MEDQA_SHARED_DATA", DEFAULT_SAMPLE.parent)) / "sample"
    )
    opts = ap.parse_args()

    processed = ROOT / params.data.processed_dir / "train.jsonl"
    if (opts.sample / "question.csv").is_file():
        examples, source = (
            sample_examples(opts.sample, params.process.system_prompt),
            "shared sample (question.csv + answer.csv)",
        )
    elif processed.is_file():
        from mediagent.fileio import read_jsonl

        examples, source = read_jsonl(processed), str(processed.relative_to(ROOT))
    else:
        sys.exit(f"no data: neither {opts.sample}/question.csv nor {processed}; run `dvc repro process`")

    with tempfile.TemporaryDirectory() as tmp:
        base = ROOT / params.model.dir / "tiny"
        if not (base / "config.json").is_file():
            from mediagent.pipeline.base_model import build_tiny

            base = Path(tmp) / "tiny"
            build_tiny(params.tiny, base)
        print(
            f"data: {source}, {len(examples)} examples; base: tiny; {opts.steps} steps of "
            f"{opts.batch_size} examples, max_seq_length {opts.max_seq_length}; {os.cpu_count()} CPUs"
        )
        results = {}
        ctx = multiprocessing.get_context("spawn")  # fresh process per arm: its own peak RSS
        for arm in ("stage", "baseline"):
            with ProcessPoolExecutor(1, mp_context=ctx) as pool:
                job = pool.submit(run_arm, arm, str(base), examples, opts.steps, opts.batch_size, opts.max_seq_length)
                results[arm] = job.result()
        # the loss arms at the shape: 8 x 512, every batch padded to 512
        for arm in ("full", "chunked"):
            with ProcessPoolExecutor(1, mp_context=ctx) as pool:
                results[arm] = pool.submit(run_arm, arm, str(base), examples, opts.loss_steps, 8, 512).result()

    print(
        f"{'':10s} {'non-pad/batch mean':>18s} {'min':>6s} {'tokens':>8s} {'seconds':>8s} {'tokens/s':>9s} {'peak RSS':>9s}"
    )
    for arm, r in results.items():
        print(
            f"{arm:10s} {r['nonpad_mean']:18.1%} {r['nonpad_min']:6.1%} {r['tokens']:8d} {r['seconds']:8.1f} "
            f"{r['tokens_per_s']:9.0f} {r['peak_rss_mb']:7.0f}MB"
        )
    a, b = results["stage"], results["baseline"]
    ratio = a["tokens_per_s"] / b["tokens_per_s"]
    print(f"trained-token throughput stage/baseline: {ratio:.2f}x (target >= 2x): {'OK' if ratio >= 2 else 'MISSED'}")
    print(
        f"non-pad tokens per batch (stage): {a['nonpad_mean']:.1%} (target >= 95%): "
        f"{'OK' if a['nonpad_mean'] >= 0.95 else 'MISSED'}"
    )
    full, chunked = results["full"], results["chunked"]
    memory = full["peak_rss_mb"] / chunked["peak_rss_mb"]
    speed = chunked["tokens_per_s"] / full["tokens_per_s"]
    print(f"loss at 8 x 512, {opts.loss_steps} steps:    peak RSS     tokens/s   train loss")
    for arm in ("full", "chunked"):
        r = results[arm]
        print(f"  {arm:8s}                {r['peak_rss_mb']:7.0f}MB {r['tokens_per_s']:10.0f}   {r['train_loss']:.6f}")
    print(f"peak memory full/chunked: {memory:.2f}x (target >= 2x): {'OK' if memory >= 2 else 'MISSED'}")
    print(f"tokens/s chunked/full: {speed:.2f}x (target >= 0.9x): {'OK' if speed >= 0.9 else 'MISSED'}")
    same = abs(full["train_loss"] - chunked["train_loss"]) <= 1e-4 * abs(full["train_loss"])
    print(f"train loss: {full['train_loss']:.6f} vs {chunked['train_loss']:.6f}: {'same' if same else 'DIFFERENT'}")
    print(
        json.dumps(
            {arm: {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for arm, r in results.items()}
        )
    )


if __name__ == "__main__":
    main()
