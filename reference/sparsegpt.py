"""SparseGPT (Frantar & Alistarh 2023): OBS mask selection and update in one column sweep.

The blocked sweep of the original (IST-DASLab/sparsegpt), row-vectorized: per block of
`blocksize` columns the mask is chosen by the OBS score w^2 / [H^-1]_jj^2, then each column
is quantized to its mask and the error is propagated to the columns right of it through the
upper Cholesky factor of H^-1. Damping is the original's isotropic damp * mean(diag(H)) * I.

Differences from the original, both for exact, comparable masks: the number pruned per
block is allocated so that the total per row (``group="row"``) or per matrix
(``group="layer"``) is exactly floor(s * n); dead input features are given H_jj = 1 and
score 0 (pruned first) instead of having their weights zeroed.
"""

from __future__ import annotations

import numpy as np

from .checks import check_int, check_positive, check_problem
from .errors import FactorizationError
from .masks import prune_lowest, nm_protected
from .schedule import prune_count
from .options import DEFAULTS
from .methods import DEFAULT_DAMP


def inverse_hessian_factor(XtX: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """Upper Cholesky factor of (H + damp mean(diag H) I)^-1, dead features set to H_jj = 1."""
    H = np.array(XtX, dtype=np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    H += damp * np.mean(np.diag(H)) * np.eye(H.shape[0])
    try:
        Hinv = np.linalg.inv(np.linalg.cholesky(H))  # L^-1
    except np.linalg.LinAlgError:  # rank-deficient H with damp 0 (fewer samples than features)
        raise FactorizationError(f"Cholesky of 'H + damp mean(diag H) I' failed with damp={damp:g}: the Gram matrix "
                                 f"is singular (fewer calibration samples than features, or repeated "
                                 f"features); use damp > 0") from None
    Hinv = Hinv.T @ Hinv  # H^-1
    return np.linalg.cholesky(Hinv).T, dead


def _block_mask(scores: np.ndarray, i1: int, i2: int, sparsity: float, group: str) -> np.ndarray:
    """Keep-mask of one column block, its prune count allocated so the totals are exact."""
    if group == "row":
        k = prune_count(i2, sparsity) - prune_count(i1, sparsity)
        return prune_lowest(scores, k)
    d_out = scores.shape[0]
    k = prune_count(d_out * i2, sparsity) - prune_count(d_out * i1, sparsity)
    return prune_lowest(scores.ravel(), k).reshape(scores.shape)


def sparsegpt(
    W: np.ndarray,
    XtX: np.ndarray,
    sparsity: float | None,
    pattern: str = DEFAULTS.pattern,
    group: str = DEFAULTS.group,
    damp: float = DEFAULT_DAMP["sparsegpt"],
    blocksize: int = 128,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """OBS column sweep; returns (pruned W, keep-mask). With `mask` given, only the update.

    Arguments as `prune_layer`'s (``sparsity=None`` for N:M or with `mask`); `damp` is the
    isotropic damping of H + damp mean(diag H) I. Inputs are checked; W is not modified.
    """
    p = check_problem(W, XtX, sparsity, pattern, group, mask)
    check_positive("damp", damp, allow_zero=True)
    check_int("blocksize", blocksize, minimum=1)
    sparsity, nm, mask = p.sparsity, p.nm, p.mask
    W = np.array(p.W, dtype=np.float64)
    d_out, d_in = W.shape
    R, dead = inverse_hessian_factor(p.XtX, damp)
    if nm is not None:
        blocksize = max(nm[1], blocksize // nm[1] * nm[1])
    M = np.ones_like(W, dtype=bool) if mask is None else np.array(mask, dtype=bool)
    for i1 in range(0, d_in, blocksize):
        i2 = min(i1 + blocksize, d_in)
        W1 = W[:, i1:i2].copy()
        Q1 = np.zeros_like(W1)
        Err1 = np.zeros_like(W1)
        R1 = R[i1:i2, i1:i2]
        d = np.diag(R1)
        score = lambda a, b: np.where(dead[i1 + a:i1 + b], 0.0, W1[:, a:b] ** 2 / d[a:b] ** 2)
        if mask is None and nm is None:
            M[:, i1:i2] = _block_mask(score(0, i2 - i1), i1, i2, sparsity, group)
        for i in range(i2 - i1):
            if mask is None and nm is not None and i % nm[1] == 0:
                M[:, i1 + i:i1 + i + nm[1]] = nm_protected(score(i, i + nm[1]), *nm)
            w = W1[:, i]
            q = w * M[:, i1 + i]
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= np.outer(err, R1[i, i:])
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ R[i1:i2, i2:]
    return W, M
