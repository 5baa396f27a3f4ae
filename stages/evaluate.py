"""The `evaluate` stage: base vs fine-tuned model, side by side, on the held-out test split.

Reads  ``<model.dir>/<model.base>`` (base), ``merge.output_dir`` (the tuned model: the
       merged, standalone artifact), ``train.output_dir`` (the adapter: serve-readiness,
       vLLM generation), ``<data.processed_dir>/test.jsonl`` and ``test_candidates.jsonl``;
       params ``model``, ``eval``.
Writes ``eval.metrics_file``  {"base", "tuned", "delta", "random", "serve_ready"} with
                              numeric leaves only, so `dvc exp show`/`dvc metrics diff` work;
       ``eval.report_path``   backend used, serve-readiness reasons, counts (for humans);
       ``eval.samples_path``  JSONL: question, reference, base and tuned answers;
       ``eval.plots_dir``     selection.json (metric bars), ranks.csv (rank of the first
                              correct answer: base, tuned and its exact random expectation).

Run: ``python -m stages.evaluate`` (or ``dvc repro evaluate``).

Metrics, per model:
- ``loss``/``perplexity``: mean NLL of the answer tokens (+ <|im_end|>) given the ChatML
  prompt, token-weighted over ``eval.max_questions`` test examples.
- ``p_at_1``/``mrr``/``map``: answer selection (the standard cMedQA2 task). Every candidate
  is scored by its mean log-probability per answer token given the question; ties are
  broken by a seeded random draw, never by list order (official files list positives
  first). ``random`` holds the exact expectation of each metric under a random ranking.
- ``bleu4`` (sacrebleu, ``tokenize="zh"``: characters), ``rouge_l`` (F1 on characters),
  ``distinct_2`` (unique/total character bigrams), ``mean_length`` (chars),
  ``empty_share`` and ``think_share`` (outputs containing ``<think>``; must be 0 in the
  non-thinking format) over ``eval.max_generations`` greedy answers.
Generation backend (``eval.backend``, recorded in the report): ``auto`` uses vLLM's
offline engine when ``import vllm`` works (one float32 engine: the base, and base + LoRA
through a LoRARequest), else transformers ``generate`` on the base and the merged model.

``serve_ready``: the adapter's rank is one vLLM serves, every configured target module
matched the base (and ``lora_modules`` > 0), no ``modules_to_save``, and vLLM + LoRA
greedy output equals peft's on a few prompts (null when vLLM is not used); ``ready`` is
their conjunction, an unchecked parity not counting against it.

Cost is bounded by ``eval.max_questions`` (0 = the whole test set), ``eval.max_generations``,
``eval.max_new_tokens`` and ``eval.batch_size``.
"""

from __future__ import annotations

import csv
import gc
import importlib
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from stages.base import check_model_dir, load_model, load_tokenizer, resolve_dtype
from stages.chatml import ENDOFTEXT, IM_END, encode_answer, encode_example, encode_prompt, split_messages
from stages.fileio import atomic_path, dump_jsonl, md5_file, read_jsonl, write_json
from stages.merge import check_adapter_dir, check_lineage_base, read_lineage
from stages.params import VLLM_LORA_RANKS, Params, load_params

log = logging.getLogger(__name__)

# Rows turned into vocab-sized float32 logits at once: 1024 x 152k x 4 B = 0.6 GB peak.
LOGPROB_CHUNK = 1024
PARITY_PROMPTS = 4   # prompts for the vLLM-vs-peft greedy parity check
SELECTION_KEYS = ("p_at_1", "mrr", "map")


class EvalError(RuntimeError):
    """Inputs are missing or inconsistent; the message names the fix."""


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Inputs:
    base_dir: Path
    adapter_dir: Path
    merged_dir: Path
    examples: list[dict]     # test.jsonl rows (capped)
    questions: list[dict]    # test_candidates.jsonl rows (capped)
    generations: list[dict]  # test.jsonl rows, one per question, for generation (capped)


def _cap(rows: list, n: int) -> list:
    return rows if n == 0 else rows[:n]


def check_inputs(params: Params) -> tuple[Path, Path, Path]:
    """Every input present and built on ``model.base``; the merged model built from this adapter."""
    base_dir, adapter_dir, merged_dir = params.model.path, Path(params.train.output_dir), Path(params.merge.output_dir)
    processed = Path(params.data.processed_dir)
    for name in ("test.jsonl", "test_candidates.jsonl"):
        if not (processed / name).is_file():
            raise EvalError(f"{processed / name} not found: run `dvc repro process` (data.processed_dir)")
    check_model_dir(base_dir)
    check_adapter_dir(adapter_dir)
    adapter_lineage = read_lineage(adapter_dir, "the adapter has no lineage: rerun `dvc repro train`")
    check_lineage_base(adapter_lineage, params.model, base_dir, f"adapter {adapter_dir}")
    if not (merged_dir / "config.json").is_file() or not (merged_dir / "lineage.json").is_file():
        raise EvalError(f"no merged model at {merged_dir} (merge.output_dir): run `dvc repro merge`")
    merged_lineage = read_lineage(merged_dir, "rerun `dvc repro merge`")
    check_lineage_base(merged_lineage, params.model, base_dir, f"merged model {merged_dir}")
    adapter_md5 = md5_file(adapter_dir / "adapter_model.safetensors")
    if (merged_lineage.get("merge") or {}).get("adapter_md5") != adapter_md5:
        raise EvalError(
            f"merged model {merged_dir} was not built from the adapter in {adapter_dir} "
            f"(lineage adapter_md5 differs): run `dvc repro merge`"
        )
    return base_dir, adapter_dir, merged_dir


def load_inputs(params: Params) -> Inputs:
    base_dir, adapter_dir, merged_dir = check_inputs(params)
    processed = Path(params.data.processed_dir)
    test = read_jsonl(processed / "test.jsonl")
    questions = [q for q in read_jsonl(processed / "test_candidates.jsonl") if q["candidates"]]
    if not test or not questions:
        raise EvalError(f"{processed} has an empty test split: check process params (test_ratio, limit)")
    seen: set[int] = set()
    first_per_question = [r for r in test if not (r["question_id"] in seen or seen.add(r["question_id"]))]
    return Inputs(
        base_dir, adapter_dir, merged_dir,
        examples=_cap(test, params.eval.max_questions),
        questions=_cap(questions, params.eval.max_questions),
        generations=_cap(first_per_question, params.eval.max_generations),
    )


# ---------------------------------------------------------------- scoring


def _device(model) -> torch.device:
    return next(model.parameters()).device


def logits_workspace(model) -> torch.Tensor | None:
    """A reusable float32 buffer for one chunk of output-layer logits (CPU, float32 head).

    Fresh 100s-of-MB tensors per chunk are page-faulted in by the OS every time; reusing
    one buffer makes the output layer ~1.4x faster on CPU. Other cases (a bfloat16 head, a
    GPU with its caching allocator) return None and allocate per chunk.
    """
    head = model.get_output_embeddings()
    if head.weight.dtype != torch.float32 or getattr(head, "bias", None) is not None or head.weight.is_cuda:
        return None
    return torch.empty(LOGPROB_CHUNK, head.weight.shape[0], dtype=torch.float32, device=head.weight.device)


@torch.no_grad()
def target_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                    workspace: torch.Tensor | None = None) -> torch.Tensor:
    """log p(target | hidden) per row, with the vocab-sized logits made a chunk at a time.

    On a small model nearly all the cost is here (152k-vocab output layer), so rows go
    through in large chunks (matmul efficiency), into ``workspace`` when given, and the
    normaliser is computed in place (fewer passes over the logits than logsumexp); a
    (batch x length x vocab) tensor is never built.
    """
    out = []
    for i in range(0, hidden.shape[0], LOGPROB_CHUNK):
        h = hidden[i:i + LOGPROB_CHUNK]
        if workspace is not None:
            logits = torch.mm(h, head.weight.t(), out=workspace[:h.shape[0]])
        else:
            logits = head(h).float()
        tgt = logits.gather(1, targets[i:i + LOGPROB_CHUNK, None])[:, 0]
        peak = logits.amax(-1, keepdim=True)
        log_norm = logits.sub_(peak).exp_().sum(-1).log_() + peak[:, 0]
        out.append(tgt - log_norm)
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def score_candidates(model, prompt: list[int], candidates: list[list[int]], batch_size: int,
                     workspace: torch.Tensor | None = None) -> list[float]:
    """Mean log-prob per answer token of each candidate after ``prompt`` (shared prefix).

    The prompt runs once; its KV cache is copied for each batch of candidates (a
    DynamicCache grows in place during forward, so every batch gets a fresh one). The first
    answer token is predicted by the prompt's last position, the rest by the candidate's own
    positions. Candidates go through the transformer in length-sorted, right-padded,
    masked batches; the hidden states of their real positions are then pooled, so the
    output layer (most of the cost on small models) runs over large chunks of rows.
    """
    from transformers import DynamicCache

    device, body, head = _device(model), model.get_decoder(), model.get_output_embeddings()
    prefix = body(input_ids=torch.tensor([prompt], device=device), use_cache=True)
    first_lp = torch.log_softmax(head(prefix.last_hidden_state[0, -1]).float(), -1)
    layers = [(k, v) for k, v, *_ in prefix.past_key_values]
    p = len(prompt)

    lengths = torch.tensor([len(c) for c in candidates], device=device)
    total = first_lp[torch.tensor([c[0] for c in candidates], device=device)]
    hidden_rows, target_rows, owner_rows = [], [], []
    order = sorted(range(len(candidates)), key=lambda i: len(candidates[i]))
    for start in range(0, len(order), batch_size):
        idx = torch.tensor(order[start:start + batch_size], device=device)
        n, width = len(idx), int(lengths[idx].max()) - 1  # a candidate's last token is only a target
        if width == 0:
            continue
        ids = torch.zeros(n, width + 1, dtype=torch.long, device=device)
        for row, i in enumerate(idx.tolist()):
            ids[row, :len(candidates[i])] = torch.tensor(candidates[i], device=device)
        valid = torch.arange(width, device=device)[None, :] < (lengths[idx, None] - 1)
        mask = torch.cat([torch.ones(n, p, dtype=torch.long, device=device), valid.long()], 1)
        cache = DynamicCache(ddp_cache_data=[(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in layers],
                             config=model.config)
        hidden = body(
            input_ids=ids[:, :width], attention_mask=mask, past_key_values=cache, use_cache=True,
            position_ids=torch.arange(p, p + width, device=device).expand(n, -1),
        ).last_hidden_state
        hidden_rows.append(hidden[valid])
        target_rows.append(ids[:, 1:][valid])
        owner_rows.append(idx[valid.nonzero()[:, 0]])
    if hidden_rows:
        lp = target_logprobs(head, torch.cat(hidden_rows), torch.cat(target_rows), workspace)
        total = total.index_add(0, torch.cat(owner_rows), lp)
    return (total / lengths).tolist()


@torch.no_grad()
def score_candidates_naive(model, prompt: list[int], candidates: list[list[int]]) -> list[float]:
    """Reference scorer: one full forward per (prompt, candidate). Tests and bench only."""
    device, scores = _device(model), []
    for c in candidates:
        logits = model(torch.tensor([prompt + c], device=device)).logits[0].float()
        lp = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
        scores.append(float(lp.gather(1, torch.tensor(c, device=device)[:, None]).mean()))
    return scores


def encode_question(tokenizer, q: dict, max_length: int) -> tuple[list[int], list[list[int]], list[int]]:
    """(prompt ids, candidate ids each ending in <|im_end|>, labels) of one candidates row.

    Candidates are cut so prompt + candidate fits ``max_length`` (the answer tail goes, as
    in training); the prompt is never cut.
    """
    prompt = encode_prompt(tokenizer, q["system"], q["question"])
    room = max(1, max_length - len(prompt))
    cands = [encode_answer(tokenizer, c["content"])[:room] for c in q["candidates"]]
    return prompt, cands, [int(c["label"]) for c in q["candidates"]]


def score_questions(model, tokenizer, questions: list[dict], max_length: int, batch_size: int,
                    desc: str) -> list[list[float]]:
    out, workspace = [], logits_workspace(model)
    for q in tqdm(questions, desc=f"selection {desc}", unit="q", leave=False):
        prompt, cands, _ = encode_question(tokenizer, q, max_length)
        out.append(score_candidates(model, prompt, cands, batch_size, workspace))
    return out


@torch.no_grad()
def answer_loss(model, tokenizer, examples: list[dict], max_length: int, batch_size: int) -> dict:
    """Token-weighted NLL of assistant tokens (chatml labels) and its perplexity."""
    device, body, head = _device(model), model.get_decoder(), model.get_output_embeddings()
    encoded = [encode_example(tokenizer, e["messages"], max_length) for e in examples]
    encoded.sort(key=lambda e: len(e.input_ids))  # similar lengths per batch: little padding
    nll, tokens, workspace = 0.0, 0, logits_workspace(model)
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]
        width = max(len(e.input_ids) for e in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
        labels = torch.full((len(batch), width), -100, dtype=torch.long, device=device)
        mask = torch.zeros(len(batch), width, dtype=torch.long, device=device)
        for row, e in enumerate(batch):
            ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
            labels[row, :len(e.labels)] = torch.tensor(e.labels)
            mask[row, :len(e.input_ids)] = 1
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        keep = targets != -100
        lp = target_logprobs(head, hidden[keep], targets[keep], workspace)
        nll -= float(lp.sum())
        tokens += int(keep.sum())
    loss = nll / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}


# ---------------------------------------------------------------- selection metrics


def _first_positive_and_ap(ranked_labels: np.ndarray) -> tuple[int, float]:
    hits = np.flatnonzero(ranked_labels) + 1  # 1-based ranks of the positives
    ap = float(np.mean(np.arange(1, len(hits) + 1) / hits))
    return int(hits[0]), ap


def selection_ranks(scores: list[list[float]], labels: list[list[int]],
                    rng: np.random.Generator) -> list[tuple[int, float]]:
    """(rank of the first positive, average precision) per question with a positive.

    Descending score; ties broken by a random key from ``rng`` (never by list order).
    """
    out = []
    for s, y in zip(scores, labels, strict=True):
        s, y = np.asarray(s, dtype=np.float64), np.asarray(y)
        tiebreak = rng.random(len(s))
        if not y.any():
            continue
        order = np.lexsort((tiebreak, -s))  # last key is primary: score, then the random key
        out.append(_first_positive_and_ap(y[order]))
    return out


def selection_metrics(scores: list[list[float]], labels: list[list[int]], rng: np.random.Generator) -> dict:
    """P@1 (top-1 accuracy), MRR and MAP over questions that have at least one positive."""
    return metrics_from_ranks(selection_ranks(scores, labels, rng))


def metrics_from_ranks(ranks: list[tuple[int, float]]) -> dict:
    if not ranks:
        raise EvalError("no test question has a correct candidate (label 1): check test_candidates.jsonl")
    first = np.array([r for r, _ in ranks])
    return {
        "p_at_1": float(np.mean(first == 1)),
        "mrr": float(np.mean(1.0 / first)),
        "map": float(np.mean([ap for _, ap in ranks])),
        "questions": len(ranks),
    }


def random_first_rank_probs(n: int, k: int) -> np.ndarray:
    """P(first positive at rank r), r = 1..n, for k positives among n in random order."""
    probs = np.zeros(n)
    for r in range(1, n - k + 2):
        probs[r - 1] = math.comb(n - r, k - 1) / math.comb(n, k)
    return probs


def random_baseline(labels: list[list[int]]) -> dict:
    """Exact expected P@1, MRR and MAP of a uniformly random ranking.

    E[AP] = (1/n) * sum_r (1 + (r-1)(k-1)/(n-1)) / r: position r holds a positive with
    probability k/n, and then the other r-1 positions above it hold (r-1)(k-1)/(n-1)
    positives on average.
    """
    p1, rr, ap = [], [], []
    for y in labels:
        n, k = len(y), int(sum(y))
        if k == 0:
            continue
        r = np.arange(1, n + 1)
        p1.append(k / n)
        rr.append(float(np.sum(random_first_rank_probs(n, k) / r)))
        ap.append(float(np.mean((1 + (r - 1) * (k - 1) / max(n - 1, 1)) / r)))
    return {"p_at_1": float(np.mean(p1)), "mrr": float(np.mean(rr)), "map": float(np.mean(ap))}


# ---------------------------------------------------------------- generation


def special_ids(tokenizer) -> tuple[list[int], tuple[int, int]]:
    """(ids that end an answer, (<think>, </think>) ids)."""
    eos = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)]
    think = (tokenizer.convert_tokens_to_ids("<think>"), tokenizer.convert_tokens_to_ids("</think>"))
    return eos, think


def clean_generation(tokenizer, ids: list[int]) -> tuple[str, bool]:
    """(visible answer, whether it contained <think>) from generated ids.

    Cut at the first end token; a think block (closed or not) is removed from the text
    but reported, since the non-thinking format must never produce one.
    """
    eos, (think_open, think_close) = special_ids(tokenizer)
    ids = list(ids)
    for i, t in enumerate(ids):
        if t in eos:
            ids = ids[:i]
            break
    raw = tokenizer.decode(ids, skip_special_tokens=False)
    has_think = "<think>" in raw
    while think_open in ids:
        start = ids.index(think_open)
        end = ids.index(think_close, start) + 1 if think_close in ids[start:] else len(ids)
        ids = ids[:start] + ids[end:]
    # a character cut in half by max_new_tokens decodes to U+FFFD: not part of the answer
    return tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd").strip(), has_think


@torch.no_grad()
def generate_hf(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                min_new_tokens: int = 0) -> list[list[int]]:
    """Greedy continuations with transformers (left padding so all prompts end together)."""
    device = _device(model)
    eos, _ = special_ids(tokenizer)
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
        )
        out.extend(g[width:].tolist() for g in gen.cpu())
    return out


def vllm_status() -> tuple[bool, str]:
    """(importable, reason) for the vLLM backend."""
    try:
        importlib.import_module("vllm")
    except Exception as exc:  # a broken install raises more than ImportError
        return False, "vllm not installed" if isinstance(exc, ModuleNotFoundError) else f"vllm import failed: {exc}"
    return True, "vllm importable"


def kv_cache_bytes(base_dir: Path, tokens: int) -> int:
    """KV-cache room for ``tokens`` float32 tokens (vLLM on CPU otherwise reserves ~90% of RAM)."""
    cfg = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head_dim * 4
    return max(64 << 20, 2 * tokens * per_token)


def open_vllm(base_dir: Path, adapter_dir: Path | None, rank: int, max_model_len: int, max_seqs: int, seed: int):
    """A float32 vLLM engine on the base, with LoRA enabled when ``adapter_dir`` is given
    (one adapter, rank rounded up to the nearest rank vLLM serves). It runs in vLLM's own
    worker process; close it with ``close_vllm``."""
    from vllm import LLM

    options = {}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the HF models of this process are gone; hand their memory back
    else:
        options["kv_cache_memory_bytes"] = kv_cache_bytes(base_dir, max_seqs * max_model_len)
    if adapter_dir is not None:
        options.update(enable_lora=True, max_lora_rank=min(r for r in VLLM_LORA_RANKS if r >= rank), max_loras=1)
    # eager: no graph capture/compilation at startup, which would cost more than a few
    # dozen evaluation answers take to generate
    return LLM(
        # prompts go in as token ids; the tokenizer only decodes, and the base's has the same vocabulary
        model=str(base_dir), tokenizer=str(base_dir), dtype="float32", seed=seed,
        max_model_len=max_model_len, enforce_eager=True, **options,
    )


def close_vllm(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    gc.collect()


def generate_vllm(llm, prompts: list[list[int]], max_new_tokens: int, eos: list[int],
                  adapter_dir: Path | None = None, min_new_tokens: int = 0) -> list[list[int]]:
    """Greedy continuations (with the LoRA when ``adapter_dir`` is given).

    Prompts go in as token ids, so vLLM sees exactly what transformers sees.
    """
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    sampling = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, min_tokens=min_new_tokens,
                              stop_token_ids=eos, skip_special_tokens=False)
    lora = LoRARequest("tuned", 1, str(adapter_dir)) if adapter_dir is not None else None
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, lora_request=lora, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


class CharTokenizer:
    """rouge-score tokenizer for Chinese: characters (its default keeps only [a-z0-9])."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return [ch for ch in text if not ch.isspace()]


def generation_metrics(answers: list[str], references: list[str], think: list[bool]) -> dict:
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=CharTokenizer())
    rouge = [scorer.score(ref, hyp)["rougeL"].fmeasure for ref, hyp in zip(references, answers, strict=True)]
    bigrams = [text[i:i + 2] for text in answers for i in range(len(text) - 1)]
    return {
        "bleu4": float(sacrebleu.corpus_bleu(answers, [references], tokenize="zh").score),
        "rouge_l": float(np.mean(rouge)),
        "distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
        "mean_length": float(np.mean([len(a) for a in answers])),
        "empty_share": float(np.mean([not a for a in answers])),
        "think_share": float(np.mean(think)),
    }


# ---------------------------------------------------------------- serve-readiness


def adapter_checks(adapter_dir: Path, base_dir: Path) -> tuple[dict, dict]:
    """Static serve checks of the adapter: (flags, reasons).

    The LoRA is injected into a weightless (meta) copy of the base, so it costs nothing
    even for an 8B base; every configured target name must match at least one module.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    flags, reasons = {}, {}

    ranks = sorted({int(config["r"]), *map(int, (config.get("rank_pattern") or {}).values())})
    bad = [r for r in ranks if r not in VLLM_LORA_RANKS]
    flags["rank_servable"] = not bad
    reasons["rank_servable"] = (f"rank(s) {bad} not servable by vLLM (allowed {list(VLLM_LORA_RANKS)})" if bad
                                else f"rank(s) {ranks} servable by vLLM")

    mts = config.get("modules_to_save") or []
    flags["no_modules_to_save"] = not mts
    reasons["no_modules_to_save"] = f"modules_to_save={mts}: vLLM cannot load them" if mts else "no modules_to_save"

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as fh:
        saved = {k.split(".lora_A")[0] for k in fh.keys() if ".lora_A" in k}
    targets = config.get("target_modules") or []
    try:
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(base_dir)))
            lora = LoraConfig(**{k: v for k, v in config.items() if k in ("r", "lora_alpha", "target_modules")})
            inject_adapter_in_model(lora, meta)
        wrapped = [n for n, m in meta.named_modules() if isinstance(m, LoraLayer)]
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        wrapped, error = [], str(exc).splitlines()[0]
    else:
        error = ""
    if isinstance(targets, str):  # a regex: it matched something or nothing
        unmatched = [] if wrapped else [targets]
    else:
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in wrapped)]
    flags["targets_matched"] = bool(wrapped) and bool(saved) and not unmatched
    flags["lora_modules"] = len(wrapped)
    if flags["targets_matched"]:
        reasons["targets_matched"] = f"{len(wrapped)} modules wrapped, {len(saved)} saved with LoRA weights"
    else:
        reasons["targets_matched"] = (error or f"target_modules {unmatched} match no module of the base") + (
            "" if saved else "; the adapter file holds no LoRA weights")
    return flags, reasons


# ---------------------------------------------------------------- plots and outputs


def plot_rows(results: dict) -> list[dict]:
    """Bars for `dvc plots` (bar_horizontal: x=value, y=metric)."""
    rows = []
    for key in (*SELECTION_KEYS, "rouge_l", "distinct_2"):
        for model in ("random", "base", "tuned"):
            if key in results.get(model, {}):
                rows.append({"metric": f"{key} {model}", "value": results[model][key]})
    return rows


def rank_csv(ranks: dict[str, list[int]], labels: list[list[int]]) -> str:
    """Histogram of the rank of the first correct answer; the random column is exact."""
    n_max = max(len(y) for y in labels)
    expected = np.zeros(n_max)
    for y in labels:
        if sum(y):
            expected[:len(y)] += random_first_rank_probs(len(y), int(sum(y)))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["rank", *ranks, "random"])
    for r in range(1, n_max + 1):
        writer.writerow([r, *(sum(1 for x in v if x == r) for v in ranks.values()), round(float(expected[r - 1]), 6)])
    return buf.getvalue()


# ---------------------------------------------------------------- main


def evaluate_model(path: Path, params: Params, inputs: Inputs, tokenizer, prompts, labels, generate: bool, name: str):
    """Loss, selection and (hf backend) generation of one model: (metrics, first-positive ranks, ids)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(path, params.model, resolve_dtype(params.model)).to(device)
    e = params.eval
    metrics = answer_loss(model, tokenizer, inputs.examples, e.max_seq_length, e.batch_size)
    scores = score_questions(model, tokenizer, inputs.questions, e.max_seq_length, e.batch_size, name)
    # the same seed for both models: equal scores get the same tie-breaking draw
    ranked = selection_ranks(scores, labels, np.random.default_rng(e.seed))
    sel = metrics_from_ranks(ranked)
    ranks = [r for r, _ in ranked]
    metrics.update({k: sel[k] for k in SELECTION_KEYS})
    generated = generate_hf(model, tokenizer, prompts, e.max_new_tokens, e.batch_size) if generate else None
    log.info(
        "%s: loss %.4f ppl %.2f | P@1 %.4f MRR %.4f MAP %.4f over %d questions",
        name, metrics["loss"], metrics["perplexity"], sel["p_at_1"], sel["mrr"], sel["map"], sel["questions"],
    )
    del model
    gc.collect()
    return metrics, ranks, generated


def resolve_backend(requested: str, rank_ok: bool) -> tuple[str, str]:
    ok, why = vllm_status()
    if requested == "hf":
        return "hf", "eval.backend=hf"
    if requested == "vllm":
        if not ok:
            raise EvalError(f"eval.backend=vllm but {why}: install vllm, or set eval.backend=auto or hf")
        if not rank_ok:
            raise EvalError("eval.backend=vllm but the adapter's rank is not servable by vLLM: retrain with lora.r in "
                            f"{list(VLLM_LORA_RANKS)}, or set eval.backend=hf")
        return "vllm", "eval.backend=vllm"
    if ok and rank_ok:
        return "vllm", "auto: vllm importable"
    return "hf", f"auto: {why if not ok else 'adapter rank not servable by vLLM'}"


def vllm_peft_parity(params: Params, inputs: Inputs, tokenizer, prompts: list[list[int]], vllm_tuned: list[list[int]]):
    """Greedy ids of vLLM + LoRA equal to peft (base + adapter, float32) on a few prompts?"""
    from peft import PeftModel

    n = min(PARITY_PROMPTS, len(prompts))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = load_model(inputs.base_dir, params.model, torch.float32).to(device)
    model = PeftModel.from_pretrained(base, str(inputs.adapter_dir)).eval()
    peft_ids = generate_hf(model, tokenizer, prompts[:n], params.eval.max_new_tokens, params.eval.batch_size)
    del model, base
    gc.collect()
    eos, _ = special_ids(tokenizer)

    def cut(ids):
        return next((ids[:i] for i, t in enumerate(ids) if t in eos), ids)

    same = sum(cut(a) == cut(b) for a, b in zip(peft_ids, vllm_tuned[:n]))
    return same == n, f"{same}/{n} greedy outputs identical (vLLM LoRA vs peft, float32)"


def vllm_generations(params: Params, inputs: Inputs, tokenizer, prompts: list[list[int]]):
    """(base ids, tuned ids, parity flag, parity reason) from one vLLM engine with the LoRA."""
    e = params.eval
    rank = int(json.loads((inputs.adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))["r"])
    eos, _ = special_ids(tokenizer)
    llm = open_vllm(inputs.base_dir, inputs.adapter_dir, rank, max(map(len, prompts)) + e.max_new_tokens,
                    len(prompts), e.seed)
    try:
        base = generate_vllm(llm, prompts, e.max_new_tokens, eos)
        tuned = generate_vllm(llm, prompts, e.max_new_tokens, eos, inputs.adapter_dir)
    finally:
        close_vllm(llm)
    return (base, tuned, *vllm_peft_parity(params, inputs, tokenizer, prompts, tuned))


def main(params: Params) -> None:
    e = params.eval
    log.info("eval params: %s", e)
    inputs = load_inputs(params)
    tokenizer = load_tokenizer(inputs.merged_dir)
    labels = [[int(c["label"]) for c in q["candidates"]] for q in inputs.questions]
    prompts = [encode_prompt(tokenizer, *split_messages(r["messages"])[:2]) for r in inputs.generations]
    flags, reasons = adapter_checks(inputs.adapter_dir, inputs.base_dir)
    backend, backend_reason = resolve_backend(e.backend, flags["rank_servable"])
    log.info("generation backend: %s (%s)", backend, backend_reason)

    hf = backend == "hf"
    args = (params, inputs, tokenizer, prompts, labels, hf)
    base, base_ranks, base_gen = evaluate_model(inputs.base_dir, *args, "base")
    tuned, tuned_ranks, tuned_gen = evaluate_model(inputs.merged_dir, *args, "tuned")
    if hf:
        flags["vllm_parity"], reasons["vllm_parity"] = None, backend_reason.removeprefix("auto: ")
    else:
        base_gen, tuned_gen, parity, reasons["vllm_parity"] = vllm_generations(params, inputs, tokenizer, prompts)
        flags["vllm_parity"] = parity

    loss_tokens = base.pop("tokens")
    tuned.pop("tokens")
    texts = {}
    for name, gen, metrics in (("base", base_gen, base), ("tuned", tuned_gen, tuned)):
        cleaned = [clean_generation(tokenizer, ids) for ids in gen]
        texts[name] = [t for t, _ in cleaned]
        refs = [split_messages(r["messages"])[2] for r in inputs.generations]
        metrics.update(generation_metrics(texts[name], refs, [th for _, th in cleaned]))

    # not ready on a failed parity; an unchecked one (no vLLM here) does not count against it
    flags["ready"] = all(flags[k] for k in ("rank_servable", "no_modules_to_save", "targets_matched")) \
        and flags["vllm_parity"] is not False
    results = {
        "base": base,
        "tuned": tuned,
        "delta": {k: tuned[k] - base[k] for k in base},
        "random": random_baseline(labels),
        "serve_ready": flags,
    }
    write_outputs(params, inputs, results, texts, {"base": base_ranks, "tuned": tuned_ranks}, labels, {
        "backend": backend,
        "backend_reason": backend_reason,
        "tuned_model": str(inputs.merged_dir) if hf else f"{inputs.merged_dir} (loss, selection); "
                       f"{inputs.base_dir} + LoRA {inputs.adapter_dir} in vLLM (generation)",
        "serve_ready_reasons": reasons,
        "counts": {"loss_examples": len(inputs.examples), "loss_tokens": loss_tokens,
                   "selection_questions": len(inputs.questions), "candidates": sum(map(len, labels)),
                   "generations": len(inputs.generations)},
        "tie_break_seed": e.seed,
    })
    log.info("tuned - base: %s", {k: round(v, 4) for k, v in results["delta"].items()})


def write_outputs(params: Params, inputs: Inputs, results: dict, texts: dict, ranks: dict, labels: list,
                  report: dict) -> None:
    e = params.eval
    samples = [
        {
            "question_id": r["question_id"],
            "question": split_messages(r["messages"])[1],
            "reference": split_messages(r["messages"])[2],
            "base": texts["base"][i],
            "tuned": texts["tuned"][i],
        }
        for i, r in enumerate(inputs.generations)
    ]
    with atomic_path(e.samples_path) as tmp:
        dump_jsonl(tmp, samples)
    with atomic_path(e.plots_dir, is_dir=True) as tmp:
        (tmp / "selection.json").write_text(json.dumps(plot_rows(results), indent=2) + "\n", encoding="utf-8")
        (tmp / "ranks.csv").write_text(rank_csv(ranks, labels), encoding="utf-8")
    write_json(e.report_path, report)
    write_json(e.metrics_file, results)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(load_params())
