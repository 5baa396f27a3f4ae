"""Typed view of params.yaml.

Each section becomes a frozen dataclass. Unknown keys, missing keys, wrong types and
cross-field problems are collected and raised as one ParamsError that lists every problem
with the param to fix (``lora.r`` style names), before any data or model is touched.
The dataclasses have no defaults: params.yaml is the one source of every value, so deleting
a key is an error that names it instead of a silent change of value.

    from mediagent.params import load_params
    params = load_params()          # params.yaml in the current directory
    params.lora.r
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from mediagent.data_params import DataParams, SourceParams  # noqa: F401 (re-exported)
from mediagent.errors import UserError
from mediagent.params_sections import (  # noqa: F401 (re-exported: importers name them from here)
    VLLM_LORA_RANKS,
    DownloadParams,
    EvalParams,
    LaunchParams,
    LoraParams,
    MergeParams,
    ModelParams,
    Optimizer,
    ProcessParams,
    ReviewParams,
    Scheduler,
    ServeParams,
    TinyParams,
    TrainParams,
)


class ParamsError(UserError, ValueError):
    """One or more params are invalid; the message lists each with its fix."""


@dataclass(frozen=True)
class Params:
    data: DataParams
    download: DownloadParams
    process: ProcessParams
    model: ModelParams
    tiny: TinyParams
    lora: LoraParams
    train: TrainParams
    launch: LaunchParams
    merge: MergeParams
    eval: EvalParams
    serve: ServeParams
    review: ReviewParams

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SCALARS = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}  # bool is an int in Python: not here


def _accepts(hint: Any, value: Any) -> bool:
    """Whether a YAML value fits a field type: a scalar, a Literal, a union of them, a tuple or a mapping
    (download.mirrors, a list, is checked by its section, whose message says how to write one)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return any(value == choice and type(value) is type(choice) for choice in get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(member, value) for member in get_args(hint))
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_accepts(get_args(hint)[0], v) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    kinds = _SCALARS.get(hint)
    return kinds is None or isinstance(value, kinds) and (hint is bool or not isinstance(value, bool))


def _describe(hint: Any) -> str:
    """What a field type accepts in params.yaml's terms, e.g. 'chunked, full' or 'int or auto'."""
    origin = typing.get_origin(hint)
    if origin in (Literal, typing.Union, types.UnionType):
        sep = ", " if origin is Literal else " or "
        return sep.join(arg if isinstance(arg, str) else _describe(arg) for arg in get_args(hint))
    if origin in (tuple, dict):
        return f"a list of {_describe(get_args(hint)[0])}" if origin is tuple else "a mapping"
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, where: str, problems: list[str]) -> Any:
    """Check one YAML value against a dataclass field type (ints are accepted as floats)."""
    origin = typing.get_origin(hint)
    if origin is tuple and dataclasses.is_dataclass(typing.get_args(hint)[0]):  # a list of sections
        if not isinstance(value, (list, tuple)):
            problems.append(f"{where}: expected a list (one `- key: value` block per entry), got {value!r}")
            return ()
        return tuple(_build(typing.get_args(hint)[0], f"{where}[{i}]", v, problems) for i, v in enumerate(value))
    if hint is float and isinstance(value, str):
        # PyYAML (YAML 1.1) reads 1e-8 without a dot as a string, and JSON or `dvc exp run -S` write it so
        with contextlib.suppress(ValueError):
            value = float(value)
    if not _accepts(hint, value):
        problems.append(
            f"{where}: {value!r} is not one of: {_describe(hint)}"
            if origin is Literal
            else f"{where}: expected {_describe(hint)}, got {value!r}"
        )
        return value
    return tuple(value) if typing.get_origin(hint) is tuple else float(value) if hint is float else value


def _build(cls: type, section: str, raw: Any, problems: list[str]) -> Any:
    if not isinstance(raw, dict):
        problems.append(f"{section}: expected a mapping of params, got {raw!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            problems.append(f"{section}.{key}: unknown param (known: {', '.join(fields)})")
    kwargs, type_problems = {}, []
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], f"{section}.{name}", type_problems)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            type_problems.append(f"{section}.{name}: missing required param")
    problems.extend(type_problems)
    if type_problems:  # cross-field checks would only repeat them
        return None
    obj = cls(**kwargs)
    problems.extend(getattr(obj, "problems", list)())
    return obj


def parse_params(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    """Build Params from a parsed YAML mapping; raise one ParamsError listing every problem."""
    problems: list[str] = []
    sections = {}
    hints = typing.get_type_hints(Params)
    for f in dataclasses.fields(Params):
        if f.name not in raw:
            problems.append(f"{f.name}: missing section")
            continue
        sections[f.name] = _build(hints[f.name], f.name, raw[f.name], problems)
    for key in raw:
        if key not in hints:
            problems.append(f"{key}: unknown section (known: {', '.join(hints)})")
    if problems:
        raise ParamsError(f"invalid params in {source}:\n  - " + "\n  - ".join(problems))
    return Params(**sections)


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found; run from the repository root (where dvc.yaml is)")
    with path.open(encoding="utf-8") as fh:
        raw = yaml.safe_load(fh) or {}
    return parse_params(raw, str(path))


def with_overrides(params: Params, **sections: dict[str, Any]) -> Params:
    """A copy of params with some fields replaced, re-validated (tests and benchmarks)."""
    raw = params.to_dict()
    for section, values in sections.items():
        raw[section] = {**raw[section], **values}
    return parse_params(raw, "overrides")
