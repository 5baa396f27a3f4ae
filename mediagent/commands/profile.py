"""``mediagent profile FILE``: switch params.yaml to a params profile in one command.

A profile (e.g. ``configs/profiles/gemma3-270m.yaml``) is a partial params.yaml: the keys it
names replace params.yaml's, everything else stays. params.yaml is rewritten round-trip
(ruamel.yaml, DVC's own YAML library), so its comments and key order survive; the result
is validated like any params.yaml before it replaces the file (atomically). Commit it, or
run ``dvc exp run`` to try it as an experiment; ``git checkout params.yaml`` switches back.
"""

from __future__ import annotations

from pathlib import Path

import click
import yaml

from mediagent.errors import UserError
from mediagent.fileio import atomic_path
from mediagent.params import parse_params


def flatten(tree: dict) -> dict[str, object]:
    """{"train": {"max_steps": 40}} -> {"train.max_steps": 40}: a profile names section keys."""
    if not all(isinstance(v, dict) for v in tree.values()):
        raise UserError("a profile maps params.yaml sections to {key: value} mappings")
    return {f"{section}.{key}": value for section, keys in tree.items() for key, value in keys.items()}


def apply(profile: Path, params_file: Path) -> dict[str, object]:
    """Write ``profile``'s keys into ``params_file``; returns the keys set."""
    from ruamel.yaml import YAML

    if not profile.is_file():
        raise UserError(f"{profile}: no such profile; see configs/profiles/")
    raw = yaml.safe_load(profile.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise UserError(f"{profile}: a profile maps params.yaml sections to {{key: value}} mappings")
    values = flatten(raw)
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    doc = rt.load(params_file.read_text(encoding="utf-8"))
    for dotted, value in values.items():
        section, _, key = dotted.partition(".")
        if section not in doc or key not in doc[section]:
            raise UserError(f"{profile}: {dotted} is not a key of {params_file}")
        doc[section][key] = value
    with atomic_path(params_file) as tmp:
        with tmp.open("w", encoding="utf-8") as fh:
            rt.dump(doc, fh)
        parse_params(yaml.safe_load(tmp.read_text(encoding="utf-8")), str(profile))  # refuse before replacing
    return values


@click.command(help="Write a params profile's keys into params.yaml (comments kept).")
@click.argument("profile", type=click.Path(path_type=Path))
@click.option("--params-file", type=click.Path(path_type=Path), default=Path("params.yaml"), show_default=True)
def command(profile: Path, params_file: Path) -> None:
    values = apply(profile, params_file)
    click.echo(f"{params_file}: {len(values)} keys from {profile}; `dvc repro` runs what they change")
