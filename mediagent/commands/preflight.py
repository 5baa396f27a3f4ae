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
from pathlib import Path

import click

from mediagent.errors import UserError
from mediagent.job_estimate import disk_bytes, format_disk
from mediagent.memory import GIB, QWEN3, budget_bytes, choose_plan, format_choice, format_plan, plan, qwen3_config, table
from mediagent.params import Params, load_params, with_overrides


def base_config(base: str | None, params: Params) -> dict:
    """config.json of --base (a published Qwen3 name, or a local folder/file), else of model.base."""
    if base is None:
        path = params.model.path / "config.json"
        if not path.is_file():
            raise UserError(f"{path} not found: run `make base` first, or name a model with --base "
                            f"(one of {', '.join(QWEN3)}, or a local config.json)")
        return json.loads(path.read_text(encoding="utf-8"))
    name = base.rsplit("/", 1)[-1]
    if name in QWEN3 and not Path(base).exists():
        return {**qwen3_config(name), "_name_or_path": f"Qwen/{name}"}
    path = Path(base)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"--base {base}: not a built-in model ({', '.join(QWEN3)}) nor a config.json on disk")
    return {**json.loads(path.read_text(encoding="utf-8")), "_name_or_path": base}


def main(params: Params, base: str | None = None, memory_gb: float | None = None, as_json: bool = False,
         allow_quantization: bool | None = None, dtype: str | None = None, show_table: bool = False) -> dict | None:
    if show_table:
        click.echo(table(params))
        return None
    config = base_config(base, params)
    if memory_gb is not None:
        params = with_overrides(params, train={"memory_budget": memory_gb})
    budget, source = budget_bytes(params)
    # A machine you do not have: price it as the GPU it would be (bf16); else this machine's dtype.
    dtype = dtype or ("bfloat16" if memory_gb is not None or base is not None else None)
    choice = choose_plan(config, params, budget, dtype, allow_quantization)
    if base is None:
        p = plan(config, params, choice["dtype"])
        for stage in ("evaluate", "serve"):
            click.echo(format_plan(p, stage))
    click.echo(f"budget: {budget / GIB:.1f} GiB ({source})")
    click.echo(format_choice(choice))
    disk = disk_bytes(config, params)
    click.echo(format_disk(disk))
    if as_json:
        keys = ("model", "dtype", "budget_bytes", "usable_bytes", "fits", "estimate_bytes", "plan",
                "fits_with_quantization", "needs")
        click.echo(json.dumps({**{k: choice[k] for k in keys if k in choice}, "disk_bytes": disk}, ensure_ascii=False))
    return choice


@click.command()
@click.option("--base", help="Qwen/Qwen3-0.6B .. Qwen/Qwen3-14B (built in), or a local config.json / model folder "
                             "(default: model.base).")
@click.option("--memory-gb", type=float, help="Device memory in GiB (default train.memory_budget: auto = this machine).")
@click.option("--allow-quantization/--no-allow-quantization", default=None,
              help="May the plan fall back to a 4-bit base (default train.allow_quantization).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]),
              help="Compute dtype (default bfloat16 for --base/--memory-gb, else model.dtype here).")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON line: model, budget_bytes, fits, "
                                                      "estimate_bytes, plan.")
@click.option("--table", "show_table", is_flag=True, help="Qwen3 0.6B..14B on 24/48/80 GB GPUs (markdown).")
def command(base, memory_gb, allow_quantization, dtype, as_json, show_table) -> None:
    """Memory plan for training (and serving), chosen before anything loads."""
    main(load_params(), base, memory_gb, as_json, allow_quantization, dtype, show_table)
