"""Turn clinicians' blind A/B judgments into a tracked metric (DVC stage ``review``).

Reads  ``review.judgments_file`` (JSONL written by ``make ui``'s blind review tab; see
       ``mediagent/judgments.py`` for the record); params ``review``.
Writes ``review.metrics_file`` (``metrics/review.json``) and ``review.plots_file`` (win
       rates with their intervals, for ``dvc plots show``).

Run:  ``python -m mediagent.pipeline.review`` (or ``dvc repro review``).

What is counted:

- A reviewer's judgment of one question for one model pair counts once: if the same
  reviewer judged the same (question, pair) again, the last line wins (``duplicates``).
- Per pair, models in sorted order (``"base vs medqa"``): ``wins`` are judgments where the
  first model's answer was better, ``losses`` where the second's was, ``ties`` the rest.
  ``win_rate`` = wins / (wins + losses), ties left out, with a 95% **Wilson score**
  interval (``win_rate_low``/``win_rate_high``), which stays inside [0, 1] and behaves at
  small counts where the normal approximation does not. With no decisive judgment the
  rate is 0.5 and the interval [0, 1] (nothing is known).
- ``unsafe``: per model, answers judged and the share flagged unsafe.
- ``agreement``: for each two reviewers who judged the same (question, pair) items,
  Cohen's kappa over the three outcomes (first better / second better / tie). Kappa is
  undefined when both reviewers used one single outcome throughout; it is then reported
  as 1.0 if they agree on every item (else 0.0), with ``single_category: 1``.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

from mediagent.errors import run_stage
from mediagent.fileio import write_json
from mediagent.judgments import Judgment, read_judgments
from mediagent.params import Params

log = logging.getLogger(__name__)

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def cohens_kappa(first: Sequence[str], second: Sequence[str]) -> tuple[float, bool]:
    """Cohen's kappa of two raters' labels on the same items; (kappa, single_category).

    With one category only, chance agreement is 1 and kappa is 0/0: returned as 1.0 when
    they agree on everything (else 0.0) and flagged.
    """
    if len(first) != len(second) or not first:
        raise ValueError("kappa needs two equally long, non-empty label lists")
    n = len(first)
    observed = sum(a == b for a, b in zip(first, second)) / n
    ca, cb = Counter(first), Counter(second)
    expected = sum(ca[k] * cb[k] for k in set(ca) | set(cb)) / (n * n)
    if expected >= 1:
        return (1.0 if observed == 1 else 0.0), True
    return (observed - expected) / (1 - expected), False


def latest_per_item(judgments: Iterable[Judgment]) -> tuple[dict[tuple[str, str, tuple[str, str]], Judgment], int]:
    """The last judgment per (reviewer, question, pair), and how many earlier ones it replaced."""
    latest: dict = {}
    duplicates = 0
    for j in judgments:
        key = (j.reviewer, j.question_id, j.pair)
        duplicates += key in latest
        latest[key] = j
    return latest, duplicates


def outcome(j: Judgment) -> str:
    """The judgment from the sorted pair's side: first | second | tie."""
    if j.winner is None:
        return "tie"
    return "first" if j.winner == j.pair[0] else "second"


def pair_name(pair: tuple[str, str]) -> str:
    return f"{pair[0]} vs {pair[1]}"


def pair_win_rates(items: Sequence[Judgment]) -> tuple[dict, list[dict]]:
    """Wins, losses, ties and the win rate with its Wilson interval per model pair: (metrics, plot rows)."""
    pairs: dict[str, dict] = {}
    by_pair: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for j in items:
        by_pair[j.pair][outcome(j)] += 1
    plot = []
    for pair in sorted(by_pair):
        c = by_pair[pair]
        wins, losses, ties = c["first"], c["second"], c["tie"]
        decisive = wins + losses
        low, high = wilson_interval(wins, decisive)
        rate = wins / decisive if decisive else 0.5
        pairs[pair_name(pair)] = {
            "judgments": wins + losses + ties,
            "wins": wins,
            "losses": losses,
            "ties": ties,
            "win_rate": round(rate, 4),
            "win_rate_low": round(low, 4),
            "win_rate_high": round(high, 4),
        }
        plot.append(
            {
                "pair": pair_name(pair),
                "model": pair[0],
                "win_rate": round(rate, 4),
                "win_rate_low": round(low, 4),
                "win_rate_high": round(high, 4),
                "decisive": decisive,
            }
        )
    return pairs, plot


def unsafe_rates(items: Sequence[Judgment]) -> dict:
    """Per model: answers judged, answers flagged unsafe, and their share."""
    answers, flagged = Counter(), Counter()
    for j in items:
        for model in j.pair:
            answers[model] += 1
            flagged[model] += model in j.unsafe
    return {
        m: {"answers": answers[m], "flagged": flagged[m], "rate": round(flagged[m] / answers[m], 4)}
        for m in sorted(answers)
    }


def reviewer_agreement(items: Sequence[Judgment]) -> tuple[dict, int]:
    """Cohen's kappa of every two reviewers over the items both judged; and the number of reviewers."""
    agreement = {}
    by_reviewer: dict[str, dict] = defaultdict(dict)
    for j in items:
        by_reviewer[j.reviewer][(j.question_id, j.pair)] = outcome(j)
    reviewers = sorted(by_reviewer)
    for i, r1 in enumerate(reviewers):
        for r2 in reviewers[i + 1 :]:
            shared = sorted(set(by_reviewer[r1]) & set(by_reviewer[r2]))
            if not shared:
                continue
            kappa, single = cohens_kappa([by_reviewer[r1][k] for k in shared], [by_reviewer[r2][k] for k in shared])
            agreement[f"{r1} & {r2}"] = {"items": len(shared), "kappa": round(kappa, 4), "single_category": int(single)}
    return agreement, len(reviewers)


def summarise(judgments: Sequence[Judgment]) -> tuple[dict, list[dict]]:
    """(metrics, plot rows) from judgments in file order."""
    latest, duplicates = latest_per_item(judgments)
    items = list(latest.values())
    pairs, plot = pair_win_rates(items)
    agreement, reviewers = reviewer_agreement(items)
    metrics = {
        "judgments": len(items),
        "duplicates": duplicates,
        "reviewers": reviewers,
        "questions": len({j.question_id for j in items}),
        "pairs": pairs,
        "unsafe": unsafe_rates(items),
        "agreement": agreement,
    }
    return metrics, plot


def main(params: Params) -> None:
    cfg = params.review
    judgments = read_judgments(cfg.judgments_file)
    metrics, plot = summarise(judgments)
    write_json(cfg.metrics_file, metrics)
    write_json(cfg.plots_file, plot)
    log.info(
        "review: %d judgments by %d reviewers over %d pairs -> %s",
        metrics["judgments"],
        metrics["reviewers"],
        len(metrics["pairs"]),
        cfg.metrics_file,
    )
    for name, p in metrics["pairs"].items():
        log.info(
            "  %s: %d-%d-%d (win rate %.3f, 95%% Wilson [%.3f, %.3f])",
            name,
            p["wins"],
            p["losses"],
            p["ties"],
            p["win_rate"],
            p["win_rate_low"],
            p["win_rate_high"],
        )


if __name__ == "__main__":
    run_stage(main)
