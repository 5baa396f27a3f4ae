"""QLoRA on the CPU, end to end on the tiny model: `model.quantization: nf4` trains on the
base loaded in 4-bit (bitsandbytes NF4), merges onto the unquantized base with a parity
figure against the adapter on the 4-bit base, evaluates, and vLLM serves the adapter on
the unquantized base with the same greedy answers as peft (evaluate's vllm_parity)."""

from __future__ import annotations

import json
import math

import pytest

from mediagent.pipeline import evaluate, merge, train
from mediagent.vllm_engine import vllm_status
from tests.adapter_kit import pipeline_params, write_processed

pytest.importorskip("bitsandbytes", reason="bitsandbytes is in requirements.txt")


def test_nf4_trains_merges_evaluates_and_serves(tmp_path, sample_data, tiny_base, repo_params):
    root = tmp_path
    write_processed(sample_data, root / "processed", n_train=16, n_val=4, n_test=4, negatives=3, one_per_question=True)
    params = pipeline_params(
        repo_params,
        root,
        tiny_base,
        model={"quantization": "nf4"},
        train={
            "max_steps": 6,
            "learning_rate": 0.01,
            "max_seq_length": 64,
            "per_device_train_batch_size": 4,
            "warmup_steps": 1,
            "logging_steps": 2,
            "eval_steps": 6,
            "save_steps": 6,
            "max_eval_examples": 4,
        },
        merge={"parity_prompts": 2},
        eval={"max_questions": 4, "max_generations": 2, "max_new_tokens": 8, "max_seq_length": 64, "batch_size": 8},
    )
    train.main(params)
    metrics = json.loads((root / "metrics" / "train.json").read_text())
    assert metrics["plan"]["quantization"] == "nf4"
    assert metrics["eval_loss"] < metrics["eval_loss_step0"]  # it trained on the 4-bit base
    assert json.loads((root / "adapter" / "lineage.json").read_text())["plan"]["quantization"] == "nf4"

    merge.main(params)
    m = json.loads((root / "metrics" / "merge.json").read_text())
    # onto the unquantized base: the usual tight parity with base + adapter in float32
    assert m["dtype"] == "float32" and m["max_abs_diff"] <= m["tolerance"] == params.merge.tolerance
    q = m["quantized"]  # and against the adapter on the 4-bit base it was trained on
    assert q["quantization"] == "nf4" and 0 < q["max_abs_diff"] <= q["bound"]
    # the bound is a multiple of what NF4 rounding alone does to the untuned base, this run
    assert 0 < q["base_rounding"] and q["bound"] == pytest.approx(
        params.merge.quantized_rounding_factor * q["base_rounding"]
    )
    with pytest.raises(merge.ParityError, match="quantized_rounding_factor"):
        merge.check_quantized_parity(
            {"quantized": {**q, "max_abs_diff": q["bound"] * 1.01}}, params.merge.quantized_rounding_factor
        )
    print(
        f"QLoRA merge parity: merged vs base+adapter {m['max_abs_diff']:.3g}; merged vs adapter on NF4 base "
        f"max {q['max_abs_diff']:.3g} mean {q['mean_abs_diff']:.3g} (bound {q['bound']:.3g}); NF4 rounding of the "
        f"untuned base {q['base_rounding']:.3g}; max |logit| {m['reference_max_abs_logit']:.3g}"
    )
    config = json.loads((root / "merged" / "config.json").read_text())
    assert "quantization_config" not in config  # never the 4-bit weights

    evaluate.main(params)
    e = json.loads((root / "metrics" / "eval.json").read_text())
    assert math.isfinite(e["tuned"]["loss"]) and e["tuned"]["loss"] < e["base"]["loss"]
    ok, why = vllm_status()
    if ok:  # vLLM served the adapter on the unquantized base: same greedy answers as peft
        assert e["serve_ready"]["vllm_parity"] is True, e["serve_ready"]
    else:
        pytest.fail(f"vLLM is part of the install: {why}")
