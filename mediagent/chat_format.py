"""The one prompt format, taken from the checkpoint's chat template.

Every stage and command renders conversations through :class:`ChatFormat`, built from a
tokenizer and its chat template: training sequences and their assistant-only labels, the
evaluation prompts, the stop tokens, and the template saved with every adapter and merged
model (which vLLM then serves). Which template that is comes from ``model.chat_template``:

- ``auto``: the base checkpoint's own template (Qwen3's hub template, the tiny base's);
- a name from :data:`TEMPLATES` for a base that ships none (a pretrained GGUF, say);
- a path to a ``.jinja`` file.

``model.chat_template_kwargs`` (e.g. Qwen3's ``enable_thinking: false``) are frozen into the
saved template as ``{% set %}`` lines, so a server that renders it with its own defaults
sees the very format training used (mixing formats is what brings ``<think>`` back after
merging or serving). Only variables the template reads are frozen.

How labels are found without a family's token names: the whole conversation is rendered,
each assistant message's content is located in that text followed by the turn's end
marker, and content + marker are learned. The end marker is what the template writes right
after an assistant message's content, read off a rendering; it is also the stop token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from mediagent.errors import UserError

IGNORE_INDEX = -100

# Qwen3's non-thinking convention in ChatML: the assistant turn opens with an empty think
# block, as Qwen3's own template renders it for enable_thinking=False. The tiny base ships it.
CHATML = (
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

# Gemma's turn format (text only), as Google's instruction-tuned Gemma 3 template writes it:
# a BOS, the system text folded into the first user turn, the assistant called "model".
GEMMA = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set first_user_prefix = '' %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{- message['content'] | trim }}"
    "{{- '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<start_of_turn>model\\n' }}"
    "{%- endif %}"
)

# The named templates, for bases without one of their own. Keep to the ones we test.
TEMPLATES = {"chatml": CHATML, "gemma": GEMMA}


class ChatFormatError(UserError):
    """The chat template is missing or cannot be used for training; the message says what to set."""


def _jinja_literal(value) -> str:
    return "none" if value is None else json.dumps(value, ensure_ascii=False)  # JSON's true/false are Jinja's


def freeze(template: str, kwargs: dict) -> str:
    """The template with ``kwargs`` it reads fixed by ``{% set %}`` lines (the served defaults)."""
    lines = [f"{{%- set {k} = {_jinja_literal(v)} %}}" for k, v in sorted(kwargs.items()) if k in template]
    return "".join(lines) + template


def resolve_template(choice: str, kwargs: dict, tokenizer, where: str = "model.chat_template") -> str:
    """The template a run uses: ``choice`` is auto, a name in TEMPLATES, or a .jinja path."""
    if choice == "auto":
        own = tokenizer.chat_template
        if not isinstance(own, str) or not own:
            raise ChatFormatError(
                f"{where}: auto, but the base's tokenizer has no chat template (a pretrained base); "
                f"name one: {', '.join(TEMPLATES)}, or a path to a .jinja file"
            )
        template = own
    elif choice in TEMPLATES:
        template = TEMPLATES[choice]
    else:
        path = Path(choice)
        if path.suffix != ".jinja" or not path.is_file():
            raise ChatFormatError(
                f"{where}: {choice!r} is neither auto, a known template "
                f"({', '.join(TEMPLATES)}) nor an existing .jinja file"
            )
        template = path.read_text(encoding="utf-8")
    return freeze(template, kwargs)


def conversation(system: str, question: str) -> list[dict]:
    """A single-turn prompt as messages (no system message when ``system`` is empty)."""
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": question}]


def prompt_messages(messages: list[dict]) -> list[dict]:
    """An example's messages without its final answer: what the model answers."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("an example must end with an assistant message")
    return messages[:-1]


def final_answer(messages: list[dict]) -> str:
    prompt_messages(messages)  # checks the shape
    return messages[-1]["content"]


def last_question(messages: list[dict]) -> str:
    """The last user message before the final answer."""
    return next(m["content"] for m in reversed(prompt_messages(messages)) if m["role"] == "user")


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on context tokens: only assistant turns are learned
    truncated: bool  # the last answer lost its tail to max_length
    dropped_turns: int = 0  # earliest user/assistant exchanges dropped to fit max_length


@dataclass(frozen=True, eq=False)
class ChatFormat:
    """A tokenizer with the template it renders conversations through."""

    tokenizer: object
    template: str

    @classmethod
    def of(cls, tokenizer) -> ChatFormat:
        """The format saved with a model folder's tokenizer (adapter, merged model, base)."""
        if not isinstance(tokenizer.chat_template, str) or not tokenizer.chat_template:
            raise ChatFormatError(
                f"tokenizer of {tokenizer.name_or_path} has no chat template: "
                f"set model.chat_template and rerun `dvc repro train`"
            )
        return cls(tokenizer, tokenizer.chat_template)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @cached_property
    def end_text(self) -> str:
        """What the template writes right after an assistant message: its first special token."""
        sentinel = "\u2063answer\u2063"
        text = self.render([{"role": "user", "content": "q"}, {"role": "assistant", "content": sentinel}])
        after = text[text.index(sentinel) + len(sentinel) :]
        for special in sorted(
            self.tokenizer.all_special_tokens + list(self.tokenizer.get_added_vocab()), key=len, reverse=True
        ):
            if special and after.startswith(special):
                return special
        raise ChatFormatError(
            f"the chat template writes {after[:20]!r} after an answer, not a special token: "
            f"no token would end a turn; use a template whose turns end in one"
        )

    @cached_property
    def end_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.end_text)

    @cached_property
    def stop_ids(self) -> list[int]:
        """Tokens that end generation: the turn's end marker, then the tokenizer's and the
        generation config's EOS (a base that never learned the turn format still stops)."""
        out = [self.end_id]
        eos = [self.tokenizer.eos_token_id]
        config = Path(str(self.tokenizer.name_or_path)) / "generation_config.json"
        if config.is_file():
            extra = json.loads(config.read_text(encoding="utf-8")).get("eos_token_id")
            eos += extra if isinstance(extra, list) else [extra]
        return out + [i for i in dict.fromkeys(eos) if i is not None and i not in out]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a prompt (messages up to the answer) with the generation prompt."""
        return self.ids(self.render(messages, add_generation_prompt=True))

    def answer_ids(self, text: str) -> list[int]:
        """An answer's tokens followed by the end marker, the token that teaches the model to stop."""
        return self.ids(text) + [self.end_id]

    def segments(self, messages: list[dict]) -> list[tuple[str, str, bool]]:
        """The rendered conversation as (context text, answer, learned) per assistant message,
        ending with the last answer (what the template writes after it is not trained on)."""
        text = self.render(messages)
        pieces, pos = [], 0
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            for content in (m["content"], m["content"].strip()):
                at = text.find(content + self.end_text, pos)
                if at >= 0:
                    break
            else:
                raise ValueError(f"assistant message {k} is not in the rendered text followed by {self.end_text!r}")
            pieces.append((text[pos:at], content, m.get("weight", 1) != 0))
            pos = at + len(content) + len(self.end_text)
        if not pieces:
            raise ValueError("no assistant message to learn")
        return pieces

    def _encode(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        ids, labels = [], []
        for context, answer, learned in self.segments(messages):
            context_ids, answer_ids = self.ids(context) if context else [], self.answer_ids(answer)
            ids += context_ids + answer_ids
            labels += [IGNORE_INDEX] * len(context_ids) + (answer_ids if learned else [IGNORE_INDEX] * len(answer_ids))
        return ids, labels

    def encode(self, messages: list[dict], max_length: int) -> Encoded:
        """Token ids and assistant-only labels for one example.

        Over-long conversations first lose whole earliest user/assistant exchanges (the
        system message stays); a single exchange that is still too long keeps its prompt and
        loses the answer's tail (a cut answer is not made to end with the stop token).
        """
        dropped = 0
        head = 1 if messages and messages[0]["role"] == "system" else 0
        while True:
            ids, labels = self._encode(messages)
            exchanges = sum(m["role"] == "assistant" for m in messages)
            if len(ids) <= max_length or exchanges <= 1:
                break
            nxt = next(i for i in range(head + 1, len(messages)) if messages[i]["role"] == "user")
            messages = messages[:head] + messages[nxt:]
            dropped += 1
        return Encoded(ids[:max_length], labels[:max_length], len(ids) > max_length, dropped)

    def __repr__(self) -> str:  # the tokenizer's repr is pages long
        return f"ChatFormat({self.tokenizer.name_or_path!r}, end={self.end_text!r})"
