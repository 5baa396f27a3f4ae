"""The `evaluate` stage: metric maths on known tables, the scorer against a naive one, a
real trained adapter that must beat chance, and the stage's outputs and input checks."""

from __future__ import annotations

import itertools
import json
import math
import shutil

import numpy as np
import pytest
import torch

from mediagent import eval_metrics, scoring
from mediagent.artifacts import ArtifactError
from mediagent.chat_format import ChatFormat, conversation
from mediagent.loading import load_model, load_tokenizer
from mediagent.params import with_overrides
from mediagent.pipeline import evaluate as ev
from mediagent.pipeline import merge
from mediagent.vllm_engine import vllm_status
from tests.adapter_kit import SYSTEM, candidates, pipeline_params, sample_pairs, write_adapter, write_processed

MODEL_KEYS = {
    "loss",
    "perplexity",
    "p_at_1",
    "mrr",
    "map",
    "bleu4",
    "rouge_l",
    "distinct_2",
    "mean_length",
    "empty_share",
    "think_share",
    "loop_share",
    "echo_share",
}
SERVE_KEYS = {"rank_servable", "targets_matched", "no_modules_to_save", "vllm_parity", "lora_modules", "ready"}


@pytest.fixture(scope="module")
def tok(tiny_base):
    return load_tokenizer(tiny_base)  # seconds to load: once per module


# ---------------------------------------------------------------- metric maths (pure)


def test_selection_metrics_on_a_hand_built_table():
    scores = [
        [0.9, 0.1, 0.5],  # positive ranked 1st: RR 1, AP 1
        [0.2, 0.8, 0.5, 0.1],  # positives end up 2nd and 3rd: RR 1/2, AP (1/2 + 2/3) / 2
        [0.3, 0.2],  # no positive: not counted
    ]
    labels = [[1, 0, 0], [1, 0, 1, 0], [0, 0]]
    m = eval_metrics.selection_metrics(scores, labels, np.random.default_rng(0))
    assert m == pytest.approx({"p_at_1": 0.5, "mrr": 0.75, "map": (1 + (1 / 2 + 2 / 3) / 2) / 2, "questions": 2})


def test_ties_are_broken_at_random_not_by_list_order():
    # All scores equal, positive listed first (as in the official files): a scorer that
    # keeps list order would report P@1 = 1.0.
    labels = [[1] + [0] * 9] * 3000
    scores = [[0.0] * 10] * 3000
    m = eval_metrics.selection_metrics(scores, labels, np.random.default_rng(1))
    chance = eval_metrics.random_baseline(labels)
    assert chance["p_at_1"] == pytest.approx(0.1)
    assert chance["mrr"] == pytest.approx(sum(1 / r for r in range(1, 11)) / 10)
    for key in ("p_at_1", "mrr", "map"):
        assert m[key] == pytest.approx(chance[key], abs=0.025), key
    # seeded: the same draw every time
    assert eval_metrics.selection_metrics(scores, labels, np.random.default_rng(1)) == m


def test_random_baseline_is_exact():
    # Brute force over every order of 5 candidates with 2 positives vs the closed forms.
    y = [1, 1, 0, 0, 0]
    per_order = [
        eval_metrics._first_positive_and_ap(np.array([y[i] for i in perm])) for perm in itertools.permutations(range(5))
    ]
    exact = {
        "p_at_1": float(np.mean([r == 1 for r, _ in per_order])),
        "mrr": float(np.mean([1 / r for r, _ in per_order])),
        "map": float(np.mean([ap for _, ap in per_order])),
    }
    assert eval_metrics.random_baseline([y]) == pytest.approx(exact)
    assert eval_metrics.random_first_rank_probs(5, 2).sum() == pytest.approx(1.0)


def test_generation_metrics_count_chinese_characters():
    refs = ["多喝水，注意休息。", "建议到医院检查"]
    m = eval_metrics.generation_metrics(["多喝水，注意休息。", "建议去医院看看"], refs, [False, True], ["头疼", "咳嗽"])
    # rouge-score's own tokenizer keeps only [a-z0-9] and would score Chinese 0
    assert m["rouge_l"] == pytest.approx((1.0 + 2 * (4 / 7) * (4 / 7) / (4 / 7 + 4 / 7)) / 2)
    assert 0 < m["bleu4"] < 100
    assert m["think_share"] == 0.5 and m["empty_share"] == 0.0
    assert m["mean_length"] == pytest.approx((9 + 7) / 2)
    assert eval_metrics.generation_metrics(["", "好"], refs, [False, False], ["头疼", "咳嗽"])["empty_share"] == 0.5
    assert m["loop_share"] == 0 and m["echo_share"] == 0


def test_loops_and_echoes_are_detected():
    question = "孩子发烧三天了，一直不退，需要去医院吗？"
    assert eval_metrics.echoes("孩子发烧三天了，一直不退，怎么办", question)
    assert not eval_metrics.echoes("多喝水，注意休息，必要时就医。", question)
    assert eval_metrics.loops("多喝水，多喝水，多喝水，多喝水")
    assert not eval_metrics.loops("多喝水，注意休息，必要时就医。")
    items = eval_metrics.generation_items(
        ["多喝水多喝水多喝水多喝水", "孩子发烧三天了，一直不退"], ["多喝水", "去医院"], [question, question]
    )
    assert items["loop_share"] == [1.0, 0.0] and items["echo_share"] == [0.0, 1.0]


def test_clean_generation_strips_and_reports_think(tok):
    ids = (
        tok("<think>想一想</think>\n\n多喝水", add_special_tokens=False)["input_ids"]
        + tok.convert_tokens_to_ids(["<|im_end|>"])
        + [100]
    )
    stop = ChatFormat.of(tok).stop_ids
    assert eval_metrics.clean_generation(tok, ids, stop) == ("多喝水", True)
    ids = tok("多喝水", add_special_tokens=False)["input_ids"] + tok.convert_tokens_to_ids(["<|endoftext|>"])
    assert eval_metrics.clean_generation(tok, ids, stop) == ("多喝水", False)


# ---------------------------------------------------------------- scoring on real data


def test_shared_prefix_scorer_equals_naive_scorer(tiny_base, tok, sample_data, repo_params):
    model = load_model(tiny_base, repo_params.model, torch.float32)
    pairs = sample_pairs(sample_data, 12)
    for q in candidates(pairs[:2], pairs, negatives=5):
        prompt, cands, _ = scoring.encode_question(ChatFormat.of(tok), q, max_length=512)
        assert len({len(c) for c in cands}) > 3  # real answers of many lengths: padding is exercised
        fast = scoring.score_candidates(model, prompt, cands, batch_size=4)
        slow = scoring.score_candidates_naive(model, prompt, cands)
        assert np.allclose(fast, slow, atol=1e-4, rtol=0), (fast, slow)
        assert max(fast) - min(fast) > 1e-3  # the candidates really are told apart


def test_vllm_scorer_equals_transformers_scorer(tiny_base, tok, sample_data, repo_params):
    """vLLM prompt log-probs (prefix caching on) give the stage's scores to 1e-4.

    Bound: both sides compute float32 log-softmax over 151,936 logits with different kernels
    (vLLM's CPU attention and GEMMs vs SDPA); per-token log-probs of magnitude ~12 then
    differ by ~1e-6..1e-5 (measured max 4e-6), while candidates differ by >1e-3.
    """
    ok, why = vllm_status()
    if not ok:
        pytest.skip(why)
    model = load_model(tiny_base, repo_params.model, torch.float32)
    pairs = sample_pairs(sample_data, 12)
    encoded = []
    for q in candidates(pairs[:2], pairs, negatives=5):
        prompt, cands, _ = scoring.encode_question(ChatFormat.of(tok), q, max_length=512)
        encoded.append((prompt, cands + [cands[0]]))  # a duplicate shares whole cache blocks
    want = [scoring.score_candidates(model, p, c, batch_size=4) for p, c in encoded]
    max_len = max(len(p) + len(c) for p, cs in encoded for c in cs)
    llm = ev.open_vllm(tiny_base, None, 0, max_len + 1, 16, 0, prefix_caching=True)
    try:
        first = scoring.score_questions_vllm(llm, encoded)
        # again: now every candidate's blocks are cached, so the scorer must notice the
        # positions vLLM skipped and rescore those candidates without the cache
        again = scoring.score_questions_vllm(llm, encoded)
    finally:
        ev.close_llm(llm)
    for got in (first, again):
        for g, w in zip(got, want, strict=True):
            assert np.allclose(g, w, atol=1e-4, rtol=0), (g, w)


def test_batched_left_padded_generation_equals_one_by_one(tiny_base, tok, sample_data, repo_params):
    model = load_model(tiny_base, repo_params.model, torch.float32)
    by_length = {
        len(ids): ids
        for ids in (
            ChatFormat.of(tok).prompt_ids(conversation(SYSTEM, p["question"])) for p in sample_pairs(sample_data, 20)
        )
    }
    prompts = list(by_length.values())[:3]
    assert len({len(p) for p in prompts}) == 3  # different lengths: left padding is exercised
    batched = scoring.generate_hf(model, ChatFormat.of(tok), prompts, max_new_tokens=6, batch_size=3)
    single = [scoring.generate_hf(model, ChatFormat.of(tok), [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single


def test_adapter_checks_flag_what_vllm_cannot_serve(tiny_base, tmp_path):
    good, good_reasons = ev.adapter_checks(write_adapter(tiny_base, tmp_path / "good", save_tokenizer=False), tiny_base)
    assert good == {"rank_servable": True, "no_modules_to_save": True, "targets_matched": True, "lora_modules": 8}
    bad, reasons = ev.adapter_checks(
        # vLLM's largest rank is 512; smaller ranks are padded up to its --max-lora-rank
        write_adapter(
            tiny_base,
            tmp_path / "bad",
            r=640,
            target_modules=("q_proj", "c_attn"),
            modules_to_save=["norm"],
            save_tokenizer=False,
        ),
        tiny_base,
    )
    assert bad == {"rank_servable": False, "no_modules_to_save": False, "targets_matched": False, "lora_modules": 2}
    assert "c_attn" in reasons["targets_matched"] and "640" in reasons["rank_servable"]
    assert (
        "--max-lora-rank 16"
        in ev.adapter_checks(write_adapter(tiny_base, tmp_path / "r12", r=12), tiny_base)[1]["rank_servable"]
    )


# ---------------------------------------------------------------- the stage on a trained adapter


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sample_data, tiny_base, repo_params):
    """process-contract data -> mediagent.pipeline.train (real, tiny) -> mediagent.pipeline.merge, in a temp dir."""
    train = pytest.importorskip("mediagent.pipeline.train", reason="the train stage is not in this checkout")
    root = tmp_path_factory.mktemp("evaluate")
    write_processed(sample_data, root / "processed", n_train=8, n_val=2, n_test=6, negatives=7, one_per_question=True)
    params = pipeline_params(
        repo_params,
        root,
        tiny_base,
        # memorise 8 answers: enough steps at a high rate on short sequences
        train={
            "max_steps": 16,
            "learning_rate": 0.005,
            "max_seq_length": 64,
            "per_device_train_batch_size": 4,
            "warmup_steps": 1,
            "logging_steps": 4,
            "eval_steps": 16,
            "save_steps": 16,
            "max_eval_examples": 2,
        },
        merge={"parity_prompts": 1},
        eval={"max_questions": 6, "max_generations": 3, "max_new_tokens": 8, "max_seq_length": 64, "batch_size": 8},
    )
    train.main(params)
    merge.main(params)
    return params, root


def test_trained_model_beats_chance_on_its_training_questions(trained, sample_data):
    # Sanity check that the scorer reads the answer tokens: after memorising 8 answers the
    # tuned model must rank each question's own answer above the others' far above chance.
    params, root = trained
    pairs = sample_pairs(sample_data, 8, one_per_question=True)  # the 8 training pairs
    rows = candidates(pairs, pairs, negatives=7)
    labels = [[c["label"] for c in q["candidates"]] for q in rows]
    tok = load_tokenizer(root / "merged")
    results = {}
    for name, path in (("base", params.model.path), ("tuned", root / "merged")):
        model = load_model(path, params.model, torch.float32)
        for rule in ("mean", "pmi"):
            scores = scoring.score_questions(model, ChatFormat.of(tok), rows, 64, 8, name, rule)
            results[name, rule] = eval_metrics.selection_metrics(scores, labels, np.random.default_rng(0))["p_at_1"]
    chance = eval_metrics.random_baseline(labels)["p_at_1"]
    assert chance == pytest.approx(1 / 8)
    for rule in ("mean", "pmi"):
        assert results["tuned", rule] >= 4 * chance and results["tuned", rule] > results["base", rule], results


def test_main_writes_metrics_samples_plots_and_report(trained):
    params, root = trained
    ev.main(params)

    metrics = json.loads((root / "metrics" / "eval.json").read_text())
    assert set(metrics) == {"base", "tuned", "delta", "random", "serve_ready"}
    assert set(metrics["base"]) == set(metrics["tuned"]) == set(metrics["delta"]) == MODEL_KEYS
    assert set(metrics["random"]) == {"p_at_1", "mrr", "map"}
    assert set(metrics["serve_ready"]) == SERVE_KEYS
    for model in ("base", "tuned", "delta", "random"):  # flat numeric leaves for dvc metrics diff
        assert all(isinstance(v, float) and math.isfinite(v) for v in metrics[model].values()), metrics[model]
    assert metrics["delta"]["p_at_1"] == pytest.approx(metrics["tuned"]["p_at_1"] - metrics["base"]["p_at_1"])
    assert metrics["tuned"]["loss"] < metrics["base"]["loss"]  # it learned the answer distribution
    assert metrics["tuned"]["perplexity"] == pytest.approx(math.exp(metrics["tuned"]["loss"]))
    assert metrics["random"]["p_at_1"] == pytest.approx(1 / 8)
    serve = metrics["serve_ready"]
    assert serve["rank_servable"] and serve["targets_matched"] and serve["no_modules_to_save"]
    assert serve["lora_modules"] == 2 * len(params.lora.target_modules)  # 2 layers

    report = json.loads((root / "eval" / "report.json").read_text())
    vllm_ok, _ = vllm_status()
    assert report["backend"] == ("vllm" if vllm_ok else "hf")
    assert report["scorer"] == report["backend"]  # auto: vLLM prompt log-probs with the vLLM backend
    if vllm_ok:
        assert serve["vllm_parity"] is True, report["serve_ready_reasons"]["vllm_parity"]
    else:
        assert serve["vllm_parity"] is None and report["serve_ready_reasons"]["vllm_parity"] == "vllm not installed"
    intervals = report["intervals"]
    # every metric has an interval but distinct-2 (a corpus statistic) and the empty/thinking guards
    assert set(intervals) == MODEL_KEYS - {"distinct_2", "empty_share", "think_share"}
    for key, iv in intervals.items():
        for model in ("base", "tuned", "delta"):
            lo, hi = iv[model]["ci95"]
            assert lo <= iv[model]["value"] <= hi or key == "bleu4", (key, iv)  # corpus BLEU is not a mean
        assert iv["tuned"]["value"] == pytest.approx(metrics["tuned"][key]), key
    assert intervals["loss"]["delta"]["ci95"][1] < 0  # learned: lower loss on every resample
    assert report["counts"] == {
        "loss_examples": 6,
        "loss_tokens": report["counts"]["loss_tokens"],
        "selection_questions": 6,
        "candidates": 48,
        "generations": 3,
    }

    samples = [json.loads(line) for line in (root / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3
    assert all(set(s) == {"question_id", "question", "reference", "base", "tuned"} for s in samples)
    assert all("<think>" not in s["tuned"] and "<|im_end|>" not in s["tuned"] for s in samples)

    plots = root / "eval" / "plots"
    assert sorted(p.name for p in plots.iterdir()) == ["ranks.csv", "selection.json"]
    bars = json.loads((plots / "selection.json").read_text())
    assert {"metric": "p_at_1 tuned", "value": metrics["tuned"]["p_at_1"]} in bars
    ranks = (plots / "ranks.csv").read_text().splitlines()
    assert ranks[0] == "rank,base,tuned,random" and len(ranks) == 1 + 8
    assert sum(int(line.split(",")[2]) for line in ranks[1:]) == 6  # every question has a first-positive rank
    assert int(ranks[1].split(",")[2]) == round(metrics["tuned"]["p_at_1"] * 6)


def test_bad_inputs_name_the_fix(trained, tmp_path):
    params, root = trained
    with pytest.raises(ArtifactError, match="dvc repro train"):
        ev.main(with_overrides(params, train={"output_dir": str(tmp_path / "none")}))
    with pytest.raises(ev.EvalError, match="dvc repro merge"):
        ev.main(with_overrides(params, merge={"output_dir": str(tmp_path / "none")}))
    with pytest.raises(ev.EvalError, match="dvc repro process"):
        ev.main(with_overrides(params, data={"processed_dir": str(tmp_path / "none")}))

    # an adapter trained on another base
    other = shutil.copytree(root / "adapter", tmp_path / "adapter")
    lineage = json.loads((other / "lineage.json").read_text())
    (other / "lineage.json").write_text(json.dumps({**lineage, "base": {**lineage["base"], "id": "Qwen/Qwen3-8B"}}))
    with pytest.raises(ArtifactError, match="model.base=Qwen/Qwen3-8B"):
        ev.main(with_overrides(params, train={"output_dir": str(other)}))

    # a merged model left over from another adapter (merge not rerun)
    stale = tmp_path / "merged"
    stale.mkdir()
    shutil.copyfile(root / "merged" / "config.json", stale / "config.json")
    lineage = json.loads((root / "merged" / "lineage.json").read_text())
    (stale / "lineage.json").write_text(json.dumps({**lineage, "merge": {**lineage["merge"], "adapter_md5": "0" * 32}}))
    with pytest.raises(ev.EvalError, match="not built from the adapter.*dvc repro merge"):
        ev.main(with_overrides(params, merge={"output_dir": str(stale)}))
    assert not (tmp_path / "eval").exists()
