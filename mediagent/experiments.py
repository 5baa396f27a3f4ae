"""DVC experiments as servable adapters: which experiments exist, and one's adapter on disk.

``dvc exp run`` commits each experiment under ``refs/exps/...`` and keeps its outputs in
this repository's DVC cache; only the last one stays in the workspace. ``materialise``
copies an experiment's ``train.output_dir`` out of the cache through DVC's own filesystem
at the experiment's commit (what ``dvc get . models/adapter --rev <exp>`` does), into
``serve.experiments_dir/<commit sha>``. A commit never changes, so a copy made once is
reused; it is written atomically, so an interrupted copy is never taken for a whole one.

Used by ``mediagent serve --exp`` and ``mediagent serve load --exp``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from mediagent import compat
from mediagent.errors import UserError
from mediagent.fileio import atomic_path

log = logging.getLogger(__name__)


class ExperimentError(UserError):
    """An experiment is unknown, ambiguous or its adapter is not in the cache; the message says why."""


@dataclass(frozen=True)
class Experiment:
    name: str
    rev: str  # the experiment's commit (refs/exps/...)
    baseline: str  # the commit it was run from


def _git(repo_root: str | Path):
    from dvc.scm import SCM

    return SCM(str(repo_root))


def list_experiments(repo_root: str | Path = ".") -> list[Experiment]:
    """Every experiment of the repository, on any baseline commit (what ``dvc exp list -A`` shows).

    Read from the git refs directly, as ``dvc exp list`` does, but without taking DVC's
    repository lock: a ``dvc exp run`` holds it for its whole run, and serving or loading
    a finished experiment meanwhile is the point.
    """
    scm = _git(repo_root)
    try:
        found = [Experiment(name, scm.get_ref(ref), baseline) for name, ref, baseline in compat.experiment_refs(scm)]
    finally:
        scm.close()
    return sorted((e for e in found if e.rev), key=lambda e: e.name)


def _head(repo_root: str | Path) -> str | None:
    scm = _git(repo_root)
    try:
        return scm.get_rev()
    except Exception:  # no commit yet: then there are no experiments either
        return None
    finally:
        scm.close()


def resolve(names: Iterable[str], repo_root: str | Path = ".") -> list[Experiment]:
    """The experiments called ``names``, in that order; unknown names fail listing the known ones.

    A name used on several baselines means the one run from the current commit, as in
    ``dvc exp apply``; if none of them was, the name is ambiguous.
    """
    names = list(names)
    known = list_experiments(repo_root)
    by_name: dict[str, list[Experiment]] = {}
    for e in known:
        by_name.setdefault(e.name, []).append(e)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        listed = ", ".join(sorted(by_name)) or "none (run one with `dvc exp run -S lora.r=8`)"
        raise ExperimentError(f"no DVC experiment called {', '.join(unknown)}; experiments here: {listed}")
    head = _head(repo_root) if any(len(by_name[n]) > 1 for n in names) else None
    out = []
    for n in names:
        found = by_name[n]
        if len(found) > 1:
            found = [e for e in found if e.baseline == head]
            if len(found) != 1:
                bases = ", ".join(e.baseline[:7] for e in by_name[n])
                raise ExperimentError(
                    f"experiment name {n} exists on several baseline commits ({bases}): "
                    f"check out the commit it was run from, or rename one with `dvc exp rename`"
                )
        out.append(found[0])
    return out


def materialise(exp: Experiment, cache_dir: str | Path, repo_root: str | Path = ".") -> Path:
    """The experiment's adapter directory (``train.output_dir`` at its commit) under ``cache_dir``."""
    dest = Path(cache_dir) / exp.rev
    if dest.is_dir():
        return dest
    from dvc.api import DVCFileSystem

    fs = DVCFileSystem(str(repo_root), rev=exp.rev)
    # The experiment's own params say where its adapter was written.
    output_dir = yaml.safe_load(fs.read_text("params.yaml"))["train"]["output_dir"]
    if not fs.isdir(output_dir):
        raise ExperimentError(
            f"experiment {exp.name} ({exp.rev[:7]}) has no {output_dir}: it did not run "
            f"the train stage; run one that does, e.g. `dvc exp run -S lora.r=8`"
        )
    log.info(
        "copying experiment %s's adapter (%s at %s) out of the DVC cache into %s",
        exp.name,
        output_dir,
        exp.rev[:7],
        dest,
    )
    try:
        # A path that does not exist yet: fs.get copies the folder as it (into an existing
        # folder it would nest it). It is renamed onto dest only when complete.
        with atomic_path(dest) as tmp:
            fs.get(output_dir, str(tmp), recursive=True)
    except (FileNotFoundError, OSError) as exc:
        raise ExperimentError(
            f"the adapter of experiment {exp.name} is not in this repository's DVC cache "
            f"({exc}): fetch it with `dvc exp pull <remote> {exp.name}`"
        ) from exc
    return dest
