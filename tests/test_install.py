"""`make install`'s Python floor: one `error:` line below it, and the same floor everywhere.

A fake interpreter stands in for an older Python: it answers the version query with the
version it pretends to be and records any other call (the `-m venv` that follows a passed
check), so the test runs the real Makefile recipe without building an environment.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def makefile_floor() -> str:
    return re.search(r"^PYTHON_MIN := (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE).group(1)


def fake_python(tmp_path: Path, version: str) -> Path:
    path = tmp_path / f"python{version}"
    path.write_text(
        "#!/bin/sh\n"
        f'case "$*" in *version_info*) echo {version}; exit 0 ;; esac\n'
        'echo "fake python called: $*"; exit 3\n'
    )
    path.chmod(0o755)
    return path


def make_install(tmp_path: Path, python: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", "install", f"PYTHON={python}", f"VENV={tmp_path / 'venv'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# make's own failure trailer: "make: ***" at top level, "make[N]: ***" when the suite itself
# runs under `make test` (MAKELEVEL > 0).
MAKE_TRAILER = re.compile(r"^make(\[\d+\])?: \*\*\*")


@pytest.mark.parametrize("version", ["3.10", "3.9"])
def test_install_below_floor_stops_with_one_error_line(tmp_path, version):
    proc = make_install(tmp_path, fake_python(tmp_path, version))
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if not MAKE_TRAILER.match(line)]
    floor = makefile_floor()
    assert ours == [
        (
            f"error: Python {version} at PYTHON={tmp_path / f'python{version}'}; the pinned packages "
            f"need {floor}+ — run make install PYTHON=python{floor} (or newer)"
        )
    ]
    assert "fake python called" not in proc.stdout + proc.stderr  # stopped before `-m venv`
    assert not (tmp_path / "venv").exists()


@pytest.mark.parametrize("version", ["3.11", "3.12", "3.14"])
def test_install_at_or_above_floor_goes_on_to_build_the_venv(tmp_path, version):
    proc = make_install(tmp_path, fake_python(tmp_path, version))
    assert "error:" not in proc.stderr
    assert f"fake python called: -m venv {tmp_path / 'venv'}" in proc.stdout


def test_floor_is_the_same_in_pyproject_and_readmes():
    floor = makefile_floor()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["requires-python"] == f">={floor}"
    for readme in ("README.md", "README_zh.md"):
        assert f"Python {floor}+" in (ROOT / readme).read_text(encoding="utf-8"), readme


def planned_install(tmp_path: Path, gpu: bool, args: tuple[str, ...] = ()) -> str:
    """The commands `make install` would run (make -n), with nvidia-smi listing a GPU or failing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + ("echo 'GPU 0: NVIDIA A10 (UUID: GPU-0)'\n" if gpu else "exit 9\n"))
    smi.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(
        ["make", "-n", "--no-print-directory", "install", f"VENV={tmp_path / 'venv'}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=env,
    )
    return proc.stdout


def torch_line(plan: str) -> str:
    return next(line for line in plan.splitlines() if "torch" in line and "pip install" in line)


def test_install_without_a_gpu_takes_the_cpu_torch_and_cpu_vllm(tmp_path):
    plan = planned_install(tmp_path, gpu=False)
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in torch_line(plan)
    assert 'case "cpu" in' in plan


def test_install_with_a_gpu_takes_the_cuda_torch_and_gpu_vllm(tmp_path):
    plan = planned_install(tmp_path, gpu=True)
    assert "download.pytorch.org" not in torch_line(plan)
    assert 'case "gpu" in' in plan


def test_use_system_torch_keeps_the_images_torch(tmp_path):
    plan = planned_install(tmp_path, gpu=True, args=("USE_SYSTEM_TORCH=1", "VLLM=none"))
    assert f"-m venv --system-site-packages {tmp_path / 'venv'}" in plan
    assert not any("pip install" in line and "torch==" in line for line in plan.splitlines())
    assert 'case "none" in' in plan
