"""The `process` stage on the embedded sample, official-layout fixtures built from it, and the real files.

Every test runs the real ``main()`` (or the real DVC CLI) on real files in tmp_path. Only
the test of the real official candidate zips needs the cMedQA2 files beside the repo.
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
import pandas as pd
import pyarrow as pa
import pytest

from mediagent.fileio import read_jsonl
from mediagent.params import with_overrides
from mediagent.pipeline.process import (
    DROP_REASONS,
    OUTPUT_FILES,
    ProcessError,
    candidate_lines,
    chatml_line,
    main,
    split_ids,
)
from mediagent.text_clean import clean_texts, mask_pii
from tests.conftest import ROOT, copy_repo

SPLIT_FILES = ("train.jsonl", "val.jsonl", "test.jsonl")
SAMPLE = ROOT / "data" / "sample"  # 102 questions (UTF-8), 129 answers (GBK)


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


def _texts(sample: Path = SAMPLE) -> dict[str, str]:
    """The sample's tables as text (answer.csv is GBK on disk)."""
    return {
        "question.csv": (sample / "question.csv").read_text(encoding="utf-8"),
        "answer.csv": (sample / "answer.csv").read_text(encoding="gbk"),
    }


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


def test_same_output_for_every_encoding_and_line_ending(tmp_path, repo_params):
    texts = _texts()
    # One question with a character outside GBK (U+30FB, as in real cMedQA2 rows): a "GBK"
    # question.csv can only hold that line in GB18030, and the file is then GB18030.
    texts["question.csv"] += "10000999,孩子发烧・咳嗽三天了怎么办？\n"
    texts["answer.csv"] += "20000999,10000999,先测体温，多喝水，咳嗽加重或高烧不退请就医。\n"
    base, base_metrics = _run(
        repo_params, _write(tmp_path / "utf8", {k: v.encode() for k, v in texts.items()}), tmp_path / "o0"
    )
    assert base_metrics["encoding"] == {"question": "utf-8", "answer": "utf-8"}
    assert base_metrics["rows_read"] == {"question": 103, "answer": 130}
    assert sum(base_metrics["examples"].values()) == 130

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
        "gbk-crlf": (
            {
                "question.csv": _gbk_where_possible(crlf["question.csv"])[0],
                "answer.csv": crlf["answer.csv"].encode("gbk"),
            },
            ("gb18030", "gbk"),
        ),
    }
    for i, (name, (files, (q_enc, a_enc))) in enumerate(variants.items(), 1):
        outputs, metrics = _run(repo_params, _write(tmp_path / name, files), tmp_path / f"o{i}")
        assert metrics["encoding"] == {"question": q_enc, "answer": a_enc}, name
        for f in OUTPUT_FILES:
            assert outputs[f] == base[f], f"{name}: {f} differs from the UTF-8 run"


def test_gbk_file_with_one_bad_byte_names_offset_and_line(tmp_path, repo_params):
    data = (SAMPLE / "answer.csv").read_bytes()  # GBK as shipped
    cut = data.index(b"\n", len(data) // 2) + 5  # inside a row in the second half
    damaged = data[:cut] + b"\xff" + data[cut:]
    raw = _write(tmp_path / "raw", {"question.csv": (SAMPLE / "question.csv").read_bytes(), "answer.csv": damaged})
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


def test_real_official_candidate_zips_split_the_real_sample(tmp_path, shared_sample, shared_candidates, repo_params):
    """Subject: the real dev/test candidate zips (their layout, encoding and ids) with real cMedQA2 rows."""
    raw = _official_raw(tmp_path, shared_sample, shared_candidates)
    outputs, metrics = _run(repo_params, raw, tmp_path / "a")
    dev, test = _official_ids(shared_candidates, "dev_candidates"), _official_ids(shared_candidates, "test_candidates")
    qids = _split_qids(outputs)
    assert metrics["split_method"] == "official"
    assert metrics["encoding"]["dev_candidates"] == metrics["encoding"]["test_candidates"] == "utf-8"
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


def _candidate_rows(qids: list[int], answers: dict[int, list[int]]) -> dict[int, list[tuple[int, int]]]:
    """Official-layout lists: 100 (ans_id, label) per question, its own answers (label 1) first,
    then answers of other questions (label 0)."""
    all_answers = [a for q in answers for a in answers[q]]
    lists = {}
    for i, qid in enumerate(qids):
        others = [a for a in all_answers if a not in answers[qid]]
        others = others[7 * i % len(others) :] + others[: 7 * i % len(others)]  # a different mix per list
        lists[qid] = [(a, 1) for a in answers[qid]] + [(a, 0) for a in others[: 100 - len(answers[qid])]]
    return lists


def _candidate_file(lists: dict[int, list[tuple[int, int]]]) -> str:
    lines = ["question_id,ans_id,cnt,label"]
    for qid, rows in lists.items():
        lines += [f"{qid},{a},{cnt},{label}" for cnt, (a, label) in enumerate(rows)]
    return "\n".join(lines) + "\n"


def test_official_split_and_candidate_lists_keep_labels_and_order(tmp_path, repo_params):
    """dev/test candidate files in the official layout, built from the sample's own ids."""
    texts = _texts()
    answers = defaultdict(list)
    for row in csv.DictReader(io.StringIO(texts["answer.csv"])):
        answers[int(row["question_id"])].append(int(row["ans_id"]))
    qids = sorted(answers)
    dev_lists = _candidate_rows(qids[1::10], answers)
    test_lists = _candidate_rows(qids[5::10], answers)
    test_q = sorted(test_lists)
    missing_neg_q, short_q, no_pos_q = test_q[:3]
    # One negative that answer.csv lacks; one question whose text becomes too short (its whole
    # list goes); one list whose true answers answer.csv lacks; one question not in the input.
    test_lists[missing_neg_q][-1] = (29999999, 0)
    test_lists[no_pos_q] = [(28888800 + i, 1) if label else (a, 0) for i, (a, label) in enumerate(test_lists[no_pos_q])]
    test_lists[19999999] = [(a, int(i == 0)) for i, a in enumerate(answers[qids[0]] + answers[qids[1]])]
    questions = [
        f"{short_q},痛？" if line.startswith(f"{short_q},") else line for line in texts["question.csv"].splitlines()
    ]
    raw = _write(
        tmp_path / "raw",
        {
            "question.csv": ("\n".join(questions) + "\n").encode(),
            "answer.csv": (SAMPLE / "answer.csv").read_bytes(),
            "dev_candidates.txt": _candidate_file(dev_lists).encode(),  # as `make data` unzips it
        },
    )
    with zipfile.ZipFile(raw / "test_candidates.zip", "w") as zf:
        zf.writestr("test_candidates.txt", _candidate_file(test_lists))

    outputs, metrics = _run(repo_params, raw, tmp_path / "a", min_question_chars=3)
    split = _split_qids(outputs)
    assert metrics["split_method"] == "official"
    assert split["val"] == set(dev_lists) and split["test"] == set(test_q) - {short_q}
    assert split["train"] == set(qids) - set(dev_lists) - set(test_q)
    assert metrics["questions"] == {"train": len(split["train"]), "val": len(dev_lists), "test": len(test_q) - 1}

    examples = [orjson.loads(line) for f in SPLIT_FILES for line in outputs[f].splitlines()]
    question_text = {ex["question_id"]: ex["messages"][1]["content"] for ex in examples}
    # Candidates may be answers whose question left (short_q's): their cleaned text is expected too.
    rows = list(csv.DictReader(io.StringIO(texts["answer.csv"])))
    cleaned = mask_pii(clean_texts(pa.array([r["content"] for r in rows])).to_pylist())[0]
    answer_text = {int(r["ans_id"]): text for r, text in zip(rows, cleaned)}
    assert all(answer_text[ex["ans_id"]] == ex["messages"][2]["content"] for ex in examples)
    got = {r["question_id"]: r for r in map(orjson.loads, outputs["test_candidates.jsonl"].splitlines())}
    assert list(got) == sorted(set(test_q) - {short_q, no_pos_q})  # lists by question id
    for qid, rec in got.items():
        expected = [(a, label) for a, label in test_lists[qid] if a != 29999999]
        assert [(c["ans_id"], c["label"]) for c in rec["candidates"]] == expected  # file order, official labels
        assert all(c["content"] == answer_text[c["ans_id"]] for c in rec["candidates"])  # cleaned texts
        assert rec["question"] == question_text[qid] and rec["system"] == repo_params.process.system_prompt
    assert metrics["candidate_questions"] == len(got) and metrics["candidates"] == sum(
        len(r["candidates"]) for r in got.values()
    )
    assert metrics["official_test_questions_not_in_input"] == 1
    assert metrics["dropped"]["candidates_answer_missing"] == 1 + len(answers[no_pos_q])
    assert metrics["dropped"]["candidate_lists_question_missing"] == 1
    assert metrics["dropped"]["candidate_lists_no_positive"] == 1

    again, metrics_again = _run(repo_params, raw, tmp_path / "b", min_question_chars=3)
    assert again == outputs and metrics_again == metrics
    capped, metrics = _run(repo_params, raw, tmp_path / "c", min_question_chars=3, max_candidate_questions=2)
    assert [orjson.loads(line)["question_id"] for line in capped["test_candidates.jsonl"].splitlines()] == list(got)[:2]
    assert metrics["candidate_questions"] == 2


def test_embedded_sample_keeps_answers_of_a_question_together(tmp_path, repo_params):
    raw = SAMPLE
    outputs, metrics = _run(repo_params, raw, tmp_path)
    assert set(metrics) == {
        "rows_read",
        "encoding",
        "answers_without_questions",
        "questions_without_answers",
        "split_method",
        "candidate_lists_short",
        "official_test_questions_not_in_input",
        "dropped",
        "pii_masked",
        "examples",
        "questions",
        "candidate_questions",
        "candidates",
        "length",
        "twin_answers_moved",
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


def test_first_answer_only_candidate_cap_and_limit(tmp_path, repo_params):
    raw = SAMPLE
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

    outputs, metrics = _run(repo_params, raw, tmp_path / "b", limit=50)
    assert sum(metrics["questions"].values()) == 50
    first50 = [int(line.split(",")[0]) for line in (raw / "question.csv").read_text().splitlines()[1:51]]
    assert set().union(*_split_qids(outputs).values()) == set(first50)


# ----------------------------------------------------------------------------- pure functions


def test_clean_texts_and_mask_pii():
    raw = pa.array(
        [
            "\u3000\u3000发烧&nbsp;三天\r\n怎么办？\u200b",
            "<p>血糖<7，体温>38</p><br/>&lt;b&gt;加粗&lt;/b&gt;",
            "a\x00b\x07c\td\u00a0\u00a0e",
            "",
        ]
    )
    assert clean_texts(raw).to_pylist() == ["发烧 三天 怎么办？", "血糖<7，体温>38 加粗", "abc d e", ""]

    texts = [
        "电话13800138000,13900139000。",
        "身份证11010519491231002X，旧号110105194912310021",
        "邮件 zhang.san+qa@mail.example.com 谢谢",
        "订单号2013800138000123不是手机",
        "已经写了[PHONE]和13712345678",
    ]
    masked, counts = mask_pii(texts)
    assert masked == [
        "电话[PHONE],[PHONE]。",
        "身份证[ID]，旧号[ID]",
        "邮件 [EMAIL] 谢谢",
        "订单号2013800138000123不是手机",
        "已经写了[PHONE]和[PHONE]",
    ]
    assert counts == {"id_card": 2, "phone": 3, "email": 1}


def test_chatml_line_is_the_data_contract():
    question, answer, system = '他说"头疼"\\怎么办', '路径C:\\temp "引号"\u2028结束', '系统"提示"'
    line = chatml_line(7, 70, question, answer, system)
    assert (
        line
        == (
            '{"messages":[{"role":"system","content":"系统\\"提示\\""},'
            '{"role":"user","content":"他说\\"头疼\\"\\\\怎么办"},'
            '{"role":"assistant","content":"路径C:\\\\temp \\"引号\\"\u2028结束"}],"question_id":7,"ans_id":70}\n'
        ).encode()
    )
    assert orjson.loads(line) == {
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ],
        "question_id": 7,
        "ans_id": 70,
    }


def test_candidate_lines_group_lists_in_order():
    cands = pd.DataFrame(
        {"question_id": [5, 5, 9], "ans_id": [50, 51, 90], "content": ['答"甲"', "答乙", "C:\\x"], "label": [1, 0, 1]}
    )
    lines = list(candidate_lines(cands, {5: '问"一"', 9: "问二\\"}, "系统"))
    expected = [
        {
            "question_id": 5,
            "system": "系统",
            "question": '问"一"',
            "candidates": [
                {"ans_id": 50, "content": '答"甲"', "label": 1},
                {"ans_id": 51, "content": "答乙", "label": 0},
            ],
        },
        {
            "question_id": 9,
            "system": "系统",
            "question": "问二\\",
            "candidates": [{"ans_id": 90, "content": "C:\\x", "label": 1}],
        },
    ]
    assert lines == [orjson.dumps(e) + b"\n" for e in expected]


def test_hash_split_is_seeded_stable_and_near_the_ratios():
    ids = np.arange(10_000_000, 10_200_000, 2)  # 100k ids
    split = split_ids(ids, seed=42, val_ratio=0.1, test_ratio=0.1)
    shares = np.bincount(split, minlength=3) / len(ids)
    assert np.allclose(shares, [0.8, 0.1, 0.1], atol=0.005), shares
    # A question's split depends on its id and the seed only: other ids never move it.
    assert (split_ids(ids[::7], 42, 0.1, 0.1) == split[::7]).all()
    assert (split_ids(ids, 7, 0.1, 0.1) != split).mean() > 0.2  # another seed, another split


def test_duplicates_dropped_and_counted(tmp_path, repo_params):
    texts = _texts()
    q_lines = texts["question.csv"].splitlines(keepends=True)
    a_lines = texts["answer.csv"].splitlines(keepends=True)
    qid, text = q_lines[1].rstrip("\n").split(",", 1)
    aid, a_qid, answer = a_lines[1].rstrip("\n").split(",", 2)
    other_qid = q_lines[2].split(",", 1)[0]
    assert a_qid == qid and other_qid != qid
    extra_q = [q_lines[1], f"99999991,{text}\n"]  # same row again; same text under a new id
    extra_a = [
        a_lines[1],  # the same answer row again
        f"99999992,{qid},{answer}\n",  # same answer text under a new id, same question
        f"99999993,99999991,{answer}\n",  # same pair again under the new question id
        "99999994,99999991,另一个不同的回答，内容足够长。\n",  # a genuinely new pair
        f"99999995,{other_qid},{answer}\n",  # the same answer text to another question: kept
        "99999996,88888888,这个回答的问题不在文件里。\n",  # an orphan: counted, then dropped
    ]
    raw = _write(
        tmp_path / "raw",
        {"question.csv": "".join(q_lines + extra_q).encode(), "answer.csv": "".join(a_lines + extra_a).encode()},
    )
    outputs, metrics = _run(repo_params, raw, tmp_path)
    assert metrics["dropped"]["question_duplicate_rows"] == 1
    assert metrics["dropped"]["answer_duplicate_rows"] == 1
    assert metrics["dropped"]["duplicate_pairs"] == 2
    assert metrics["answers_without_questions"] == metrics["dropped"]["answer_question_missing"] == 1
    assert metrics["questions_without_answers"] == 0
    assert sum(metrics["examples"].values()) == 129 + 2
    ans_ids = {orjson.loads(line)["ans_id"] for f in SPLIT_FILES for line in outputs[f].splitlines()}
    assert {int(aid), 99999994, 99999995} <= ans_ids and not {99999992, 99999993} & ans_ids


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
    # More answers, so that the damage lies past the 64 KB head that encoding detection reads.
    a_bytes = (
        a + "".join(f"{30000000 + i},10000001,第{i}条补充回答：多喝水，注意休息，按时复诊。\n" for i in range(2000))
    ).encode()
    assert len(a_bytes) > 3 * 64 * 1024
    cut = a_bytes.index(b"\n", len(a_bytes) * 3 // 4) + 4  # inside a row, past the 64 KB head
    bad_utf8 = a_bytes[:cut] + b"\xff" + a_bytes[cut:]
    bad_line = bad_utf8.count(b"\n", 0, cut) + 1
    return {
        "undecodable byte": (
            {"answer.csv": bad_utf8},
            {},
            ["answer.csv", f"byte offset {cut} ", f"(line {bad_line},", "as utf-8"],
        ),
        "missing file": ({"answer.csv": None}, {}, ["no answer table", "answer.csv", "make data"]),
        "utf-16": (
            {"question.csv": q.encode("utf-16")},
            {},
            ["question.csv", "looks like UTF-16", "re-save it as UTF-8"],
        ),
        "renamed column": (
            {"question.csv": q.replace("question_id,content", "question_id,text", 1)},
            {},
            ["question.csv", "missing column(s) content", "rename"],
        ),
        "tab delimiter": ({"answer.csv": a.replace(",", "\t")}, {}, ["answer.csv", "tab-separated", "','"]),
        "semicolon delimiter": ({"question.csv": q.replace(",", ";")}, {}, ["question.csv", "semicolon-separated"]),
        "empty file": ({"question.csv": ""}, {}, ["question.csv", "file is empty"]),
        "header only": ({"answer.csv": "ans_id,question_id,content\n"}, {}, ["answer.csv", "no data rows"]),
        "conflicting duplicate ids": (
            {"question.csv": conflict},
            {},
            ["question.csv", f"question_id {dup_id} on data rows [3, 103]", "unique"],
        ),
        "non-integer id": ({"question.csv": non_int}, {}, ["question.csv", "'question_id'", "data row 2", "'abc'"]),
        "empty id": (
            {"question.csv": q_lines[0] + "," + q_lines[1].split(",", 1)[1] + "".join(q_lines[2:])},
            {},
            ["question.csv", "'question_id'", "data row 1", "''"],
        ),
        "extra field": (
            {"answer.csv": "".join(extra_field)},
            {},
            ["answer.csv", "Row #8", "Expected 3 columns, got 4"],
        ),
        "bad label": (
            {
                "dev_candidates.txt": "question_id,ans_id,cnt,label\n1,2,0,1\n",
                "test_candidates.txt": "question_id,ans_id,cnt,label\n1,2,0,2\n",
            },
            {},
            ["test_candidates", "column 'label' must be 0 or 1"],
        ),
        "nothing left": (
            {},
            {"min_answer_chars": 1500, "max_answer_chars": 2000},
            ["no question/answer pairs left", "answer_too_short"],
        ),
        "half the official files": (
            {"dev_candidates.txt": "question_id,ans_id,cnt,label\n1,2,0,1\n"},
            {},
            ["dev_candidates.txt is present but test_candidates"],
        ),
    }


def test_bad_inputs_fail_clearly_and_keep_previous_outputs(tmp_path, repo_params):
    texts = _texts()
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


def test_cli_runs_from_params_yaml(tmp_path, repo_params):
    params = repo_params.to_dict()
    params["data"] = {"raw_dir": str(SAMPLE), "processed_dir": str(tmp_path / "processed")}
    params["process"]["metrics_file"] = str(tmp_path / "process.json")
    (tmp_path / "params.yaml").write_text(json.dumps(params, ensure_ascii=False), encoding="utf-8")  # JSON is YAML
    proc = subprocess.run(
        [sys.executable, "-m", "mediagent.pipeline.process"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "processed").iterdir()) == sorted(OUTPUT_FILES)
    assert json.loads((tmp_path / "process.json").read_text(encoding="utf-8"))["rows_read"] == {
        "question": 102,
        "answer": 129,
    }


def test_cli_exits_nonzero_with_the_message(tmp_path, repo_params):
    raw = _write(
        tmp_path / "raw",
        {"question.csv": b"question_id\tcontent\n1\tx\n", "answer.csv": b"ans_id,question_id,content\n1,1,y\n"},
    )
    params = repo_params.to_dict()
    params["data"] = {"raw_dir": str(raw), "processed_dir": str(tmp_path / "processed")}
    (tmp_path / "params.yaml").write_text(json.dumps(params, ensure_ascii=False), encoding="utf-8")  # JSON is YAML
    proc = subprocess.run(
        [sys.executable, "-m", "mediagent.pipeline.process"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "tab-separated" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "processed").exists() and not (tmp_path / "metrics").exists()


# ----------------------------------------------------------------------------- dvc


def test_dvc_repro_runs_once_then_skips(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
    }
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env)

    def repro() -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "dvc", "repro", "process"],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
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
