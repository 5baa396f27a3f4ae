"""Chat with the tuned model: `make chat` (REPL) or one question (``--question``).

Reads  a running ``make serve`` (default ``http://<serve.host>:<serve.port>/v1``, model
       ``serve.alias``), or with ``--offline`` the base model + ``train.output_dir`` (or
       ``--adapter DIR`` / ``--merged``) through vLLM's offline engine; params ``serve``,
       ``process.system_prompt`` (and ``model``, ``train``, ``merge`` offline).
Writes the answers to stdout, streamed token by token from the server.

Run: ``mediagent chat [--question Q] [--base-url URL] [--api-key KEY] [--model NAME]``
     ``[--offline [--adapter DIR | --merged]] [--temperature T] [--max-tokens N]``

Every conversation starts with the training system prompt (``process.system_prompt``), so
the model is asked the way it was trained. In the REPL earlier turns are kept (``/reset``
clears them, ``/exit`` or Ctrl-D quits). The server is asked through mediagent/client.py
(no think block, Qwen3's sampling advice; a server that is down is one ``error:`` line).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import IO

import click

from mediagent.client import ModelClient
from mediagent.errors import setup_logging
from mediagent.loading import load_tokenizer
from mediagent.net import local_url
from mediagent.params import Params, load_params
from mediagent.vllm_engine import open_engine, sampling_params

log = logging.getLogger(__name__)


def build_messages(system: str, history: Sequence[dict], question: str) -> list[dict]:
    """System prompt, earlier turns, then the new question."""
    return [{"role": "system", "content": system}, *history, {"role": "user", "content": question}]


def stream_answer(
    client: ModelClient, model: str, messages: list[dict], max_tokens: int, temperature: float, out: IO[str]
) -> str:
    """Ask the server, print tokens as they arrive, return the whole answer."""
    parts = []
    for piece in client.stream(model, messages, max_tokens, temperature):
        parts.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    return "".join(parts)


def offline_answerer(
    params: Params, adapter: str | None, merged: bool, max_tokens: int, temperature: float
) -> Callable[[list[dict], IO[str]], str]:
    """A function like ``stream_answer`` backed by vLLM's offline engine (prints at the end)."""
    engine = open_engine(params, adapter, merged)
    tokenizer = load_tokenizer(engine.tokenizer_dir)  # carries the training chat template
    max_len = params.serve.max_model_len

    def ask(messages: list[dict], out: IO[str]) -> str:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, enable_thinking=False
        )["input_ids"]
        if len(ids) >= max_len:
            raise ValueError(f"conversation is {len(ids)} tokens, serve.max_model_len is {max_len}: /reset")
        sp = sampling_params(tokenizer, min(max_tokens, max_len - len(ids)), temperature, seed=0)
        text = (
            engine.llm.generate([{"prompt_token_ids": ids}], sp, lora_request=engine.lora, use_tqdm=False)[0]
            .outputs[0]
            .text.strip()
        )
        out.write(text + "\n")
        return text

    return ask


def repl(
    ask: Callable[[list[dict], IO[str]], str], system: str, lines: Iterable[str], out: IO[str], interactive: bool
) -> None:
    """Read questions line by line; keep the conversation; /reset and /exit."""
    history: list[dict] = []
    prompt = "you> " if interactive else ""
    out.write(prompt)
    out.flush()
    for line in lines:
        q = line.strip()
        if q in ("/exit", "/quit"):
            break
        if q == "/reset":
            history = []
            out.write("(conversation cleared)\n")
        elif q:
            messages = build_messages(system, history, q)
            try:
                text = ask(messages, out)
            except Exception as exc:  # a rejected turn (too long, bad model) must not end the session
                out.write(f"error: {exc}\n")
            else:
                history += [messages[-1], {"role": "assistant", "content": text}]
        out.write(prompt)
        out.flush()
    if interactive:
        out.write("\n")


def main(
    params: Params,
    question: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    model: str | None = None,
    offline: bool = False,
    adapter: str | None = None,
    merged: bool = False,
    max_tokens: int = 512,
    temperature: float = 0.7,
    stdin: IO[str] = sys.stdin,
    out: IO[str] = sys.stdout,
) -> None:
    """Answer ``question``, or run a REPL on ``stdin``."""
    system = params.process.system_prompt
    if offline:
        ask = offline_answerer(params, adapter, merged, max_tokens, temperature)
    else:
        url = base_url or f"{local_url(params.serve.host, params.serve.port)}/v1"
        client = ModelClient(url, api_key, start_hint="start one with `make serve`, or use --offline")
        name = model or params.serve.alias

        def ask(messages: list[dict], o: IO[str]) -> str:
            return stream_answer(client, name, messages, max_tokens, temperature, o)

    if question is not None:
        ask(build_messages(system, [], question), out)
    else:
        repl(ask, system, stdin, out, interactive=stdin.isatty())


@click.command()
@click.option("--question", "-q", help="Ask one question and exit (default: interactive).")
@click.option("--base-url", help="Server URL (default http://<serve.host>:<serve.port>/v1).")
@click.option("--api-key", envvar="API_KEY", help="Bearer token, if the server wants one (env API_KEY).")
@click.option("--model", help="Served model name (default serve.alias: the latest adapter).")
@click.option("--offline", is_flag=True, help="No server: load vLLM's engine in this process.")
@click.option("--adapter", help="With --offline: adapter dir (default train.output_dir).")
@click.option("--merged", is_flag=True, help="With --offline: use merge.output_dir.")
@click.option("--max-tokens", default=512, show_default=True)
@click.option("--temperature", default=0.7, show_default=True, help="0 = greedy.")
def command(question, base_url, api_key, model, offline, adapter, merged, max_tokens, temperature) -> None:
    """Chat with the served (or offline) tuned model."""
    # WARNING: the HTTP client logs every request at INFO, which would interleave with answers.
    setup_logging(logging.WARNING)
    if (adapter or merged) and not offline:
        raise click.UsageError("--adapter/--merged choose the offline model; pick the served one with --model")
    main(load_params(), question, base_url, api_key, model, offline, adapter, merged, max_tokens, temperature)
