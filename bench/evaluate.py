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
2. Answer-selection scorers at official scale: the stage's shared-prefix transformers
   scorer vs vLLM prompt log-probabilities (`mediagent.scoring.score_questions_vllm`: one
   request per candidate, prompt_logprobs=0, max_tokens=1), without and with prefix
   caching, on the same candidates, on two bases:
     tiny        the default (float32, 2 layers, hidden 128, tied)
     rehearsal   a Qwen3 config with Qwen3-8B's head layout (32 heads, 8 KV heads,
                 head_dim 128, untied, vocab 151,936, rope_theta 1e6) scaled to hidden 512,
                 4 layers, intermediate 1536, random weights in bfloat16
   float32 scores must agree to 1e-4 (see tests/test_evaluate.py for why that bound);
   bfloat16 differences are printed, not asserted. Prints candidates/s of each, the ratio
   vLLM/transformers and the projected time of the full official test (4,000 questions x
   100 candidates = 400,000 candidates) at the measured rate of each scorer. Timed
   in alternating rounds with both engines open (every question through transformers,
   then all of them in one vLLM call per engine, as the stage batches them), so all arms
   share the same background load on average.
3. Generation: greedy answers with exactly --new-tokens tokens each (end tokens ignored, so
   both backends produce the same number), vLLM's offline engine vs transformers
   `generate` (batched, left padding); tokens/s for both. Skipped, with the reason, when
   vLLM cannot be imported.

Data: real questions and answers from the shared cMedQA2 sample (question.csv +
answer.csv); each question's candidates are its own answer plus other questions' answers.
Base: models/base/tiny when present, else built in a temporary folder from params.yaml.

    python bench/evaluate.py [--questions 20] [--candidates 10] [--batch-size 16]
                             [--scorer-questions 6] [--prompts 16] [--new-tokens 48]
                             [--sample DIR] [--skip-generation]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mediagent.chat_format import ChatFormat, conversation

ROOT = Path(__file__).resolve().parents[1]
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

    from mediagent import scoring

    encoded = [scoring.encode_question(ChatFormat.of(tok), q, max_length=512)[:2] for q in rows]
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

    print(
        f"answer selection: {len(rows)} questions x {n // len(rows)} candidates = {n} candidates; "
        f"mean prompt {prompt_tokens:.1f} tokens, mean candidate {answer_tokens:.1f} tokens"
    )
    print(f"  (a) stage  shared prefix, batch {batch_size}: {n / t_fast:8.2f} candidates/s  ({t_fast:.2f} s)")
    print(f"  (b) naive  one forward per candidate:  {n / t_slow:8.2f} candidates/s  ({t_slow:.2f} s)")
    print(f"  ratio (a)/(b): {t_slow / t_fast:.2f}x   max |score diff| {diff:.2e}")
    print(
        f"  output-layer rows per candidate: naive {prompt_tokens + answer_tokens:.1f}, stage {answer_tokens:.1f} "
        f"({(prompt_tokens + answer_tokens) / answer_tokens:.2f}x fewer)"
    )


OFFICIAL_CANDIDATES = 4000 * 100
ROUNDS = 2  # alternating timing rounds of the scorer comparison
# Qwen3-8B's published config.json with only the size fields scaled down.
REHEARSAL = dict(
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=4,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    tie_word_embeddings=False,
    rope_theta=1000000.0,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    bos_token_id=151643,
    eos_token_id=151645,
    attention_bias=False,
)


def build_rehearsal(out: Path, tokenizer_dir: Path) -> Path:
    """Random bfloat16 weights in Qwen3-8B's head layout, the tiny base's tokenizer files."""
    import shutil

    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**REHEARSAL)).to(torch.bfloat16)
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copyfile(f, out / f.name)
    return out


def open_scoring_engine(model_dir: Path, dtype: str, max_len: int, prefix_caching: bool):
    """vLLM's offline engine as the stage opens it for scoring (eager, bounded KV cache on CPU)."""
    import torch

    from mediagent.vllm_engine import kv_cache_bytes, open_llm, prepare_process_env

    gpu = torch.cuda.is_available()
    prepare_process_env(1, gpu)
    options = {} if gpu else {"kv_cache_memory_bytes": kv_cache_bytes(model_dir, 64 * max_len, 4)}
    if prefix_caching and not gpu:
        options["block_size"] = 32  # the CPU backend's smallest block (its default, 128, exceeds most prompts)
    return open_llm(
        model_dir,
        dtype,
        max_len + 1,
        0,
        tokenizer=str(model_dir),
        enforce_eager=True,
        enable_prefix_caching=prefix_caching,
        **options,
    )


def bench_scorers(name: str, model_dir: Path, dtype: str, tok, rows: list[dict], batch_size: int) -> None:
    """Both scorers on the same candidates, in alternating rounds (shared cores: same load)."""
    import numpy as np
    import torch

    from mediagent import scoring, vllm_engine
    from mediagent.loading import load_model
    from mediagent.params import load_params

    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoded = [scoring.encode_question(ChatFormat.of(tok), q, max_length=512)[:2] for q in rows]
    n = sum(len(c) for _, c in encoded)
    total = ROUNDS * n
    model = load_model(model_dir, load_params(ROOT / "params.yaml").model, getattr(torch, dtype)).to(device)
    workspace = scoring.logits_workspace(model)
    scoring.score_candidates(model, *encoded[0], batch_size, workspace)  # warm-up
    print(f"scorers on {name} ({dtype}): {len(rows)} questions x {n // len(rows)} candidates = {n} candidates")
    ok, why = vllm_engine.vllm_status()
    engines = {}
    if ok:
        max_len = max(len(p) + len(c) for p, cands in encoded for c in cands)
        for caching in (False, True):
            llm, t_init = timed(lambda: open_scoring_engine(model_dir, dtype, max_len, caching))
            scoring.score_questions_vllm(llm, encoded[-1:])  # warm-up on a question not timed first
            engines[caching] = llm
            print(f"  vLLM engine (prefix cache {'on' if caching else 'off'}) started in {t_init:.0f} s")
    else:
        print(f"  vLLM: skipped ({why})")
    scores = {"hf": [], False: [], True: []}
    times = dict.fromkeys(scores, 0.0)
    try:
        # Rounds of: every question through transformers, then all of them in one vLLM call
        # per engine (as the stage batches them), so each arm sees the same load on average.
        for _ in range(ROUNDS):
            scores["hf"], t = timed(
                lambda: [scoring.score_candidates(model, p, c, batch_size, workspace) for p, c in encoded]
            )
            times["hf"] += t
            for caching, llm in engines.items():
                llm.reset_prefix_cache()  # a later round must not find this round's blocks
                scores[caching], t = timed(lambda: scoring.score_questions_vllm(llm, encoded))
                times[caching] += t
    finally:
        for llm in engines.values():
            vllm_engine.close_llm(llm)
    model = None  # freed before the report (rebinding, not del: the timed lambdas above read it)
    t_hf = times["hf"]
    print(
        f"  transformers shared prefix, batch {batch_size}: {total / t_hf:8.2f} candidates/s  ({t_hf:.2f} s)  "
        f"full test {OFFICIAL_CANDIDATES / (total / t_hf) / 3600:7.1f} h"
    )
    for caching in engines:
        t = times[caching]
        diff = max(float(np.max(np.abs(np.array(a) - np.array(b)))) for a, b in zip(scores[caching], scores["hf"]))
        same_top = np.mean([int(np.argmax(a)) == int(np.argmax(b)) for a, b in zip(scores[caching], scores["hf"])])
        if dtype == "float32":
            assert diff < 1e-4, f"vLLM and transformers scores disagree: max |diff| {diff:.2e}"
        label = "vLLM prompt logprobs, prefix cache" + (" on " if caching else " off")
        print(
            f"  {label}:  {total / t:8.2f} candidates/s  ({t:.2f} s)  "
            f"full test {OFFICIAL_CANDIDATES / (total / t) / 3600:7.1f} h"
        )
        print(f"    ratio vLLM/transformers {t_hf / t:.2f}x   max |score diff| {diff:.2e}   same top-1 {same_top:.0%}")


def bench_generation(
    model, tok, base_dir: Path, rows: list[dict], n_prompts: int, new_tokens: int, batch_size: int
) -> None:
    from mediagent import scoring, vllm_engine
    from mediagent.pipeline import evaluate as ev

    fmt = ChatFormat.of(tok)
    prompts = [fmt.prompt_ids(conversation(q["system"], q["question"])) for q in rows[:n_prompts]]
    eos = fmt.stop_ids
    scoring.generate_hf(model, fmt, prompts[:2], 2, batch_size)  # warm-up
    hf, t_hf = timed(
        lambda: scoring.generate_hf(model, fmt, prompts, new_tokens, batch_size, min_new_tokens=new_tokens)
    )
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
    print(
        f"  vLLM offline engine:                {vllm_tokens / t_vllm:8.1f} tokens/s  ({t_vllm:.2f} s; "
        f"engine start {t_init:.1f} s not included)"
    )
    print(f"  ratio vLLM/transformers: {(vllm_tokens / t_vllm) / (hf_tokens / t_hf):.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--candidates", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--scorer-questions", type=int, default=6, help="questions for the scorer comparison")
    ap.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE)
    ap.add_argument("--skip-generation", action="store_true")
    args = ap.parse_args()

    import torch

    from mediagent.loading import load_model, load_tokenizer
    from mediagent.params import load_params
    from mediagent.pipeline.base_model import build_tiny

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
        scorer_rows = rows[: args.scorer_questions]
        bench_scorers("tiny", base_dir, "float32", tok, scorer_rows, args.batch_size)
        rehearsal = build_rehearsal(Path(tmp) / "rehearsal", base_dir)
        bench_scorers(
            "rehearsal (Qwen3-8B head layout, hidden 512, 4 layers)",
            rehearsal,
            "bfloat16",
            tok,
            scorer_rows,
            args.batch_size,
        )
        if not args.skip_generation:
            bench_generation(model, tok, base_dir, rows, args.prompts, args.new_tokens, args.batch_size)


if __name__ == "__main__":
    main()
