"""Rooms by concern: no module of the package over 500 lines, no function over 60.

A module that outgrows the limit is split by concern into library modules (STYLE.md); a
long function into named steps. Lines are counted as written (ruff-formatted, 120 columns).
"""

from __future__ import annotations

import ast

from tests.conftest import ROOT

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
PACKAGE = ROOT / "mediagent"


def sizes() -> tuple[list[str], list[str]]:
    modules, functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        where = path.relative_to(ROOT)
        if (n := len(source.splitlines())) > MAX_MODULE_LINES:
            modules.append(f"{where}: {n} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                    functions.append(f"{where}:{node.lineno} {node.name}: {n} lines")
    return modules, functions


def test_no_module_over_500_lines_and_no_function_over_60():
    modules, functions = sizes()
    assert not modules, f"split these modules by concern (at most {MAX_MODULE_LINES} lines): {modules}"
    assert not functions, f"break these into named steps (at most {MAX_FUNCTION_LINES} lines): {functions}"


def test_the_count_sees_the_package():
    # A wrong path would make the test above pass on nothing.
    assert len(list(PACKAGE.rglob("*.py"))) > 40
    assert (PACKAGE / "pipeline" / "train.py").is_file()
