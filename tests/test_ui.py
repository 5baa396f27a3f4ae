"""`make ui` in a real headless browser against a real vLLM server (base + a LoRA adapter).

One vLLM server for the module (the `server` fixture of the serve tests: models `base`, the
adapter's lineage name and `medqa`), headless Chromium (Debian's ``chromium`` and
``chromium-driver``, installed by the `chromium` fixture when missing; one browser whose
Accept-Language is English, one whose is Chinese), and the app started as ``mediagent
review-app`` in a project folder with a small test split. Every test builds what it reads, so
they pass alone and in any order: a test that reads judgments gets an app of its own on a
fresh folder (``review_app``), and a test that reads the page's language sets it first.

Set ``MEDQA_UI_SCREENSHOTS=<folder>`` to save screenshots of both tabs and of the Chinese
review page there (docs/ holds the README's; Chinese needs a CJK font, e.g. fonts-noto-cjk).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from mediagent.blind_review import ab_order
from mediagent.commands.review_app import ASSETS, LANGUAGES, page_language

# The serve tests' module-scoped fixtures: one tiny base + adapter and one vLLM server here.
from tests.test_serve import API_KEY, adapter, free_port, project, server, stage_env  # noqa: F401

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1100,850",
]
QUESTIONS = [  # (id, question, reference)
    ("q-fever", "孩子发烧38.5度，精神还可以，需要马上去医院吗？", "精神好可先物理降温，超过三天或精神差及时就医。"),
    ("q-cough", "咳嗽两周了还没好，需要拍胸片吗？", "咳嗽超过两周建议就诊，医生会决定是否拍胸片。"),
    ("q-sleep", "晚上总是失眠怎么办？", "规律作息，睡前少看手机，长期失眠请看睡眠门诊。"),
]
SCRIPT = '<script>window.__xss = 1; alert(1)</script><img src=x onerror="window.__xss = 2">'
MARKUP = "**bold** <b>not bold</b> &amp; [link](javascript:alert(1))"
MAX_TOKENS = 16
# every judgment line holds these (mediagent.judgments), in either page language
JUDGMENT_FIELDS = {
    "reviewer",
    "question_id",
    "model_a",
    "model_b",
    "choice",
    "winner",
    "unsafe",
    "comment",
    "seed",
    "answer_md5",
    "time",
}
WAIT_S = 180


# ---------------------------------------------------------------- browser


@pytest.fixture(scope="session")
def chromium() -> None:
    """Debian's chromium + chromium-driver, installed with apt when missing (CI runs as root)."""
    if Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists():
        return
    if shutil.which("apt-get") is None:
        pytest.skip(f"{CHROMIUM} / {CHROMEDRIVER} missing and no apt-get to install chromium, chromium-driver")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]):
        out = subprocess.run(sudo + cmd, capture_output=True, text=True, env=env, timeout=1200)
        if out.returncode:
            pytest.skip(
                f"could not install chromium ({' '.join(cmd)} exited {out.returncode}): "
                f"{(out.stderr or out.stdout).strip()[-500:]}"
            )
    assert Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists(), "apt installed chromium but not at /usr/bin"


def chrome(accept_language: str, *flags: str):
    """Headless Chromium that sends ``accept_language`` (and takes extra command-line ``flags``).
    Headless Chromium ignores --lang: the intl.accept_languages pref sets the header (and
    navigator.languages)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROME_FLAGS, *flags):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"intl.accept_languages": accept_language})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    return driver


@pytest.fixture(scope="module")
def browser(chromium):
    driver = chrome("en-US,en")
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def browser_zh(chromium):
    driver = chrome("zh-CN,zh")
    yield driver
    driver.quit()


def wait(driver, condition, what: str, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition, message=f"timed out waiting for {what}")


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def select(driver, element_id: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(by_id(driver, element_id)).select_by_value(value)


def screenshot(driver, name: str) -> None:
    folder = os.environ.get("MEDQA_UI_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / name))


# ---------------------------------------------------------------- the app


@pytest.fixture(scope="module")
def ui_project(project, tmp_path_factory) -> Path:
    """The serve tests' project plus a 3-question test split and small review answers."""
    root = tmp_path_factory.mktemp("ui-project")
    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    params["data"]["processed_dir"] = str(root / "processed")
    params["review"].update(max_tokens=MAX_TOKENS, max_questions=10)
    (root / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    (root / "processed").mkdir()
    system = params["process"]["system_prompt"]
    rows = [
        {
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": q},
                {"role": "assistant", "content": a},
            ],
            "question_id": qid,
            "ans_id": f"a-{qid}",
        }
        for qid, q, a in QUESTIONS
    ]
    (root / "processed" / "test.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return root


class App:
    def __init__(self, cwd: Path, server_url: str):
        self.cwd, self.server_url = cwd, server_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = cwd / f"ui-{self.port}.log"

    def start(self) -> App:
        port = self.server_url.rsplit(":", 1)[1]
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mediagent", "review-app", "--ui-port", str(self.port), "--port", port],
                cwd=self.cwd,
                env=stage_env(API_KEY=API_KEY),
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        start = time.monotonic()
        while True:
            assert self.proc.poll() is None, f"mediagent.commands.review_app exited:\n{self.log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(self.url + "/", timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() - start < 60, (
                f"mediagent.commands.review_app not up in 60 s:\n{self.log.read_text()[-3000:]}"
            )
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            # uvicorn shuts down cleanly, then re-raises the signal it caught
            assert self.proc.wait(timeout=30) in (0, -signal.SIGTERM), self.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def app(ui_project, server):
    ui = App(ui_project, server.url).start()
    yield ui
    ui.stop()


@pytest.fixture
def review_app(ui_project, server, tmp_path):
    """The app in a folder of its own: the module's params (and so its test split), no cached
    answers and no judgments yet, whatever other tests judged."""
    shutil.copy(ui_project / "params.yaml", tmp_path / "params.yaml")
    ui = App(tmp_path, server.url).start()
    yield ui
    ui.stop()


def get(url: str, headers: dict | None = None) -> tuple[int, dict, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def review_stage(cwd: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "mediagent.pipeline.review"],
        cwd=cwd,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads((cwd / "metrics" / "review.json").read_text(encoding="utf-8"))


def reference_answer(server, system: str, model: str, question: str) -> str:
    reply = server.client().chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    return reply.choices[0].message.content


# ---------------------------------------------------------------- tests (in order)


def test_refuses_non_loopback_host_without_flag(ui_project):
    out = subprocess.run(
        [sys.executable, "-m", "mediagent", "review-app", "--host", "0.0.0.0", "--ui-port", str(free_port())],
        cwd=ui_project,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert "refusing to listen on 0.0.0.0" in out.stderr and "--allow-remote" in out.stderr


def test_page_headers_no_key_and_host_check(app):
    status, headers, html = get(app.url + "/")
    assert status == 200 and "script-src 'self'" in headers["content-security-policy"]
    assert '<script src="static/app.js"' in html  # relative: works under a proxy's prefix (test_ui_proxy)
    status, _, body = get(app.url + "/api/config")
    assert status == 200 and set(json.loads(body)["models"]) >= {"base", "medqa"}
    for path in ("/", "/static/app.js", "/api/config"):
        assert API_KEY not in get(app.url + path)[2]
    assert get(app.url + "/", headers={"Host": "evil.example"})[0] == 400  # DNS rebinding


def test_arena_streams_two_served_models(app, browser, server, ui_project):
    from selenium.webdriver.common.by import By

    browser.get(app.url + "/")
    wait(browser, lambda d: len(by_id(d, "arena-model-1").find_elements(By.TAG_NAME, "option")) >= 3, "model list")
    select(browser, "arena-model-1", "base")
    select(browser, "arena-model-2", "medqa")
    by_id(browser, "arena-question").send_keys(QUESTIONS[0][1])
    for field, value in (("arena-max-tokens", MAX_TOKENS), ("arena-temperature", 0)):
        by_id(browser, field).clear()
        by_id(browser, field).send_keys(str(value))
        assert by_id(browser, field).get_attribute("value") == str(value)
    by_id(browser, "arena-ask").click()
    panes = wait(
        browser,
        lambda d: (
            (p := d.find_elements(By.CSS_SELECTOR, "#arena-answers .pane"))
            and len(p) == 2
            and all(x.get_attribute("data-done") == "1" for x in p)
            and p
        ),
        "both answers",
    )
    system = yaml.safe_load((ui_project / "params.yaml").read_text(encoding="utf-8"))["process"]["system_prompt"]
    shown = {}
    for pane in panes:
        model = pane.get_attribute("data-model")
        assert pane.get_attribute("data-error") is None, pane.text
        text = pane.find_element(By.TAG_NAME, "pre").get_attribute("textContent")
        # streamed: the answer came as several pieces, each appended as it arrived (how many
        # network reads carried them depends on the machine's load, so that is not asserted)
        assert int(pane.get_attribute("data-pieces")) >= 2, (model, pane.get_attribute("data-pieces"))
        shown[model] = text
    assert set(shown) == {"base", "medqa"} and shown["base"] != shown["medqa"]
    # asked at once: each pane's first piece came before the other's last one
    first = {p.get_attribute("data-model"): float(p.get_attribute("data-first")) for p in panes}
    last = {p.get_attribute("data-model"): float(p.get_attribute("data-last")) for p in panes}
    assert first["base"] < last["medqa"] and first["medqa"] < last["base"], (first, last)
    # Each pane holds exactly its own model's greedy answer, although the two requests were
    # batched together on the server (base tokens get no adapter delta: vllm_lora_fix).
    for model, text in shown.items():
        assert text == reference_answer(server, system, model, QUESTIONS[0][1]), model
    # offline by construction: every resource the page loaded came from the app itself
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(url.startswith(app.url + "/") for url in loaded), loaded
    if os.environ.get("MEDQA_UI_SCREENSHOTS"):  # sampled answers: the random base's greedy one is blank lines
        by_id(browser, "arena-temperature").clear()
        by_id(browser, "arena-temperature").send_keys("0.7")
        select(browser, "arena-model-3", server.adapter_name)
        by_id(browser, "arena-ask").click()
        wait(
            browser,
            lambda d: (
                len(p := d.find_elements(By.CSS_SELECTOR, "#arena-answers .pane")) == 3
                and all(x.get_attribute("data-done") == "1" for x in p)
            ),
            "three answers",
        )
        screenshot(browser, "ui-arena.png")


def _start_review(browser, app, reviewer: str | None):
    from selenium.webdriver.common.by import By

    browser.get(app.url + "/")
    wait(browser, lambda d: len(by_id(d, "review-model-1").find_elements(By.TAG_NAME, "option")) >= 3, "models")
    by_id(browser, "tab-review").click()
    if reviewer is not None:
        by_id(browser, "reviewer").clear()
        by_id(browser, "reviewer").send_keys(reviewer)
    select(browser, "review-model-1", "base")
    select(browser, "review-model-2", "medqa")
    by_id(browser, "review-start").click()
    return _shown_item(browser)


def _shown_item(browser, not_id: str | None = None) -> str:
    def ready(d):
        item = by_id(d, "review-item")
        qid = item.get_attribute("data-question-id")
        return item.is_displayed() and qid and qid != not_id and qid

    return wait(browser, ready, "a review question")


def _judgments(ui_project: Path) -> list[dict]:
    path = ui_project / "review" / "judgments.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def test_review_records_resumes_after_restart_and_renders_text(review_app, browser):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    app, folder = review_app, review_app.cwd
    pair = ("base", "medqa")
    # Answers for the second question are already in the cache (as a served model could
    # write them): markup must come out as the very same characters.
    a2, b2 = ab_order(0, QUESTIONS[1][0], pair)
    cache = folder / "review" / "answers.jsonl"
    cache.parent.mkdir(exist_ok=True)
    cache.write_text(
        "".join(
            json.dumps({"model": m, "question_id": QUESTIONS[1][0], "answer": t}, ensure_ascii=False) + "\n"
            for m, t in ((a2, SCRIPT), (b2, MARKUP))
        ),
        encoding="utf-8",
    )
    app.stop()
    app.start()  # the cache is read at start

    assert review_stage(folder)["judgments"] == 0
    qid = _start_review(browser, app, "dr-test")
    assert qid == QUESTIONS[0][0]
    assert by_id(browser, "review-question").get_attribute("textContent") == QUESTIONS[0][1]
    assert by_id(browser, "review-reference").get_attribute("textContent") == QUESTIONS[0][2]
    model_a, model_b = ab_order(0, qid, pair)
    cached = {
        (r["model"], r["question_id"]): r["answer"]
        for r in map(json.loads, cache.read_text(encoding="utf-8").splitlines())
    }
    assert by_id(browser, "answer-a").get_attribute("textContent") == cached[(model_a, qid)]
    assert by_id(browser, "answer-b").get_attribute("textContent") == cached[(model_b, qid)]
    by_id(browser, "unsafe-b").click()
    by_id(browser, "review-comment").send_keys("B 的建议不够谨慎")
    screenshot(browser, "ui-review.png")
    by_id(browser, "choose-a").click()
    assert _shown_item(browser, not_id=qid) == QUESTIONS[1][0]

    [first] = _judgments(folder)
    assert (first["reviewer"], first["question_id"], first["choice"]) == ("dr-test", qid, "A")
    assert (first["model_a"], first["model_b"], first["winner"]) == (model_a, model_b, model_a)
    assert first["unsafe"] == [model_b] and first["comment"] == "B 的建议不够谨慎"
    metrics = review_stage(folder)
    base_wins = int(model_a == "base")
    assert metrics["judgments"] == 1 and metrics["reviewers"] == 1
    assert {k: metrics["pairs"]["base vs medqa"][k] for k in ("wins", "losses", "ties")} == {
        "wins": base_wins,
        "losses": 1 - base_wins,
        "ties": 0,
    }
    assert metrics["unsafe"][model_b] == {"answers": 1, "flagged": 1, "rate": 1.0}

    # Restart: the reviewer comes back (name remembered by the browser) to the next unjudged question.
    app.stop()
    app.start()
    qid2 = _start_review(browser, app, None)
    assert by_id(browser, "reviewer").get_attribute("value") == "dr-test"
    assert qid2 == QUESTIONS[1][0]
    # The cached markup shows literally: no element was made of it, no script ran.
    assert by_id(browser, "answer-a").get_attribute("textContent") == SCRIPT
    assert by_id(browser, "answer-b").get_attribute("textContent") == MARKUP
    assert by_id(browser, "answer-a").text == SCRIPT
    for pane in ("answer-a", "answer-b"):
        assert by_id(browser, pane).find_elements(By.XPATH, "./*") == []
    assert browser.execute_script("return window.__xss === undefined")
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018
    by_id(browser, "choose-tie").click()
    assert _shown_item(browser, not_id=qid2) == QUESTIONS[2][0]

    judgments = _judgments(folder)
    assert [j["question_id"] for j in judgments] == [QUESTIONS[0][0], QUESTIONS[1][0]]
    assert judgments[1]["choice"] == "tie" and judgments[1]["winner"] is None
    metrics = review_stage(folder)
    assert metrics["judgments"] == 2 and metrics["pairs"]["base vs medqa"]["ties"] == 1
    assert metrics["pairs"]["base vs medqa"]["judgments"] == 2
    for name in ("judgments.jsonl", "answers.jsonl"):
        assert API_KEY not in (folder / "review" / name).read_text(encoding="utf-8")


def test_other_reviewer_starts_at_the_first_question_and_no_double_judgment(review_app):
    def post(path: str, body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(
            review_app.url + path,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    # dr-test judges the first question (its answers are generated then and cached)
    status, first = post("/api/review/next", {"reviewer": "dr-test", "models": ["base", "medqa"]})
    assert status == 200 and first["question_id"] == QUESTIONS[0][0], first
    status, body = post(
        "/api/review/judge",
        {"reviewer": "dr-test", "models": ["base", "medqa"], "question_id": QUESTIONS[0][0], "choice": "A"},
    )
    assert status == 200 and body["recorded"] == QUESTIONS[0][0] and body["next"]["question_id"] == QUESTIONS[1][0]

    status, item = post("/api/review/next", {"reviewer": "dr-other", "models": ["medqa", "base"]})
    assert status == 200 and item["question_id"] == QUESTIONS[0][0] and item["position"] == 1
    # the same texts as dr-test saw: they come from the cache
    cache = {
        (r["model"], r["question_id"]): r["answer"]
        for r in map(json.loads, (review_app.cwd / "review" / "answers.jsonl").read_text(encoding="utf-8").splitlines())
    }
    model_a, model_b = ab_order(0, QUESTIONS[0][0], ("base", "medqa"))
    assert (item["answer_a"], item["answer_b"]) == (first["answer_a"], first["answer_b"])
    assert (item["answer_a"], item["answer_b"]) == (
        cache[(model_a, QUESTIONS[0][0])],
        cache[(model_b, QUESTIONS[0][0])],
    )
    status, body = post(
        "/api/review/judge",
        {"reviewer": "dr-test", "models": ["base", "medqa"], "question_id": QUESTIONS[0][0], "choice": "B"},
    )
    assert status == 400 and "already judged" in body["error"]
    assert [(j["reviewer"], j["choice"]) for j in _judgments(review_app.cwd)] == [("dr-test", "A")]


# ---------------------------------------------------------------- languages

MESSAGES = json.loads((ASSETS / "messages.json").read_text(encoding="utf-8"))
CJK = re.compile(r"[\u4e00-\u9fff]")


def _render(lang: str, key: str, values: dict) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: str(values[m.group(1)]), MESSAGES[lang][key])


def _open(driver, app, reload: bool = False) -> None:
    """Load (or reload) the page and wait until the script has written its texts and the models."""
    from selenium.webdriver.common.by import By

    if reload:
        driver.refresh()
    else:
        driver.get(app.url + "/")
    wait(driver, lambda d: len(by_id(d, "review-model-1").find_elements(By.TAG_NAME, "option")) >= 3, "models")


def _assert_page_in(driver, lang: str) -> None:
    """<html lang>, the title, every text and placeholder the page shows: all from ``lang``'s table."""
    assert driver.execute_script("return document.documentElement.lang") == lang
    assert driver.title == MESSAGES[lang]["app.title"]
    shown = driver.execute_script("""return [...document.querySelectorAll('[data-i18n]')].map(
        (el) => [el.dataset.i18n, JSON.parse(el.dataset.i18nValues || '{}'), el.textContent])""")
    assert len(shown) >= 25, shown
    for key, values, text in shown:
        assert text == _render(lang, key, values), (key, text)
    for field, key in (
        ("arena-question", "arena.question_placeholder"),
        ("reviewer", "review.reviewer_placeholder"),
        ("review-comment", "review.comment_placeholder"),
    ):
        assert by_id(driver, field).get_attribute("placeholder") == MESSAGES[lang][key]
    pressed = {b: by_id(driver, f"lang-{b}").get_attribute("aria-pressed") for b in LANGUAGES}
    assert pressed == {b: str(b == lang).lower() for b in LANGUAGES}


def test_page_language_follows_accept_language(app, browser, browser_zh):
    for driver in (browser, browser_zh):  # no choice saved by another test: the header decides
        driver.get(app.url + "/")
        driver.delete_all_cookies()
    # the server picks it from the header: the HTML it sends already says so
    assert '<html lang="zh-CN">' in get(app.url + "/", headers={"Accept-Language": "zh-TW,zh;q=0.9,en;q=0.8"})[2]
    assert '<html lang="en">' in get(app.url + "/", headers={"Accept-Language": "en-GB,zh;q=0.5"})[2]

    _open(browser_zh, app)  # Accept-Language: zh-CN,zh
    _assert_page_in(browser_zh, "zh-CN")
    buttons = {
        name: by_id(browser_zh, name).get_attribute("textContent")
        for name in ("tab-arena", "tab-review", "arena-ask", "review-start", "choose-a", "choose-tie", "choose-b")
    }
    assert buttons == {
        "tab-arena": "竞技场",
        "tab-review": "盲评",
        "arena-ask": "提问",
        "review-start": "开始",
        "choose-a": "A 更好",
        "choose-tie": "平局",
        "choose-b": "B 更好",
    }
    assert all(CJK.search(text) for text in buttons.values())
    assert by_id(browser_zh, "reviewer").get_attribute("placeholder") == "您的姓名"
    assert by_id(browser_zh, "server-status").text == "已部署 3 个模型；评审题 3 道"  # written by the script
    # the empty-answer note comes from the table too (CSS reads it)
    note = browser_zh.execute_script(
        "return getComputedStyle(document.documentElement).getPropertyValue('--empty-answer')"
    )
    assert json.loads(note) == "（空回答）"

    _open(browser, app)  # Accept-Language: en-US,en
    _assert_page_in(browser, "en")
    assert by_id(browser, "review-start").get_attribute("textContent") == "Start"
    assert not CJK.search(by_id(browser, "server-status").text)


def test_language_switch_overrides_the_header_and_persists(app, browser_zh):
    _open(browser_zh, app)
    by_id(browser_zh, "lang-en").click()
    _assert_page_in(browser_zh, "en")  # at once, the script's statuses too
    assert by_id(browser_zh, "server-status").text == "3 models served; 3 review questions"
    _open(browser_zh, app, reload=True)  # the browser still prefers Chinese; the choice wins
    _assert_page_in(browser_zh, "en")
    assert by_id(browser_zh, "tab-review").get_attribute("textContent") == "Blind review"
    by_id(browser_zh, "lang-zh-CN").click()
    _open(browser_zh, app, reload=True)
    _assert_page_in(browser_zh, "zh-CN")


def test_judgments_do_not_depend_on_the_page_language(review_app, browser_zh):
    app, pair = review_app, ("base", "medqa")
    _open(browser_zh, app)
    by_id(browser_zh, "lang-zh-CN").click()  # whatever another test chose: the page in Chinese
    # Chinese page: judge the first question
    qid = _start_review(browser_zh, app, "张医生")
    _assert_page_in(browser_zh, "zh-CN")
    assert qid == QUESTIONS[0][0] and by_id(browser_zh, "review-progress").text == "第 1 题，共 3 题"
    by_id(browser_zh, "unsafe-b").click()
    by_id(browser_zh, "review-comment").send_keys("B 的建议不够谨慎")
    screenshot(browser_zh, "review-zh.png")
    by_id(browser_zh, "choose-a").click()
    qid2 = _shown_item(browser_zh, not_id=qid)
    # switch to English in the middle of the review: the question stays, its labels change
    by_id(browser_zh, "lang-en").click()
    _assert_page_in(browser_zh, "en")
    assert by_id(browser_zh, "review-progress").text == "Question 2 of 3"
    by_id(browser_zh, "unsafe-a").click()
    by_id(browser_zh, "choose-b").click()
    _shown_item(browser_zh, not_id=qid2)

    zh, en = _judgments(app.cwd)
    assert set(zh) == set(en) == JUDGMENT_FIELDS  # the fields a judgment always has
    assert (zh["reviewer"], zh["question_id"], zh["choice"], zh["comment"]) == ("张医生", qid, "A", "B 的建议不够谨慎")
    assert (en["reviewer"], en["question_id"], en["choice"], en["comment"]) == ("张医生", qid2, "B", "")
    for record, flagged in ((zh, "B"), (en, "A")):
        model_a, model_b = ab_order(0, record["question_id"], pair)
        shown_as = {"A": model_a, "B": model_b}
        assert (record["model_a"], record["model_b"]) == (model_a, model_b)
        assert record["winner"] == shown_as[record["choice"]] and record["unsafe"] == [shown_as[flagged]]
        # no label of either language in the record (the comment is the reviewer's own text)
        values = json.dumps({k: v for k, v in record.items() if k != "comment"}, ensure_ascii=False)
        assert not CJK.search(values.replace("张医生", ""))
        assert not any(MESSAGES["en"][k] in values for k in ("review.choose_a", "review.choose_b", "review.unsafe_a"))
    metrics = review_stage(app.cwd)
    assert metrics["judgments"] == 2 and metrics["reviewers"] == 1


# ---------------------------------------------------------------- pure functions (no server, no browser)


def test_ab_order_is_seeded_per_question_and_balanced():
    from mediagent.blind_review import ab_order

    orders = [ab_order(0, f"q{i}", ("medqa", "base")) for i in range(200)]
    assert all(set(o) == {"base", "medqa"} for o in orders)
    assert orders == [ab_order(0, f"q{i}", ("base", "medqa")) for i in range(200)]  # whoever picked them
    assert 70 < sum(o[0] == "base" for o in orders) < 130  # a fair coin, not a fixed side
    assert orders != [ab_order(1, f"q{i}", ("base", "medqa")) for i in range(200)]  # review.seed matters


def test_bind_host_and_test_split_checks(tmp_path):
    from mediagent.blind_review import UIError, load_questions
    from mediagent.commands.review_app import check_bind_host

    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_bind_host(host, allow_remote=False)
    for host in ("0.0.0.0", "192.168.1.5", "example.org"):
        with pytest.raises(UIError, match="--allow-remote"):
            check_bind_host(host, allow_remote=False)
        check_bind_host(host, allow_remote=True)
    with pytest.raises(UIError, match=r"test.jsonl: not found; run `dvc repro process`"):
        load_questions(tmp_path, 10)
    (tmp_path / "test.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "q"}], "question_id": 1}\n', encoding="utf-8"
    )
    with pytest.raises(UIError, match=r"test.jsonl:1: not a chat row"):
        load_questions(tmp_path, 10)


@pytest.mark.parametrize(
    ("header", "saved", "lang"),
    [
        ("zh-CN,zh;q=0.9,en;q=0.8", None, "zh-CN"),
        ("zh", None, "zh-CN"),
        ("zh-TW", None, "zh-CN"),
        ("ZH-hk, en", None, "zh-CN"),
        ("fr-FR,zh;q=0.8,en;q=0.5", None, "zh-CN"),  # zh ranked above en
        ("en;q=0.5, zh;q=0.8", None, "zh-CN"),  # q decides, not the order
        ("en-US,en;q=0.9", None, "en"),
        ("en-US,zh-CN;q=0.9", None, "en"),
        ("zh;q=0,en", None, "en"),  # q=0: not acceptable
        ("zh;q=x", None, "en"),
        ("de-DE,*", None, "en"),
        ("", None, "en"),
        (None, None, "en"),
        ("zh-CN", "en", "en"),  # the reviewer's choice wins
        ("en-US", "zh-CN", "zh-CN"),
        ("zh-CN", "fr", "zh-CN"),  # an unknown saved value is ignored
    ],
)
def test_page_language(header, saved, lang):
    assert page_language(header, saved) == lang


def test_message_tables_match_and_cover_every_key_the_page_uses():
    assert set(MESSAGES) == set(LANGUAGES)
    en, zh = MESSAGES["en"], MESSAGES["zh-CN"]
    assert set(en) == set(zh)
    for key in en:  # the same {values} in both, and a real translation
        assert sorted(re.findall(r"\{(\w+)\}", en[key])) == sorted(re.findall(r"\{(\w+)\}", zh[key])), key
        assert en[key].strip() and CJK.search(zh[key]), key
    html = (ASSETS / "index.html").read_text(encoding="utf-8")
    script = (ASSETS / "app.js").read_text(encoding="utf-8")
    # The codes the server sends: the app's own and the blind review's (mediagent/blind_review.py).
    app_source = "".join(
        path.read_text(encoding="utf-8")
        for path in (ASSETS.parent / "review_app.py", ASSETS.parent.parent / "blind_review.py")
    )
    in_html = set(re.findall(r'data-i18n(?:-placeholder|-title)?="([^"]+)"', html))
    in_script = set(re.findall(r'"((?:[a-z]+\.)+[a-z_]+)"', script))  # every key-like literal of the script
    from_server = {f"error.{code}" for code in re.findall(r'code="(\w+)"', app_source)}  # shown as error.<code>
    assert len(in_html) >= 25 and len(in_script) >= 15 and len(from_server) >= 8
    used = in_html | in_script | from_server
    assert used - set(en) == set(), "keys the page uses but the tables lack"
    assert set(en) - used == set(), "messages nothing uses"
