"""The prompt format comes from the chat template: Qwen3's prompt pinned, labels, stop tokens."""

from __future__ import annotations

import pytest

from mediagent.chat_format import (
    IGNORE_INDEX,
    TEMPLATES,
    ChatFormat,
    ChatFormatError,
    freeze,
    resolve_template,
)
from mediagent.loading import load_tokenizer
from rehearsal.checkpoint import QWEN3_CHAT_TEMPLATE
from tests.formats import MESSAGES, QWEN3_PROMPT


@pytest.fixture(scope="module")
def qwen_tok(tiny_base):
    return load_tokenizer(tiny_base)


def gemma_tokenizer(tiny_base):
    """Qwen's vocabulary with Gemma's turn markers added as special tokens and a BOS."""
    tok = load_tokenizer(tiny_base)
    tok.add_special_tokens({"bos_token": "<bos>", "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = TEMPLATES["gemma"]
    return tok


def test_qwen3_prompt_is_unchanged_byte_for_byte(qwen_tok):
    """Existing adapters keep serving: the tiny base's template, and Qwen3's hub template in
    non-thinking mode (as model.chat_template_kwargs freezes it), render today's prompt."""
    hub = resolve_template("auto", {"enable_thinking": False}, type("T", (), {"chat_template": QWEN3_CHAT_TEMPLATE}))
    for template in (TEMPLATES["chatml"], hub):
        fmt = ChatFormat(qwen_tok, template)
        assert fmt.render(MESSAGES, add_generation_prompt=True) == QWEN3_PROMPT
        assert fmt.prompt_ids(MESSAGES) == qwen_tok(QWEN3_PROMPT, add_special_tokens=False)["input_ids"]
    # without the frozen kwarg the hub template would open a thinking turn: a different prompt
    assert ChatFormat(qwen_tok, QWEN3_CHAT_TEMPLATE).render(MESSAGES, add_generation_prompt=True) != QWEN3_PROMPT


def test_freeze_sets_only_variables_the_template_reads():
    assert freeze("{{ x }}", {"enable_thinking": False}) == "{{ x }}"
    assert freeze("{% if enable_thinking %}{% endif %}", {"enable_thinking": False}).startswith(
        "{%- set enable_thinking = false %}"
    )


def test_labels_are_the_answers_and_their_end_token_only(qwen_tok):
    fmt = ChatFormat.of(qwen_tok)
    assert fmt.end_text == "<|im_end|>" and fmt.stop_ids[0] == qwen_tok.convert_tokens_to_ids("<|im_end|>")
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": "多喝水"},
        {"role": "user", "content": "还疼呢？"},
        {"role": "assistant", "content": "去医院"},
    ]
    enc = fmt.encode(messages, max_length=4096)
    # the whole conversation as rendered, up to the last answer's end token (the newline after it is not trained)
    assert qwen_tok.decode(enc.input_ids) + "\n" == fmt.render(messages)
    learned = qwen_tok.decode([i for i, y in zip(enc.input_ids, enc.labels) if y != IGNORE_INDEX])
    assert learned == "多喝水<|im_end|>去医院<|im_end|>"

    # weight 0: an earlier answer is context, not a target
    quiet = [{**m, "weight": 0} if m["content"] == "多喝水" else m for m in messages]
    enc = fmt.encode(quiet, max_length=4096)
    assert qwen_tok.decode([i for i, y in zip(enc.input_ids, enc.labels) if y != IGNORE_INDEX]) == "去医院<|im_end|>"

    # too long: the earliest exchange goes first, the system message stays
    short = fmt.encode(messages, max_length=len(fmt.encode(messages[:1] + messages[3:], 4096).input_ids))
    assert short.dropped_turns == 1 and not short.truncated
    assert qwen_tok.decode(short.input_ids).startswith("<|im_start|>system\n系统")


def test_a_non_chatml_template_gives_its_own_labels_and_stop_token(tiny_base):
    tok = gemma_tokenizer(tiny_base)
    fmt = ChatFormat.of(tok)
    assert fmt.end_text == "<end_of_turn>" and fmt.end_id == tok.convert_tokens_to_ids("<end_of_turn>")
    prompt = fmt.render(MESSAGES, add_generation_prompt=True)
    assert prompt == "<bos><start_of_turn>user\n系统\n\n头疼怎么办？<end_of_turn>\n<start_of_turn>model\n"
    enc = fmt.encode([*MESSAGES, {"role": "assistant", "content": "多喝水"}], max_length=4096)
    n_context = enc.labels.count(IGNORE_INDEX)
    assert enc.input_ids[:n_context] == fmt.prompt_ids(MESSAGES)  # context = the served prompt
    assert tok.decode(enc.input_ids[n_context:]) == "多喝水<end_of_turn>"


def test_a_base_without_a_template_needs_one_named(qwen_tok, tmp_path):
    bare = type("T", (), {"chat_template": None})
    with pytest.raises(ChatFormatError, match="model.chat_template: auto.*chatml, gemma"):
        resolve_template("auto", {}, bare)
    with pytest.raises(ChatFormatError, match="neither auto"):
        resolve_template("llama9", {}, bare)
    path = tmp_path / "mine.jinja"
    path.write_text(TEMPLATES["chatml"], encoding="utf-8")
    assert resolve_template(str(path), {}, bare) == TEMPLATES["chatml"]
    # a template whose turns end in plain text has no stop token: refused before training
    plain = ChatFormat(qwen_tok, "{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    with pytest.raises(ChatFormatError, match="not a special token"):
        _ = plain.end_text
