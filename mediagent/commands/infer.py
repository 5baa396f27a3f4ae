"""Batch inference with vLLM's offline engine: a JSONL of questions in, answers out.

Reads  ``--input`` JSONL, one ``{"question": "...", "id": ...}`` per line (``id`` optional;
       the line number by default); the base model ``<model.dir>/<model.base>`` and the
       adapter ``train.output_dir`` (or ``--adapter DIR``), or ``merge.output_dir`` with
       ``--merged``; params ``model``, ``train``, ``merge``, ``serve`` (max_model_len,
       CPU KV cache), ``process.system_prompt``.
Writes ``--output`` JSONL atomically, one line per answered question in input order:
       ``{"id", "line", "question", "answer", "finish_reason", "prompt_tokens",
       "completion_tokens", "model"}``; with ``--errors FILE`` also the skipped lines.

Run: ``mediagent infer --input questions.jsonl --output answers.jsonl [--merged]``

Bad lines (invalid JSON, no question, a prompt longer than ``serve.max_model_len``) are
reported by line number on stderr and in a summary at the end; they never stop the
batch. Prompts are built with the model's saved chat template (the training format) and handed to vLLM
as token ids, so the engine sees exactly what the model was trained on. Decoding is
greedy by default, so the same input gives the same answers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import orjson

from mediagent import compat
from mediagent.chat_format import ChatFormat, conversation
from mediagent.errors import UserError, setup_logging
from mediagent.fileio import atomic_path, dump_jsonl
from mediagent.loading import load_tokenizer
from mediagent.params import Params, load_params
from mediagent.vllm_engine import Engine, open_engine, sampling_params

log = logging.getLogger(__name__)


class InferError(UserError):
    """A bad command-line argument; the message names it."""


@dataclass(frozen=True)
class Question:
    line: int  # 1-based line number in the input file
    id: Any
    question: str


@dataclass(frozen=True)
class LineError:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


def parse_questions(lines: Iterable[bytes | str]) -> tuple[list[Question], list[LineError]]:
    """Good questions and per-line errors; blank lines are skipped silently."""
    questions, errors = [], []
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            errors.append(LineError(n, f"invalid JSON ({exc})"))
            continue
        if not isinstance(row, dict):
            errors.append(LineError(n, f'expected an object like {{"question": ...}}, got {type(row).__name__}'))
            continue
        q = row.get("question")
        if not isinstance(q, str) or not q.strip():
            errors.append(LineError(n, "missing 'question' (a non-empty string)"))
            continue
        questions.append(Question(n, row.get("id", n), q.strip()))
    return questions, errors


def encode_questions(
    tokenizer, system: str, questions: Sequence[Question], max_model_len: int
) -> tuple[list[tuple[Question, list[int]]], list[LineError]]:
    """Prompt ids per question; prompts that leave no room for an answer become errors."""
    encoded, errors, fmt = [], [], ChatFormat.of(tokenizer)
    for q in questions:
        ids = fmt.prompt_ids(conversation(system, q.question))
        if len(ids) >= max_model_len:
            errors.append(LineError(q.line, f"prompt is {len(ids)} tokens; serve.max_model_len is {max_model_len}"))
        else:
            encoded.append((q, ids))
    return encoded, errors


def answer(
    engine: Engine,
    tokenizer,
    encoded: Sequence[tuple[Question, list[int]]],
    max_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[dict]:
    """One output row per question, in order (vLLM batches them itself)."""
    if not encoded:
        return []
    max_len = compat.engine_max_model_len(engine.llm)
    # Each prompt may only use what the context leaves after it.
    sampling = [
        sampling_params(tokenizer, min(max_tokens, max_len - len(ids)), temperature, seed) for _, ids in encoded
    ]
    outs = engine.llm.generate(
        [{"prompt_token_ids": ids} for _, ids in encoded], sampling, lora_request=engine.lora, use_tqdm=True
    )
    rows = []
    for (q, ids), out in zip(encoded, outs):
        o = out.outputs[0]
        rows.append(
            {
                "id": q.id,
                "line": q.line,
                "question": q.question,
                "answer": o.text.strip(),
                "finish_reason": o.finish_reason,
                "prompt_tokens": len(ids),
                "completion_tokens": len(o.token_ids),
                "model": engine.name,
            }
        )
    return rows


def main(
    params: Params,
    input_path: str | Path,
    output_path: str | Path,
    adapter: str | Path | None = None,
    merged: bool = False,
    max_tokens: int = 256,
    temperature: float = 0.0,
    errors_path: str | Path | None = None,
) -> list[LineError]:
    """Answer every good line of ``input_path`` into ``output_path``; return the bad lines."""
    input_path = Path(input_path)
    if not input_path.is_file():
        raise InferError(f"--input {input_path}: no such file")
    with input_path.open("rb") as fh:
        questions, errors = parse_questions(fh)
    for e in errors:
        log.warning("%s: %s", input_path, e)
    engine = open_engine(params, adapter, merged)
    tokenizer = load_tokenizer(engine.tokenizer_dir)
    encoded, too_long = encode_questions(tokenizer, params.process.system_prompt, questions, params.serve.max_model_len)
    for e in too_long:
        log.warning("%s: %s", input_path, e)
    errors = sorted(errors + too_long, key=lambda e: e.line)
    rows = answer(engine, tokenizer, encoded, max_tokens, temperature)
    with atomic_path(output_path) as tmp:
        dump_jsonl(tmp, rows)
    if errors_path:
        with atomic_path(errors_path) as tmp:
            dump_jsonl(tmp, [{"line": e.line, "reason": e.reason} for e in errors])
    log.info("%d answers written to %s (model %s)", len(rows), output_path, engine.name)
    if errors:
        log.warning("%d line(s) of %s skipped:\n  %s", len(errors), input_path, "\n  ".join(map(str, errors)))
    return errors


@click.command()
@click.option("--input", "input_path", required=True, type=click.Path(dir_okay=False), help="Questions JSONL.")
@click.option("--output", "output_path", required=True, type=click.Path(dir_okay=False), help="Answers JSONL.")
@click.option("--adapter", help="Adapter dir (default train.output_dir).")
@click.option("--merged", is_flag=True, help="Use merge.output_dir instead of base + LoRA.")
@click.option("--max-tokens", default=256, show_default=True, help="Answer length cap in tokens.")
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy (reproducible).")
@click.option("--errors", "errors_path", type=click.Path(dir_okay=False), help="Also write skipped lines here (JSONL).")
def command(input_path, output_path, adapter, merged, max_tokens, temperature, errors_path) -> None:
    """Answer a JSONL file of questions with the tuned model (vLLM offline engine)."""
    setup_logging()
    if adapter and merged:
        raise click.UsageError("--adapter and --merged exclude each other")
    main(load_params(), input_path, output_path, adapter, merged, max_tokens, temperature, errors_path)
