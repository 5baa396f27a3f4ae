"""The `train` stage on the tiny Qwen3 base and real cMedQA2 examples, on CPU.

Each test runs in its own working directory laid out like the repository (params paths
are relative): models/base/tiny links to the session's tiny base, data/processed holds
train/val examples in the process stage's format built from the shared real sample.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mediagent.chat_format import TEMPLATES, ChatFormat
from mediagent.errors import UserError
from mediagent.fileio import md5_dir
from mediagent.loading import BaseModelError, load_tokenizer
from mediagent.params import Params, ParamsError, with_overrides
from mediagent.pipeline.train import encode_split, main
from tests.adapter_kit import write_processed
from tests.conftest import ROOT

ADAPTER_FILES = [
    "adapter_config.json",
    "adapter_model.safetensors",
    "chat_template.jinja",
    "lineage.json",
    "tokenizer.json",
    "tokenizer_config.json",
]
METRIC_KEYS = {
    "train_loss",
    "eval_loss",
    "eval_loss_step0",
    "steps",
    "trainable_params",
    "total_params",
    "train_examples",
    "train_truncated",
    "train_dropped",
    "val_examples",
    "val_truncated",
    "val_dropped",
    "train_dropped_turns",
    "val_dropped_turns",
    "nonpad_fraction",
    "plan",
    "budget_bytes",
    "estimate_bytes",
    "peak_bytes",
    "devices",
}
# Small but real: short sequences and few steps keep each run to seconds on two cores.
SMALL = dict(
    max_seq_length=128,
    per_device_train_batch_size=4,
    per_device_eval_batch_size=16,
    max_eval_examples=32,
    logging_steps=2,
    eval_steps=4,
    save_steps=4,
    warmup_steps=1,
)


@pytest.fixture
def workdir(tmp_path, monkeypatch, tiny_base, sample_data) -> Path:
    """A repository-shaped working directory (the stage resolves params paths from CWD)."""
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "models" / "base" / "tiny").symlink_to(tiny_base, target_is_directory=True)
    # every pair of the repo's sample: 96 to train on, 32 to validate (train.max_eval_examples)
    write_processed(sample_data, tmp_path / "data" / "processed", n_train=96, n_val=32, n_test=1, negatives=4)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def small(params: Params, lora: dict | None = None, **train) -> Params:
    return with_overrides(params, lora=lora or {}, train={**SMALL, **train})


def write_params(params: Params, path: Path) -> None:
    raw = json.loads(json.dumps(dataclasses.asdict(params)))  # tuples -> lists for YAML
    path.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")


def stage_env() -> dict:
    # one thread each: the machine's cores are shared with the other test processes
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def test_labels_cover_exactly_the_answer(workdir, tiny_base):
    tok = load_tokenizer(tiny_base)
    rows = [
        json.loads(line) for line in (workdir / "data/processed/train.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    messages = rows[0]["messages"]
    fmt = ChatFormat.of(tok)
    enc = fmt.encode(messages, max_length=4096)
    learned = [i for i, label in zip(enc.input_ids, enc.labels) if label != -100]
    assert learned == [label for label in enc.labels if label != -100]  # labels are the ids themselves
    assert tok.decode(learned) == messages[2]["content"] + "<|im_end|>"
    n_prompt = enc.labels.index(next(label for label in enc.labels if label != -100))
    prompt = tok.decode(enc.input_ids[:n_prompt])
    assert prompt == tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert all(label == -100 for label in enc.labels[:n_prompt]) and not enc.truncated

    # Cut to a short length: the answer's tail goes (counted); with no answer left, dropped.
    full = [fmt.encode(r["messages"], max_length=4096) for r in rows[:50]]
    prompt_lens = [e.labels.count(-100) for e in full]
    limit = sorted(prompt_lens)[len(prompt_lens) // 2] + 1  # about half the prompts fill it
    feats, stats = encode_split(fmt, rows[:50], max_length=limit, source="train.jsonl")
    assert stats.dropped == sum(p >= limit for p in prompt_lens) > 0
    assert stats.truncated == sum(p < limit < len(e.input_ids) for p, e in zip(prompt_lens, full)) > 0
    assert stats.examples == len(feats) == 50 - stats.dropped
    assert all(len(f["input_ids"]) <= limit and any(x != -100 for x in f["labels"]) for f in feats)


def test_training_lowers_heldout_loss(workdir, repo_params):
    # The tiny base's frozen, tied embeddings cap what LoRA can learn at ~0.25 nats; a high
    # learning rate reaches most of it in a dozen steps.
    params = small(repo_params, max_steps=8, learning_rate=0.03, eval_steps=4, save_steps=4)
    main(params)

    metrics = read_json("metrics/train.json")
    assert set(metrics) == METRIC_KEYS
    assert metrics["eval_loss"] < metrics["eval_loss_step0"] - 0.1, metrics
    assert metrics["steps"] == 8 and metrics["val_examples"] + metrics["val_dropped"] == 32
    # 128 tokens: the longest of the sample's prompt + answer pairs lose their answer's tail
    assert metrics["train_examples"] + metrics["train_dropped"] == 96 and metrics["train_dropped"] < 5
    assert 0 < metrics["train_truncated"] < 96 - metrics["train_dropped"]
    assert 0 < metrics["trainable_params"] < metrics["total_params"] / 50
    assert metrics["nonpad_fraction"] > 0.9  # length-grouped batches carry little padding

    adapter = Path("models/adapter")
    assert sorted(p.name for p in adapter.iterdir()) == ADAPTER_FILES
    config = read_json(adapter / "adapter_config.json")
    assert config["r"] == 16 and config["base_model_name_or_path"] == "models/base/tiny"
    assert sorted(config["target_modules"]) == sorted(repo_params.lora.target_modules)
    assert not config.get("modules_to_save")
    assert (adapter / "chat_template.jinja").read_text(encoding="utf-8") == TEMPLATES["chatml"]
    lineage = read_json(adapter / "lineage.json")
    assert set(lineage) == {"name", "base", "data", "params", "plan", "world_size", "git_commit", "versions", "metrics"}
    assert (
        lineage["plan"]
        == metrics["plan"]
        == {
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "gradient_checkpointing": False,
            "chunked_loss": True,
            "quantization": "none",
        }
    )
    assert lineage["world_size"] == 1
    assert 0 < metrics["estimate_bytes"] < metrics["budget_bytes"] and metrics["peak_bytes"] > 0
    assert lineage["name"].startswith("medqa-" + lineage["data"]["train_md5"][:8] + "-")
    assert lineage["base"]["id"] == "tiny" and lineage["params"]["lora"]["r"] == 16
    assert lineage["metrics"] == {"train_loss": metrics["train_loss"], "eval_loss": metrics["eval_loss"]}

    # dvclive curves at the trainer's steps: eval loss before training, mid-way and at the end
    eval_curve = pd.read_csv("dvclive/train/plots/metrics/eval/loss.tsv", sep="\t")
    assert eval_curve["step"].tolist() == [0, 4, 8]
    assert eval_curve["loss"].iloc[-1] == pytest.approx(metrics["eval_loss"])
    assert pd.read_csv("dvclive/train/plots/metrics/loss.tsv", sep="\t")["step"].tolist() == list(range(2, 9, 2))
    assert not Path("models/checkpoints").exists()  # scratch removed after success


def test_same_seed_same_bytes_other_rank_other_adapter(workdir, repo_params):
    def run(params: Params) -> tuple[bytes, str]:
        main(params)
        return Path("models/adapter/adapter_model.safetensors").read_bytes(), md5_dir("models/adapter")

    params = small(repo_params, max_steps=2, per_device_train_batch_size=2, max_eval_examples=8)
    first = run(params)
    second = run(params)
    assert first[0] == second[0]
    assert first[1] == second[1]
    other = run(small(repo_params, lora={"r": 8}, max_steps=2, per_device_train_batch_size=2, max_eval_examples=8))
    assert other[0] != first[0] and len(other[0]) < len(first[0])  # rank 8: half the LoRA weights
    assert read_json("models/adapter/adapter_config.json")["r"] == 8


def test_killed_run_resumes_from_its_checkpoint(workdir, repo_params):
    params = small(
        repo_params, max_steps=6, per_device_train_batch_size=2, save_steps=2, eval_steps=6, max_eval_examples=8
    )
    write_params(params, workdir / "params.yaml")
    cmd = [sys.executable, "-m", "mediagent.pipeline.train"]
    with open(workdir / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=workdir, env=stage_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while not list(workdir.glob("models/checkpoints/checkpoint-*/trainer_state.json")):
            assert proc.poll() is None, (workdir / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = sorted(
        int(p.parent.name.split("-")[1]) for p in workdir.glob("models/checkpoints/checkpoint-*/trainer_state.json")
    )
    assert saved and saved[-1] < 6 and not Path("models/adapter").exists()

    rerun = subprocess.run(cmd, cwd=workdir, env=stage_env(), capture_output=True, text=True, timeout=300)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out[-3000:]
    assert f"resuming from checkpoint-{saved[-1]} " in out, out[-3000:]
    metrics = read_json("metrics/train.json")
    assert metrics["steps"] == 6  # as many optimizer steps as an uninterrupted run
    assert metrics["eval_loss_step0"] > metrics["eval_loss"]
    assert not Path("models/checkpoints").exists()
    # the same adapter as a run that was never interrupted: same batches, optimizer state, schedule
    main(with_overrides(params, train={"output_dir": "models/whole", "checkpoint_dir": "models/ckpt-whole"}))
    resumed, whole = _adapter_weights("models/adapter"), _adapter_weights("models/whole")
    diff = max(float((resumed[k] - w).abs().max()) for k, w in whole.items())
    assert diff <= 2e-4 * max(float(w.abs().max()) for w in whole.values()), diff


def test_checkpoints_of_other_params_are_discarded(workdir, repo_params, caplog):
    from mediagent.pipeline.train import RUN_FILE

    caplog.set_level("INFO", logger="mediagent.pipeline.train")

    stale = Path("models/checkpoints/checkpoint-2")
    stale.mkdir(parents=True)
    (stale / "trainer_state.json").write_text("{}")
    Path("models/checkpoints", RUN_FILE).write_text(json.dumps({"fingerprint": "other", "eval_loss_step0": 1.0}))
    main(small(repo_params, max_steps=1, per_device_train_batch_size=2, max_eval_examples=8))
    metrics = read_json("metrics/train.json")
    assert metrics["steps"] == 1 and metrics["eval_loss_step0"] > 5  # measured afresh, not taken over
    assert "discarding old checkpoints in models/checkpoints: they come from other params or data" in caplog.text


def _adapter_weights(path: str | Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "adapter_model.safetensors"))


def test_micro_batches_train_the_same_adapter(workdir, repo_params):
    """8 x 1 and 2 x 4 (same effective batch, same data order) give the same LoRA weights;
    the chunked and the full loss too."""

    runs = {}
    for name, train in {
        "8x1": dict(micro_batch_size=8),
        "2x4": dict(micro_batch_size=2),
        "8x1-full": dict(micro_batch_size=8, loss="full"),
    }.items():
        main(
            small(
                repo_params,
                max_steps=3,
                per_device_train_batch_size=8,
                max_eval_examples=8,
                learning_rate=0.01,
                output_dir=f"models/{name}",
                **train,
            )
        )
        runs[name] = _adapter_weights(f"models/{name}")
        plan = read_json(f"models/{name}/lineage.json")["plan"]
        micro = train["micro_batch_size"]
        assert (plan["per_device_train_batch_size"], plan["gradient_accumulation_steps"]) == (micro, 8 // micro)
        assert plan["chunked_loss"] == (train.get("loss", "chunked") == "chunked")
    base = runs["8x1"]
    assert any(float(w.abs().max()) > 0 for k, w in base.items() if "lora_B" in k)  # it trained
    scale = max(float(w.abs().max()) for w in base.values())
    for other in ("2x4", "8x1-full"):
        assert runs[other].keys() == base.keys()
        diff = max(float((runs[other][k] - w).abs().max()) for k, w in base.items())
        print(f"{other} vs 8x1: max |LoRA weight diff| {diff:.2e} (weights up to {scale:.3f})")
        # float32 sums in another order; AdamW's first steps scale a gradient by its own size,
        # so a 1e-7 difference in a near-zero gradient moves a weight by ~1e-5
        assert diff <= 2e-4 * scale


def test_plan_picks_smaller_micro_batches_for_a_small_budget(workdir, repo_params, caplog):
    """A budget below what the full batch needs: the plan halves the micro-batch, keeps the
    effective batch, logs and records the plan; below anything: one error with the table."""
    import logging

    from mediagent import memory

    params = small(
        repo_params,
        max_steps=1,
        per_device_train_batch_size=8,
        max_eval_examples=8,
        per_device_eval_batch_size=1,
        loss="full",
    )
    config = json.loads(Path("models/base/tiny/config.json").read_text())
    needs = {
        m: memory.train_plan(
            memory.Arch.from_config(config), params, "float32", micro_batch=m, gradient_checkpointing=False
        )["peak"]
        + memory.RUNTIME_BYTES[memory.training_device()]
        for m in (8, 4, 2)
    }
    # between what 2 and 4 sequences need: the plan must pick 2 x 4
    budget_gib = (needs[2] + needs[4]) / 2 / (1 - memory.MARGIN) / memory.GIB
    with caplog.at_level(logging.INFO):
        main(with_overrides(params, train={"memory_budget": budget_gib}))
    plan = read_json("metrics/train.json")["plan"]
    assert plan == {
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 4,
        "gradient_checkpointing": False,
        "chunked_loss": False,
        "quantization": "none",
    }
    assert "chosen: micro-batch 2 x 4 accumulation steps" in caplog.text

    with pytest.raises(UserError) as err:
        main(with_overrides(params, train={"memory_budget": 0.05, "output_dir": "models/none"}))
    assert "no training plan fits" in str(err.value) and "too big" in str(err.value)
    assert not Path("models/none").exists()


def test_bad_params_fail_early_with_clear_messages(workdir, repo_params):
    with pytest.raises(ParamsError) as err:
        small(repo_params, lora={"r": 24, "alpha": 16})
    assert "lora.r: 24 cannot be served by vLLM" in str(err.value)
    assert "lora.alpha: unknown param" in str(err.value)

    with pytest.raises(ParamsError) as err:
        main(small(repo_params, lora={"target_modules": ["q_proj", "qkv_proj", "lm_head"]}))
    msg = str(err.value)
    assert "'qkv_proj' matches no linear layer" in msg and "q_proj, up_proj, v_proj" in msg
    assert "'lm_head' would train embeddings/the LM head" in msg
    assert "'q_proj'" not in msg

    with pytest.raises(BaseModelError, match="make base"):
        main(with_overrides(repo_params, model={"dir": "nowhere"}))
    with pytest.raises(UserError, match="dvc repro process"):
        main(with_overrides(repo_params, data={"processed_dir": "data/none"}))
    # nothing was written by the failed runs
    assert not any(Path(p).exists() for p in ("models/adapter", "models/checkpoints", "metrics", "dvclive"))
