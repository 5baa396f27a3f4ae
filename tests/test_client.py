"""mediagent/client.py against a stand-in OpenAI-compatible server on 127.0.0.1: the real
openai client speaks real HTTP (JSON and server-sent events) to it. What the requests carry
(key, no-thinking flag, sampling), what comes back (pieces, whole answer, token count) and
what each failure becomes (one line naming the server and what to do). A real vLLM server
answers the same client in tests/test_serve.py, tests/test_ui.py and tests/test_cli.py."""

from __future__ import annotations

import json
import socket
import threading
from http.server import ThreadingHTTPServer

import pytest

from mediagent.client import NO_THINKING, ModelClient, ServerError
from mediagent.errors import UserError
from tests.openai_standin import OpenAIHandler

KEY = "sk-test"
MODELS = ("medqa", "base")


class Handler(OpenAIHandler):
    """/v1/models and /v1/chat/completions (whole or streamed) as vLLM answers them; 401
    without the key, 404 for a model it does not serve. Request bodies go to ``server.bodies``."""

    def authorized(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {KEY}":
            return True
        self.reply({"error": {"message": "Unauthorized", "type": "invalid_request_error", "code": 401}}, 401)
        return False

    def do_GET(self):
        if self.authorized():
            self.reply_models(MODELS)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append(body)
        if not self.authorized():
            return
        if body["model"] not in MODELS:
            return self.reply(
                {
                    "error": {
                        "message": f"The model `{body['model']}` does not exist.",
                        "type": "NotFoundError",
                        "code": 404,
                    }
                },
                404,
            )
        # vLLM's first streamed chunk carries the role, no text
        pieces = ["", "发烧", "先量", "体温。"]
        usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
        self.reply_chat(body, pieces, finish_reason="length", usage=usage)


@pytest.fixture()
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.bodies = []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def url_of(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/v1"


QUESTION = [{"role": "system", "content": "你是医生。"}, {"role": "user", "content": "发烧怎么办？"}]


def test_lists_models_and_streams_pieces_with_the_projects_request(server):
    client = ModelClient(url_of(server), KEY)
    assert client.names() == ["base", "medqa"]
    assert list(client.stream("medqa", QUESTION, 16, 0.7)) == ["发烧", "先量", "体温。"]
    body = server.bodies[-1]
    assert body["stream"] is True and body["messages"] == QUESTION and body["max_tokens"] == 16
    assert body["chat_template_kwargs"] == NO_THINKING["chat_template_kwargs"]
    assert (body["temperature"], body["top_p"]) == (0.7, 0.8)


def test_whole_answer_with_its_token_count_and_extra_fields(server):
    reply = ModelClient(url_of(server), KEY).complete("base", QUESTION, 3, 0, seed=0, extra_body={"ignore_eos": True})
    assert (reply.text, reply.finish_reason, reply.completion_tokens) == ("发烧先量体温。", "length", 3)
    body = server.bodies[-1]
    assert "stream" not in body and (body["temperature"], body["top_p"], body["seed"]) == (0, 1.0, 0)
    assert body["ignore_eos"] is True and body["chat_template_kwargs"] == {"enable_thinking": False}


def test_no_server_is_one_line_naming_the_url_and_what_to_do():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    client = ModelClient(url, start_hint="start one with `make serve`")
    for ask in (
        client.names,
        lambda: list(client.stream("medqa", QUESTION, 4, 0)),
        lambda: client.complete("medqa", QUESTION, 4, 0),
    ):
        with pytest.raises(ServerError) as err:
            ask()
        assert isinstance(err.value, UserError) and err.value.kind == "no_server"
        assert str(err.value) == f"no model server at {url} — start one with `make serve`"


def test_missing_key_and_unknown_model_say_so(server):
    url = url_of(server)
    with pytest.raises(ServerError) as err:
        ModelClient(url, key_hint="set API_KEY").names()
    assert err.value.kind == "needs_key" and err.value.status == 401
    assert str(err.value) == f"the model server at {url} wants an API key — set API_KEY"
    with pytest.raises(ServerError) as err:
        list(ModelClient(url, KEY).stream("nope", QUESTION, 4, 0))
    assert (err.value.kind, err.value.status) == ("server_said", 404)
    assert "nope" in err.value.detail and str(err.value).startswith(f"the model server at {url} said 404: ")
    assert "\n" not in str(err.value)
