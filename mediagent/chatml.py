"""The one prompt format used by train, merge, evaluate and serve.

Qwen3's non-thinking convention: the assistant turn opens with an empty think block
(``<think>\\n\\n</think>\\n\\n``), which is also what Qwen3's own template emits for
``enable_thinking=False``. Training, scoring, generation and the served chat template all
use exactly this string, so the tuned model never sees a format it was not trained on
(mixing formats is what brings ``<think>`` back after merging or serving).

The Jinja template below is saved with every tokenizer we write (tiny base, adapter,
merged model) and handed to vLLM; ``render_prompt`` is its Python twin, and a test checks
that both give the same text.
"""

from __future__ import annotations

from dataclasses import dataclass

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
EMPTY_THINK = "<think>\n\n</think>\n\n"

# Rendering of one conversation: every turn is "<|im_start|>{role}\n{content}<|im_end|>\n";
# assistant turns (and the generation prompt) start with the empty think block.
# Earlier assistant turns keep only their visible content, as Qwen3's template does.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
)


def render_prompt(system: str, question: str) -> str:
    """Text the model sees before it answers (system + user + generation prompt)."""
    return (
        f"{IM_START}system\n{system}{IM_END}\n"
        f"{IM_START}user\n{question}{IM_END}\n"
        f"{IM_START}assistant\n{EMPTY_THINK}"
    )


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # -100 on prompt tokens: only the answer and its end token are learned
    truncated: bool


def split_messages(messages: list[dict]) -> tuple[str, str, str]:
    """(system, user, assistant) contents of one ChatML example from the process stage."""
    roles = [m["role"] for m in messages]
    if roles != ["system", "user", "assistant"]:
        raise ValueError(f"expected system/user/assistant messages, got roles {roles}")
    return messages[0]["content"], messages[1]["content"], messages[2]["content"]


def encode_prompt(tokenizer, system: str, question: str) -> list[int]:
    return tokenizer(render_prompt(system, question), add_special_tokens=False)["input_ids"]


def encode_answer(tokenizer, answer: str) -> list[int]:
    """Answer tokens followed by <|im_end|>, the token that teaches the model to stop."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.convert_tokens_to_ids(IM_END)]


def encode_example(tokenizer, messages: list[dict], max_length: int) -> Encoded:
    """Token ids and assistant-only labels for one example.

    The prompt and the answer are tokenised separately; Qwen's pre-tokeniser splits at
    the newline that ends the prompt anyway, so this equals tokenising the whole text, and
    it gives the exact label boundary without offsets. Over-long examples keep the whole
    prompt and lose the answer's tail (still ending in <|im_end|> is not forced: a cut
    answer should not teach the model to stop mid-sentence).
    """
    system, question, answer = split_messages(messages)
    prompt = encode_prompt(tokenizer, system, question)
    target = encode_answer(tokenizer, answer)
    ids = prompt + target
    labels = [-100] * len(prompt) + target
    truncated = len(ids) > max_length
    return Encoded(ids[:max_length], labels[:max_length], truncated)
