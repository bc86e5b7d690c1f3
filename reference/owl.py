"""Outlier-weighed layerwise sparsity (OWL; Yin et al., ICML 2024): one target per block.

OWL's observation: blocks whose Wanda scores hold more outliers lose more when pruned.
With the paper's symbols, block l's "layerwise outlier distribution" is

    D_l = #{ A_ij > M * mean(A) } / #A,     A_ij = |W_ij| * ||X_j||_2,

the Wanda scores A of all the block's prunable linears pooled (one mean over all of
them), M the outlier threshold (paper: M = 5). Blocks then get sparsities that fall with
D_l, within lambda of the target S (paper: lambda = 0.08):

    r_l = (D_l - min D) / (max D - min D)                 (min-max normalisation; 0 if all equal)
    S_l = clip(S + lambda - 2 lambda r_l + c,  max(S - lambda, 0),  S + lambda)

with the one shift c that makes the average over all prunable weights exactly S:
sum_l n_l S_l = S sum_l n_l (n_l = the block's number of prunable weights).

Relation to OWL's code (luuyin/OWL): it sets the density 1 - S_l = 2 lambda r_l -
mean(2 lambda r) + 1 - S, i.e. S_l = S - 2 lambda (r_l - mean r): the same as above when
the blocks have equal sizes and nothing is clipped. Here the average is weighted by n_l
(blocks of different sizes keep the overall sparsity) and every S_l stays in
[S - lambda, S + lambda], which the paper states and the code does not enforce (one
outlying block gets S - 2 lambda (1 - mean r) there).

N:M patterns fix every block's sparsity at 1 - N/M: OWL is refused for them
(`owl_sparsities(..., pattern="2:4")` raises a ValueError naming ``sparsity_profile``).
"""

from __future__ import annotations

import numbers
from typing import Sequence

import numpy as np

from .checks import check_fraction, check_positive, parse_pattern
from .options import DEFAULTS


def _wanda_sums(W: np.ndarray, col_norms: np.ndarray, threshold: float | None = None):
    """(sum of A, #A) or, with a threshold, #{A > threshold}; A = |W| * col_norms[None, :]."""
    A = np.abs(np.asarray(W, dtype=np.float64)) * np.asarray(col_norms, dtype=np.float64)[None, :]
    return (float(A.sum()), A.size) if threshold is None else int(np.count_nonzero(A > threshold))


def check_block(Ws, col_norms, m) -> None:
    if len(Ws) == 0 or len(Ws) != len(col_norms):
        raise ValueError(f"Ws and col_norms must be non-empty sequences of equal length, "
                         f"got {len(Ws)} and {len(col_norms)}")
    for W, c in zip(Ws, col_norms):
        if W.ndim != 2 or c.shape != (W.shape[1],):
            raise ValueError(f"col_norms must hold one norm per input of each W: W {tuple(W.shape)}, "
                             f"col_norms {tuple(c.shape)}")
    check_positive("m", m)


def outlier_ratio(Ws: Sequence[np.ndarray], col_norms: Sequence[np.ndarray], m: float = 5.0) -> float:
    """D = #{A_ij > m mean(A)} / #A, A = |W| ||X_j||_2 pooled over the block's linears.

    Parameters
    ----------
    Ws : the block's prunable weights, each (d_out_k, d_in_k), ``nn.Linear`` layout.
    col_norms : per weight, its inputs' norms ||X_j||_2 = sqrt(diag(XtX)), shape (d_in_k,).
        Any common factor (OWL uses ||X_j|| / sqrt(tokens)) leaves D unchanged.
    m : the outlier threshold M (paper: 5).

    Returns the fraction in [0, 1] (OWL's code reports it in percent).
    """
    Ws = [np.asarray(W) for W in Ws]
    col_norms = [np.asarray(c) for c in col_norms]
    check_block(Ws, col_norms, m)
    sums = [_wanda_sums(W, c) for W, c in zip(Ws, col_norms)]
    total, count = sum(s for s, _ in sums), sum(n for _, n in sums)
    threshold = m * total / count
    return sum(_wanda_sums(W, c, threshold) for W, c in zip(Ws, col_norms)) / count


def _shift(a: np.ndarray, n: np.ndarray, target: float, lo: float, hi: float) -> float:
    """c with sum n clip(a + c, lo, hi) = target sum n: exact on the piecewise-linear path."""
    f = lambda c: float(np.sum(n * np.clip(a + c, lo, hi)) - target * np.sum(n))  # noqa: E731
    knots = np.unique(np.concatenate([lo - a, hi - a]))  # where some S_l starts/stops clipping
    values = np.array([f(c) for c in knots])             # nondecreasing, from <= 0 to >= 0
    i = int(np.searchsorted(values, 0.0))
    if i == 0 or values[i] == 0.0:
        return float(knots[min(i, len(knots) - 1)])
    (c0, c1), (f0, f1) = knots[i - 1:i + 1], values[i - 1:i + 1]
    return float(c0 - f0 * (c1 - c0) / (f1 - f0))       # f is linear between the knots


def owl_sparsities(
    ratios: Sequence[float],
    sizes: Sequence[int],
    sparsity: float,
    lam: float = 0.08,
    pattern: str = DEFAULTS.pattern,
) -> np.ndarray:
    """S_l = clip(S + lam - 2 lam r_l + c, S - lam, S + lam), r_l = min-max normalised D_l.

    The shift c makes sum_l n_l S_l = S sum_l n_l exactly (up to rounding); S_l falls as
    D_l grows. Equal ratios or ``lam = 0`` give S for every block.

    Parameters
    ----------
    ratios : D_l per block (`outlier_ratio`), finite, >= 0.
    sizes : n_l per block, its number of prunable weights (> 0).
    sparsity : the overall target S in [0, 1).  lam : lambda >= 0, with S + lambda < 1.
    pattern : only ``"unstructured"``: N:M raises a ValueError naming ``sparsity_profile``.

    Returns the per-block sparsities, float64 of shape (len(ratios),).
    """
    nm = parse_pattern(pattern)
    if nm is not None:
        raise ValueError(f"sparsity_profile='owl' is defined for unstructured sparsity only; "
                         f"pattern {pattern} fixes every block at {1 - nm[0] / nm[1]:g} "
                         f"(use sparsity_profile='uniform')")
    s = check_fraction("sparsity", sparsity)
    lam = check_positive("lam", lam, allow_zero=True)
    if s + lam >= 1.0:
        raise ValueError(f"sparsity + lam must be < 1 (no block may lose all its weights), "
                         f"got {s} + {lam}")
    D = np.asarray(ratios, dtype=np.float64)
    n = np.asarray(sizes)
    if D.ndim != 1 or D.size == 0 or not np.all(np.isfinite(D)) or np.any(D < 0):
        raise ValueError(f"ratios must be a non-empty 1-D sequence of finite numbers >= 0, got {ratios!r}")
    if n.shape != D.shape or not all(isinstance(v, numbers.Integral) and v > 0 for v in n.tolist()):
        raise ValueError(f"sizes must hold one positive integer per ratio, got {sizes!r}")
    n = n.astype(np.float64)
    spread = D.max() - D.min()
    if lam == 0.0 or spread == 0.0:
        return np.full(D.shape, s)
    r = (D - D.min()) / spread
    a = s + lam - 2.0 * lam * r
    lo, hi = max(s - lam, 0.0), s + lam
    return np.clip(a + _shift(a, n, s, lo, hi), lo, hi)
