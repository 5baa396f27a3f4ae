"""What ``mediagent serve`` serves: the adapters (given, the latest, or DVC experiments') or
the merged model, each checked before vLLM starts, and one line of lineage for the log.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from mediagent.artifacts import Adapter, Merged, check_adapter, check_merged
from mediagent.experiments import materialise, resolve
from mediagent.loading import check_model_dir
from mediagent.params import Params
from mediagent.vllm_command import ServeError


def rank_limit(params: Params, max_lora_rank: int | None, runtime_lora: bool) -> int | None:
    """The LoRA rank every served adapter must fit (None: whatever vLLM accepts)."""
    # Runtime loading fixes the rank limit up front; every adapter must fit it.
    return max_lora_rank if max_lora_rank is not None or not runtime_lora else params.serve.runtime_max_lora_rank


def served_models(
    params: Params,
    adapters: Sequence[str] | None,
    merged: bool,
    experiments: Sequence[str] | None,
    limit: int | None,
) -> tuple[list[Adapter], Merged | None]:
    """(adapters, merged model) to serve, each checked against ``model.base`` and the rank ``limit``.

    Args:
        adapters: adapter dirs (default: ``[train.output_dir]``); not with ``merged``.
        merged: serve ``merge.output_dir`` alone.
        experiments: DVC experiment names whose adapters are served too, under those names.
    """
    if merged:
        if adapters or experiments:
            raise ServeError("--merged serves the merged model alone; drop --adapter/ADAPTER and --exp/EXP")
        return [], check_merged(params.merge.output_dir, params.model)
    check_model_dir(params.model.path)
    served = [check_adapter(p, params.model, limit) for p in (adapters or [params.train.output_dir])]
    if experiments:
        served += experiment_adapters(params, experiments, limit)
    return served, None


def experiment_adapters(params: Params, names: Sequence[str], max_lora_rank: int | None) -> list[Adapter]:
    """The adapters of these DVC experiments, checked like any adapter and named by experiment."""
    return [
        dataclasses.replace(
            check_adapter(materialise(e, params.serve.experiments_dir), params.model, max_lora_rank), name=e.name
        )
        for e in resolve(names)
    ]


def describe(adapter: Adapter | Merged) -> str:
    """One line of lineage for the log: what was trained on what."""
    lin = adapter.lineage
    base = lin.get("base") or {}
    data = lin.get("data") or {}
    bits = [
        f"base {base.get('id')}@{base.get('revision')}",
        f"train data md5 {str(data.get('train_md5'))[:8]}",
        f"git {str(lin.get('git_commit'))[:10]}",
    ]
    metrics = lin.get("metrics") or {}
    bits += [f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if isinstance(v, (int, float))]
    return ", ".join(bits)
