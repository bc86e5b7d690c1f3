"""The built wheel (#28 item 1): what `pip install .` or a wheel install gets must hold every
module and task file of the source tree. A hand-written package list once left gpu/ without
its subpackages (ModuleNotFoundError on import), and evaluation/tasks rode on setuptools'
deprecated "importable but not listed" fallback; editable installs (CI, the quickstart) never
saw either."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"gpu": "admm_prune/gpu", "reference": "admm_prune/reference"}  # folder -> where the wheel puts it


def _shipped(folder: str) -> set[str]:
    """Every .py and task .yaml under `folder` of the source tree, as the wheel names them."""
    paths = [p for pattern in ("*.py", "*.yaml") for p in (ROOT / folder).rglob(pattern)
             if "__pycache__" not in p.parts]
    return {f"{SOURCES[folder]}/{p.relative_to(ROOT / folder).as_posix()}" for p in paths}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel built from a copy of the source tree (the tree itself gets no build/ folder);
    its file names and the build's output."""
    pytest.importorskip("setuptools")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    for folder in SOURCES:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    dest = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            str(src), "-w", str(dest)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (whl,) = dest.glob("admm_prune-*.whl")
    with zipfile.ZipFile(whl) as z:
        return set(z.namelist()), build.stdout + build.stderr


@pytest.mark.parametrize("folder", sorted(SOURCES))
def test_the_wheel_holds_every_module_and_task_file(wheel, folder):
    names, _ = wheel
    expected = _shipped(folder)
    assert expected, folder
    missing = sorted(expected - names)
    assert not missing, f"{len(missing)} files of {folder}/ missing from the wheel: {missing[:10]}"


def test_the_wheel_build_needs_no_deprecated_fallback(wheel):
    """Every folder the wheel holds is a package setuptools found, not one it keeps only with a
    "Package would be ignored" warning (the fallback setuptools plans to remove)."""
    _, output = wheel
    assert "absent from the `packages` configuration" not in output, output[-3000:]

