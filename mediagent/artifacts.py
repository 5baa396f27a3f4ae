"""What the pipeline's artifacts must satisfy before anyone loads them.

One place for the rules several stages and commands share:

- lineage: every adapter and merged model carries ``lineage.json`` naming the base it was
  trained on (hub id + md5 of its config.json); using it with another base is refused;
- an adapter is complete (peft config, safetensors weights, tokenizer) and servable by
  vLLM (LoRA, no ``modules_to_save``, no DoRA, rank within vLLM's largest);
- the rank vLLM needs: ``--max-lora-rank`` must be one of vLLM's ranks, so an adapter's
  rank is rounded up to the next one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from mediagent.errors import UserError
from mediagent.fileio import md5_file
from mediagent.loading import BaseModelError, check_model_dir
from mediagent.params import VLLM_LORA_RANKS, ModelParams

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json")
TRAIN_FIX = "run `dvc repro train` (train.output_dir must point at the adapter)"


class ArtifactError(UserError):
    """An adapter or model is missing, incomplete or built on another base; the message names the fix."""


def read_lineage(path: Path, what: str, fix: str) -> dict:
    """``path/lineage.json`` as a dict with at least a ``name``."""
    f = path / "lineage.json"
    if not f.is_file():
        raise ArtifactError(f"{what} {path} has no lineage.json: {fix}")
    try:
        lineage = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{f} is not valid JSON ({exc}): {fix}") from exc
    if not isinstance(lineage, dict) or not lineage.get("name"):
        raise ArtifactError(f"{f} has no 'name': {fix}")
    return lineage


def check_lineage_base(lineage: dict, model: ModelParams, what: str) -> None:
    """Refuse an artifact built on another base than ``model.base`` (hub id or config bytes)."""
    base = lineage.get("base") or {}
    if base.get("id") != model.base:
        raise ArtifactError(
            f"{what} was trained on base {base.get('id')!r} but model.base is {model.base!r}: set "
            f"model.base={base.get('id')} (e.g. `dvc exp run -S model.base={base.get('id')}`) or retrain "
            f"on {model.base!r} with `dvc repro train`"
        )
    config = model.path / "config.json"
    if not config.is_file():
        raise ArtifactError(f"base model not found at {model.path}: run `make base`")
    config_md5 = md5_file(config)
    if base.get("config_md5") != config_md5:
        raise ArtifactError(
            f"{what} was trained on a {model.base} whose config.json md5 was {base.get('config_md5')}, but "
            f"{config} now has md5 {config_md5} (another revision or tiny params?): "
            f"restore that base, or retrain with `dvc repro train`"
        )


def check_adapter_files(path: Path, fix: str = TRAIN_FIX) -> dict:
    """The adapter's files are all there; returns its parsed adapter_config.json."""
    if (path / "adapter_model.bin").is_file() and not (path / "adapter_model.safetensors").is_file():
        raise ArtifactError(f"{path} holds pickle weights (adapter_model.bin); only safetensors are loaded")
    missing = [n for n in ADAPTER_FILES if not (path / n).is_file()]
    if missing:
        raise ArtifactError(f"no trained adapter at {path} (missing {', '.join(missing)}): {fix}")
    return read_adapter_config(path, fix)


def read_adapter_config(path: Path, fix: str = TRAIN_FIX) -> dict:
    """The adapter's parsed adapter_config.json (the one reader of it)."""
    try:
        return json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path / 'adapter_config.json'} unreadable ({exc}): {fix}") from exc


def adapter_rank(config: dict) -> int:
    """Largest rank in an adapter (``r`` or any ``rank_pattern`` entry)."""
    return max([int(config.get("r", 0)), *map(int, (config.get("rank_pattern") or {}).values())])


def vllm_rank(rank: int) -> int:
    """Smallest --max-lora-rank vLLM accepts that holds an adapter of this rank."""
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise ArtifactError(
        f"LoRA rank {rank} is above vLLM's largest ({VLLM_LORA_RANKS[-1]}): retrain with a smaller lora.r"
    )


def vllm_problems(config: dict) -> dict[str, str]:
    """Why vLLM could not serve an adapter with this adapter_config.json (empty: it can).

    Keys: ``lora`` (peft type, DoRA), ``modules_to_save`` (vllm-project/vllm#9280),
    ``rank`` (above vLLM's largest).
    """
    out = {}
    if config.get("peft_type") != "LORA":
        out["lora"] = f"a {config.get('peft_type')} adapter; vLLM serves LoRA only"
    elif config.get("use_dora"):
        out["lora"] = "a DoRA adapter; vLLM serves plain LoRA only (serve the merged model)"
    if config.get("modules_to_save"):
        out["modules_to_save"] = (
            f"modules_to_save={config['modules_to_save']} cannot be served by vLLM; "
            f"retrain without it or serve the merged model (--merged)"
        )
    if adapter_rank(config) > VLLM_LORA_RANKS[-1]:
        out["rank"] = f"LoRA rank {adapter_rank(config)} is above vLLM's largest ({VLLM_LORA_RANKS[-1]})"
    return out


def chat_template_file(path: Path) -> Path | None:
    """The saved chat template (the format trained on, which vLLM is given to serve)."""
    f = path / "chat_template.jinja"
    return f.resolve() if f.is_file() else None


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter that passed every check."""

    path: Path
    name: str  # lineage name, e.g. medqa-1a2b3c4d-5e6f7a8b
    rank: int  # largest rank in the adapter (r or rank_pattern)
    lineage: dict = field(repr=False)
    chat_template: Path | None = None
    target_modules: tuple[str, ...] | None = None  # None: a regex or "all-linear"


@dataclass(frozen=True)
class Merged:
    """A merged model directory that passed every check."""

    path: Path
    name: str
    lineage: dict = field(repr=False)
    chat_template: Path | None = None


def check_adapter(path: str | Path, model: ModelParams, max_lora_rank: int | None = None) -> Adapter:
    """Everything vLLM would only find out after loading the base, checked up front.

    Args:
        path: the adapter directory (peft ``save_pretrained`` + tokenizer + lineage.json).
        model: ``model`` params; the adapter must have been trained on ``model.base``.
        max_lora_rank: a server's ``--max-lora-rank``; the adapter's rank must fit.
    """
    path = Path(path)
    fix = "train one with `dvc repro train`, or pass --adapter/ADAPTER=<adapter dir>"
    if not path.is_dir():
        raise ArtifactError(f"no adapter at {path}: {fix}")
    config = check_adapter_files(path, fix)
    problems = vllm_problems(config)
    if problems:
        raise ArtifactError(f"{path}: " + "; ".join(problems.values()))
    lineage = read_lineage(path, "adapter", "it was not written by the train stage: " + fix)
    what = f"adapter {lineage['name']} ({path})"
    check_lineage_base(lineage, model, what)
    rank = adapter_rank(config)
    if max_lora_rank is not None and rank > max_lora_rank:
        raise ArtifactError(
            f"{what} has LoRA rank {rank} > --max-lora-rank {max_lora_rank} (the server's "
            f"limit): use --max-lora-rank {vllm_rank(rank)} or higher"
        )
    template = chat_template_file(path)
    if template is None:
        raise ArtifactError(f"{path} has no chat_template.jinja (the format it was trained on): {fix}")
    targets = config.get("target_modules")
    return Adapter(
        path=path.resolve(),
        name=lineage["name"],
        rank=rank,
        lineage=lineage,
        chat_template=template,
        target_modules=tuple(sorted(targets)) if isinstance(targets, list) else None,
    )


def check_merged(path: str | Path, model: ModelParams) -> Merged:
    """The merged model: a complete safetensors checkpoint with lineage on ``model.base``."""
    path = Path(path)
    fix = "run `dvc repro merge` (merge.output_dir)"
    if not path.is_dir():
        raise ArtifactError(f"no merged model at {path}: {fix}")
    try:
        check_model_dir(path)
    except BaseModelError as exc:
        raise ArtifactError(f"no merged model usable at {path} ({exc}): {fix}") from exc
    lineage = read_lineage(path, "merged model", fix)
    check_lineage_base(lineage, model, f"merged model {lineage['name']} ({path})")
    return Merged(path=path.resolve(), name=lineage["name"], lineage=lineage, chat_template=chat_template_file(path))
