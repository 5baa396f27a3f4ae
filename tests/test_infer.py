"""Batch inference (`mediagent infer`) with vLLM's offline engine on the tiny base + LoRA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mediagent.fileio import read_jsonl

# The same module-scoped `adapter` and `project` fixtures as the server tests (one each here).
from tests.test_serve import QUESTION, adapter, peft_greedy, project, stage_env, vllm_skip_reason  # noqa: F401

MAX_TOKENS = 8


def _infer(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mediagent", "infer", *map(str, args)],
        cwd=project,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )


def test_answers_good_lines_reports_bad_ones(project, tiny_base, adapter, repo_params, tmp_path):
    reason = vllm_skip_reason()
    if reason:
        pytest.skip(reason)
    from mediagent.chat_format import ChatFormat, conversation
    from mediagent.loading import load_tokenizer

    lines = [
        json.dumps({"id": "a", "question": QUESTION}, ensure_ascii=False),  # 1 good
        '{"question": "头疼',  # 2 invalid JSON
        json.dumps({"id": "b"}),  # 3 no question
        "",  # 4 blank: ignored
        json.dumps({"question": "发烧了吃什么药？"}, ensure_ascii=False),  # 5 good, id = line
        json.dumps(["not", "an", "object"]),  # 6 not an object
        json.dumps({"id": "long", "question": "头疼" * 2100}, ensure_ascii=False),  # 7 > max_model_len
        json.dumps({"id": "c", "question": "   "}),  # 8 empty question
    ]
    inp, out, errors = tmp_path / "q.jsonl", tmp_path / "answers.jsonl", tmp_path / "errors.jsonl"
    inp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out.write_text("previous run\n")

    res = _infer(project, "--input", inp, "--output", out, "--errors", errors, "--max-tokens", MAX_TOKENS)
    assert res.returncode == 0, res.stderr[-4000:]

    rows = read_jsonl(out)
    name = json.loads((adapter / "lineage.json").read_text())["name"]
    assert [(r["id"], r["line"], r["question"]) for r in rows] == [("a", 1, QUESTION), (5, 5, "发烧了吃什么药？")]
    assert all(r["model"] == name and r["answer"] and 0 < r["completion_tokens"] <= MAX_TOKENS for r in rows)
    assert [e["line"] for e in read_jsonl(errors)] == [2, 3, 6, 7, 8]
    for n in (2, 3, 6, 7, 8):
        assert f"line {n}: " in res.stderr
    assert "5 line(s) of" in res.stderr and "skipped" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl", "errors.jsonl", "q.jsonl"]  # no temp left

    # the offline engine applies the adapter: its greedy answer is peft's
    tok = load_tokenizer(adapter)
    prompt = ChatFormat.of(tok).prompt_ids(conversation(repo_params.process.system_prompt, QUESTION))
    assert rows[0]["prompt_tokens"] == len(prompt)
    ref = peft_greedy(tiny_base, adapter, prompt, MAX_TOKENS)
    assert rows[0]["answer"] == tok.decode(ref, skip_special_tokens=True).strip()


def test_failed_run_keeps_previous_output(project, tmp_path):
    inp, out = tmp_path / "q.jsonl", tmp_path / "answers.jsonl"
    inp.write_text(json.dumps({"question": QUESTION}) + "\n")
    out.write_text("previous run\n")
    res = _infer(project, "--input", inp, "--output", out, "--adapter", tmp_path / "missing")
    assert res.returncode == 1 and f"no adapter at {tmp_path / 'missing'}" in res.stderr
    assert out.read_text() == "previous run\n"
    res = _infer(project, "--input", tmp_path / "nope.jsonl", "--output", out)
    assert res.returncode == 1 and "nope.jsonl: no such file" in res.stderr
    assert out.read_text() == "previous run\n"
