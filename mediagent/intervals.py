"""Paired bootstrap 95% intervals for base vs tuned metrics over the same held-out items.

Both models are scored on the same questions, so the difference is resampled per item
(one set of resampled indices for base, tuned and their delta): the interval of the delta
is much narrower than the two separate intervals suggest. Percentile intervals, a seeded
generator: the same inputs give the same intervals.

Each metric is a statistic of a set of items, given as per-item arrays: a mean (ROUGE-L,
P@1), a ratio of sums (token-weighted loss: sum of NLL over sum of tokens) or corpus BLEU
from summed n-gram counts, so a resample never re-tokenises text.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

RESAMPLES = 2000


def _ci(values: np.ndarray) -> list[float]:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def paired(
    statistic: Callable[[np.ndarray], float],
    base: np.ndarray,
    tuned: np.ndarray,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict:
    """{"base", "tuned", "delta"}: each {"value", "ci95"}; ``statistic`` maps an (n, ...) item array to a float."""
    base, tuned = np.asarray(base, dtype=np.float64), np.asarray(tuned, dtype=np.float64)
    if len(base) != len(tuned) or not len(base):
        raise ValueError(
            f"paired bootstrap needs the same non-empty items for both models ({len(base)} vs {len(tuned)})"
        )
    idx = np.random.default_rng(seed).integers(0, len(base), size=(resamples, len(base)))
    b = np.array([statistic(base[i]) for i in idx])
    t = np.array([statistic(tuned[i]) for i in idx])
    vb, vt = statistic(base), statistic(tuned)
    return {
        "base": {"value": vb, "ci95": _ci(b)},
        "tuned": {"value": vt, "ci95": _ci(t)},
        "delta": {"value": vt - vb, "ci95": _ci(t - b)},
    }


def mean(items: np.ndarray) -> float:
    return float(np.mean(items))


def ratio_of_sums(items: np.ndarray) -> float:
    """Items (numerator, denominator), e.g. (answer NLL, answer tokens): token-weighted mean."""
    return float(items[:, 0].sum() / items[:, 1].sum())


def perplexity(items: np.ndarray) -> float:
    return math.exp(min(ratio_of_sums(items), 700.0))


def bleu_items(hypotheses: list[str], references: list[str]) -> np.ndarray:
    """Per-sentence BLEU sufficient statistics (4 matches, 4 totals, hyp length, ref length),
    with the Chinese tokenisation of corpus BLEU: summing them over any set of sentences
    gives that set's corpus BLEU."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU(tokenize="zh")
    rows = []
    for h, r in zip(hypotheses, references, strict=True):
        s = bleu.corpus_score([h], [[r]])
        rows.append([*s.counts, *s.totals, s.sys_len, s.ref_len])
    return np.array(rows, dtype=np.float64)


def corpus_bleu(items: np.ndarray) -> float:
    from sacrebleu.metrics import BLEU

    c = items.sum(0).astype(np.int64).tolist()
    return float(BLEU.compute_bleu(c[0:4], c[4:8], c[8], c[9], smooth_method="exp").score)


def selection_items(ranked: list[tuple[int, float]]) -> dict[str, list[float]]:
    """Per-question P@1, reciprocal rank and average precision from (first-positive rank, AP)."""
    return {
        "p_at_1": [float(r == 1) for r, _ in ranked],
        "mrr": [1.0 / r for r, _ in ranked],
        "map": [ap for _, ap in ranked],
    }


# How each metric is computed from its items (see the module docstring).
STATISTICS = {"loss": ratio_of_sums, "perplexity": perplexity, "bleu4": corpus_bleu}


def metric_intervals(base: dict, tuned: dict, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Paired intervals of every metric whose items both models have (perplexity from the loss items)."""
    out = {}
    for key in base.keys() & tuned.keys():
        out[key] = paired(STATISTICS.get(key, mean), base[key], tuned[key], resamples, seed)
    if "loss" in out:
        out["perplexity"] = paired(perplexity, base["loss"], tuned["loss"], resamples, seed)
    return dict(sorted(out.items()))
