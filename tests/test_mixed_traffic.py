"""Every answer from the model that was asked, under mixed concurrent traffic (CPU build).

One `mediagent serve` with two adapters, the alias and runtime slots filled by `serve load`:
every LoRA slot holds an adapter, which is when vLLM's CPU ops used to give base tokens the
last slot's delta (index -1). Then concurrent greedy requests mixing the base and every
adapter must each equal that model's answer to the same request sent alone, and for the
adapters peft's. ``MEDIAGENT_VLLM_PLUGINS=none`` runs the server without the fix
(vLLM's ``VLLM_PLUGINS``), to see this test fail on the unpatched ops.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.test_serve import (
    API_KEY,
    MAX_TOKENS,
    SYSTEM,
    chat,
    make_adapter,
    peft_greedy,
    running_server,
    stage_env,
    vllm_skip_reason,
    write_project,
)

QUESTIONS = ["头疼怎么办？", "孩子发烧38.5度怎么办？", "胃痛吃什么药？", "失眠多梦怎么调理？"]


@pytest.fixture(scope="module")
def served(tmp_path_factory, repo_params, tiny_base):
    reason = vllm_skip_reason()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("mixed")
    adapters = {
        name: make_adapter(tiny_base, root / name, r=8, seed=seed) for seed, name in enumerate(("a", "b", "c", "d"))
    }
    project = write_project(root / "project", repo_params, tiny_base, adapters["a"])
    env = {"API_KEY": API_KEY}
    if os.environ.get("MEDIAGENT_VLLM_PLUGINS"):  # to show the failure without the fix
        env["VLLM_PLUGINS"] = os.environ["MEDIAGENT_VLLM_PLUGINS"]
    with running_server(
        project, ["--adapter", f"{adapters['a']},{adapters['b']}", "--runtime-lora"], root / "serve.log", "a", **env
    ) as srv:
        # the two runtime slots (serve.runtime_max_loras) get adapters c and d
        for name in ("c", "d"):
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "mediagent",
                    "serve",
                    "load",
                    "--adapter",
                    str(adapters[name]),
                    "--name",
                    name,
                    "--port",
                    srv.url.rsplit(":", 1)[1],
                ],
                cwd=project,
                env=stage_env(API_KEY=API_KEY),
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert out.returncode == 0, out.stderr[-2000:]
        lineage = {n: json.loads((p / "lineage.json").read_text())["name"] for n, p in adapters.items()}
        models = {"base": None, lineage["a"]: "a", lineage["b"]: "b", "medqa": "a", "c": "c", "d": "d"}
        assert {m.id for m in srv.client().models.list().data} == set(models)
        yield srv, models, adapters, lineage


def _ids(reply) -> list[int]:
    return list(reply.choices[0].token_ids)


def test_mixed_concurrent_answers_equal_solo_and_peft(served, tiny_base):
    from mediagent.chat_format import ChatFormat, conversation
    from mediagent.loading import load_tokenizer

    srv, models, adapters, lineage = served
    client = srv.client()
    # alone, one at a time: every model (so every LoRA slot has held its adapter) x every question
    solo = {
        (m, q): _ids(chat(client, m, question=q, extra_body={"return_token_ids": True}))
        for m in models
        for q in QUESTIONS
    }
    tok = load_tokenizer(tiny_base)
    prompt = ChatFormat.of(tok).prompt_ids(conversation(SYSTEM, QUESTIONS[0]))
    for model, source in models.items():  # the solo answers are the right model's (peft, float32)
        want = peft_greedy(tiny_base, adapters[source] if source else None, prompt, MAX_TOKENS)
        assert solo[(model, QUESTIONS[0])] == want, model
    assert len({tuple(solo[(m, QUESTIONS[0])]) for m in ("base", "medqa", lineage["b"], "c", "d")}) == 5  # all differ

    jobs = [(m, q) for q in QUESTIONS for m in models] * 2  # 48 requests, the base among five adapter names
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(
            pool.map(
                lambda job: _ids(chat(client, job[0], question=job[1], extra_body={"return_token_ids": True})), jobs
            )
        )
    wrong = [(m, q) for (m, q), ids in zip(jobs, got) if ids != solo[(m, q)]]
    print(
        f"\n{len(jobs)} concurrent requests over {len(models)} models: {len(wrong)} wrong "
        f"({sum(m == 'base' for m, _ in wrong)} of them base)"
    )
    assert not wrong, f"{len(wrong)} of {len(jobs)} answers came from another model: {wrong[:6]}"


def test_64_concurrent_streams_over_three_models(served):
    srv, models, _, lineage = served
    client = srv.client()
    three = ["base", "medqa", lineage["b"]]
    solo = {(m, q): chat(client, m, question=q).choices[0].message.content for m in three for q in QUESTIONS}

    def stream(i: int) -> tuple[str, str, str]:
        m, q = three[i % 3], QUESTIONS[i % len(QUESTIONS)]
        pieces = []
        for chunk in chat(client, m, question=q, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
        return m, q, "".join(pieces)

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(stream, range(64)))  # an error in any stream raises here
    assert len(results) == 64
    wrong = [(m, q) for m, q, text in results if text != solo[(m, q)]]
    assert not wrong, wrong[:6]
    with urllib.request.urlopen(f"{srv.url}/health", timeout=10) as r:  # still healthy
        assert r.status == 200
