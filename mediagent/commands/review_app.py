"""Clinician review in the browser (`make ui`): an arena and a blind A/B review of served models.

Reads  the running ``make serve`` through its OpenAI-compatible API (``/v1/models``, chat
       completions; default ``http://<serve.host>:<serve.port>/v1``), the processed test
       split ``<data.processed_dir>/test.jsonl`` (questions and reference answers),
       ``review.answers_file`` and ``review.judgments_file``; params ``data``,
       ``process.system_prompt``, ``serve``, ``review``.
Writes ``review.answers_file`` (each model's answer to each review question, generated once
       and reused so every reviewer judges the same text) and ``review.judgments_file`` (one
       line per judgment, on disk before the next question is shown).

Run:  ``mediagent review-app [--port SERVER_PORT] [--server-url URL] [--ui-port 7860]``
      ``[--host 127.0.0.1] [--allow-remote] [--allow-host HOST ...]``, or ``make ui [PORT=]``
      ``[UI_PORT=] [HOST=] [SERVER_URL=] [ALLOWED_HOSTS=]``; ``API_KEY`` in the environment is
      sent to the model server. ``--server-url`` may carry a path (a server behind a prefix).

- **Arena**: one question, answers streamed side by side from 2-4 served models, with the
  training system prompt and chat format (through mediagent/client.py, as ``mediagent chat``).
- **Blind review**: a reviewer names themself once, picks two models, and judges test
  questions one by one: the reference answer and the two answers labelled A/B in an order
  drawn per question from ``review.seed`` (the same for every reviewer). Restarting resumes
  at the first question this reviewer has not judged for that pair.

Safety: the page is plain HTML with one script of our own; model text only ever reaches
the page through ``textContent`` (never parsed as HTML or Markdown), and a Content
Security Policy forbids inline and foreign scripts as a second line of defence. The API
key stays in this process (never sent to the browser, never written to review files). The
app binds to 127.0.0.1 and refuses any other address without ``--allow-remote``; on
loopback it also rejects requests whose Host header is not loopback (DNS rebinding), or
one of the ``--allow-host`` names: a reverse proxy that forwards its own Host (PAI-DSW's
gateway) is allowed by name, any other host stays refused.

Under a prefix: the page and its script use relative URLs only, so the app works unchanged
behind a reverse proxy that strips a path prefix (PAI-DSW shows it at
``https://<gateway>/<instance>/proxy/7860/``; open it with the trailing slash).

Languages: the page speaks Chinese (zh-CN) and English, from one message table
(``review_app_assets/messages.json``). The server picks the language of each page load (the
reviewer's saved choice, a cookie the page's switch sets, else Chinese when Accept-Language
prefers zh, else English) and writes it into ``<html lang>``. Errors the page shows carry a
stable ``code`` (and ``values``) beside the English ``error`` text, and the page shows the
code's message. Review files never depend on the language: the page sends codes (A, B,
tie), not labels.

The app is FastAPI + uvicorn (already in the environment as vLLM's own server stack)
serving static files: no front-end build, no CDN, nothing fetched from the internet.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import click
from pydantic import BaseModel, Field

from mediagent.blind_review import Review, UIError
from mediagent.client import ModelClient, ServerError
from mediagent.errors import setup_logging
from mediagent.judgments import ReviewFileError
from mediagent.net import LOOPBACK_NAMES, is_loopback, local_url
from mediagent.params import Params, load_params

log = logging.getLogger(__name__)

ASSETS = Path(__file__).with_name("review_app_assets")
MAX_ARENA_MODELS = 4
# Only our own script and stylesheet run; inline script/handlers (what an injected
# <script> or onerror= would need) are refused by the browser even if text became HTML.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


LANGUAGES = ("zh-CN", "en")  # the tables of review_app_assets/messages.json
LANG_COOKIE = "mediagent_lang"  # set by the page's language switch (app.js)


# ---------------------------------------------------------------- pure functions


def check_bind_host(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback address unless the operator asked for it explicitly."""
    if not is_loopback(host) and not allow_remote:
        raise UIError(
            f"refusing to listen on {host}: the review app has no login, so anyone who can reach it "
            f"can read answers and record judgments. Use 127.0.0.1 (the default), or pass "
            f"--allow-remote (make ui ALLOW_REMOTE=1) on a trusted network"
        )


def check_allow_hosts(names: tuple[str, ...]) -> None:
    """Each ``--allow-host`` is one host name (``*.example.com`` allowed): no port, no URL, and
    not ``*``, which would switch the Host check off."""
    bad = [n for n in names if n == "*" or not n or any(c in n for c in ":/ ")]
    if bad:
        raise UIError(
            f"--allow-host {', '.join(map(repr, bad))}: give a host name without scheme, port or path "
            f"(e.g. dsw-gateway.example.com; ALLOWED_HOSTS= for make ui), never '*'"
        )


def page_language(accept_language: str | None, saved: str | None = None) -> str:
    """The page's language: ``saved`` (the reviewer's choice) when valid, else zh-CN when
    Accept-Language ranks a zh tag (zh, zh-CN, zh-TW, ...) above every en tag, else en."""
    if saved in LANGUAGES:
        return saved
    ranked = []  # (-q, position, language): highest q first, then the header's order
    for position, item in enumerate((accept_language or "").split(",")):
        tag, *params = (part.strip() for part in item.split(";"))
        q = 1.0
        for param in params:
            if param.startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        primary = tag.split("-")[0].lower()
        if primary in ("zh", "en") and q > 0:
            ranked.append((-q, position, primary))
    return "zh-CN" if ranked and min(ranked)[2] == "zh" else "en"


# ---------------------------------------------------------------- model server access


class Models:
    """The model server (mediagent/client.py) asked with the training system prompt; the key
    never leaves the client.

    Requests run concurrently: the arena asks every chosen model at once. Mixed batches of
    base and adapter requests are right on the CPU build too (mediagent/vllm_lora_fix.py).
    """

    def __init__(self, url: str, api_key: str | None, system_prompt: str):
        self.url = url
        self.system = system_prompt
        self.client = ModelClient(
            url,
            api_key,
            timeout=600,
            start_hint="start one with `make serve` (and pass its PORT to make ui)",
            key_hint="set API_KEY for make ui",
        )

    def names(self) -> list[str]:
        return self.client.names()

    def messages(self, question: str) -> list[dict]:
        return [{"role": "system", "content": self.system}, {"role": "user", "content": question}]

    def stream(self, model: str, question: str, max_tokens: int, temperature: float) -> Iterator[str]:
        """Answer pieces as the server streams them."""
        return self.client.stream(model, self.messages(question), max_tokens, temperature)

    def answer(self, model: str, question: str, max_tokens: int, temperature: float) -> str:
        return self.client.complete(model, self.messages(question), max_tokens, temperature, seed=0).text.strip()


def error_body(message: str, code: str, **values) -> dict:
    """What the page gets for a failure: the English message, and the code (with values)
    that the page turns into ``error.<code>`` of messages.json in the reviewer's language."""
    return {"error": message, "code": code, "values": values}


def upstream_error(exc: Exception, url: str) -> dict:
    """The error body for a failed request to the model server (the kinds of ServerError)."""
    if not isinstance(exc, ServerError):
        return error_body(str(exc), code="model_server", detail=str(exc))
    if exc.kind == "no_server":
        return error_body(str(exc), code="no_server", url=url)
    if exc.kind == "needs_key":
        return error_body(str(exc), code="needs_key", url=url)
    return error_body(str(exc), code="server_said", url=url, status=exc.status, detail=exc.detail)


# ---------------------------------------------------------------- web app

# Request bodies, at module level: with postponed annotations FastAPI resolves a route's
# parameter types in the module's namespace, not in that of the function adding the route.


class ArenaAsk(BaseModel):
    model: str
    question: str = Field(min_length=1)
    max_tokens: int = Field(default=512, ge=1)
    temperature: float = Field(default=0.7, ge=0)


class Pick(BaseModel):
    reviewer: str = Field(min_length=1, max_length=100)
    models: list[str] = Field(min_length=2, max_length=2)

    def pair(self) -> tuple[str, str]:
        if self.models[0] == self.models[1]:
            raise UIError("choose two different models", code="same_models")
        return tuple(sorted(self.models))  # type: ignore[return-value]


class Judge(Pick):
    question_id: str
    choice: str
    unsafe: list[str] = []
    comment: str = Field(default="", max_length=4000)


def create_app(params: Params, models: Models, trusted_hosts: list[str] | None):
    """The FastAPI app: static page + JSON API. ``trusted_hosts`` None accepts any Host header."""
    from fastapi import FastAPI
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    cfg = params.review
    review = Review(params, lambda model, q: models.answer(model, q.question, cfg.max_tokens, cfg.temperature))

    app = FastAPI(title="MediAgent review", docs_url=None, redoc_url=None, openapi_url=None)
    if trusted_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=trusted_hosts)
    add_guards(app)
    add_page(app)
    add_arena_api(app, params, models, review)
    add_review_api(app, models, review)
    return app


def add_guards(app) -> None:
    """Security headers on every response; our errors as JSON bodies the page can show."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(UIError)
    async def ui_error(_request, exc: UIError):
        return JSONResponse(error_body(str(exc), exc.code, **exc.values), status_code=400)

    @app.exception_handler(ReviewFileError)
    async def file_error(_request, exc: ReviewFileError):
        return JSONResponse(error_body(str(exc), code="review_file", detail=str(exc)), status_code=500)


def add_page(app) -> None:
    """The page (in the language of the request) and its static files."""
    from fastapi import Cookie, Header
    from fastapi.responses import HTMLResponse, Response
    from fastapi.staticfiles import StaticFiles

    page = (ASSETS / "index.html").read_text(encoding="utf-8")

    @app.get("/")
    def index(
        accept_language: str | None = Header(default=None), saved: str | None = Cookie(default=None, alias=LANG_COOKIE)
    ):
        lang = page_language(accept_language, saved)  # one of LANGUAGES, never the raw header
        return HTMLResponse(
            page.replace('<html lang="en">', f'<html lang="{lang}">', 1), headers={"Vary": "Accept-Language, Cookie"}
        )

    @app.get("/favicon.ico")
    def favicon():
        return Response(status_code=204)

    app.mount("/static", StaticFiles(directory=ASSETS), name="static")


def upstream_response(exc: Exception, url: str):
    """A failed request to the model server, as the page's 502."""
    from fastapi.responses import JSONResponse

    return JSONResponse(upstream_error(exc, url), status_code=502)


def add_arena_api(app, params: Params, models: Models, review: Review) -> None:
    """The page's config and the arena's streamed answers."""
    from fastapi.responses import JSONResponse, StreamingResponse

    cfg = params.review

    def upstream(exc: Exception) -> JSONResponse:
        return upstream_response(exc, models.url)

    @app.get("/api/config")
    def config():
        try:
            names = models.names()
        except Exception as exc:  # the page shows why instead of an empty list
            return upstream(exc)
        return {
            "models": names,
            "max_arena_models": MAX_ARENA_MODELS,
            "review_questions": len(review.questions),
            "arena_defaults": {"max_tokens": cfg.max_tokens, "temperature": 0.7},
        }

    @app.post("/api/arena")
    def arena(ask: ArenaAsk):
        try:
            served = models.names()
        except Exception as exc:
            return upstream(exc)
        if ask.model not in served:
            return JSONResponse(
                error_body(
                    f"model {ask.model!r} is not served (served: {', '.join(served)})",
                    code="model_not_served",
                    model=ask.model,
                    served=", ".join(served),
                ),
                status_code=404,
            )

        def lines() -> Iterator[str]:
            # One JSON object per line: {"text": piece} ... or an error body (the page tells them apart).
            try:
                for piece in models.stream(ask.model, ask.question, ask.max_tokens, ask.temperature):
                    yield json.dumps({"text": piece}, ensure_ascii=False) + "\n"
            except Exception as exc:  # after the headers: the error travels in the body
                yield json.dumps(upstream_error(exc, models.url), ensure_ascii=False) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson", headers={"X-Accel-Buffering": "no"})


def add_review_api(app, models: Models, review: Review) -> None:
    """The blind review: the next item for a reviewer and pair, and recording a judgment."""

    def upstream(exc: Exception):
        return upstream_response(exc, models.url)

    @app.post("/api/review/next")
    def review_next(pick: Pick):
        try:
            return review.next_item(pick.reviewer.strip(), pick.pair())
        except (UIError, ReviewFileError):
            raise
        except Exception as exc:
            return upstream(exc)

    @app.post("/api/review/judge")
    def review_judge(judge: Judge):
        pair = judge.pair()
        try:
            record = review.record(
                judge.reviewer.strip(), pair, judge.question_id, judge.choice, judge.unsafe, judge.comment
            )
            return {"recorded": record["question_id"], "next": review.next_item(judge.reviewer.strip(), pair)}
        except (UIError, ReviewFileError):
            raise
        except Exception as exc:
            return upstream(exc)


def main(
    params: Params,
    host: str = "127.0.0.1",
    ui_port: int = 7860,
    server: str | None = None,
    port: int | None = None,
    api_key: str | None = None,
    allow_remote: bool = False,
    allow_hosts: tuple[str, ...] = (),
) -> None:
    """Check the bind address, build the app, serve until Ctrl-C. ``allow_hosts``: Host
    names accepted besides loopback (a reverse proxy's own)."""
    import uvicorn

    check_bind_host(host, allow_remote)
    check_allow_hosts(allow_hosts)
    url = server or f"{local_url(params.serve.host, port or params.serve.port)}/v1"
    models = Models(url, api_key, params.process.system_prompt)
    trusted = [*LOOPBACK_NAMES, "[::1]", *allow_hosts] if is_loopback(host) else None
    app = create_app(params, models, trusted)
    shown = f"[{host}]" if ":" in host else host
    log.info("review app on http://%s:%d (model server %s)", shown, ui_port, url)
    uvicorn.run(app, host=host, port=ui_port, log_level="warning")


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the app listens on.")
@click.option("--ui-port", default=7860, show_default=True, help="Port of the app.")
@click.option("--port", type=int, help="Port of the model server (default serve.port).")
@click.option("--server-url", help="Model server URL, e.g. http://10.0.0.5:8000/v1 (overrides --port).")
@click.option("--api-key", envvar="API_KEY", help="Bearer token of the model server (env API_KEY).")
@click.option("--allow-remote", is_flag=True, help="Allow a non-loopback --host (no login: trusted networks only).")
@click.option(
    "--allow-host",
    "allow_hosts",
    multiple=True,
    metavar="HOST",
    help="Also accept this Host header, e.g. a reverse proxy's own (PAI-DSW's gateway); repeatable.",
)
def command(host, ui_port, port, server_url, api_key, allow_remote, allow_hosts) -> None:
    """Arena and blind review of the served models in the browser (make ui)."""
    setup_logging()
    main(load_params(), host, ui_port, server_url, port, api_key, allow_remote, allow_hosts)
