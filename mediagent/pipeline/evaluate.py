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
    vllm_problems,
    vllm_rank,
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
from mediagent.vllm_engine import base_env, close_llm, kv_cache_bytes, lora_request, open_llm, vllm_status

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


# ---------------------------------------------------------------- scoring


# ---------------------------------------------------------------- selection metrics


# ---------------------------------------------------------------- generation


def open_vllm(
    base_dir: Path,
    adapter_dir: Path | None,
    rank: int,
    max_model_len: int,
    max_seqs: int,
    seed: int,
    prefix_caching: bool = False,
):
    """A float32 vLLM engine on the base, with one LoRA slot when ``adapter_dir`` is given.

    ``prefix_caching``: candidates of one question share their prompt's KV blocks (the
    vLLM scorer). The CPU backend takes blocks in multiples of 32 and defaults to 128,
    longer than most question prompts, so 32 there. It runs in vLLM's own worker process;
    close it with ``close_llm``.
    """
    options = {"enable_prefix_caching": prefix_caching}
    if prefix_caching and not torch.cuda.is_available():
        options["block_size"] = 32
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the HF models of this process are gone; hand their memory back
    else:
        options["kv_cache_memory_bytes"] = kv_cache_bytes(base_dir, max_seqs * max_model_len)
    if adapter_dir is not None:
        options.update(enable_lora=True, max_lora_rank=vllm_rank(rank), max_loras=1)
        targets = read_adapter_config(adapter_dir).get("target_modules")
        if isinstance(targets, list):
            # only the adapted modules: a LoRA-wrapped LM head is slower and its CPU kernel
            # fails on prompt log-probs (one row per prompt token, not per request)
            options["lora_target_modules"] = targets
    # float32 so that greedy answers are comparable with peft's (the parity check); eager:
    # no graph capture/compilation at startup, which would cost more than a few dozen
    # evaluation answers take to generate. Prompts go in as token ids; the tokenizer only
    # decodes, and the base's has the same vocabulary.
    return open_llm(base_dir, "float32", max_model_len, seed, tokenizer=str(base_dir), enforce_eager=True, **options)


def generate_vllm(
    llm,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos: list[int],
    adapter_dir: Path | None = None,
    min_new_tokens: int = 0,
) -> list[list[int]]:
    """Greedy continuations (with the LoRA when ``adapter_dir`` is given).

    Prompts go in as token ids, so vLLM sees exactly what transformers sees.
    """
    from vllm import SamplingParams

    # greedy with no penalty, as generate_hf (scoring.GREEDY); vLLM never reads the base's generation config here
    sampling = SamplingParams(
        temperature=0.0,
        repetition_penalty=1.0,
        max_tokens=max_new_tokens,
        min_tokens=min_new_tokens,
        stop_token_ids=eos,
        skip_special_tokens=False,
    )
    lora = lora_request("tuned", adapter_dir) if adapter_dir is not None else None
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, lora_request=lora, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


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

    config = read_adapter_config(adapter_dir)
    problems = vllm_problems(config)
    flags = {"rank_servable": "rank" not in problems, "no_modules_to_save": "modules_to_save" not in problems}
    rank = adapter_rank(config)
    reasons = {
        "rank_servable": problems.get("rank") or f"rank {rank} servable by vLLM (--max-lora-rank {vllm_rank(rank)})",
        "no_modules_to_save": problems.get("modules_to_save", "no modules_to_save"),
    }

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
            "" if saved else "; the adapter file holds no LoRA weights"
        )
    return flags, reasons


# ---------------------------------------------------------------- plots and outputs


# ---------------------------------------------------------------- main


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
    backend, backend_reason = resolve_backend(e.backend, flags["rank_servable"])
    scorer = resolve_scorer(e.scorer, backend, e.selection_score)
    log.info("generation backend: %s (%s); answer-selection scorer: %s", backend, backend_reason, scorer)

    hf = backend == "hf"
    args = (params, inputs, fmt, prompts, labels, hf)
    base, base_ranks, base_gen = evaluate_model(inputs.base_dir, *args, "base", score=scorer == "hf")
    tuned, tuned_ranks, tuned_gen = evaluate_model(inputs.merged_dir, *args, "tuned", score=scorer == "hf")
    if hf:
        flags["vllm_parity"], reasons["vllm_parity"] = None, backend_reason.removeprefix("auto: ")
    else:
        base_gen, tuned_gen, parity, reasons["vllm_parity"], scores = vllm_generations(
            params, inputs, fmt, prompts, score=scorer == "vllm"
        )
        flags["vllm_parity"] = parity
        if scores:  # tuned = base + LoRA in vLLM (the merged model's weights, unmerged)
            ranks = {}
            for name, metrics in (("base", base), ("tuned", tuned)):
                sel, ranks[name] = selection(scores[name], labels, e.seed)
                metrics.update({k: sel[k] for k in SELECTION_KEYS})
                log.info(
                    "%s: P@1 %.4f MRR %.4f MAP %.4f over %d questions (vLLM scorer)",
                    name,
                    sel["p_at_1"],
                    sel["mrr"],
                    sel["map"],
                    sel["questions"],
                )
            base_ranks, tuned_ranks = ranks["base"], ranks["tuned"]

    loss_tokens = base.pop("tokens")
    tuned.pop("tokens")
    items = {"base": {"loss": base.pop("items")}, "tuned": {"loss": tuned.pop("items")}}
    texts = {}
    refs = [final_answer(r["messages"]) for r in inputs.generations]
    asked = [last_question(r["messages"]) for r in inputs.generations]
    for name, gen, metrics, ranked in (("base", base_gen, base, base_ranks), ("tuned", tuned_gen, tuned, tuned_ranks)):
        cleaned = [clean_generation(fmt.tokenizer, ids, fmt.stop_ids) for ids in gen]
        texts[name] = [t for t, _ in cleaned]
        metrics.update(generation_metrics(texts[name], refs, [th for _, th in cleaned], asked))
        items[name].update(
            selection_items(ranked), **generation_items(texts[name], refs, asked), bleu4=bleu_items(texts[name], refs)
        )
    base_ranks, tuned_ranks = [r for r, _ in base_ranks], [r for r, _ in tuned_ranks]

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
    write_outputs(
        params,
        inputs,
        results,
        texts,
        {"base": base_ranks, "tuned": tuned_ranks},
        labels,
        {
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
            "counts": {
                "loss_examples": len(inputs.examples),
                "loss_tokens": loss_tokens,
                "selection_questions": len(inputs.questions),
                "candidates": sum(map(len, labels)),
                "generations": len(inputs.generations),
            },
            "tie_break_seed": e.seed,
        },
    )
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
