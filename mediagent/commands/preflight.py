"""``mediagent preflight``: the memory plan for a base and a budget, before anything loads.

    mediagent preflight                                   # params.yaml's base, this machine
    mediagent preflight --base Qwen/Qwen3-8B --memory-gb 24 [--json]   # a machine you lack
    mediagent preflight --table                           # Qwen3 0.6B..14B x 24/48/80 GB

``--base`` takes a published Qwen3 (0.6B..14B, configs built in) or a folder/``config.json``
of any local checkpoint. With ``--json`` the last line is one JSON object: ``model``,
``budget_bytes``, ``fits``, ``estimate_bytes``, ``plan`` and ``disk_bytes`` (mediagent/job_estimate.py).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click

from mediagent.errors import UserError
from mediagent.job_estimate import disk_bytes, format_disk
from mediagent.job_size import GPUS, examples_and_tokens, format_size, format_time, job_size, wall_time
from mediagent.loading import gpu_count, load_tokenizer
from mediagent.memory import (
    GIB,
    QWEN3,
    budget_bytes,
    choose_plan,
    format_choice,
    format_plan,
    plan,
    qwen3_config,
    table,
    training_device,
)
from mediagent.params import Params, load_params, with_overrides
from mediagent.step_timing import run_steps


def base_config(base: str | None, params: Params) -> dict:
    """config.json of --base (a published Qwen3 name, or a local folder/file), else of model.base."""
    if base is None:
        path = params.model.path / "config.json"
        if not path.is_file():
            raise UserError(
                f"{path} not found: run `make base` first, or name a model with --base "
                f"(one of {', '.join(QWEN3)}, or a local config.json)"
            )
        return json.loads(path.read_text(encoding="utf-8"))
    name = base.rsplit("/", 1)[-1]
    if name in QWEN3 and not Path(base).exists():
        return {**qwen3_config(name), "_name_or_path": f"Qwen/{name}"}
    path = Path(base)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"--base {base}: not a built-in model ({', '.join(QWEN3)}) nor a config.json on disk")
    return {**json.loads(path.read_text(encoding="utf-8")), "_name_or_path": base}


def base_tokenizer(base: str | None, params: Params):
    """The tokenizer of the base asked about, where it is on disk (else None: tokens are estimated)."""
    path = params.model.path if base is None else Path(base) if Path(base).exists() else Path(params.model.dir) / base
    path = path.parent if path.is_file() else path
    return load_tokenizer(path, params.model.trust_remote_code) if (path / "tokenizer_config.json").is_file() else None


def devices(params: Params) -> int:
    """Processes the train stage would run: one, or launch.processes under launch.config."""
    if not params.launch.config:
        return 1
    return max(gpu_count(), 1) if params.launch.processes == "auto" else int(params.launch.processes)


def size_and_time(config: dict, params: Params, choice: dict, base: str | None, gpu: str) -> tuple[dict | None, dict]:
    """The job's size (None where the training data is unknown) and its wall-time estimate."""
    counted = examples_and_tokens(params, base_tokenizer(base, params))
    size = job_size(*counted, params.train, choice.get("plan"), devices(params)) if counted else None
    plan = choice.get("plan") or {}
    time = wall_time(size, config, plan.get("gradient_checkpointing", True), gpu, devices(params))
    click.echo(
        format_size(size)
        if size
        else f"job: unknown until {Path(params.data.processed_dir) / 'train.jsonl'} "
        f"exists (`dvc repro process`; for the official data, data.raw_dir: {params.download.out_dir})"
    )
    click.echo(format_time(time))
    return size, time


def measure(params: Params, steps: int) -> dict:
    """N real steps of the train stage here, extrapolated to its epoch and run."""
    with tempfile.TemporaryDirectory(prefix="measure-") as tmp:
        got = run_steps(params, steps, Path(tmp))
    metrics = got["metrics"]
    size = job_size(metrics["train_examples"], 0, "", params.train, metrics["plan"], got["world_size"])
    seconds = got["seconds_per_step"]
    out = {
        "steps": steps,
        "timed_steps": got["timed_steps"],
        "seconds_per_step": round(seconds, 4),
        "steps_per_epoch": size["steps_per_epoch"],
        "epoch_seconds": round(size["steps_per_epoch"] * seconds, 1),
        "run_steps": size["steps"],
        "run_seconds": round(size["steps"] * seconds, 1),
    }
    click.echo(
        f"measured: {seconds:.3f} s per optimizer step over steps 2..{steps} (step 1 is warm-up); "
        f"epoch {out['steps_per_epoch']:,} steps ~{out['epoch_seconds']:,.0f} s "
        f"({out['epoch_seconds'] / 3600:.2f} h), run {out['run_steps']:,} steps ~{out['run_seconds']:,.0f} s "
        f"({out['run_seconds'] / 3600:.2f} h) on this machine"
    )
    return out


def main(
    params: Params,
    base: str | None = None,
    memory_gb: float | None = None,
    as_json: bool = False,
    allow_quantization: bool | None = None,
    dtype: str | None = None,
    show_table: bool = False,
    gpu: str = "a10",
    measure_steps: int | None = None,
) -> dict | None:
    if show_table:
        click.echo(table(params))
        return None
    if measure_steps and base is not None:
        raise UserError(
            "--measure trains the current setup (model.base in params.yaml): drop --base, or set model.base"
        )
    config = base_config(base, params)
    if memory_gb is not None:
        params = with_overrides(params, train={"memory_budget": memory_gb})
    budget, source = budget_bytes(params)
    # A machine you do not have: price it as the GPU it would be (bf16, CUDA runtime); else
    # this machine, as the train stage would run here.
    elsewhere = memory_gb is not None or base is not None
    dtype = dtype or ("bfloat16" if elsewhere else None)
    device = "cuda" if elsewhere else training_device()
    choice = choose_plan(config, params, budget, dtype, allow_quantization, device)
    if base is None:
        p = plan(config, params, choice["dtype"])
        for stage in ("evaluate", "serve"):
            click.echo(format_plan(p, stage))
    click.echo(f"budget: {budget / GIB:.1f} GiB ({source})")
    click.echo(format_choice(choice))
    disk = disk_bytes(config, params)
    click.echo(format_disk(disk))
    size, time = size_and_time(config, params, choice, base, gpu)
    measured = measure(params, measure_steps) if measure_steps else None
    if as_json:
        keys = (
            "model",
            "dtype",
            "device",
            "runtime_bytes",
            "budget_bytes",
            "usable_bytes",
            "fits",
            "estimate_bytes",
            "plan",
            "fits_with_quantization",
            "needs",
        )
        out = {**{k: choice[k] for k in keys if k in choice}, "disk_bytes": disk, "job": size, "time": time}
        click.echo(json.dumps({**out, **({"measure": measured} if measured else {})}, ensure_ascii=False))
    return choice


@click.command()
@click.option(
    "--base",
    help="Qwen/Qwen3-0.6B .. Qwen/Qwen3-14B (built in), or a local config.json / model folder (default: model.base).",
)
@click.option(
    "--memory-gb", type=float, help="Device memory in GiB (default train.memory_budget: auto = this machine)."
)
@click.option(
    "--allow-quantization/--no-allow-quantization",
    default=None,
    help="May the plan fall back to a 4-bit base (default train.allow_quantization).",
)
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float16", "float32"]),
    help="Compute dtype (default bfloat16 for --base/--memory-gb, else model.dtype here).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="End with one JSON line: model, budget_bytes, fits, estimate_bytes, plan, disk_bytes, job, time (measure).",
)
@click.option("--table", "show_table", is_flag=True, help="Qwen3 0.6B..14B on 24/48/80 GB GPUs (markdown).")
@click.option(
    "--gpu",
    type=click.Choice(sorted(GPUS)),
    default="a10",
    show_default=True,
    help="GPU kind whose peak bf16 throughput the time estimate assumes.",
)
@click.option(
    "--measure",
    "measure_steps",
    type=click.IntRange(min=3),
    help="Also run N real training steps of the current setup on this machine and extrapolate the epoch.",
)
def command(base, memory_gb, allow_quantization, dtype, as_json, show_table, gpu, measure_steps) -> None:
    """Memory plan, disk, job size and wall time for training, before anything loads."""
    main(load_params(), base, memory_gb, as_json, allow_quantization, dtype, show_table, gpu, measure_steps)
