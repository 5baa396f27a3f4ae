"""`make ui` behind a path-stripping reverse proxy, as PAI-DSW shows it (`/<instance>/proxy/7860/`).

Three real HTTP servers on 127.0.0.1, all started here: a stand-in OpenAI-compatible model
server under a path (``/llm/v1``: what ``SERVER_URL`` with a path reaches), the review app
(``mediagent review-app --server-url ... --allow-host gateway.example``) and a reverse proxy
that serves it at ``/x/proxy/7860/``, strips that prefix and forwards the browser's own Host
(as DSW's gateway does) and logs every path it is asked for. Headless Chromium resolves
``gateway.example`` and ``other.example`` to 127.0.0.1 (--host-resolver-rules), so the Host
the app sees is the gateway's. The model server is a stand-in because the subject here is the
page's URLs and the Host check, not the model (tests/test_ui.py drives a real vLLM server).
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.openai_standin import OpenAIHandler
from tests.test_serve import free_port, stage_env
from tests.test_ui import by_id, chrome, chromium, select, wait  # noqa: F401 (chromium: a fixture)

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "/x/proxy/7860/"
GATEWAY = "gateway.example"
MODELS = ("base", "medqa")
QUESTIONS = [
    ("q-fever", "孩子发烧38.5度，需要马上去医院吗？", "精神好可先物理降温。"),
    ("q-cough", "咳嗽两周了还没好，需要拍胸片吗？", "咳嗽超过两周建议就诊。"),
]
RESOLVE = f"--host-resolver-rules=MAP {GATEWAY} 127.0.0.1, MAP other.example 127.0.0.1"


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler):
        super().__init__(("127.0.0.1", free_port()), handler)
        self.paths: list[str] = []  # every request path, in order
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server_address[1]


class ModelServer(OpenAIHandler):
    """/llm/v1/models and /llm/v1/chat/completions (whole or streamed), as vLLM answers them."""

    def do_GET(self):
        self.server.paths.append(self.path)
        if self.path != "/llm/v1/models":
            return self.reply({"error": "not found"}, 404)
        self.reply_models(MODELS)

    def do_POST(self):
        self.server.paths.append(self.path)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/llm/v1/chat/completions":
            return self.reply({"error": "not found"}, 404)
        text = f"{body['model']} 的回答：{body['messages'][-1]['content']}"
        self.reply_chat(body, [text[:4], text[4:]])  # streamed: two pieces


def proxy_handler(app_port: int):
    class Proxy(BaseHTTPRequestHandler):
        """Serves the app at PREFIX only: strips it, forwards method, headers (Host as the
        browser sent it) and body, and returns the app's answer; anything else is a 404."""

        def log_message(self, *args):
            pass

        def forward(self):
            self.server.paths.append(self.path)
            if not self.path.startswith(PREFIX):
                self.send_error(404, "outside the proxy's prefix")
                return
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            conn = http.client.HTTPConnection("127.0.0.1", app_port, timeout=60)
            conn.request(
                self.command,
                "/" + self.path[len(PREFIX) :],
                body=body or None,
                headers={k: v for k, v in self.headers.items() if k.lower() != "connection"},
            )
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status)
            for key, value in resp.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            conn.close()

        do_GET = do_POST = forward

    return Proxy


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(proxy, model server, app folder): the app behind the proxy, talking to the stand-in."""
    root = tmp_path_factory.mktemp("ui-proxy")
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["data"]["processed_dir"] = str(root / "processed")
    (root / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    (root / "processed").mkdir()
    system = params["process"]["system_prompt"]
    (root / "processed" / "test.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": system},
                        {"role": "user", "content": q},
                        {"role": "assistant", "content": a},
                    ],
                    "question_id": qid,
                },
                ensure_ascii=False,
            )
            + "\n"
            for qid, q, a in QUESTIONS
        ),
        encoding="utf-8",
    )
    models = Server(ModelServer)
    ui_port = free_port()
    log = root / "ui.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mediagent",
                "review-app",
                "--ui-port",
                str(ui_port),
                "--server-url",
                f"http://127.0.0.1:{models.port}/llm/v1",
                "--allow-host",
                GATEWAY,
            ],
            cwd=root,
            env=stage_env(),
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    start = time.monotonic()
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/", timeout=5).close()
            break
        except (urllib.error.URLError, OSError):
            assert time.monotonic() - start < 60, log.read_text()
            time.sleep(0.3)
    proxy = Server(proxy_handler(ui_port))
    yield proxy, models, root
    proxy.shutdown()
    models.shutdown()
    proc.terminate()
    proc.wait(timeout=30)


def via_proxy(proxy, host: str, path: str = "") -> tuple[int, str]:
    """GET PREFIX + path through the proxy with this Host header (stdlib: any Host can be sent)."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
    conn.request("GET", PREFIX + path, headers={"Host": f"{host}:{proxy.port}"})
    resp = conn.getresponse()
    result = resp.status, resp.read().decode()
    conn.close()
    return result


def test_gateway_host_allowed_any_other_refused(stack):
    proxy, _, _ = stack
    status, html = via_proxy(proxy, GATEWAY)
    assert status == 200 and 'src="static/app.js"' in html
    assert via_proxy(proxy, GATEWAY, "api/config")[0] == 200
    for host in ("other.example", "evil.gateway.example", "gateway.example.evil"):
        assert via_proxy(proxy, host) == (400, "Invalid host header"), host
        assert via_proxy(proxy, host, "api/config")[0] == 400, host


@pytest.mark.usefixtures("chromium")
def test_page_under_prefix_in_both_languages_records_a_judgment(stack):
    from selenium.webdriver.common.by import By

    proxy, models, root = stack
    url = f"http://{GATEWAY}:{proxy.port}{PREFIX}"
    messages = json.loads((ROOT / "mediagent/commands/review_app_assets/messages.json").read_text(encoding="utf-8"))
    first_request = len(proxy.paths)
    reviewer = f"dr-proxy-{time.monotonic_ns()}"  # this test's own judgments, whatever ran before
    for lang, accept in (("en", "en-US,en"), ("zh-CN", "zh-CN,zh")):
        driver = chrome(accept, RESOLVE)
        try:
            driver.get(url)
            wait(
                driver,
                lambda d: len(by_id(d, "review-model-1").find_elements(By.TAG_NAME, "option")) >= 2,
                "models",
                timeout=60,
            )
            assert driver.execute_script("return document.documentElement.lang") == lang
            assert driver.title == messages[lang]["app.title"]
            assert by_id(driver, "tab-review").text == messages[lang]["tab.review"]
            assert (
                by_id(driver, "server-status").text
                == {"en": "2 models served; 2 review questions", "zh-CN": "已部署 2 个模型；评审题 2 道"}[lang]
            )
            if lang == "zh-CN":
                by_id(driver, "tab-review").click()
                by_id(driver, "reviewer").send_keys(reviewer)
                select(driver, "review-model-1", "base")
                select(driver, "review-model-2", "medqa")
                by_id(driver, "review-start").click()
                wait(
                    driver,
                    lambda d: by_id(d, "review-item").get_attribute("data-question-id") == "q-fever",
                    "first question",
                    timeout=60,
                )
                assert by_id(driver, "review-question").get_attribute("textContent") == QUESTIONS[0][1]
                by_id(driver, "choose-a").click()
                wait(
                    driver,
                    lambda d: by_id(d, "review-item").get_attribute("data-question-id") == "q-cough",
                    "second question",
                    timeout=60,
                )
                # the language switch's cookie is kept by the page's own path, under the prefix
                by_id(driver, "lang-en").click()
                driver.refresh()
                wait(driver, lambda d: d.execute_script("return document.documentElement.lang") == "en", "English")
                assert by_id(driver, "tab-review").text == messages["en"]["tab.review"]
            loaded = driver.execute_script("""return performance.getEntries().filter(
                (e) => ['navigation', 'resource'].includes(e.entryType)).map((e) => e.name)""")
            assert loaded and all(name.startswith(url) for name in loaded), loaded
        finally:
            driver.quit()

    judged = [
        json.loads(line) for line in (root / "review" / "judgments.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    [mine] = [j for j in judged if j["reviewer"] == reviewer]
    assert (mine["question_id"], mine["choice"], sorted((mine["model_a"], mine["model_b"]))) == (
        "q-fever",
        "A",
        list(MODELS),
    )
    # every request the pages made reached the proxy under the prefix: the page, its script,
    # stylesheet, message table and API calls
    asked = proxy.paths[first_request:]
    outside = [p for p in asked if not p.startswith(PREFIX)]
    assert not outside, outside
    for path in (
        "",
        "static/app.js",
        "static/app.css",
        "static/messages.json",
        "api/config",
        "api/review/next",
        "api/review/judge",
    ):
        assert PREFIX + path in asked, (path, asked)
    # and the app reached the model server at the path of --server-url
    assert models.paths and all(p.startswith("/llm/v1/") for p in models.paths), models.paths


def test_allow_host_refuses_wildcards_ports_and_urls():
    from mediagent.commands.review_app import UIError, check_allow_hosts

    check_allow_hosts(("dsw-gateway.example.com", "*.example.com"))
    for bad in ("*", "gw.example:443", "https://gw.example", ""):
        with pytest.raises(UIError, match="--allow-host"):
            check_allow_hosts((bad,))


def test_chat_reaches_a_server_behind_a_path(stack):
    """`make chat SERVER_URL=...` with a path: the client asks under it and prints the answer."""
    _, models, root = stack
    first = len(models.paths)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mediagent",
            "chat",
            "--base-url",
            f"http://127.0.0.1:{models.port}/llm/v1",
            "--model",
            "medqa",
            "--question",
            "咳嗽怎么办？",
            "--temperature",
            "0",
        ],
        cwd=root,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "medqa 的回答：咳嗽怎么办？" in out.stdout
    assert models.paths[first:] and all(p.startswith("/llm/v1/") for p in models.paths[first:]), models.paths
