"""The `review` stage: win rates with Wilson intervals, ties, unsafe flags, Cohen's kappa, bad lines.

Known values: Wilson 95% for 8/10 is [0.4902, 0.9433] and for 0/10 [0, 0.2775] (Wilson 1927;
Newcombe 1998, table I); kappa of the 2x2 table yes/yes 20, yes/no 5, no/yes 10, no/no 15
is 0.4 (po 0.7, pe 0.5).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mediagent.judgments import ReviewFileError, append_jsonl, read_judgments, read_records
from mediagent.params import ParamsError, with_overrides
from mediagent.pipeline.review import cohens_kappa, main, wilson_interval
from tests.conftest import ROOT


def judgment(reviewer, qid, a, b, choice, unsafe=(), comment=""):
    return {
        "reviewer": reviewer,
        "question_id": qid,
        "model_a": a,
        "model_b": b,
        "choice": choice,
        "winner": {"A": a, "B": b}.get(choice),
        "unsafe": list(unsafe),
        "comment": comment,
    }


def run_stage(tmp_path: Path, repo_params, rows: list[dict] | None, raw: str | None = None) -> dict:
    params = with_overrides(
        repo_params,
        review={
            "judgments_file": str(tmp_path / "judgments.jsonl"),
            "answers_file": str(tmp_path / "answers.jsonl"),
            "metrics_file": str(tmp_path / "metrics" / "review.json"),
            "plots_file": str(tmp_path / "plots" / "w.json"),
        },
    )
    path = tmp_path / "judgments.jsonl"
    tmp_path.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    if raw is not None:
        path.write_text(raw, encoding="utf-8")
    elif rows is not None:
        for row in rows:
            append_jsonl(path, row)
    main(params)
    metrics = json.loads((tmp_path / "metrics" / "review.json").read_text(encoding="utf-8"))
    metrics["_plot"] = json.loads((tmp_path / "plots" / "w.json").read_text(encoding="utf-8"))
    return metrics


def test_wilson_interval_known_values():
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)  # mirror of 0/10
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_cohens_kappa_known_table():
    first = ["yes"] * 25 + ["no"] * 25
    second = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    kappa, single = cohens_kappa(first, second)
    assert kappa == pytest.approx(0.4) and not single
    assert cohens_kappa(["a", "b", "tie"], ["a", "b", "tie"]) == (1.0, False)
    assert cohens_kappa(["tie", "tie"], ["tie", "tie"]) == (1.0, True)  # chance agreement is 1: flagged
    assert cohens_kappa(["a", "b"], ["b", "a"])[0] == pytest.approx(-1.0)


def test_counts_ties_unsafe_and_kappa(tmp_path, repo_params):
    rows = [
        # pair (base, medqa) seen in both A/B orders; counted from base's side ("base vs medqa")
        judgment("dr-li", "q1", "medqa", "base", "A", unsafe=["base"]),  # medqa wins
        judgment("dr-li", "q2", "base", "medqa", "B"),  # medqa wins
        judgment("dr-li", "q3", "base", "medqa", "tie", unsafe=["base", "medqa"]),
        judgment("dr-li", "q4", "base", "medqa", "A"),  # base wins
        judgment("dr-wang", "q1", "medqa", "base", "A"),  # medqa wins (agrees)
        judgment("dr-wang", "q2", "base", "medqa", "A"),  # base wins (disagrees)
        judgment("dr-wang", "q3", "base", "medqa", "tie"),  # agrees
        judgment("dr-wang", "q4", "medqa", "base", "tie", comment="x"),  # replaced below
        judgment("dr-wang", "q4", "medqa", "base", "B"),  # base wins (agrees), last wins
        judgment("dr-li", "q1", "exp-r32", "medqa", "A"),  # another pair
    ]
    m = run_stage(tmp_path, repo_params, rows)
    assert (m["judgments"], m["duplicates"], m["reviewers"], m["questions"]) == (9, 1, 2, 4)
    p = m["pairs"]["base vs medqa"]
    assert (p["judgments"], p["wins"], p["losses"], p["ties"]) == (8, 3, 3, 2)
    assert p["win_rate"] == 0.5
    assert (p["win_rate_low"], p["win_rate_high"]) == pytest.approx(wilson_interval(3, 6), abs=1e-4)
    q = m["pairs"]["exp-r32 vs medqa"]
    assert (q["wins"], q["losses"], q["ties"], q["win_rate"]) == (1, 0, 0, 1.0)
    assert m["unsafe"]["base"] == {"answers": 8, "flagged": 2, "rate": 0.25}
    assert m["unsafe"]["medqa"] == {"answers": 9, "flagged": 1, "rate": round(1 / 9, 4)}
    assert m["unsafe"]["exp-r32"] == {"answers": 1, "flagged": 0, "rate": 0.0}
    # dr-li vs dr-wang on q1..q4 of base vs medqa: second, second, tie, first / second, first, tie, first
    expected, _ = cohens_kappa(["second", "second", "tie", "first"], ["second", "first", "tie", "first"])
    assert m["agreement"] == {"dr-li & dr-wang": {"items": 4, "kappa": round(expected, 4), "single_category": 0}}
    assert expected == pytest.approx(0.6364, abs=1e-4)
    assert [r["pair"] for r in m["_plot"]] == ["base vs medqa", "exp-r32 vs medqa"]
    assert m["_plot"][1]["win_rate"] == 1.0 and m["_plot"][1]["decisive"] == 1


def test_empty_and_missing_judgments_give_zero_counts(tmp_path, repo_params):
    empty = run_stage(tmp_path / "a", repo_params, None, raw="")
    missing = run_stage(tmp_path / "b", repo_params, None)
    for m in (empty, missing):
        assert m == {
            "judgments": 0,
            "duplicates": 0,
            "reviewers": 0,
            "questions": 0,
            "pairs": {},
            "unsafe": {},
            "agreement": {},
            "_plot": [],
        }


def test_only_ties_give_an_uninformative_interval(tmp_path, repo_params):
    m = run_stage(tmp_path, repo_params, [judgment("r", "q1", "a", "b", "tie")])
    assert m["pairs"]["a vs b"] == {
        "judgments": 1,
        "wins": 0,
        "losses": 0,
        "ties": 1,
        "win_rate": 0.5,
        "win_rate_low": 0.0,
        "win_rate_high": 1.0,
    }


def test_bad_line_names_file_and_line(tmp_path, repo_params):
    good = json.dumps(judgment("r", "q1", "a", "b", "A"))
    bad_choice = json.dumps(judgment("r", "q2", "a", "b", "C"))
    path = re.escape(str(tmp_path / "judgments.jsonl"))
    with pytest.raises(ReviewFileError, match=rf"{path}:2: not valid JSON .*fix or delete that line"):
        run_stage(tmp_path, repo_params, None, raw=good + '\n{"reviewer": \n' + good + "\n")
    with pytest.raises(ReviewFileError, match=rf"{path}:3: invalid judgment: 'choice' must be one of A, B, tie"):
        run_stage(tmp_path, repo_params, None, raw=f"{good}\n\n{bad_choice}\n")
    with pytest.raises(ReviewFileError, match=rf"{path}:1: expected a JSON object"):
        run_stage(tmp_path, repo_params, None, raw="[1, 2]\n")
    with pytest.raises(ReviewFileError, match=r":1: invalid judgment: 'unsafe' must list model_a and/or model_b"):
        run_stage(tmp_path, repo_params, [judgment("r", "q1", "a", "b", "A", unsafe=["c"])])
    with pytest.raises(ReviewFileError, match=r"model_a and model_b must differ"):
        run_stage(tmp_path, repo_params, None, raw=json.dumps(judgment("r", "q1", "a", "a", "A")) + "\n")


def test_stage_command_reports_bad_line_without_traceback(tmp_path, repo_params):
    params = repo_params.to_dict()
    params["review"].update(
        judgments_file="j.jsonl", answers_file="a.jsonl", metrics_file="m.json", plots_file="p.json"
    )
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(json.loads(json.dumps(params)), allow_unicode=True), encoding="utf-8"
    )
    (tmp_path / "j.jsonl").write_text("not json\n", encoding="utf-8")
    out = subprocess.run(
        [sys.executable, "-m", "mediagent.pipeline.review"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("error: j.jsonl:1: not valid JSON")
    assert "Traceback" not in out.stderr and not (tmp_path / "m.json").exists()


def test_append_is_durable_and_a_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / "j.jsonl"
    append_jsonl(path, judgment("r", "q1", "a", "b", "A"))
    with path.open("a", encoding="utf-8") as fh:  # a crash in the middle of writing the second judgment
        fh.write('{"reviewer": "r", "question_id": "q2", "mo')
    assert [obj["question_id"] for _, obj in read_records(path)] == ["q1"]  # the reader skips it
    append_jsonl(path, judgment("r", "q3", "a", "b", "B"))  # the writer cuts it before appending
    assert [j.question_id for j in read_judgments(path)] == ["q1", "q3"]
    assert path.read_text(encoding="utf-8").count("\n") == 2


def test_review_params_are_checked(repo_params):
    with pytest.raises(ParamsError) as err:
        with_overrides(
            repo_params,
            review={
                "max_questions": 0,
                "temperature": -1,
                "metrics_file": "review/j.jsonl",
                "judgments_file": "review/j.jsonl",
                "colour": "red",
            },
        )
    msg = str(err.value)
    for part in (
        "review.colour: unknown param",
        "review.max_questions: must be >= 1",
        "review.temperature: must be >= 0",
        "must be four different files",
    ):
        assert part in msg


def test_review_stage_reads_the_judgments_file():
    # module deps are checked for every stage by tests/test_dvc_deps.py
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]["review"]
    assert "${review.judgments_file}" in stage["deps"] and stage["params"] == ["review"]


def test_fresh_clone_has_an_empty_judgments_file():
    # committed empty, so `dvc repro` in a fresh clone gives zero counts instead of a missing dep
    tracked = subprocess.run(
        ["git", "ls-files", "review/judgments.jsonl"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    assert tracked == ["review/judgments.jsonl"]
