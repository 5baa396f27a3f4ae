"""Model computations of the `evaluate` stage with transformers: candidate scores, answer
loss and greedy generation.

Answer selection scores every candidate by its mean log-probability per answer token given
the question. On a small model nearly all the cost is the 152k-vocabulary output layer, so
the prompt runs once per question (its KV cache is shared by the candidates) and the
output layer runs over large pooled chunks of rows (``bench/evaluate.py`` measures it
against one forward per candidate).
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from mediagent.chat_format import IGNORE_INDEX, ChatFormat, conversation

# Rows turned into vocab-sized float32 logits at once: 1024 x 152k x 4 B = 0.6 GB peak.
LOGPROB_CHUNK = 1024
# Evaluation answers are greedy with nothing on top, in transformers as in vLLM. Passed as a
# whole GenerationConfig: otherwise transformers fills every unset field from the base's
# generation_config.json (Qwen3's samples at temperature 0.6; other bases ship a
# repetition_penalty or num_beams), which vLLM's SamplingParams never reads.
GREEDY = {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}


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
def target_logprobs(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, workspace: torch.Tensor | None = None
) -> torch.Tensor:
    """log p(target | hidden) per row, with the vocab-sized logits made a chunk at a time.

    On a small model nearly all the cost is here (152k-vocab output layer), so rows go
    through in large chunks (matmul efficiency), into ``workspace`` when given, and the
    normaliser is computed in place (fewer passes over the logits than logsumexp); a
    (batch x length x vocab) tensor is never built.
    """
    out = []
    for i in range(0, hidden.shape[0], LOGPROB_CHUNK):
        h = hidden[i : i + LOGPROB_CHUNK]
        if workspace is not None:
            logits = torch.mm(h, head.weight.t(), out=workspace[: h.shape[0]])
        else:
            logits = head(h).float()
        tgt = logits.gather(1, targets[i : i + LOGPROB_CHUNK, None])[:, 0]
        peak = logits.amax(-1, keepdim=True)
        log_norm = logits.sub_(peak).exp_().sum(-1).log_() + peak[:, 0]
        out.append(tgt - log_norm)
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def score_candidates(
    model,
    prompt: list[int],
    candidates: list[list[int]],
    batch_size: int,
    workspace: torch.Tensor | None = None,
    reduce: str = "mean",
) -> list[float]:
    """Mean (``reduce="sum"``: total) log-prob of each candidate's tokens after ``prompt`` (shared prefix).

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
        idx = torch.tensor(order[start : start + batch_size], device=device)
        n, width = len(idx), int(lengths[idx].max()) - 1  # a candidate's last token is only a target
        if width == 0:
            continue
        ids = torch.zeros(n, width + 1, dtype=torch.long, device=device)
        for row, i in enumerate(idx.tolist()):
            ids[row, : len(candidates[i])] = torch.tensor(candidates[i], device=device)
        valid = torch.arange(width, device=device)[None, :] < (lengths[idx, None] - 1)
        mask = torch.cat([torch.ones(n, p, dtype=torch.long, device=device), valid.long()], 1)
        cache = DynamicCache(
            ddp_cache_data=[(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in layers], config=model.config
        )
        hidden = body(
            input_ids=ids[:, :width],
            attention_mask=mask,
            past_key_values=cache,
            use_cache=True,
            position_ids=torch.arange(p, p + width, device=device).expand(n, -1),
        ).last_hidden_state
        hidden_rows.append(hidden[valid])
        target_rows.append(ids[:, 1:][valid])
        owner_rows.append(idx[valid.nonzero()[:, 0]])
    if hidden_rows:
        lp = target_logprobs(head, torch.cat(hidden_rows), torch.cat(target_rows), workspace)
        total = total.index_add(0, torch.cat(owner_rows), lp)
    return (total / lengths if reduce == "mean" else total).tolist()


@torch.no_grad()
def score_candidates_naive(model, prompt: list[int], candidates: list[list[int]]) -> list[float]:
    """Reference scorer: one full forward per (prompt, candidate). Tests and bench only."""
    device, scores = _device(model), []
    for c in candidates:
        logits = model(torch.tensor([prompt + c], device=device)).logits[0].float()
        lp = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
        scores.append(float(lp.gather(1, torch.tensor(c, device=device)[:, None]).mean()))
    return scores


def encode_question(fmt: ChatFormat, q: dict, max_length: int) -> tuple[list[int], list[list[int]], list[int]]:
    """(prompt ids, candidate ids each ending in the turn's end token, labels) of one candidates row.

    Candidates are cut so prompt + candidate fits ``max_length`` (the answer tail goes, as
    in training); the prompt is never cut.
    """
    prompt = fmt.prompt_ids(conversation(q["system"], q["question"]))
    room = max(1, max_length - len(prompt))
    cands = [fmt.answer_ids(c["content"])[:room] for c in q["candidates"]]
    return prompt, cands, [int(c["label"]) for c in q["candidates"]]


def score_questions(
    model, fmt: ChatFormat, questions: list[dict], max_length: int, batch_size: int, desc: str, rule: str = "mean"
) -> list[list[float]]:
    """Each candidate's score under ``rule`` (eval.selection_score): ``mean`` log-prob per
    answer token given the question, or ``pmi``: log p(answer | question) - log p(answer | an
    empty question), in sums. PMI discounts answers that are likely whatever was asked (short,
    generic ones); the unconditional term is computed once per distinct answer."""
    out, workspace = [], logits_workspace(model)
    unconditional: dict[tuple[int, ...], float] = {}
    for q in tqdm(questions, desc=f"selection {desc}", unit="q", leave=False):
        prompt, cands, _ = encode_question(fmt, q, max_length)
        if rule == "mean":
            out.append(score_candidates(model, prompt, cands, batch_size, workspace))
            continue
        cond = score_candidates(model, prompt, cands, batch_size, workspace, reduce="sum")
        empty, _, _ = encode_question(fmt, {**q, "question": "", "candidates": []}, max_length)
        todo = list(dict.fromkeys(tuple(c) for c in cands if tuple(c) not in unconditional))
        if todo:
            sums = score_candidates(model, empty, [list(c) for c in todo], batch_size, workspace, reduce="sum")
            unconditional.update(zip(todo, sums))
        out.append([s - unconditional[tuple(c)] for s, c in zip(cond, cands)])
    return out


@torch.no_grad()
def answer_loss(model, fmt: ChatFormat, examples: list[dict], max_length: int, batch_size: int) -> dict:
    """Token-weighted NLL of every assistant turn's tokens and its perplexity.

    ``weight: 0`` (process.train_on: last_turn) keeps an earlier answer out of training only:
    held-out loss scores every turn, so runs trained either way compare on the same tokens.
    """
    device, body, head = _device(model), model.get_decoder(), model.get_output_embeddings()
    encoded = [
        fmt.encode([{k: v for k, v in m.items() if k != "weight"} for m in e["messages"]], max_length) for e in examples
    ]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))  # similar lengths: little padding
    nll, tokens, workspace = 0.0, 0, logits_workspace(model)
    items = [(0.0, 0)] * len(encoded)  # (NLL, tokens) per example, in the given order
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = [encoded[i] for i in rows]
        width = max(len(e.input_ids) for e in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long, device=device)
        mask = torch.zeros(len(batch), width, dtype=torch.long, device=device)
        for row, e in enumerate(batch):
            ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
            labels[row, : len(e.labels)] = torch.tensor(e.labels)
            mask[row, : len(e.input_ids)] = 1
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        lp = target_logprobs(head, hidden[keep], targets[keep], workspace)
        per_row = torch.zeros(len(batch), dtype=lp.dtype).index_add_(0, keep.nonzero()[:, 0].cpu(), lp.cpu())
        for row, i in enumerate(rows):
            items[i] = (-float(per_row[row]), int(keep[row].sum()))
        nll -= float(lp.sum())
        tokens += int(keep.sum())
    loss = nll / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens, "items": items}


@torch.no_grad()
def generate_hf(
    model, fmt: ChatFormat, prompts: list[list[int]], max_new_tokens: int, batch_size: int, min_new_tokens: int = 0
) -> list[list[int]]:
    """Greedy continuations with transformers (left padding so all prompts end together)."""
    from transformers import GenerationConfig

    device, tokenizer, eos = _device(model), fmt.tokenizer, fmt.stop_ids
    config = GenerationConfig(
        **GREEDY,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        out.extend(g[width:].tolist() for g in gen.cpu())
    return out


# ---------------------------------------------------------------- vLLM prompt log-probabilities

# Questions whose candidates go to vLLM in one generate call: bounds the Python objects
# vLLM returns (one dict per prompt position) while leaving it thousands of sequences to batch.
VLLM_QUESTIONS_PER_CALL = 32


def score_questions_vllm(llm, encoded: list[tuple[list[int], list[list[int]]]], lora=None) -> list[list[float]]:
    """Mean log-prob per answer token of every (prompt, candidates) pair, from vLLM.

    Each candidate is one request ``prompt + candidate`` with ``prompt_logprobs=0`` (the
    log-prob of each actual prompt token) and ``max_tokens=1``. With prefix caching the
    shared question prompt is computed once per question, but vLLM then returns no
    log-probs for cached positions: a candidate whose cached span reaches into its own
    tokens (an identical start shared with another candidate across a whole cache block)
    is scored again with the cache skipped, so every score covers all its tokens.
    """
    from vllm import SamplingParams

    cached = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, skip_reading_prefix_cache=False)
    fresh = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, skip_reading_prefix_cache=True)

    def run(pairs, sampling):
        outs = llm.generate(
            [{"prompt_token_ids": p + c} for p, c in pairs], sampling, lora_request=lora, use_tqdm=False
        )
        return [(o.prompt_logprobs, o.num_cached_tokens or 0) for o in outs]

    scores: list[list[float]] = []
    for start in tqdm(
        range(0, len(encoded), VLLM_QUESTIONS_PER_CALL), desc="selection vllm", unit="batch", leave=False
    ):
        chunk = encoded[start : start + VLLM_QUESTIONS_PER_CALL]
        pairs = [(p, c) for p, cands in chunk for c in cands]
        results = run(pairs, cached)
        # entry i holds log p(token i | tokens < i); it is computed only for i > cached tokens
        redo = [i for i, ((p, _), (_, n_cached)) in enumerate(zip(pairs, results)) if n_cached >= len(p)]
        for i, r in zip(redo, run([pairs[i] for i in redo], fresh)):
            results[i] = r
        flat = []
        for (p, c), (logprobs, _) in zip(pairs, results):
            flat.append(sum(logprobs[len(p) + j][t].logprob for j, t in enumerate(c)) / len(c))
        for _, cands in chunk:
            scores.append(flat[: len(cands)])
            flat = flat[len(cands) :]
    return scores
