"""Builders for the merge/evaluate tests: processed data and adapters in the stage contracts.

``write_processed`` turns question/answer CSVs in the cMedQA2 layout (the repo's own
``data/sample`` by default in tests) into the `process` stage's outputs;
``write_adapter`` saves a peft adapter with non-zero B (``init_lora_weights=False``: a
default-initialised LoRA is a no-op and would make every merge/eval check vacuous), the
tokenizer with its chat template and a ``lineage.json`` as `train` writes it.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pandas as pd

from mediagent.fileio import dump_jsonl, md5_file

SYSTEM = "你是一个专业的医疗助手，能够提供准确的医疗咨询。"


def read_csv(path: Path) -> pd.DataFrame:
    """A cMedQA2-layout CSV in UTF-8 or GB18030 (data/sample's answer.csv is GBK on purpose)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("gb18030")
    return pd.read_csv(io.StringIO(text))


def sample_pairs(sample_dir: Path, n: int, one_per_question: bool = False) -> list[dict]:
    """First ``n`` (question_id, question, ans_id, answer) rows of a question/answer CSV pair
    (with ``one_per_question``, only each question's first answer)."""
    q = read_csv(sample_dir / "question.csv")
    a = read_csv(sample_dir / "answer.csv")
    if one_per_question:
        a = a.drop_duplicates("question_id")
    rows = a.merge(q, on="question_id", suffixes=("_a", "_q")).head(n)
    return [
        {"question_id": int(r.question_id), "question": r.content_q, "ans_id": int(r.ans_id), "answer": r.content_a}
        for r in rows.itertuples()
    ]


def example(p: dict) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": p["question"]},
            {"role": "assistant", "content": p["answer"]},
        ],
        "question_id": p["question_id"],
        "ans_id": p["ans_id"],
    }


def candidates(pairs: list[dict], pool: list[dict], negatives: int, seed: int = 0) -> list[dict]:
    """One test_candidates row per pair: its own answer plus ``negatives`` others from ``pool``.

    The positive is listed first, as in the official files, so a scorer that breaks ties by
    order would look perfect.
    """
    rng = random.Random(seed)
    rows = []
    for p in pairs:
        others = rng.sample([o for o in pool if o["question_id"] != p["question_id"]], negatives)
        cands = [{"ans_id": p["ans_id"], "content": p["answer"], "label": 1}]
        cands += [{"ans_id": o["ans_id"], "content": o["answer"], "label": 0} for o in others]
        rows.append({"question_id": p["question_id"], "system": SYSTEM, "question": p["question"], "candidates": cands})
    return rows


def write_processed(
    sample_dir: Path,
    out: Path,
    n_train: int = 24,
    n_val: int = 4,
    n_test: int = 8,
    negatives: int = 9,
    one_per_question: bool = False,
) -> Path:
    """train/val/test.jsonl + test_candidates.jsonl from question/answer CSVs, in the data contract."""
    pairs = sample_pairs(sample_dir, n_train + n_val + n_test, one_per_question)
    train, val, test = pairs[:n_train], pairs[n_train : n_train + n_val], pairs[n_train + n_val :]
    out.mkdir(parents=True, exist_ok=True)
    dump_jsonl(out / "train.jsonl", map(example, train))
    dump_jsonl(out / "val.jsonl", map(example, val))
    dump_jsonl(out / "test.jsonl", map(example, test))
    dump_jsonl(out / "test_candidates.jsonl", candidates(test, pairs, negatives))
    return out


def write_adapter(
    base_dir: Path,
    out: Path,
    r: int = 8,
    target_modules=("q_proj", "v_proj", "o_proj", "down_proj"),
    seed: int = 0,
    base_id: str = "tiny",
    modules_to_save=None,
    save_tokenizer: bool = True,
) -> Path:
    """A random non-zero LoRA on ``base_dir`` saved like the `train` stage saves adapters."""
    import torch
    from peft import LoraConfig, get_peft_model

    from mediagent.loading import load_model, load_tokenizer
    from mediagent.params import ModelParams

    torch.manual_seed(seed)
    model = load_model(
        base_dir,
        ModelParams(
            base=base_id,
            dir=str(base_dir.parent),
            revision="main",
            source="huggingface",
            dtype="float32",
            trust_remote_code=False,
            quantization="none",
            gguf="",
            chat_template="auto",
            chat_template_kwargs={},
        ),
    )
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=list(target_modules),
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        modules_to_save=modules_to_save,
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out)
    if save_tokenizer:  # the base's tokenizer carries the project's chat template
        load_tokenizer(base_dir).save_pretrained(out)
    lineage = {
        "name": f"medqa-{seed:08x}-{r:08x}",  # distinct per (seed, r), like real lineage names
        "base": {"id": base_id, "revision": "main", "config_md5": md5_file(base_dir / "config.json")},
        "data": {"train_md5": "0" * 32, "val_md5": "0" * 32},
        "params": {"lora": {"r": r, "target_modules": list(target_modules)}, "train": {}},
        "git_commit": None,
        "versions": {},
        "metrics": {},
    }
    (out / "lineage.json").write_text(json.dumps(lineage, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def pipeline_params(
    repo_params,
    root: Path,
    tiny_base: Path,
    model: dict | None = None,
    train: dict | None = None,
    merge: dict | None = None,
    eval: dict | None = None,
):
    """The repo's params with every output of train, merge and evaluate under ``root`` (and
    ``root/processed`` as the data), the tiny base, and the given overrides on top."""
    from mediagent.params import with_overrides

    return with_overrides(
        repo_params,
        data={"processed_dir": str(root / "processed")},
        model={"dir": str(tiny_base.parent), "base": "tiny", **(model or {})},
        train={
            "output_dir": str(root / "adapter"),
            "checkpoint_dir": str(root / "ckpt"),
            "dvclive_dir": str(root / "dvclive"),
            "metrics_file": str(root / "metrics" / "train.json"),
            **(train or {}),
        },
        merge={
            "output_dir": str(root / "merged"),
            "metrics_file": str(root / "metrics" / "merge.json"),
            **(merge or {}),
        },
        eval={
            "metrics_file": str(root / "metrics" / "eval.json"),
            "report_path": str(root / "eval" / "report.json"),
            "samples_path": str(root / "eval" / "samples.jsonl"),
            "plots_dir": str(root / "eval" / "plots"),
            **(eval or {}),
        },
    )
