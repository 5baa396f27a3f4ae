"""data.sources: every format (UTF-8 and GBK, single- and multi-turn, xlsx) through the real
process stage, the masks of a multi-turn dialogue, per-source counts, the leak-free split
across sources, and each bad input's one-line error with data/processed left as it was."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mediagent.chat_format import IGNORE_INDEX, ChatFormat
from mediagent.errors import ProcessError
from mediagent.fileio import read_jsonl
from mediagent.loading import load_model, load_tokenizer
from mediagent.params import ParamsError, with_overrides
from mediagent.pipeline.process import main
from mediagent.scoring import answer_loss
from mediagent.text_clean import question_key
from tests.adapter_kit import pipeline_params
from tests.conftest import ROOT

SPLIT_FILES = ("train.jsonl", "val.jsonl", "test.jsonl")
SAMPLE = ROOT / "data" / "sample"
SYSTEM = "你是一个专业的医疗助手，能够提供准确的医疗咨询。"  # params.yaml's process.system_prompt
THREE_TURNS = [
    ("我咳嗽三天了。", "有发热吗？"),
    ("有点低烧，三十七度八。", "可能是上呼吸道感染。"),
    ("需要吃抗生素吗？", "病毒感染不需要抗生素，多休息多喝水。"),
]


def _params(repo_params, tmp: Path, sources: list[dict], **process):
    return with_overrides(
        repo_params,
        data={"raw_dir": str(tmp), "processed_dir": str(tmp / "processed"), "sources": sources},
        process={"metrics_file": str(tmp / "metrics" / "process.json"), **process},
    )


def _run(repo_params, tmp: Path, sources: list[dict], **process) -> tuple[list[dict], dict]:
    """Every example written (all three splits, file order) and the metrics."""
    main(_params(repo_params, tmp, sources, **process))
    rows = [{**r, "split": name} for name in SPLIT_FILES for r in read_jsonl(tmp / "processed" / name)]
    return rows, json.loads((tmp / "metrics" / "process.json").read_text(encoding="utf-8"))


def _jsonl(path: Path, records: list, encoding: str = "utf-8") -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding=encoding)
    return path


def _sharegpt(turns, system=None) -> dict:
    conv = [{"from": "system", "value": system}] if system else []
    for q, a in turns:
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"conversations": conv}


def _dialogue(row: dict) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in row["messages"]]


def _by_question(rows: list[dict]) -> dict[str, dict]:
    return {m["content"]: r for r in rows for m in r["messages"][-2:-1]}


def test_every_format_becomes_dialogues_with_counts_per_source(tmp_path, repo_params):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(
        json.dumps(
            [
                {
                    "instruction": "孩子发烧三十九度怎么办",
                    "input": "三岁，精神尚可",
                    "output": "先物理降温，超过三十八度五可用退烧药。",
                },
                {
                    "instruction": "还需要去医院吗",
                    "output": "持续高烧超过三天就去医院。",
                    "history": [["孩子发烧了", "多少度？"], ["三十九度", "先物理降温。"]],
                },
            ],
            ensure_ascii=False,
        ),
        encoding="utf-8",
    )
    sharegpt = _jsonl(
        tmp_path / "chat.jsonl",
        [
            {"dialog": [{"speaker": "患者", "text": q if i == 0 else "然后呢？"}, {"speaker": "医生", "text": a}]}
            for i, (q, a) in enumerate(THREE_TURNS[:2])
        ],
        encoding="gbk",
    )
    messages = tmp_path / "openai.jsonl"
    messages.write_bytes(
        b"\xef\xbb\xbf"
        + json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "你是儿科医生。"},
                    {"role": "user", "content": "宝宝湿疹怎么护理"},
                    {"role": "assistant", "content": "保湿为主，避免过热。"},
                ]
            },
            ensure_ascii=False,
        ).encode()
    )
    table = tmp_path / "export.csv"
    pd.DataFrame(
        {
            "department": ["内科", "外科"],
            "title": ["胃疼", "擦伤"],
            "ask": ["饭后胃疼是怎么回事", "擦伤后怎么消毒"],
            "reply": ["可能是胃炎，建议做胃镜。", "用碘伏消毒，保持干燥。"],
        }
    ).to_csv(table, index=False, encoding="gbk")
    tsv = tmp_path / "export.tsv"  # 𠮷 is outside GBK: the file needs GB18030
    tsv.write_bytes("ask\treply\n𠮷字怎么读，头晕要紧吗\t多休息，持续不缓解请就医。\n".encode("gb18030"))
    book = tmp_path / "export.xlsx"
    pd.DataFrame(
        {"question": ["腰疼怎么办", "牙龈出血"], "answer": ["注意休息，必要时理疗。", "可能是牙龈炎，请看牙科。"]}
    ).to_excel(book, index=False)
    rows, metrics = _run(
        repo_params,
        tmp_path,
        [
            {"path": str(alpaca), "format": "alpaca", "name": "alpaca"},
            {
                "path": str(sharegpt),
                "format": "sharegpt",
                "name": "sharegpt",
                "columns": {
                    "messages": "dialog",
                    "role": "speaker",
                    "content": "text",
                    "user": "患者",
                    "assistant": "医生",
                },
            },
            {"path": str(messages), "format": "messages", "name": "messages"},
            {
                "path": str(tmp_path / "export.*sv"),
                "format": "table",
                "name": "tables",
                "system_prompt": "你是全科医生。",
                "columns": {"question": "ask", "answer": "reply"},
            },
            {"path": str(book), "format": "table", "name": "xlsx"},
        ],
        test_ratio=0.0,
        val_ratio=0.0,
    )
    q = _by_question(rows)
    assert len(rows) == 10
    assert _dialogue(q["孩子发烧三十九度怎么办 三岁，精神尚可"]) == [
        ("system", SYSTEM),
        ("user", "孩子发烧三十九度怎么办 三岁，精神尚可"),
        ("assistant", "先物理降温，超过三十八度五可用退烧药。"),
    ]
    assert _dialogue(q["还需要去医院吗"]) == [
        ("system", SYSTEM),
        ("user", "孩子发烧了"),
        ("assistant", "多少度？"),
        ("user", "三十九度"),
        ("assistant", "先物理降温。"),
        ("user", "还需要去医院吗"),
        ("assistant", "持续高烧超过三天就去医院。"),
    ]
    assert _dialogue(q["然后呢？"])[1:] == [("user", "然后呢？"), ("assistant", THREE_TURNS[1][1])]
    assert _dialogue(q["宝宝湿疹怎么护理"])[0] == ("system", "你是儿科医生。")  # the record's own system turn
    assert _dialogue(q["饭后胃疼是怎么回事"]) == [
        ("system", "你是全科医生。"),
        ("user", "饭后胃疼是怎么回事"),
        ("assistant", "可能是胃炎，建议做胃镜。"),
    ]
    assert _dialogue(q["𠮷字怎么读，头晕要紧吗"])[2] == ("assistant", "多休息，持续不缓解请就医。")
    assert _dialogue(q["牙龈出血"])[2] == ("assistant", "可能是牙龈炎，请看牙科。")
    src = metrics["sources"]
    assert {k: (v["format"], v["rows_read"], v["examples"]) for k, v in src.items()} == {
        "alpaca": ("alpaca", 2, 2),
        "sharegpt": ("sharegpt", 2, 2),
        "messages": ("messages", 1, 1),
        "tables": ("table", 3, 3),
        "xlsx": ("table", 2, 2),
    }
    assert src["sharegpt"]["encoding"] == {str(sharegpt): "gbk"}
    assert src["messages"]["encoding"] == {str(messages): "utf-8-sig"}
    assert src["tables"]["encoding"] == {str(table): "gbk", str(tsv): "gb18030"}
    assert metrics["examples"] == {"train": 10, "val": 0, "test": 0}
    assert all(isinstance(r["question_id"], int) and isinstance(r["ans_id"], int) for r in rows)


def test_dialogue_as_alternating_strings(tmp_path, repo_params):
    chat = _jsonl(
        tmp_path / "qa.jsonl",
        [{"dialogue": ["问：头疼三天了怎么办", "答：有发热吗？", "问:没有发热", "答：先休息观察。"]}],
    )
    rows, _ = _run(
        repo_params, tmp_path, [{"path": str(chat), "format": "messages", "columns": {"messages": "dialogue"}}]
    )
    assert [_dialogue(r)[1:] for r in rows] == [
        [("user", "头疼三天了怎么办"), ("assistant", "有发热吗？"), ("user", "没有发热"), ("assistant", "先休息观察。")]
    ]
    odd = _jsonl(tmp_path / "odd.jsonl", [{"dialogue": ["问：头疼三天了怎么办", "答：有发热吗？", "问：没有发热"]}])
    with pytest.raises(ProcessError, match="odd.jsonl line 1: the dialogue ends with a user turn"):
        _run(repo_params, tmp_path, [{"path": str(odd), "format": "messages", "columns": {"messages": "dialogue"}}])


def test_cleaning_and_drops_are_counted_per_source(tmp_path, repo_params, caplog):
    own = _jsonl(
        tmp_path / "own.jsonl",
        [
            {"instruction": "我的电话13812345678，<b>胃疼</b>", "output": "请来门诊。"},  # masked, tags stripped
            {"instruction": "头疼怎么回事", "output": "嗯"},  # answer too short: the dialogue goes
            {
                "instruction": "头疼怎么办",
                "output": "休息。",
                "history": [["医生你好", "x" * 3000]],
            },  # a long earlier answer
            {"instruction": "我的电话13812345678，<b>胃疼</b>", "output": "请来门诊。"},  # a repeat
        ],
    )
    short = _jsonl(tmp_path / "short.jsonl", [{"instruction": "疼", "output": "休息一下。"}])
    caplog.set_level("WARNING")
    rows, metrics = _run(
        repo_params,
        tmp_path,
        [
            {"path": str(own), "format": "alpaca", "name": "own"},
            {"path": str(short), "format": "alpaca", "name": "short"},
            {"path": str(SAMPLE), "format": "cmedqa2", "name": "cmedqa2"},
        ],
    )
    mine = [r for r in rows if r["question_id"] >= 1 << 56]
    assert [_dialogue(r)[1:] for r in mine] == [[("user", "我的电话[PHONE]， 胃疼"), ("assistant", "请来门诊。")]]
    own_drops = {k: v for k, v in metrics["sources"]["own"]["dropped"].items() if v}
    assert own_drops == {"answer_too_short": 1, "answer_too_long": 1, "duplicate_pairs": 1}
    assert metrics["sources"]["own"]["pii_masked"]["phone"] == 2  # both copies: masking comes before the repeat check
    assert metrics["sources"]["short"]["dropped"]["question_too_short"] == 1
    assert metrics["sources"]["cmedqa2"]["examples"] == 129 and len(rows) == 130
    assert metrics["dropped"]["answer_too_short"] == 1 and metrics["pii_masked"]["phone"] == 3  # 2 + the sample's
    assert any(
        "data.sources[1] (short): all 1 records dropped" in r.getMessage() and "question_too_short" in r.getMessage()
        for r in caplog.records
    )


@pytest.fixture(scope="module")
def fmt(tiny_base):
    return ChatFormat.of(load_tokenizer(tiny_base))


@pytest.mark.parametrize(
    "train_on, learned", [("all_turns", [a for _, a in THREE_TURNS]), ("last_turn", [THREE_TURNS[-1][1]])]
)
def test_train_on_chooses_which_turns_carry_loss(tmp_path, repo_params, fmt, tiny_base, train_on, learned):
    chat = _jsonl(tmp_path / "chat.jsonl", [_sharegpt(THREE_TURNS)])
    rows, _ = _run(repo_params, tmp_path, [{"path": str(chat), "format": "sharegpt"}], train_on=train_on)
    (row,) = rows
    assert [m["content"] for m in row["messages"][1:]] == [t for pair in THREE_TURNS for t in pair]
    enc = fmt.encode(row["messages"], max_length=4096)
    tok = fmt.tokenizer
    assert tok.decode([i for i, y in zip(enc.input_ids, enc.labels) if y != IGNORE_INDEX]) == "".join(
        f"{a}<|im_end|>" for a in learned
    )
    # held-out loss scores every assistant turn whichever turns were learned
    model = load_model(tiny_base, repo_params.model)
    every_turn = fmt.encode([{k: v for k, v in m.items() if k != "weight"} for m in row["messages"]], 4096)
    assert answer_loss(model, fmt, [row], 4096, 1)["tokens"] == sum(y != IGNORE_INDEX for y in every_turn.labels)
    assert (
        sum(y != IGNORE_INDEX for y in every_turn.labels) > sum(y != IGNORE_INDEX for y in enc.labels)
        or train_on == "all_turns"
    )


def test_twins_in_and_across_sources_share_a_split(tmp_path, repo_params):
    sample_q = pd.read_csv(SAMPLE / "question.csv")
    heldout_id, heldout_text = int(sample_q["question_id"][0]), sample_q["content"][0]
    official = tmp_path / "official"
    official.mkdir()
    for name in ("dev_candidates.csv", "test_candidates.csv"):
        (official / name).write_text(f"question_id,ans_id,cnt,label\n{heldout_id},1,0,1\n", encoding="utf-8")
    # the same questions as cMedQA2's, full-width and spaced, with other answers; some twice in one source
    twins = [
        {"instruction": " ".join(t.replace("?", "？")), "output": f"另一个回答{i}。"}
        for i, t in enumerate(sample_q["content"][:40])
    ]
    own = _jsonl(tmp_path / "own.jsonl", twins + [{**t, "output": t["output"] + "补充。"} for t in twins[:10]])
    copy = _jsonl(
        tmp_path / "copy.jsonl",
        [{"question": "口腔溃疡反复发作怎么办", "answer": "补充维生素。"}] * 1
        + [{"question": twins[1]["instruction"], "answer": "另一个回答1。"}],
    )
    rows, metrics = _run(
        repo_params,
        tmp_path,
        [
            {"path": str(SAMPLE), "format": "cmedqa2"},
            {"path": str(own), "format": "alpaca", "name": "own"},
            {
                "path": str(copy),
                "format": "alpaca",
                "name": "copy",
                "columns": {"question": "question", "answer": "answer"},
            },
        ],
        heldout_candidates_dir=str(official),
    )
    splits: dict[str, set] = {}
    for r in rows:
        first_user = next(m["content"] for m in r["messages"] if m["role"] == "user")
        splits.setdefault(question_key(pd.Series([first_user]))[0], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits.values()), {k: v for k, v in splits.items() if len(v) > 1}
    assert splits[question_key(pd.Series([heldout_text]))[0]] == {"test.jsonl"}  # official test, whichever source
    assert metrics["cross_source_questions"] == 40
    assert metrics["cross_source_duplicates"] == 1  # copy's second record repeats own's
    assert metrics["sources"]["copy"]["examples"] == 2 and len(rows) == 129 + 50 + 1


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[dict], list[str]]]:
    """Each bad input: its sources and what its error must name."""
    table = tmp / "t.csv"
    pd.DataFrame({"title": ["胃疼"], "reply": ["吃药。"]}).to_csv(table, index=False, encoding="gbk")
    book = tmp / "two.xlsx"
    with pd.ExcelWriter(book) as xw:
        for sheet in ("内科", "外科"):
            pd.DataFrame({"question": ["头疼"], "answer": ["休息。"]}).to_excel(xw, sheet_name=sheet, index=False)
    chat = _sharegpt(THREE_TURNS[:1])
    cases = {
        "missing_column": (
            [{"path": str(table), "format": "table", "columns": {"answer": "reply"}}],
            [f"{table} row 2", "'question'", "data.sources[0].columns.question"],
        ),
        "unknown_role": (
            [
                {
                    "path": str(
                        _jsonl(
                            tmp / "role.jsonl",
                            [
                                chat,
                                {
                                    "conversations": [
                                        {"from": "human", "value": "头疼"},
                                        {"from": "doctor", "value": "休息。"},
                                    ]
                                },
                            ],
                        )
                    ),
                    "format": "sharegpt",
                }
            ],
            ["role.jsonl line 2 turn 2", "'doctor'", "data.sources[0].columns.assistant"],
        ),
        "ends_with_user": (
            [
                {
                    "path": str(
                        _jsonl(
                            tmp / "open.jsonl",
                            [
                                {
                                    "messages": [
                                        {"role": "user", "content": "头疼"},
                                        {"role": "assistant", "content": "休息。"},
                                        {"role": "user", "content": "还疼"},
                                    ]
                                }
                            ],
                        )
                    ),
                    "format": "messages",
                }
            ],
            ["open.jsonl line 1", "ends with a user turn"],
        ),
        "empty_answer": (
            [
                {
                    "path": str(
                        _jsonl(
                            tmp / "empty.jsonl",
                            [
                                {"instruction": "头疼", "output": "休息。"},
                                {"instruction": "胃疼", "output": " ", "id": "A7"},
                            ],
                        )
                    ),
                    "format": "alpaca",
                }
            ],
            ["empty.jsonl line 2 (id A7)", "'output'", "is empty"],
        ),
        "malformed_json": (
            [{"path": str(tmp / "broken.jsonl"), "format": "sharegpt"}],
            ["broken.jsonl line 3", "malformed JSON"],
        ),
        "xlsx_two_sheets": ([{"path": str(book), "format": "table"}], [str(book), "内科", "sheet: 内科"]),
    }
    (tmp / "broken.jsonl").write_text(
        "".join(json.dumps(chat, ensure_ascii=False) + "\n" for _ in range(2)) + '{"conversations": [\n',
        encoding="utf-8",
    )
    return cases


BAD = ("missing_column", "unknown_role", "ends_with_user", "empty_answer", "malformed_json", "xlsx_two_sheets")


@pytest.mark.parametrize("case", BAD)
def test_bad_input_names_file_row_and_fix_and_keeps_processed(tmp_path, repo_params, case):
    sources, names = _bad_inputs(tmp_path)[case]
    processed = tmp_path / "processed"
    processed.mkdir()
    (processed / "train.jsonl").write_text("earlier run\n", encoding="utf-8")
    with pytest.raises(ProcessError) as err:
        main(_params(repo_params, tmp_path, sources))
    message = str(err.value)
    assert "\n" not in message and all(n in message for n in names), message
    assert [p.name for p in processed.iterdir()] == ["train.jsonl"]
    assert (processed / "train.jsonl").read_text(encoding="utf-8") == "earlier run\n"


def test_bad_source_ends_the_command_with_one_error_line(tmp_path, repo_params):
    sources, _ = _bad_inputs(tmp_path)["malformed_json"]
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    raw["data"].update(raw_dir=str(tmp_path), processed_dir=str(tmp_path / "processed"), sources=sources)
    raw["process"]["metrics_file"] = str(tmp_path / "process.json")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "mediagent.pipeline.process"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "broken.jsonl line 3: malformed JSON" in last and "fix that line" in last
    assert not (tmp_path / "processed").exists()


def test_default_params_keep_the_process_stage_params_hash(repo_params):
    """DVC hashes the data and process sections as written: the optional keys stay out of
    params.yaml, so an existing cMedQA2 setup's `dvc repro` sees the same params."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    assert "sources" not in raw["data"] and "train_on" not in raw["process"]
    assert repo_params.data.sources == () and repo_params.process.train_on == "all_turns"


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, repo_params, tiny_base):
    """cMedQA2's sample + a multi-turn sharegpt file through the real process, train, merge and evaluate."""
    from mediagent.pipeline import evaluate, merge, train

    tmp_path = tmp_path_factory.mktemp("mixed")
    chat = _jsonl(
        tmp_path / "chat.jsonl", [_sharegpt([(f"{q}（第{i}位患者）", a) for q, a in THREE_TURNS]) for i in range(20)]
    )
    params = pipeline_params(
        repo_params,
        tmp_path,
        tiny_base,
        train={
            "max_steps": 4,
            "max_seq_length": 128,
            "per_device_train_batch_size": 4,
            "warmup_steps": 1,
            "logging_steps": 2,
            "eval_steps": 4,
            "save_steps": 4,
            "max_eval_examples": 4,
        },
        merge={"parity_prompts": 1},
        eval={
            "backend": "hf",
            "scorer": "hf",
            "max_questions": 0,
            "max_generations": 2,
            "max_new_tokens": 4,
            "max_seq_length": 128,
            "batch_size": 8,
        },
    )
    params = with_overrides(
        params,
        data={
            "raw_dir": str(tmp_path),
            "sources": [
                {"path": str(SAMPLE), "format": "cmedqa2", "name": "cmedqa2"},
                {"path": str(chat), "format": "sharegpt", "name": "dialogues"},
            ],
        },
        process={"metrics_file": str(tmp_path / "metrics" / "process.json"), "train_on": "last_turn"},
    )
    main(params)
    train.main(params)
    merge.main(params)
    evaluate.main(params)
    return params, tmp_path


def test_mixed_sources_train_merge_and_evaluate(mixed_run):
    params, tmp_path = mixed_run
    metrics = json.loads((tmp_path / "metrics" / "process.json").read_text(encoding="utf-8"))
    assert {k: v["examples"] for k, v in metrics["sources"].items()} == {"cmedqa2": 129, "dialogues": 20}
    test = read_jsonl(tmp_path / "processed" / "test.jsonl")
    multi = [r for r in test if len(r["messages"]) > 3]
    assert multi and all(m.get("weight") == 0 for r in multi for m in r["messages"][2:-1:2])
    report = json.loads((tmp_path / "eval" / "report.json").read_text(encoding="utf-8"))
    assert report["counts"]["loss_examples"] == len(test)  # the multi-turn test examples included
    scores = json.loads((tmp_path / "metrics" / "eval.json").read_text(encoding="utf-8"))
    assert all(math.isfinite(scores[m]["loss"]) for m in ("base", "tuned"))


def test_mixed_run_serves_a_multi_turn_dialogue_as_trained(mixed_run, tmp_path):
    """The mixed run's adapter behind `mediagent serve`: a held-out dialogue's earlier turns
    reach the model as the training template rendered them, token for token."""
    from mediagent.chat_format import prompt_messages
    from tests.test_serve import serving_run, vllm_skip_reason

    reason = vllm_skip_reason()
    if reason:
        pytest.skip(reason)
    params, root = mixed_run
    dialogue = next(r for r in read_jsonl(root / "processed" / "test.jsonl") if len(r["messages"]) > 3)
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt_messages(dialogue["messages"])]
    with serving_run(params, root, tmp_path) as srv:
        served = srv.prompt_ids(messages)
        assert served == ChatFormat.of(load_tokenizer(root / "adapter")).prompt_ids(messages)
        assert sum(m["role"] == "assistant" for m in messages) == 2  # two earlier answers as context
        reply = srv.client().chat.completions.create(model="medqa", messages=messages, max_tokens=8, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")


def test_official_lists_with_own_sources(tmp_path, repo_params):
    """cMedQA2 with its official candidate files beside own data: official questions are
    val/test, own questions are hashed into all three splits, official lists keep their
    question texts, and a list whose only true answer was dropped in cleaning goes."""
    cm = tmp_path / "cmedqa2"
    cm.mkdir()
    qs = pd.DataFrame({"question_id": range(1, 41), "content": [f"第{i}个问题：头疼怎么办？" for i in range(1, 41)]})
    ans = pd.DataFrame(
        {
            "ans_id": range(101, 141),
            "question_id": range(1, 41),
            "content": ["短" if i == 40 else f"第{i}个回答：多休息。" for i in range(1, 41)],
        }
    )
    qs.to_csv(cm / "question.csv", index=False)
    ans.to_csv(cm / "answer.csv", index=False)

    def rows(qid: int, pos: int) -> str:  # an official list: its true answer, then two others
        return "".join(f"{qid},{a},0,{int(a == pos)}\n" for a in (pos, 101, 102))

    (cm / "dev_candidates.csv").write_text("question_id,ans_id,cnt,label\n" + rows(38, 138), encoding="utf-8")
    (cm / "test_candidates.csv").write_text(
        "question_id,ans_id,cnt,label\n" + rows(39, 139) + rows(40, 140) + rows(3, 103), encoding="utf-8"
    )
    own = _jsonl(
        tmp_path / "own.jsonl",
        [{"instruction": f"自己的问题{i}：胃疼怎么办？", "output": f"自己的回答{i}。"} for i in range(60)],
    )
    out, metrics = _run(
        repo_params,
        tmp_path,
        [{"path": str(cm), "format": "cmedqa2"}, {"path": str(own), "format": "alpaca", "name": "own"}],
    )
    assert metrics["split_method"] == "official"
    split_of = {r["question_id"]: r["split"] for r in out}
    assert split_of[38] == "val.jsonl" and split_of[39] == split_of[3] == "test.jsonl" and 40 not in split_of
    assert all(split_of[q] == "train.jsonl" for q in range(4, 38))
    assert {split_of[q] for q in split_of if q >= 1 << 56} == set(SPLIT_FILES)
    lists = {r["question_id"]: r for r in read_jsonl(tmp_path / "processed" / "test_candidates.jsonl")}
    assert set(lists) == {3, 39} and lists[39]["question"] == "第39个问题：头疼怎么办？"
    assert metrics["dropped"]["answer_too_short"] == 1 and metrics["dropped"]["candidates_answer_missing"] == 1


@pytest.mark.parametrize(
    "entry, problem",
    [
        (
            {"path": "a.xml", "format": "xml"},
            "data.sources[0].format: 'xml' is not one of: cmedqa2, alpaca, table, sharegpt, messages",
        ),
        (
            {"path": "a.csv", "format": "table", "columns": {"messages": "m"}},
            "data.sources[0].columns.messages: unknown for format table (known: question, answer, system, id)",
        ),
        ({"path": "a.csv", "format": "table", "encoding": "gbk"}, "data.sources[0].encoding: unknown param"),
        ({"format": "table"}, "data.sources[0].path: missing required param"),
    ],
)
def test_sources_params_are_checked_when_params_load(repo_params, entry, problem):
    with pytest.raises(ParamsError, match=re.escape(problem)):
        with_overrides(repo_params, data={"sources": [entry]})
    with pytest.raises(ParamsError, match="process.train_on: 'first_turn' is not one of: all_turns, last_turn"):
        with_overrides(repo_params, process={"train_on": "first_turn"})
