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

Run: ``python -m mediagent.pipeline.evaluate`` (or ``dvc repro evaluate``).

Metrics, per model:
- ``loss``/``perplexity``: mean NLL of the answer tokens (+ the turn's end token) given the
  prompt, both as the saved chat template renders them, token-weighted over
  ``eval.max_questions`` test examples.
- ``p_at_1``/``mrr``/``map``: answer selection (the standard cMedQA2 task). Every candidate
  is scored by ``eval.selection_score``: its mean log-probability per answer token given the
  question, or PMI (conditional minus unconditional log-probability); ties are broken by a
  seeded random draw, never by list order (official files list positives first). ``random``
  holds the exact expectation of each metric under a random ranking.
- ``loop_share``/``echo_share``: greedy answers that repeat themselves / the question.
Intervals: ``eval.report_path`` holds a paired bootstrap 95% interval of every metric per
model and of tuned - base (``mediagent/intervals.py``).
- ``bleu4`` (sacrebleu, ``tokenize="zh"``: characters), ``rouge_l`` (F1 on characters),
  ``distinct_2`` (unique/total character bigrams), ``mean_length`` (chars),
  ``empty_share`` and ``think_share`` (outputs containing ``<think>``; must be 0 in the
  non-thinking format) over ``eval.max_generations`` greedy answers.
Generation backend (``eval.backend``, recorded in the report): ``auto`` uses vLLM's
offline engine when ``import vllm`` works (one float32 engine: the base, and base + LoRA
through a LoRARequest), else transformers ``generate`` on the base and the merged model.

Answer-selection scorer (``eval.scorer``, in the report): ``auto`` scores with vLLM
prompt log-probabilities in that same engine (prefix caching on; tuned = base + LoRA)
when the vLLM backend is used, else with the transformers shared-prefix scorer.

``serve_ready``: the adapter's rank is one vLLM serves, every configured target module
matched the base (and ``lora_modules`` > 0), no ``modules_to_save``, and vLLM + LoRA
greedy output equals peft's on a few prompts (null when vLLM is not used); ``ready`` is
their conjunction, an unchecked parity not counting against it.

Cost is bounded by ``eval.max_questions`` (0 = the whole test set), ``eval.max_generations``,
``eval.max_new_tokens`` and ``eval.batch_size``.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mediagent.artifacts import (
    adapter_rank,
    check_adapter_files,
    check_lineage_base,
    read_adapter_config,
    read_lineage,
)
from mediagent.chat_format import ChatFormat, final_answer, last_question, prompt_messages
from mediagent.errors import UserError, run_stage
from mediagent.eval_metrics import (
    SELECTION_KEYS,
    clean_generation,
    generation_items,
    generation_metrics,
    metrics_from_ranks,
    plot_rows,
    random_baseline,
    rank_csv,
    selection_ranks,
)
from mediagent.fileio import atomic_path, dump_jsonl, md5_file, read_jsonl, write_json
from mediagent.intervals import bleu_items, metric_intervals, selection_items
from mediagent.loading import check_model_dir, dtype_name, load_model, load_tokenizer, resolve_dtype
from mediagent.memory import log_plan
from mediagent.params import Params
from mediagent.scoring import answer_loss, encode_question, generate_hf, score_questions, score_questions_vllm
from mediagent.serve_readiness import adapter_checks
from mediagent.vllm_engine import base_env, close_llm, lora_request, vllm_status
from mediagent.vllm_generation import generate_vllm, open_vllm

log = logging.getLogger(__name__)

PARITY_PROMPTS = 4  # prompts for the vLLM-vs-peft greedy parity check


class EvalError(UserError):
    """Inputs are missing or inconsistent; the message names the fix."""


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Inputs:
    base_dir: Path
    adapter_dir: Path
    merged_dir: Path
    examples: list[dict]  # test.jsonl rows (capped)
    questions: list[dict]  # test_candidates.jsonl rows (capped)
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
    check_adapter_files(adapter_dir)
    adapter_lineage = read_lineage(adapter_dir, "adapter", "rerun `dvc repro train`")
    check_lineage_base(adapter_lineage, params.model, f"adapter {adapter_dir}")
    if not (merged_dir / "config.json").is_file() or not (merged_dir / "lineage.json").is_file():
        raise EvalError(f"no merged model at {merged_dir} (merge.output_dir): run `dvc repro merge`")
    merged_lineage = read_lineage(merged_dir, "merged model", "rerun `dvc repro merge`")
    check_lineage_base(merged_lineage, params.model, f"merged model {merged_dir}")
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
        base_dir,
        adapter_dir,
        merged_dir,
        examples=_cap(test, params.eval.max_questions),
        questions=_cap(questions, params.eval.max_questions),
        generations=_cap(first_per_question, params.eval.max_generations),
    )


def selection(scores: list[list[float]], labels: list[list[int]], seed: int) -> tuple[dict, list[tuple[int, float]]]:
    """P@1/MRR/MAP and (first-positive rank, average precision) per question; the same seed
    for both models, so equal scores get the same tie-breaking draw."""
    ranked = selection_ranks(scores, labels, np.random.default_rng(seed))
    return metrics_from_ranks(ranked), ranked


def evaluate_model(
    path: Path,
    params: Params,
    inputs: Inputs,
    fmt: ChatFormat,
    prompts,
    labels,
    generate: bool,
    name: str,
    score: bool = True,
):
    """Loss, selection (``score``: hf scorer) and (hf backend) generation of one model:
    (metrics, first-positive ranks or None, ids)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(path, params.model, resolve_dtype(params.model)).to(device)
    e = params.eval
    metrics = answer_loss(model, fmt, inputs.examples, e.max_seq_length, e.batch_size)
    ranks = None
    if score:
        sel, ranks = selection(
            score_questions(model, fmt, inputs.questions, e.max_seq_length, e.batch_size, name, e.selection_score),
            labels,
            e.seed,
        )
        metrics.update({k: sel[k] for k in SELECTION_KEYS})
        log.info(
            "%s: P@1 %.4f MRR %.4f MAP %.4f over %d questions (transformers scorer)",
            name,
            sel["p_at_1"],
            sel["mrr"],
            sel["map"],
            sel["questions"],
        )
    generated = generate_hf(model, fmt, prompts, e.max_new_tokens, e.batch_size) if generate else None
    log.info("%s: loss %.4f ppl %.2f", name, metrics["loss"], metrics["perplexity"])
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
            raise EvalError(
                "eval.backend=vllm but the adapter's rank is not servable by vLLM: retrain with a "
                "smaller lora.r, or set eval.backend=hf"
            )
        return "vllm", "eval.backend=vllm"
    if ok and rank_ok:
        return "vllm", "auto: vllm importable"
    return "hf", f"auto: {why if not ok else 'adapter rank not servable by vLLM'}"


def resolve_scorer(requested: str, backend: str, rule: str = "mean") -> str:
    """auto: vLLM prompt log-probs whenever the vLLM backend is used (same scores, as fast
    or faster with prefix caching: bench/evaluate.py), else the transformers scorer. PMI
    scores are computed by the transformers scorer only."""
    if requested == "vllm" and backend != "vllm":
        raise EvalError(
            "eval.scorer=vllm needs the vLLM engine, but the generation backend is hf: "
            "set eval.backend to auto or vllm, or eval.scorer to hf"
        )
    if requested == "vllm" and rule != "mean":
        raise EvalError(
            f"eval.selection_score={rule} is computed by the transformers scorer: set eval.scorer to hf or auto"
        )
    if requested == "auto":
        return "vllm" if backend == "vllm" and rule == "mean" else "hf"
    return requested


def vllm_peft_parity(
    params: Params, inputs: Inputs, fmt: ChatFormat, prompts: list[list[int]], vllm_tuned: list[list[int]]
):
    """Greedy ids of vLLM + LoRA equal to peft (base + adapter, float32) on a few prompts?"""
    from peft import PeftModel

    n = min(PARITY_PROMPTS, len(prompts))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = load_model(inputs.base_dir, params.model, torch.float32).to(device)
    model = PeftModel.from_pretrained(base, str(inputs.adapter_dir)).eval()
    peft_ids = generate_hf(model, fmt, prompts[:n], params.eval.max_new_tokens, params.eval.batch_size)
    del model, base
    gc.collect()
    eos = fmt.stop_ids

    def cut(ids):
        return next((ids[:i] for i, t in enumerate(ids) if t in eos), ids)

    same = sum(cut(a) == cut(b) for a, b in zip(peft_ids, vllm_tuned[:n]))
    return same == n, f"{same}/{n} greedy outputs identical (vLLM LoRA vs peft, float32)"


def vllm_generations(params: Params, inputs: Inputs, fmt: ChatFormat, prompts: list[list[int]], score: bool):
    """(base ids, tuned ids, parity flag, parity reason, {"base", "tuned": candidate scores}
    when ``score``) from one vLLM engine on the base with the LoRA."""
    e = params.eval
    rank = adapter_rank(read_adapter_config(inputs.adapter_dir))
    eos = fmt.stop_ids
    encoded = [encode_question(fmt, q, e.max_seq_length)[:2] for q in inputs.questions] if score else []
    max_len = max([len(p) + e.max_new_tokens for p in prompts] + [len(p) + len(c) + 1 for p, cs in encoded for c in cs])
    llm = open_vllm(
        inputs.base_dir, inputs.adapter_dir, rank, max_len, max(len(prompts), 64), e.seed, prefix_caching=score
    )
    try:
        base = generate_vllm(llm, prompts, e.max_new_tokens, eos)
        tuned = generate_vllm(llm, prompts, e.max_new_tokens, eos, inputs.adapter_dir)
        scores = (
            {
                "base": score_questions_vllm(llm, encoded),
                "tuned": score_questions_vllm(llm, encoded, lora_request("tuned", inputs.adapter_dir)),
            }
            if score
            else None
        )
    finally:
        close_llm(llm)
    return (base, tuned, *vllm_peft_parity(params, inputs, fmt, prompts, tuned), scores)


def vllm_selection(scores: dict, labels: list[list[int]], seed: int, metrics: dict) -> dict:
    """Selection metrics from vLLM's candidate scores into each model's ``metrics``; the ranks by
    model name. tuned = base + LoRA in vLLM (the merged model's weights, unmerged)."""
    ranks = {}
    for name in ("base", "tuned"):
        sel, ranks[name] = selection(scores[name], labels, seed)
        metrics[name].update({k: sel[k] for k in SELECTION_KEYS})
        log.info(
            "%s: P@1 %.4f MRR %.4f MAP %.4f over %d questions (vLLM scorer)",
            name,
            sel["p_at_1"],
            sel["mrr"],
            sel["map"],
            sel["questions"],
        )
    return ranks


def run_models(
    params: Params, inputs: Inputs, fmt: ChatFormat, prompts, labels, backend: str, scorer: str, checks: tuple
) -> tuple[dict, dict, dict]:
    """Loss, selection and greedy answers of base and tuned: (metrics, ranks, generated ids), each
    by model name. ``checks``: the serve-readiness (flags, reasons), given the vLLM parity here."""
    (flags, reasons), (backend, backend_reason) = checks, backend
    hf = backend == "hf"
    args = (params, inputs, fmt, prompts, labels, hf)
    base, base_ranks, base_gen = evaluate_model(inputs.base_dir, *args, "base", score=scorer == "hf")
    tuned, tuned_ranks, tuned_gen = evaluate_model(inputs.merged_dir, *args, "tuned", score=scorer == "hf")
    metrics, ranks = {"base": base, "tuned": tuned}, {"base": base_ranks, "tuned": tuned_ranks}
    if hf:
        flags["vllm_parity"], reasons["vllm_parity"] = None, backend_reason.removeprefix("auto: ")
    else:
        base_gen, tuned_gen, parity, reasons["vllm_parity"], scores = vllm_generations(
            params, inputs, fmt, prompts, score=scorer == "vllm"
        )
        flags["vllm_parity"] = parity
        if scores:
            ranks = vllm_selection(scores, labels, params.eval.seed, metrics)
    return metrics, ranks, {"base": base_gen, "tuned": tuned_gen}


def answer_results(fmt: ChatFormat, inputs: Inputs, metrics: dict, generated: dict, ranks: dict):
    """Generation metrics into each model's ``metrics``, whose loss tokens and per-example losses
    are taken out: (answer texts, per-item values for the intervals, loss tokens)."""
    loss_tokens = metrics["base"].pop("tokens")
    metrics["tuned"].pop("tokens")
    items = {"base": {"loss": metrics["base"].pop("items")}, "tuned": {"loss": metrics["tuned"].pop("items")}}
    texts = {}
    refs = [final_answer(r["messages"]) for r in inputs.generations]
    asked = [last_question(r["messages"]) for r in inputs.generations]
    for name in ("base", "tuned"):
        cleaned = [clean_generation(fmt.tokenizer, ids, fmt.stop_ids) for ids in generated[name]]
        texts[name] = [t for t, _ in cleaned]
        metrics[name].update(generation_metrics(texts[name], refs, [th for _, th in cleaned], asked))
        items[name].update(
            selection_items(ranks[name]),
            **generation_items(texts[name], refs, asked),
            bleu4=bleu_items(texts[name], refs),
        )
    return texts, items, loss_tokens


def build_report(
    params: Params, inputs: Inputs, backend: tuple[str, str], scorer: str, reasons: dict, items: dict, counts: dict
) -> dict:
    """eval.report_path's content: backend, scorer, serve-readiness reasons, intervals, counts."""
    e, (backend, backend_reason), hf = params.eval, backend, backend[0] == "hf"
    return {
        "backend": backend,
        "backend_reason": backend_reason,
        "scorer": scorer,
        "tuned_model": str(inputs.merged_dir)
        if hf
        else f"{inputs.merged_dir} (loss{'' if scorer == 'vllm' else ', selection'}); {inputs.base_dir} + "
        f"LoRA {inputs.adapter_dir} in vLLM (generation{', selection' if scorer == 'vllm' else ''})",
        "serve_ready_reasons": reasons,
        "selection_score": e.selection_score,
        # paired bootstrap over the same held-out items: {metric: {base, tuned, delta: {value, ci95}}}
        "intervals": metric_intervals(items["base"], items["tuned"], e.bootstrap_resamples, e.seed),
        "counts": counts,
        "tie_break_seed": e.seed,
    }


def main(params: Params) -> None:
    os.environ.update(base_env(os.environ))  # before vLLM is imported: offline, warnings only
    e = params.eval
    log.info("eval params: %s", e)
    log_plan(params, "evaluate", log, dtype_name(resolve_dtype(params.model)))  # before anything is loaded
    inputs = load_inputs(params)
    fmt = ChatFormat.of(load_tokenizer(inputs.merged_dir))  # the format trained on, saved with the model
    labels = [[int(c["label"]) for c in q["candidates"]] for q in inputs.questions]
    prompts = [fmt.prompt_ids(prompt_messages(r["messages"])) for r in inputs.generations]
    flags, reasons = adapter_checks(inputs.adapter_dir, inputs.base_dir)
    backend = resolve_backend(e.backend, flags["rank_servable"])
    scorer = resolve_scorer(e.scorer, backend[0], e.selection_score)
    log.info("generation backend: %s (%s); answer-selection scorer: %s", *backend, scorer)

    metrics, ranks, generated = run_models(params, inputs, fmt, prompts, labels, backend, scorer, (flags, reasons))
    texts, items, loss_tokens = answer_results(fmt, inputs, metrics, generated, ranks)
    base, tuned = metrics["base"], metrics["tuned"]
    # not ready on a failed parity; an unchecked one (no vLLM here) does not count against it
    flags["ready"] = (
        all(flags[k] for k in ("rank_servable", "no_modules_to_save", "targets_matched"))
        and flags["vllm_parity"] is not False
    )
    results = {
        "base": base,
        "tuned": tuned,
        "delta": {k: tuned[k] - base[k] for k in base},
        "random": random_baseline(labels),
        "serve_ready": flags,
    }
    counts = {
        "loss_examples": len(inputs.examples),
        "loss_tokens": loss_tokens,
        "selection_questions": len(inputs.questions),
        "candidates": sum(map(len, labels)),
        "generations": len(inputs.generations),
    }
    first_ranks = {name: [r for r, _ in ranks[name]] for name in ("base", "tuned")}
    report = build_report(params, inputs, backend, scorer, reasons, items, counts)
    write_outputs(params, inputs, results, texts, first_ranks, labels, report)
    log.info("tuned - base: %s", {k: round(v, 4) for k, v in results["delta"].items()})


def write_outputs(
    params: Params, inputs: Inputs, results: dict, texts: dict, ranks: dict, labels: list, report: dict
) -> None:
    e = params.eval
    samples = [
        {
            "question_id": r["question_id"],
            "question": last_question(r["messages"]),
            "reference": final_answer(r["messages"]),
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
    run_stage(main)
