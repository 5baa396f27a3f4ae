"""The `process` stage on real cMedQA2 rows, the official candidate files and the embedded sample.

Every test runs the real ``main()`` (or the real DVC CLI) on real files in tmp_path.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pytest

from stages.fileio import read_jsonl
from stages.params import with_overrides
from stages.process import (
    DROP_REASONS,
    OUTPUT_FILES,
    CandidateLists,
    ProcessError,
    candidate_lines,
    chatml_lines,
    clean_texts,
    main,
    mask_pii,
    text_codes,
    unique_pairs,
)
from tests.conftest import ROOT, copy_repo

SPLIT_FILES = ("train.jsonl", "val.jsonl", "test.jsonl")


def _params(repo_params, raw: Path, tmp: Path, **process):
    return with_overrides(
        repo_params,
        data={"raw_dir": str(raw), "processed_dir": str(tmp / "processed")},
        process={"metrics_file": str(tmp / "metrics" / "process.json"), **process},
    )


def _run(repo_params, raw: Path, tmp: Path, **process) -> tuple[dict[str, bytes], dict]:
    main(_params(repo_params, raw, tmp, **process))
    out = tmp / "processed"
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    metrics = json.loads((tmp / "metrics" / "process.json").read_text(encoding="utf-8"))
    return {p.name: p.read_bytes() for p in out.iterdir()}, metrics


def _texts(sample: Path) -> dict[str, str]:
    return {name: (sample / name).read_text(encoding="utf-8") for name in ("question.csv", "answer.csv")}


def _write(raw: Path, files: dict[str, bytes]) -> Path:
    raw.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (raw / name).write_bytes(data)
    return raw


def _gbk_where_possible(text: str) -> tuple[bytes, int]:
    """GBK per line; a line with a character outside GBK goes GB18030 (its superset)."""
    out, fallback = [], 0
    for line in text.splitlines(keepends=True):
        try:
            out.append(line.encode("gbk"))
        except UnicodeEncodeError:
            out.append(line.encode("gb18030"))
            fallback += 1
    return b"".join(out), fallback


def _split_qids(outputs: dict[str, bytes]) -> dict[str, set[int]]:
    return {
        name.removesuffix(".jsonl"): {orjson.loads(line)["question_id"] for line in outputs[name].splitlines()}
        for name in SPLIT_FILES
    }


# ----------------------------------------------------------------------------- encodings


def test_same_output_for_every_encoding_and_line_ending(tmp_path, shared_sample, repo_params):
    texts = _texts(shared_sample)
    base, base_metrics = _run(repo_params, _write(tmp_path / "utf8", {k: v.encode() for k, v in texts.items()}), tmp_path / "o0")
    assert base_metrics["encoding"] == {"question": "utf-8", "answer": "utf-8"}
    assert base_metrics["rows_read"] == {"question": 500, "answer": 500}
    assert sum(base_metrics["examples"].values()) == 500

    # The real sample has exactly one character outside GBK (U+30FB in one question), so a
    # "GBK" question.csv can only hold that line in GB18030, and the file is then GB18030.
    q_gbk, fallback = _gbk_where_possible(texts["question.csv"])
    assert fallback == 1
    a_gbk = texts["answer.csv"].encode("gbk")  # every answer is GBK-encodable
    # Answers in GB18030 are byte-identical to GBK, so "gbk" is the right record for them.
    assert texts["answer.csv"].encode("gb18030") == a_gbk

    crlf = {k: v.replace("\n", "\r\n") for k, v in texts.items()}
    variants = {
        "utf-8-sig": ({k: b"\xef\xbb\xbf" + v.encode() for k, v in texts.items()}, ("utf-8-sig", "utf-8-sig")),
        "gbk": ({"question.csv": q_gbk, "answer.csv": a_gbk}, ("gb18030", "gbk")),
        "gb18030": ({k: v.encode("gb18030") for k, v in texts.items()}, ("gb18030", "gbk")),
        "crlf": ({k: v.encode() for k, v in crlf.items()}, ("utf-8", "utf-8")),
        "gbk-crlf": ({"question.csv": _gbk_where_possible(crlf["question.csv"])[0],
                      "answer.csv": crlf["answer.csv"].encode("gbk")}, ("gb18030", "gbk")),
    }
    for i, (name, (files, (q_enc, a_enc))) in enumerate(variants.items(), 1):
        outputs, metrics = _run(repo_params, _write(tmp_path / name, files), tmp_path / f"o{i}")
        assert metrics["encoding"] == {"question": q_enc, "answer": a_enc}, name
        for f in OUTPUT_FILES:
            assert outputs[f] == base[f], f"{name}: {f} differs from the UTF-8 run"


def test_gbk_file_with_one_bad_byte_names_offset_and_line(tmp_path, shared_sample, repo_params):
    texts = _texts(shared_sample)
    data = texts["answer.csv"].encode("gbk")
    cut = data.index(b"\n", len(data) // 2) + 5  # inside a row in the second half
    damaged = data[:cut] + b"\xff" + data[cut:]
    raw = _write(tmp_path / "raw", {"question.csv": texts["question.csv"].encode(), "answer.csv": damaged})
    line = damaged.count(b"\n", 0, cut) + 1
    with pytest.raises(ProcessError) as err:
        main(_params(repo_params, raw, tmp_path))
    msg = str(err.value)
    assert "answer.csv" in msg and f"byte offset {cut} " in msg and f"(line {line}," in msg


# ----------------------------------------------------------------------------- splits


def _official_raw(tmp: Path, sample: Path, candidates: Path) -> Path:
    raw = tmp / "raw"
    raw.mkdir(parents=True)
    for name in ("question.csv", "answer.csv"):
        shutil.copy(sample / name, raw / name)
    for name in ("dev_candidates.zip", "test_candidates.zip"):
        shutil.copy(candidates / name, raw / name)
    return raw


def _official_ids(candidates: Path, name: str) -> set[int]:
    with zipfile.ZipFile(candidates / f"{name}.zip") as zf:
        text = zf.read(f"{name}.txt").decode()
    return {int(row["question_id"]) for row in csv.DictReader(io.StringIO(text))}


def test_official_dev_test_ids_never_in_train_and_rerun_is_identical(tmp_path, shared_sample, shared_candidates, repo_params):
    raw = _official_raw(tmp_path, shared_sample, shared_candidates)
    outputs, metrics = _run(repo_params, raw, tmp_path / "a")
    dev, test = _official_ids(shared_candidates, "dev_candidates"), _official_ids(shared_candidates, "test_candidates")
    qids = _split_qids(outputs)
    assert metrics["split_method"] == "official"
    assert not qids["train"] & (dev | test)
    assert qids["val"] <= dev and qids["test"] <= test
    assert len(qids["val"]) + len(qids["test"]) == 32  # the sample's official dev/test questions
    assert len(qids["train"]) == 468
    assert metrics["questions"] == {"train": 468, "val": len(qids["val"]), "test": len(qids["test"])}
    # The sample's answers carry local ids, so no official candidate resolves: every list of
    # its test questions loses its true answers and is dropped, and says so.
    assert metrics["candidate_questions"] == 0
    assert metrics["dropped"]["candidate_lists_no_positive"] == len(qids["test"])
    assert metrics["dropped"]["candidates_answer_missing"] == 100 * len(qids["test"])

    again, metrics_again = _run(repo_params, raw, tmp_path / "b")
    assert again == outputs and metrics_again == metrics


def test_official_candidate_lists_keep_labels_and_order(tmp_path, shared_sample, shared_candidates, repo_params):
    """Answer texts for every id the real test lists use; one negative and one question removed."""
    raw = _official_raw(tmp_path, shared_sample, shared_candidates)
    with zipfile.ZipFile(shared_candidates / "test_candidates.zip") as zf:
        rows = list(csv.DictReader(io.StringIO(zf.read("test_candidates.txt").decode())))
    sample_q = {int(r["question_id"]) for r in csv.DictReader((raw / "question.csv").open(encoding="utf-8"))}
    lists = defaultdict(list)
    for r in rows:
        if int(r["question_id"]) in sample_q:
            lists[int(r["question_id"])].append((int(r["ans_id"]), int(r["label"])))
    qids = sorted(lists)
    assert len(qids) >= 3
    missing_neg = next(a for a, label in lists[qids[0]] if label == 0)
    short_q = qids[1]  # its text becomes too short: the whole list goes
    with (raw / "answer.csv").open("a", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        written = set()
        for qid in qids:
            for aid, label in lists[qid]:
                if aid == missing_neg or aid in written:
                    continue
                written.add(aid)
                # True answers belong to the question; negatives to a question not in the file.
                w.writerow([aid, qid if label else 1, f"候选答案{aid}，内容为测试而写。"])
    text = (raw / "question.csv").read_text(encoding="utf-8").splitlines()
    text = [f"{short_q},痛？" if line.startswith(f"{short_q},") else line for line in text]
    (raw / "question.csv").write_text("\n".join(text) + "\n", encoding="utf-8")

    outputs, metrics = _run(repo_params, raw, tmp_path / "o", min_question_chars=3)
    got = {r["question_id"]: r for r in map(orjson.loads, outputs["test_candidates.jsonl"].splitlines())}
    assert set(got) == set(qids) - {short_q}
    assert metrics["candidate_questions"] == len(qids) - 1
    assert metrics["dropped"]["candidates_answer_missing"] == lists[qids[0]].count((missing_neg, 0))
    assert metrics["dropped"]["candidate_lists_question_missing"] == 1
    for qid, rec in got.items():
        expected = [(a, label) for a, label in lists[qid] if a != missing_neg]
        assert [(c["ans_id"], c["label"]) for c in rec["candidates"]] == expected  # file order, official labels
        assert all(c["content"] == f"候选答案{c['ans_id']}，内容为测试而写。" for c in rec["candidates"])
        assert rec["system"] == repo_params.process.system_prompt and rec["question"]
    assert metrics["answers_without_questions"] > 0  # the negatives' made-up question id 1


def test_embedded_sample_keeps_answers_of_a_question_together(tmp_path, repo_params):
    raw = ROOT / "data" / "sample"
    outputs, metrics = _run(repo_params, raw, tmp_path)
    assert set(metrics) == {
        "rows_read", "encoding", "answers_without_questions", "questions_without_answers", "split_method",
        "candidate_lists_short", "official_test_questions_not_in_input", "dropped", "pii_masked", "examples",
        "questions", "candidate_questions", "candidates", "length",
    }
    assert set(metrics["dropped"]) == set(DROP_REASONS) and not any(metrics["dropped"].values())
    assert set(metrics["length"]) == {f"{w}_{s}" for w in ("question", "answer") for s in ("p50", "p95", "max")}
    assert metrics["rows_read"] == {"question": 102, "answer": 129}
    assert metrics["encoding"] == {"question": "utf-8", "answer": "gbk"}
    assert metrics["split_method"] == "hash"
    answers = defaultdict(set)
    with (raw / "answer.csv").open(encoding="gbk") as fh:
        for row in csv.DictReader(fh):
            answers[int(row["question_id"])].add(int(row["ans_id"]))
    multi = {q for q, a in answers.items() if len(a) > 1}
    assert len(multi) >= 20

    where = defaultdict(set)
    examples = defaultdict(set)
    for name in SPLIT_FILES:
        for ex in read_jsonl(tmp_path / "processed" / name):
            assert [m["role"] for m in ex["messages"]] == ["system", "user", "assistant"]
            assert ex["messages"][0]["content"] == repo_params.process.system_prompt
            where[ex["question_id"]].add(name)
            examples[ex["question_id"]].add(ex["ans_id"])
    assert all(len(s) == 1 for s in where.values())  # no question in two splits
    assert examples == answers  # every answer kept, under its own question
    assert {name for q in multi for name in where[q]} == set(SPLIT_FILES)  # multi-answer ones go everywhere

    # Cleaning that the sample exercises.
    text = b"".join(outputs[f] for f in SPLIT_FILES).decode()
    assert "[PHONE]" in text and "13912345678" not in text and metrics["pii_masked"]["phone"] == 1
    assert "<br>" not in text and "&lt;" not in text and "糖化血红蛋白要<7%" in text and "\u3000" not in text

    # Sampled candidates: own answers labelled 1, 9 negatives from other held-out questions.
    held_out = {a for q, s in where.items() if s & {"val.jsonl", "test.jsonl"} for a in answers[q]}
    test_q = {q for q, s in where.items() if s == {"test.jsonl"}}
    lists = read_jsonl(tmp_path / "processed" / "test_candidates.jsonl")
    assert {r["question_id"] for r in lists} == test_q
    for r in lists:
        pos = {c["ans_id"] for c in r["candidates"] if c["label"] == 1}
        neg = [c["ans_id"] for c in r["candidates"] if c["label"] == 0]
        assert pos == answers[r["question_id"]]
        assert len(neg) == repo_params.process.num_negatives == len(set(neg))
        assert set(neg) <= held_out - answers[r["question_id"]]


def test_first_answer_only_candidate_cap_and_limit(tmp_path, shared_sample, repo_params):
    raw = ROOT / "data" / "sample"
    first = {}
    with (raw / "answer.csv").open(encoding="gbk") as fh:
        for row in csv.DictReader(fh):
            first.setdefault(int(row["question_id"]), int(row["ans_id"]))  # ids ascend within a question
    _, metrics = _run(repo_params, raw, tmp_path / "a", answers_per_question="first")
    assert sum(metrics["examples"].values()) == len(first) == 102
    assert metrics["dropped"]["answer_not_first"] == 129 - 102
    seen = {}
    for name in SPLIT_FILES:
        for ex in read_jsonl(tmp_path / "a" / "processed" / name):
            seen[ex["question_id"]] = ex["ans_id"]
    assert seen == first

    _, metrics = _run(repo_params, raw, tmp_path / "c", max_candidate_questions=3, num_negatives=4)
    lists = read_jsonl(tmp_path / "c" / "processed" / "test_candidates.jsonl")
    assert metrics["candidate_questions"] == len(lists) == 3
    assert all(sum(c["label"] == 0 for c in r["candidates"]) == 4 for r in lists)

    outputs, metrics = _run(repo_params, shared_sample, tmp_path / "b", limit=50)
    assert sum(metrics["questions"].values()) == 50
    first50 = [int(line.split(",")[0]) for line in (shared_sample / "question.csv").read_text().splitlines()[1:51]]
    assert set().union(*_split_qids(outputs).values()) == set(first50)


# ----------------------------------------------------------------------------- pure functions


def test_clean_texts_and_mask_pii():
    raw = pa.array([
        "\u3000\u3000发烧&nbsp;三天\r\n怎么办？\u200b",
        "<p>血糖<7，体温>38</p><br/>&lt;b&gt;加粗&lt;/b&gt;",
        "a\x00b\x07c\td\u00a0\u00a0e",
        "",
    ])
    assert clean_texts(raw).to_pylist() == ["发烧 三天 怎么办？", "血糖<7，体温>38 加粗", "abc d e", ""]

    texts = pa.array([
        "电话13800138000,13900139000。",
        "身份证11010519491231002X，旧号110105194912310021",
        "邮件 zhang.san+qa@mail.example.com 谢谢",
        "订单号2013800138000123不是手机",
        "已经写了[PHONE]和13712345678",
    ])
    masked, counts = mask_pii(texts)
    assert masked.to_pylist() == [
        "电话[PHONE],[PHONE]。",
        "身份证[ID]，旧号[ID]",
        "邮件 [EMAIL] 谢谢",
        "订单号2013800138000123不是手机",
        "已经写了[PHONE]和[PHONE]",
    ]
    assert counts == {"id_card": 2, "phone": 3, "email": 1}


def test_chatml_lines_equal_orjson():
    pairs = pa.table({
        "question_id": pa.array([7, 8], pa.int64()),
        "ans_id": pa.array([70, 80], pa.int64()),
        "question": clean_texts(pa.array(['他说"头疼"\\怎么办', "普通问题"])),
        "answer": clean_texts(pa.array(["路径C:\\temp \"引号\"", "回答\t\u2028结束"])),
    })
    system = '系统"提示"'
    lines = chatml_lines(pairs, system).to_pylist()
    for line, row in zip(lines, pairs.to_pylist()):
        expected = {
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": row["answer"]},
            ],
            "question_id": row["question_id"],
            "ans_id": row["ans_id"],
        }
        assert line == orjson.dumps(expected).decode() + "\n"


def test_candidate_lines_equal_orjson():
    lists = CandidateLists(
        qids=np.array([5, 9]),
        questions=pa.array(['问"一"', "问二\\"]),
        group=np.array([0, 0, 1]),
        ans_ids=np.array([50, 51, 90]),
        contents=pa.array(["答\"甲\"", "答乙", "C:\\x"]),
        labels=np.array([1, 0, 1]),
    )
    lines = candidate_lines(lists, "系统").to_pylist()
    expected = [
        {"question_id": 5, "system": "系统", "question": '问"一"', "candidates": [
            {"ans_id": 50, "content": '答"甲"', "label": 1}, {"ans_id": 51, "content": "答乙", "label": 0}]},
        {"question_id": 9, "system": "系统", "question": "问二\\", "candidates": [
            {"ans_id": 90, "content": "C:\\x", "label": 1}]},
    ]
    assert lines == [orjson.dumps(e).decode() + "\n" for e in expected]


def test_duplicates_dropped_and_counted(tmp_path, shared_sample, repo_params):
    texts = _texts(shared_sample)
    q_lines = texts["question.csv"].splitlines(keepends=True)
    a_lines = texts["answer.csv"].splitlines(keepends=True)
    qid, text = q_lines[1].rstrip("\n").split(",", 1)
    aid, _, answer = a_lines[1].rstrip("\n").split(",", 2)
    extra_q = [q_lines[1], f"99999991,{text}\n"]  # same row again; same text under a new id
    extra_a = [
        a_lines[1],  # the same answer row again
        f"99999992,{qid},{answer}\n",  # same answer text under a new id, same question
        f"99999993,99999991,{answer}\n",  # same pair again under the new question id
        "99999994,99999991,另一个不同的回答，内容足够长。\n",  # a genuinely new pair
    ]
    raw = _write(tmp_path / "raw", {"question.csv": "".join(q_lines + extra_q).encode(),
                                     "answer.csv": "".join(a_lines + extra_a).encode()})
    outputs, metrics = _run(repo_params, raw, tmp_path)
    assert metrics["dropped"]["question_duplicate_rows"] == 1
    assert metrics["dropped"]["answer_duplicate_rows"] == 1
    assert metrics["dropped"]["duplicate_pairs"] == 2
    assert sum(metrics["examples"].values()) == 500 + 1
    ans_ids = {orjson.loads(line)["ans_id"] for f in SPLIT_FILES for line in outputs[f].splitlines()}
    assert int(aid) in ans_ids and 99999994 in ans_ids and not {99999992, 99999993} & ans_ids

    codes = text_codes(pa.array(["a", "b", "a", "a"]))
    assert unique_pairs(codes, pa.array(["x", "x", "x", "yy"])).tolist() == [True, True, False, True]


# ----------------------------------------------------------------------------- bad input


def _bad_cases(texts: dict[str, str]) -> dict[str, tuple[dict, dict, list[str]]]:
    """name -> (files to write/override (None = remove; str or bytes), process param overrides, message parts)."""
    q, a = texts["question.csv"], texts["answer.csv"]
    q_lines = q.splitlines(keepends=True)
    dup_id = q_lines[3].split(",")[0]
    conflict = q + f"{dup_id},这是同一个编号下的另一个问题？\n"
    non_int = q_lines[0] + q_lines[1] + "abc," + q_lines[2].split(",", 1)[1] + "".join(q_lines[3:])
    extra_field = a.splitlines(keepends=True)
    extra_field[7] = extra_field[7].rstrip("\n") + ",多出来的字段\n"
    a_bytes = a.encode()
    cut = a_bytes.index(b"\n", len(a_bytes) * 3 // 4) + 4  # inside a row, past the 64 KB head
    bad_utf8 = a_bytes[:cut] + b"\xff" + a_bytes[cut:]
    bad_line = bad_utf8.count(b"\n", 0, cut) + 1
    return {
        "undecodable byte": ({"answer.csv": bad_utf8}, {},
                             ["answer.csv", f"byte offset {cut} ", f"(line {bad_line},", "as utf-8"]),
        "missing file": ({"answer.csv": None}, {}, ["no answer table", "answer.csv", "make data"]),
        "renamed column": ({"question.csv": q.replace("question_id,content", "question_id,text", 1)}, {},
                           ["question.csv", "missing column(s) content", "rename"]),
        "tab delimiter": ({"answer.csv": a.replace(",", "\t")}, {}, ["answer.csv", "tab-separated", "','"]),
        "semicolon delimiter": ({"question.csv": q.replace(",", ";")}, {}, ["question.csv", "semicolon-separated"]),
        "empty file": ({"question.csv": ""}, {}, ["question.csv", "file is empty"]),
        "header only": ({"answer.csv": "ans_id,question_id,content\n"}, {}, ["answer.csv", "no data rows"]),
        "conflicting duplicate ids": ({"question.csv": conflict}, {},
                                      ["question.csv", f"question_id {dup_id} on data rows [3, 501]", "unique"]),
        "non-integer id": ({"question.csv": non_int}, {}, ["question.csv", "'question_id'", "data row 2", "'abc'"]),
        "extra field": ({"answer.csv": "".join(extra_field)}, {}, ["answer.csv", "Row #8", "Expected 3 columns, got 4"]),
        "nothing left": ({}, {"min_answer_chars": 1500, "max_answer_chars": 2000},
                         ["no question/answer pairs left", "answer_too_short"]),
        "half the official files": ({"dev_candidates.txt": "question_id,ans_id,cnt,label\n1,2,0,1\n"}, {},
                                    ["dev_candidates.txt is present but test_candidates"]),
    }


def test_bad_inputs_fail_clearly_and_keep_previous_outputs(tmp_path, shared_sample, repo_params):
    texts = _texts(shared_sample)
    # A previous good run whose outputs must survive every failure byte for byte.
    good = _write(tmp_path / "good", {k: v.encode() for k, v in texts.items()})
    before, _ = _run(repo_params, good, tmp_path)
    metrics_before = (tmp_path / "metrics" / "process.json").read_bytes()

    for name, (files, overrides, expected) in _bad_cases(texts).items():
        raw = tmp_path / f"raw-{name.replace(' ', '-')}"
        _write(raw, {k: v.encode() for k, v in texts.items()})
        for fname, content in files.items():
            if content is None:
                (raw / fname).unlink()
            else:
                (raw / fname).write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(ProcessError) as err:
            main(_params(repo_params, raw, tmp_path, **overrides))
        for part in expected:
            assert part in str(err.value), f"{name}: {part!r} not in {err.value}"
        after = {p.name: p.read_bytes() for p in (tmp_path / "processed").iterdir()}
        assert after == before, name
        assert (tmp_path / "metrics" / "process.json").read_bytes() == metrics_before, name
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [], name


def test_cli_runs_without_importing_pandas(tmp_path, repo_params):
    """The stage's speed relies on never loading pandas (pyarrow would import it on pa.array)."""
    params = repo_params.to_dict()
    params["data"] = {"raw_dir": str(ROOT / "data" / "sample"), "processed_dir": str(tmp_path / "processed")}
    params["process"]["metrics_file"] = str(tmp_path / "process.json")
    (tmp_path / "params.yaml").write_text(json.dumps(params, ensure_ascii=False), encoding="utf-8")
    code = ("import runpy, sys; sys.argv = ['stages.process']; runpy.run_module('stages.process', run_name='__main__');"
            " assert 'pandas' not in sys.modules, 'pandas was imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "processed").iterdir()) == sorted(OUTPUT_FILES)


def test_cli_exits_nonzero_with_the_message(tmp_path, repo_params):
    raw = _write(tmp_path / "raw", {"question.csv": b"question_id\tcontent\n1\tx\n", "answer.csv": b"ans_id,question_id,content\n1,1,y\n"})
    params = repo_params.to_dict()
    params["data"] = {"raw_dir": str(raw), "processed_dir": str(tmp_path / "processed")}
    (tmp_path / "params.yaml").write_text(json.dumps(params, ensure_ascii=False), encoding="utf-8")  # JSON is YAML
    proc = subprocess.run(
        [sys.executable, "-m", "stages.process"], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 1
    assert "process failed:" in proc.stderr and "tab-separated" in proc.stderr
    assert not (tmp_path / "processed").exists() and not (tmp_path / "metrics").exists()


# ----------------------------------------------------------------------------- dvc


def test_dvc_repro_runs_once_then_skips(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env)

    def repro() -> str:
        proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "process"], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout + proc.stderr

    first = repro()
    assert "Running stage 'process'" in first
    out = repo / "data" / "processed"
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    metrics = json.loads((repo / "metrics" / "process.json").read_text())
    assert metrics["encoding"]["answer"] == "gbk"
    mtimes = {p.name: p.stat().st_mtime_ns for p in [*out.iterdir(), repo / "metrics" / "process.json"]}

    second = repro()
    assert "Stage 'process' didn't change, skipping" in second
    assert "Running stage" not in second
    assert {p.name: p.stat().st_mtime_ns for p in [*out.iterdir(), repo / "metrics" / "process.json"]} == mtimes
