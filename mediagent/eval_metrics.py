"""Metrics of the `evaluate` stage that need no model: answer selection (P@1, MRR, MAP and
their exact random expectation), generation quality (BLEU, ROUGE-L, distinct-2, think
share) and the rows `dvc plots` draws.
"""

from __future__ import annotations

import csv
import io
import math

import numpy as np

SELECTION_KEYS = ("p_at_1", "mrr", "map")


def _first_positive_and_ap(ranked_labels: np.ndarray) -> tuple[int, float]:
    hits = np.flatnonzero(ranked_labels) + 1  # 1-based ranks of the positives
    ap = float(np.mean(np.arange(1, len(hits) + 1) / hits))
    return int(hits[0]), ap


def selection_ranks(
    scores: list[list[float]], labels: list[list[int]], rng: np.random.Generator
) -> list[tuple[int, float]]:
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
        raise ValueError("no test question has a correct candidate (label 1): check test_candidates.jsonl")
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


def think_ids(tokenizer) -> tuple[int | None, int | None]:
    """(<think>, </think>) ids where the tokenizer has them as tokens (Qwen3's reasoning markers)."""
    vocab = tokenizer.get_added_vocab()
    return vocab.get("<think>"), vocab.get("</think>")


def clean_generation(tokenizer, ids: list[int], eos: list[int]) -> tuple[str, bool]:
    """(visible answer, whether it contained <think>) from generated ids.

    Cut at the first end token; a think block (closed or not) is removed from the text
    but reported, since the non-thinking format must never produce one.
    """
    think_open, think_close = think_ids(tokenizer)
    ids = list(ids)
    for i, t in enumerate(ids):
        if t in eos:
            ids = ids[:i]
            break
    raw = tokenizer.decode(ids, skip_special_tokens=False)
    has_think = "<think>" in raw
    while think_open is not None and think_open in ids:
        start = ids.index(think_open)
        end = ids.index(think_close, start) + 1 if think_close in ids[start:] else len(ids)
        ids = ids[:start] + ids[end:]
    # a character cut in half by max_new_tokens decodes to U+FFFD: not part of the answer
    return tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd").strip(), has_think


class CharTokenizer:
    """rouge-score tokenizer for Chinese: characters (its default keeps only [a-z0-9])."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return [ch for ch in text if not ch.isspace()]


# An answer "loops" when some 6-character sequence occurs 3 or more times in it (a pretrained
# model's greedy decoding repeating itself), and "echoes" the question when it holds a run of
# at least half the question (8 characters or more) verbatim.
LOOP_NGRAM, LOOP_REPEATS, ECHO_MIN_CHARS = 6, 3, 8


def loops(text: str) -> bool:
    from collections import Counter

    grams = Counter(text[i : i + LOOP_NGRAM] for i in range(len(text) - LOOP_NGRAM + 1))
    return bool(grams) and max(grams.values()) >= LOOP_REPEATS


def echoes(answer: str, question: str) -> bool:
    from difflib import SequenceMatcher

    if not answer or not question:
        return False
    match = SequenceMatcher(None, answer, question, autojunk=False).find_longest_match()
    return match.size >= max(ECHO_MIN_CHARS, len(question) // 2)


def generation_items(answers: list[str], references: list[str], questions: list[str]) -> dict[str, list[float]]:
    """Per-answer values of the generation metrics (their means are the metrics; BLEU: see intervals)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=CharTokenizer())
    return {
        "rouge_l": [scorer.score(r, a)["rougeL"].fmeasure for r, a in zip(references, answers, strict=True)],
        "mean_length": [float(len(a)) for a in answers],
        "loop_share": [float(loops(a)) for a in answers],
        "echo_share": [float(echoes(a, q)) for a, q in zip(answers, questions, strict=True)],
    }


def generation_metrics(answers: list[str], references: list[str], think: list[bool], questions: list[str]) -> dict:
    import sacrebleu

    items = generation_items(answers, references, questions)
    bigrams = [text[i : i + 2] for text in answers for i in range(len(text) - 1)]
    return {
        "bleu4": float(sacrebleu.corpus_bleu(answers, [references], tokenize="zh").score),
        **{k: float(np.mean(v)) for k, v in items.items()},
        "distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
        "empty_share": float(np.mean([not a for a in answers])),
        "think_share": float(np.mean(think)),
    }


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
            expected[: len(y)] += random_first_rank_probs(len(y), int(sum(y)))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["rank", *ranks, "random"])
    for r in range(1, n_max + 1):
        writer.writerow([r, *(sum(1 for x in v if x == r) for v in ranks.values()), round(float(expected[r - 1]), 6)])
    return buf.getvalue()
