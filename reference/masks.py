"""Pruning scores and mask selection with exact counts.

Rounding: a group of n weights at sparsity s loses k = floor(s * n) weights
(`schedule.prune_count`). Tie-break: scores are sorted with a stable sort, so among equal
scores the weight with the lower index (row-major within the group) is pruned first.
"""

from __future__ import annotations

import numpy as np

from .checks import check_gram, check_mask_target, check_weights
from .schedule import prune_count
from .options import DEFAULTS


def magnitude_scores(W: np.ndarray) -> np.ndarray:
    """S_ij = |W_ij|."""
    return np.abs(check_weights(W))


def wanda_scores(W: np.ndarray, XtX: np.ndarray) -> np.ndarray:
    """S_ij = |W_ij| * ||X_j||, with ||X_j|| = sqrt((X^T X)_jj).

    Parameters
    ----------
    W : (d_out, d_in) weights, ``nn.Linear`` layout.
    XtX : (d_in, d_in) Gram matrix of the layer's inputs.
    """
    W = check_weights(W)
    XtX = check_gram(XtX, W.shape[1])
    return np.abs(W) * np.sqrt(np.diag(XtX))[None, :]


def prune_lowest(scores: np.ndarray, k: int) -> np.ndarray:
    """Mask of a 1-D or 2-D (rows) score array with the k lowest of each row set False."""
    scores2 = np.atleast_2d(scores)
    order = np.argsort(scores2, axis=1, kind="stable")
    keep = np.ones(scores2.shape, dtype=bool)
    np.put_along_axis(keep, order[:, :k], False, axis=1)
    return keep.reshape(scores.shape)


def _select_unstructured(scores: np.ndarray, sparsity: float, group: str) -> np.ndarray:
    if group == "row":
        return prune_lowest(scores, prune_count(scores.shape[1], sparsity))
    return prune_lowest(scores.ravel(), prune_count(scores.size, sparsity)).reshape(scores.shape)


def nm_protected(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """True for the n highest scores of every m consecutive inputs of a row."""
    d_out, d_in = scores.shape
    groups = scores.reshape(d_out * d_in // m, m)
    return prune_lowest(groups, m - n).reshape(d_out, d_in)


def select_mask(
    scores: np.ndarray,
    sparsity: float | None,
    pattern: str = DEFAULTS.pattern,
    group: str = DEFAULTS.group,
) -> np.ndarray:
    """M = keep the highest scores: prune floor(s * n) lowest per group (True = kept).

    unstructured: n is d_in per row (``group="row"``, Wanda) or d_out * d_in for the whole
    matrix (``group="layer"``, the official ADMM code).

    N:M: at most N nonzeros in every M consecutive inputs of a row; ``sparsity=None``
    means exact N:M (s = 1 - N/M). A smaller s gives the gradual N:M mask of ADMM-Grad:
    the N best of every group are always kept, the others are pruned by score (per row or
    layer, as `group` says) up to s; at s = 1 - N/M that is exactly N:M.

    Parameters
    ----------
    scores : (d_out, d_in) finite, higher = more important.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or not np.all(np.isfinite(scores)):
        raise ValueError(f"scores must be a finite 2-D array, got shape {scores.shape}")
    nm, s, exact = check_mask_target(sparsity, pattern, group, scores.shape[1])
    if nm is None:
        return _select_unstructured(scores, s, group)
    protected = nm_protected(scores, *nm)
    if exact:
        return protected
    # gradual N:M: protected entries get +inf and are never among the pruned
    return _select_unstructured(np.where(protected, np.inf, scores), s, group)
