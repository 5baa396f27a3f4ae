"""The one client of a served model: chat completions from `mediagent serve` (vLLM's
OpenAI-compatible server, or any other) through the ``openai`` package.

Used by `mediagent chat`, the review app, the serving benchmark (``bench/serve.py``),
``make quality`` and the rehearsal. It owns the base URL and API key, the model list,
answers streamed piece by piece or whole, the way the project asks (no thinking block,
Qwen3's sampling advice), and what a failed request means: a :class:`ServerError`, whose
message is one line naming the server and what to do.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from mediagent.errors import UserError

# Sent with every request: a server running Qwen3's stock template then answers without a
# think block too, as the model was trained (our own template has none and ignores it).
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


class ServerError(UserError):
    """A request the model server did not answer; ``kind`` says why.

    ``no_server`` (nothing answers at the URL), ``needs_key`` (401), ``server_said`` (another
    HTTP error: ``status`` and the server's ``detail``).
    """

    def __init__(self, message: str, kind: str, status: int | None = None, detail: str = ""):
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class Reply:
    """A whole answer: its text, why it ended (``stop``, ``length``) and its length in tokens."""

    text: str
    finish_reason: str | None
    completion_tokens: int | None


class ModelClient:
    """An OpenAI-compatible model server at ``base_url`` (ending in ``/v1``).

    Args:
        api_key: sent as the bearer token; the key stays in this object.
        timeout: seconds per request (None: the openai client's default).
        start_hint: what to do when nothing answers (e.g. "start one with `make serve`").
        key_hint: how this program's user passes the API key.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float | None = None,
        start_hint: str = "start one with `make serve`",
        key_hint: str = "pass --api-key or set API_KEY",
    ):
        from openai import OpenAI

        self.url = base_url
        self.start_hint, self.key_hint = start_hint, key_hint
        # vLLM without --api-key accepts any token; the client insists on one. No retries:
        # a server that is down should say so at once, not after backing off.
        options = {} if timeout is None else {"timeout": timeout}
        self._client = OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=0, **options)

    @contextmanager
    def _errors(self):
        """The openai client's errors as :class:`ServerError`; anything else passes unchanged."""
        import openai

        try:
            yield
        except openai.APIConnectionError as exc:
            raise ServerError(f"no model server at {self.url} — {self.start_hint}", "no_server") from exc
        except openai.AuthenticationError as exc:
            raise ServerError(
                f"the model server at {self.url} wants an API key — {self.key_hint}",
                "needs_key",
                exc.status_code,
                exc.message,
            ) from exc
        except openai.APIStatusError as exc:
            raise ServerError(
                f"the model server at {self.url} said {exc.status_code}: {exc.message}",
                "server_said",
                exc.status_code,
                exc.message,
            ) from exc

    def names(self) -> list[str]:
        """The served model names (base, adapters, alias), sorted."""
        with self._errors():
            return sorted(m.id for m in self._client.models.list().data)

    def _request(self, model: str, messages: list[dict], max_tokens: int, temperature: float, **options) -> dict:
        extra_body = {**NO_THINKING, **options.pop("extra_body", {})}
        return dict(
            model=model,
            messages=messages,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=0.8 if temperature > 0 else 1.0,  # Qwen3's advice for non-thinking sampling
            extra_body=extra_body,
            **options,
        )

    def stream(self, model: str, messages: list[dict], max_tokens: int, temperature: float, **options) -> Iterator[str]:
        """The answer's pieces as the server streams them. ``options``: more request fields
        (``seed``; ``extra_body`` for vLLM's own, e.g. ``{"ignore_eos": True}``)."""
        with self._errors():
            stream = self._client.chat.completions.create(
                **self._request(model, messages, max_tokens, temperature, **options), stream=True
            )
            with stream:  # a consumer that stops early closes the connection
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        yield chunk.choices[0].delta.content

    def complete(self, model: str, messages: list[dict], max_tokens: int, temperature: float, **options) -> Reply:
        """The whole answer in one response (``options`` as for :meth:`stream`)."""
        with self._errors():
            reply = self._client.chat.completions.create(
                **self._request(model, messages, max_tokens, temperature, **options)
            )
        choice = reply.choices[0]
        return Reply(
            choice.message.content or "", choice.finish_reason, reply.usage.completion_tokens if reply.usage else None
        )
