"""The `tiny` base: deterministic bytes, Qwen's real token ids, the project's chat template."""

from __future__ import annotations

import pytest

from stages.base import build_tiny
from stages.models import BaseModelError, check_model_dir, load_tokenizer
from stages.chatml import render_prompt
from stages.fileio import md5_dir


def test_same_params_same_bytes(tmp_path, repo_params, tiny_base):
    again = tmp_path / "tiny"
    build_tiny(repo_params.tiny, again)
    assert md5_dir(again) == md5_dir(tiny_base)
    assert sorted(p.name for p in again.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json",
        "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    ]


def test_other_seed_other_weights(tmp_path, repo_params, tiny_base):
    from stages.params import with_overrides

    other = tmp_path / "tiny"
    build_tiny(with_overrides(repo_params, tiny={"seed": 1}).tiny, other)
    assert (other / "model.safetensors").read_bytes() != (tiny_base / "model.safetensors").read_bytes()


def test_real_qwen_token_ids(tiny_base):
    tok = load_tokenizer(tiny_base)
    assert tok("你好", add_special_tokens=False)["input_ids"] == [108386]
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"])
    assert ids == [151643, 151644, 151645, 151667, 151668]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_saved_chat_template_is_the_training_format(tiny_base):
    tok = load_tokenizer(tiny_base)
    messages = [{"role": "system", "content": "系统"}, {"role": "user", "content": "头疼怎么办？"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == render_prompt("系统", "头疼怎么办？")
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_missing_or_pickled_base_is_refused(tmp_path):
    with pytest.raises(BaseModelError, match="make base"):
        check_model_dir(tmp_path / "nope")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "tokenizer_config.json").write_text("{}")
    (bad / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(BaseModelError, match="only safetensors"):
        check_model_dir(bad)
