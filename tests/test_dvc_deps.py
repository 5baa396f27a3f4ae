"""dvc.yaml's code deps are derived, not trusted: every project module a stage imports,
directly or through another project module, must be a dep of that stage; and the folder
rule holds: a stage (``mediagent/pipeline/``) or command (``mediagent/commands/``) module
never imports another stage or command module (what they share lives in ``mediagent/``)."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from tests.conftest import ROOT

PACKAGE = ROOT / "mediagent"
ENTRY_FOLDERS = ("pipeline", "commands")


def module_path(name: str) -> Path:
    """mediagent.a.b -> mediagent/a/b.py (or the package's __init__.py)."""
    path = ROOT.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def project_imports(path: Path) -> set[str]:
    """``mediagent.*`` modules imported anywhere in the file (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mediagent":
            for alias in node.names:  # `from mediagent import scoring` names a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if module_path(sub).is_file() else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "mediagent"}
    # Package __init__ files only hold docstrings: not code a stage runs.
    return {m for m in found if module_path(m).name != "__init__.py"}


def closure(module: str) -> set[str]:
    seen, todo = {module}, [module]
    while todo:
        for dep in project_imports(module_path(todo.pop())):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def stage_modules() -> dict[str, str]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return {name: stage["cmd"].split("python -m ")[1].split()[0] for name, stage in stages.items()}


def test_stage_deps_list_every_imported_module():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    for name, module in stage_modules().items():
        needed = {module_path(m).relative_to(ROOT).as_posix() for m in closure(module)}
        listed = {d for d in stages[name]["deps"] if d.startswith("mediagent/")}
        assert needed <= listed, f"dvc.yaml stage {name!r} misses deps {sorted(needed - listed)}"
        assert listed <= needed, f"dvc.yaml stage {name!r} lists modules it never imports: {sorted(listed - needed)}"


def test_stage_folder_holds_exactly_the_dvc_stages():
    in_folder = {p.stem for p in (PACKAGE / "pipeline").glob("*.py")} - {"__init__"}
    assert {m.rsplit(".", 1)[1] for m in stage_modules().values()} == in_folder
    assert all(m.startswith("mediagent.pipeline.") for m in stage_modules().values())


def test_no_stage_or_command_imports_another():
    entries = {
        f"mediagent.{folder}.{p.stem}"
        for folder in ENTRY_FOLDERS
        for p in (PACKAGE / folder).glob("*.py")
        if p.stem != "__init__"
    }
    assert len(entries) >= 12
    for path in PACKAGE.rglob("*.py"):
        if path.name == "cli.py":  # the command group dispatches to them by name, lazily
            continue
        own = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        bad = (project_imports(path) & entries) - {own}
        assert not bad, f"{path.relative_to(ROOT)} imports the stage/command module(s) {sorted(bad)}"


def test_closure_follows_helpers():
    """The check itself can fail: a helper's own import is part of the closure."""
    assert "mediagent.params" in closure("mediagent.loading")
    assert "mediagent.errors" in closure("mediagent.chat_format")
    assert {
        "mediagent.loading",
        "mediagent.params",
        "mediagent.artifacts",
        "mediagent.fileio",
        "mediagent.chat_format",
        "mediagent.errors",
    } <= closure("mediagent.pipeline.merge")
