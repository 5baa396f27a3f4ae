"""dvc.yaml's code deps are derived, not trusted: every project module a stage imports,
directly or through another project module, must be a dep of that stage, and stage or
command modules never import each other (what they share lives in helper modules)."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from tests.conftest import ROOT

# Modules run as commands or DVC stages; the rest of stages/ are shared helpers.
ENTRY_MODULES = {"process", "base", "train", "merge", "evaluate", "serve", "infer", "chat", "download", "review",
                 "ui", "summary"}


def project_imports(module: str) -> set[str]:
    """``stages.*`` modules imported anywhere in ``module`` (function-level imports too)."""
    tree = ast.parse((ROOT / "stages" / f"{module}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "stages":  # from stages import evaluate, scoring
                found |= {a.name for a in node.names}
            elif node.module.startswith("stages."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("stages.")}
    return found - {module}


def closure(module: str) -> set[str]:
    seen, todo = {module}, [module]
    while todo:
        for dep in project_imports(todo.pop()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_stage_deps_list_every_imported_module():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    for name, stage in stages.items():
        module = stage["cmd"].split("-m stages.")[1].split()[0]
        needed = {f"stages/{m}.py" for m in closure(module)}
        listed = {d for d in stage["deps"] if d.startswith("stages/")}
        assert needed <= listed, f"dvc.yaml stage {name!r} misses deps {sorted(needed - listed)}"
        assert listed <= needed, f"dvc.yaml stage {name!r} lists modules it never imports: {sorted(listed - needed)}"


def test_no_stage_or_command_imports_another():
    modules = {p.stem for p in (ROOT / "stages").glob("*.py")} - {"__init__"}
    assert ENTRY_MODULES <= modules
    for module in sorted(modules):
        entries = project_imports(module) & ENTRY_MODULES
        assert not entries, f"stages/{module}.py imports the stage/command module(s) {sorted(entries)}"


def test_closure_follows_helpers(tmp_path):
    """The check itself can fail: a helper's own import is part of the closure."""
    assert "params" in closure("models") and "chatml" in closure("artifacts")
    assert {"models", "params", "artifacts", "fileio", "chatml"} <= closure("merge")
