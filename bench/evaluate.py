"""Benchmark of the `evaluate` stage's scoring and generation (`make bench-evaluate`). Not a test.

1. Answer selection: the same questions and candidates scored twice on the tiny Qwen3 base
   (float32, CPU unless a GPU is present):
     (a) stage     `score_candidates`: the question prompt runs once, its KV cache is
                   shared by length-sorted, right-padded batches of candidates, and only
                   answer positions go through the 152k-vocab output layer, in large
                   chunks into one reused buffer, with an in-place normaliser
     (b) baseline  `score_candidates_naive`: one full forward per (question, candidate),
                   log_softmax over all positions
   Timed interleaved per question (both arms see the same background load). Scores must
   agree to 1e-4. Prints candidates/s for both and the ratio (target >= 3x), and the
   output-layer rows per candidate of each (on the tiny model that layer is nearly all
   the cost).
2. Generation: greedy answers with exactly --new-tokens tokens each (end tokens ignored, so
   both backends produce the same number), vLLM's offline engine vs transformers
   `generate` (batched, left padding); tokens/s for both. Skipped, with the reason, when
   vLLM cannot be imported.

Data: real questions and answers from the shared cMedQA2 sample (question.csv +
answer.csv); each question's candidates are its own answer plus other questions' answers.
Base: models/base/tiny when present, else built in a temporary folder from params.yaml.

    python bench/evaluate.py [--questions 20] [--candidates 10] [--batch-size 16]
                             [--prompts 16] [--new-tokens 48] [--sample DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_SAMPLE = Path(os.environ.get("MEDQA_SHARED_DATA", ROOT / ".." / "shared" / "data" / "cmedqa2")) / "sample"


def question_rows(sample: Path, system: str, n_questions: int, n_candidates: int, seed: int = 0) -> list[dict]:
    """test_candidates-shaped rows: own answer (label 1) + other questions' answers."""
    import random

    import pandas as pd

    q = pd.read_csv(sample / "question.csv", encoding="utf-8")
    a = pd.read_csv(sample / "answer.csv", encoding="utf-8")
    pairs = a.merge(q, on="question_id", suffixes=("_a", "_q"))
    pool = list(pairs.itertuples())
    rng = random.Random(seed)
    rows = []
    for r in pool[:n_questions]:
        others = rng.sample([o for o in pool if o.question_id != r.question_id], n_candidates - 1)
        cands = [{"ans_id": int(r.ans_id), "content": r.content_a, "label": 1}]
        cands += [{"ans_id": int(o.ans_id), "content": o.content_a, "label": 0} for o in others]
        rows.append({"question_id": int(r.question_id), "system": system, "question": r.content_q, "candidates": cands})
    return rows


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_selection(model, tok, rows: list[dict], batch_size: int) -> None:
    import numpy as np

    from stages import scoring

    encoded = [scoring.encode_question(tok, q, max_length=512)[:2] for q in rows]
    n = sum(len(c) for _, c in encoded)
    prompt_tokens = statistics.mean(len(p) for p, _ in encoded)
    answer_tokens = statistics.mean(len(c) for _, cands in encoded for c in cands)
    workspace = scoring.logits_workspace(model)  # what the stage's score_questions allocates once
    scoring.score_candidates(model, *encoded[0], batch_size, workspace)  # warm-up (allocator, kernels)
    scoring.score_candidates_naive(model, encoded[0][0], encoded[0][1][:2])

    # Interleaved per question, so both arms see the same background load on shared cores.
    fast, slow, t_fast, t_slow = [], [], 0.0, 0.0
    for p, c in encoded:
        scores, t = timed(lambda: scoring.score_candidates(model, p, c, batch_size, workspace))
        fast.append(scores)
        t_fast += t
        scores, t = timed(lambda: scoring.score_candidates_naive(model, p, c))
        slow.append(scores)
        t_slow += t
    diff = max(float(np.max(np.abs(np.array(a) - np.array(b)))) for a, b in zip(fast, slow))
    assert diff < 1e-4, f"scorers disagree: max |diff| {diff:.2e}"

    print(f"answer selection: {len(rows)} questions x {n // len(rows)} candidates = {n} candidates; "
          f"mean prompt {prompt_tokens:.1f} tokens, mean candidate {answer_tokens:.1f} tokens")
    print(f"  (a) stage  shared prefix, batch {batch_size}: {n / t_fast:8.2f} candidates/s  ({t_fast:.2f} s)")
    print(f"  (b) naive  one forward per candidate:  {n / t_slow:8.2f} candidates/s  ({t_slow:.2f} s)")
    print(f"  ratio (a)/(b): {t_slow / t_fast:.2f}x   max |score diff| {diff:.2e}")
    print(f"  output-layer rows per candidate: naive {prompt_tokens + answer_tokens:.1f}, stage {answer_tokens:.1f} "
          f"({(prompt_tokens + answer_tokens) / answer_tokens:.2f}x fewer)")


def bench_generation(model, tok, base_dir: Path, rows: list[dict], n_prompts: int, new_tokens: int, batch_size: int) -> None:
    from stages import eval_metrics, scoring, vllm_engine
    from stages import evaluate as ev
    from stages.chatml import encode_prompt

    prompts = [encode_prompt(tok, q["system"], q["question"]) for q in rows[:n_prompts]]
    eos, _ = eval_metrics.special_ids(tok)
    scoring.generate_hf(model, tok, prompts[:2], 2, batch_size)  # warm-up
    hf, t_hf = timed(lambda: scoring.generate_hf(model, tok, prompts, new_tokens, batch_size, min_new_tokens=new_tokens))
    hf_tokens = sum(len(g) for g in hf)
    print(f"generation: {len(prompts)} prompts x {new_tokens} new tokens, greedy, float32")
    print(f"  transformers generate (batch {batch_size}): {hf_tokens / t_hf:8.1f} tokens/s  ({t_hf:.2f} s)")

    ok, why = vllm_engine.vllm_status()
    if not ok:
        print(f"  vLLM: skipped ({why})")
        return
    llm, t_init = timed(lambda: ev.open_vllm(base_dir, None, 0, max(map(len, prompts)) + new_tokens, len(prompts), 0))
    try:
        ev.generate_vllm(llm, prompts[:2], 2, eos)  # warm-up
        out, t_vllm = timed(lambda: ev.generate_vllm(llm, prompts, new_tokens, eos, min_new_tokens=new_tokens))
    finally:
        vllm_engine.close_llm(llm)
    vllm_tokens = sum(len(g) for g in out)
    print(f"  vLLM offline engine:                {vllm_tokens / t_vllm:8.1f} tokens/s  ({t_vllm:.2f} s; "
          f"engine start {t_init:.1f} s not included)")
    print(f"  ratio vLLM/transformers: {(vllm_tokens / t_vllm) / (hf_tokens / t_hf):.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--candidates", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE)
    args = ap.parse_args()

    import torch

    from stages.base import build_tiny
    from stages.models import load_model, load_tokenizer
    from stages.params import load_params

    if not (args.sample / "question.csv").is_file():
        sys.exit(f"no question.csv in {args.sample}: pass --sample DIR (cMedQA2 question.csv + answer.csv)")
    params = load_params(ROOT / "params.yaml")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = ROOT / "models" / "base" / "tiny"
        if not (base_dir / "config.json").is_file():
            base_dir = Path(tmp) / "tiny"
            build_tiny(params.tiny, base_dir)
        model = load_model(base_dir, params.model, torch.float32).to(device)
        tok = load_tokenizer(base_dir)
        rows = question_rows(args.sample, params.process.system_prompt, args.questions, args.candidates)
        bench_selection(model, tok, rows, args.batch_size)
        bench_generation(model, tok, base_dir, rows, args.prompts, args.new_tokens, args.batch_size)


if __name__ == "__main__":
    main()
