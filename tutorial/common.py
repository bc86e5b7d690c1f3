"""What every tutorial chapter sets up the same way: threads, fast mode, plots, a test layer.

Chapters import from here (``from common import ...``); it works when a chapter runs as
a script (its folder is on ``sys.path``) and in a notebook opened from this folder.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# One thread per library unless the environment says otherwise: on a small CPU shared with
# other jobs, BLAS/OpenMP threads waiting for each other cost far more than they gain (while
# this tutorial was written, on 2 shared cores, a SmolLM2 block took several times longer
# with 2 threads than with 1). Set before numpy and torch are imported.
for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import matplotlib  # noqa: E402
import numpy as np  # noqa: E402

if "ipykernel" not in sys.modules:  # a script: draw into files only, never a window
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FAST = os.environ.get("ADMM_TUTORIAL_FAST") == "1"  # CI: small sizes, seconds per chapter
REPO = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("ADMM_TUTORIAL_OUT", REPO / "tutorial" / "_build"))
OUT.mkdir(parents=True, exist_ok=True)
DATA = Path(os.environ.get("ADMM_PRUNE_DATA", REPO.parent / "shared" / "data"))


def save(fig, name):
    """Write a figure into OUT (and leave it open in a notebook, which displays it)."""
    fig.savefig(OUT / name, dpi=120, bbox_inches="tight")
    print(f"saved {OUT / name}")
    if "ipykernel" not in sys.modules:
        plt.close(fig)


def outlier_layer(seed, d_out, d_in, n_tokens=None, outliers=4):
    """(W, XtX, X) with log-normal feature scales, `outliers` features x20, correlated inputs.

    The recipe of the test suite's layers: what makes LLM layers hard for magnitude pruning
    (a few input features much larger than the rest) in a few lines.
    """
    rng = np.random.default_rng(seed)
    n_tokens = n_tokens or 4 * d_in
    A = np.eye(d_in) + rng.normal(size=(d_in, d_in)) / np.sqrt(d_in)
    scales = np.exp(0.5 * rng.normal(size=d_in))
    scales[rng.choice(d_in, outliers, replace=False)] *= 20
    X = (rng.normal(size=(n_tokens, d_in)) @ A) * scales
    W = rng.normal(size=(d_out, d_in))
    return W, X.T @ X, X


def tiny_workdir(name, arch="llama", layers=4):
    """Fast mode's stand-in for SmolLM2: a tiny random `arch` model saved in OUT/name/model,
    with small calibration (calib.jsonl) and evaluation (eval.txt) files of English-like words.
    Returns (model path, calibration file, evaluation file) as strings."""
    import json

    from admm_prune.gpu.checkpoint import models

    workdir = OUT / name
    workdir.mkdir(exist_ok=True)
    tiny, tiny_tok = models.tiny_model(arch, num_hidden_layers=layers)
    tiny.save_pretrained(workdir / "model")
    tiny_tok.save_pretrained(workdir / "model")
    rng = np.random.default_rng(0)
    words = "the of and to in a is that for it as was with be by on not he this are or his from".split()
    docs = [" ".join(rng.choice(words, size=int(rng.integers(20, 200)))) for _ in range(40)]
    (workdir / "calib.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in docs))
    (workdir / "eval.txt").write_text("\n".join(docs[:20]))
    return str(workdir / "model"), str(workdir / "calib.jsonl"), str(workdir / "eval.txt")
