"""The tutorial chapters run, in fast mode, as the scripts a reader runs, and write their plots.

Each chapter asserts its own claims (hand computation == reference function, and every
number its prose relies on), so "exits 0" is the real test; the plots are checked to exist.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TUTORIAL = REPO / "tutorial"
CHAPTERS = sorted(TUTORIAL.glob("[0-9][0-9]_*.py"))

# plots each chapter must write into ADMM_TUTORIAL_OUT
PLOTS = {
    "01_layerwise_problem": ["01_damping_path.png", "01_cost.png"],
    "02_masks": ["02_mask_errors.png"],
    "03_admm_fixed_mask": ["03_admm_convergence.png"],
    "04_gradual_masks": ["04_mask_movement.png", "04_methods.png"],
    "05_convergence": ["05_convergence.png"],
    "06_reference_vs_gpu": ["06_reference_vs_gpu.png"],
    "07_whole_model": ["07_layer_errors.png"],
    "08_beyond_the_paper": ["08_finish.png", "08_owl_profile.png", "08_owl_model.png"],
    "09_block_reconstruction": ["09_block_errors.png"],
    "10_alps": ["10_support_paths.png"],
}
NEEDS_TORCH = {"06_reference_vs_gpu", "07_whole_model", "08_beyond_the_paper", "09_block_reconstruction"}


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_every_chapter_is_listed():
    assert sorted(PLOTS) == [c.stem for c in CHAPTERS]


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_runs_in_fast_mode(chapter, tmp_path):
    pytest.importorskip("matplotlib")
    if chapter.stem in NEEDS_TORCH and not (_has("torch") and _has("transformers")):
        pytest.skip("needs the gpu extra (torch, transformers)")
    env = dict(os.environ, ADMM_TUTORIAL_FAST="1", ADMM_TUTORIAL_OUT=str(tmp_path), MPLBACKEND="Agg")
    # One thread per library: fast mode's problems are tiny, and NumPy's OpenBLAS and
    # torch's OpenMP pools fight over a 2-core CI machine (chapter 6 measured a torch
    # Cholesky inverse several times slower after SciPy work with both pools at 2 threads).
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        env.setdefault(var, "1")
    proc = subprocess.run([sys.executable, str(chapter)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{chapter.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    for plot in PLOTS[chapter.stem]:
        path = tmp_path / plot
        assert path.is_file() and path.stat().st_size > 1000, f"{chapter.name} did not write {plot}"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_is_a_percent_notebook(chapter):
    jupytext = pytest.importorskip("jupytext")
    text = chapter.read_text(encoding="utf-8")
    assert text.startswith("# ---\n# jupyter:\n#   jupytext:"), "missing the jupytext header"
    assert "format_name: percent" in text.split("# ---", 2)[1]
    nb = jupytext.read(chapter)
    kinds = [cell.cell_type for cell in nb.cells]
    assert kinds[0] == "markdown" and nb.cells[0].source.startswith("# Chapter"), "starts with its title"
    assert kinds.count("markdown") >= 5 and kinds.count("code") >= 5, kinds
    assert all(cell.source.strip() for cell in nb.cells), "no empty cells"
    # the notebook round-trips to the same script (nothing jupytext would rewrite), up to
    # the version stamp of whichever jupytext is installed
    def unstamped(s):
        return [line for line in s.strip().splitlines() if "jupytext_version:" not in line]

    assert unstamped(jupytext.writes(nb, fmt="py:percent")) == unstamped(text)
