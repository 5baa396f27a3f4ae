"""A non-Qwen base with a non-ChatML template, end to end: train -> merge -> evaluate -> vLLM.

A tiny randomly initialised Gemma 3 (Gemma3ForCausalLM: 4 norms per layer, q/k norms, one
KV head, sliding-window layers) with Qwen's vocabulary plus Gemma's turn markers, and no
chat template of its own: ``model.chat_template: gemma`` names one. Checked: the labels
cover the answers and ``<end_of_turn>`` only, generation stops at ``<end_of_turn>``, and
the prompt the server builds is the one training used, token for token.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mediagent.chat_format import IGNORE_INDEX, ChatFormat, conversation
from mediagent.loading import load_tokenizer
from mediagent.memory import Arch, param_counts
from tests.adapter_kit import SYSTEM, pipeline_params, write_processed
from tests.test_serve import serving_run, vllm_skip_reason

BASE_ID = "test/tiny-gemma3"
QUESTION = "头疼怎么办？"


@pytest.fixture(scope="module")
def gemma_base(tmp_path_factory, tiny_base) -> Path:
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    out = tmp_path_factory.mktemp("models") / BASE_ID
    tok = load_tokenizer(tiny_base)
    tok.add_special_tokens({"bos_token": "<bos>", "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = None  # a pretrained base ships none: the params name it
    config = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=2048,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.convert_tokens_to_ids("<end_of_turn>"),
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    return out


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, gemma_base, sample_data, repo_params):
    from mediagent.pipeline import evaluate, merge, train

    root = tmp_path_factory.mktemp("gemma-pipeline")
    write_processed(sample_data, root / "processed", n_train=16, n_val=2, n_test=4, negatives=3, one_per_question=True)
    params = pipeline_params(
        repo_params,
        root,
        gemma_base,
        model={
            "dir": str(gemma_base.parent.parent),
            "base": BASE_ID,
            "chat_template": "gemma",
            "chat_template_kwargs": {},
        },
        train={
            "max_steps": 6,
            "per_device_train_batch_size": 4,
            "max_seq_length": 128,
            "eval_steps": 3,
            "save_steps": 3,
            "logging_steps": 1,
            "warmup_steps": 0,
            "max_eval_examples": 2,
            "learning_rate": 0.01,
        },
        merge={"parity_prompts": 2},
        eval={
            "max_questions": 4,
            "max_generations": 2,
            "max_new_tokens": 8,
            "max_seq_length": 128,
            "bootstrap_resamples": 200,
        },
    )
    train.main(params)
    merge.main(params)
    evaluate.main(params)
    return params, root


def test_the_planner_reads_a_gemma3_config(gemma_base):
    from transformers import AutoModelForCausalLM

    arch = Arch.from_config(json.loads((gemma_base / "config.json").read_text()))
    assert (arch.head_dim, arch.kv_heads, arch.tied, arch.norms, arch.qk_norm) == (32, 1, True, 4, True)
    model = AutoModelForCausalLM.from_pretrained(gemma_base)
    assert sum(param_counts(arch).values()) == sum(p.numel() for p in model.parameters())


def test_labels_and_stop_token_come_from_the_named_template(pipeline):
    params, root = pipeline
    tok = load_tokenizer(root / "adapter")
    fmt = ChatFormat.of(tok)
    assert fmt.end_text == "<end_of_turn>" and fmt.stop_ids[0] == tok.convert_tokens_to_ids("<end_of_turn>")
    row = json.loads((root / "processed" / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    enc = fmt.encode(row["messages"], max_length=4096)
    learned = [i for i, y in zip(enc.input_ids, enc.labels) if y != IGNORE_INDEX]
    assert tok.decode(learned) == row["messages"][-1]["content"].strip() + "<end_of_turn>"
    assert tok.decode(enc.input_ids).startswith("<bos><start_of_turn>user\n")
    for where in ("adapter", "merged"):  # the format travels with the model
        assert load_tokenizer(root / where).chat_template == tok.chat_template
    metrics = json.loads((root / "metrics" / "eval.json").read_text())
    assert metrics["tuned"]["loss"] < metrics["base"]["loss"]
    merged = json.loads((root / "metrics" / "merge.json").read_text())
    assert merged["max_abs_diff"] <= merged["tolerance"]
    assert json.loads((root / "eval" / "report.json").read_text())["serve_ready_reasons"]["vllm_parity"]


def test_the_served_prompt_is_the_trained_one(pipeline, gemma_base, tmp_path):
    reason = vllm_skip_reason()
    if reason:
        pytest.skip(reason)
    params, root = pipeline
    with serving_run(params, root, tmp_path) as srv:
        messages = conversation(SYSTEM, QUESTION)
        served = srv.prompt_ids(messages)
        fmt = ChatFormat.of(load_tokenizer(root / "adapter"))
        assert served == fmt.prompt_ids(messages)
        reply = srv.client().chat.completions.create(model="medqa", messages=messages, max_tokens=8, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert "<end_of_turn>" not in reply.choices[0].message.content
