"""The finish on the support: conjugate gradient on the masked normal equations.

Once a method has fixed its mask M, the best weights on M solve, row by row,

    G~_SS w_S = (W0~ G~)_S,     S = kept live inputs of the row (M_i and diag(XtX) > 0),

the damped, preconditioned problem of `admm` (`masked_lstsq` solves it exactly with one
dense solve per row). The finish runs K steps of conjugate gradient (CG) on all rows at
once, warm-started from the method's weights: one (d_out, d_in) x (d_in, d_in) product per
step, the cost of one ADMM iteration. In preconditioned coordinates G~ has the constant
diagonal 1 + damp on live features, so CG here is Jacobi-preconditioned CG (PCG) on the
original problem. ALPS (Meng et al., NeurIPS 2024) finishes its ADMM the same way.

Each CG step minimises the objective tr((W - W0~) G~ (W - W0~)^T) over a growing Krylov
space, so it never increases it; after |S| steps (exact arithmetic) it is the exact
masked solution. Per row, with R = (B - W G~) * S the residual on the support
(B = W0~ G~) and P the search direction (P_0 = R_0):

    a = |R|^2 / <P, P G~>,   W = W + a P,   R' = (B - W G~) * S,
    b = |R'|^2 / |R|^2,      P = R' + b P                               cg_step

W G~ is carried along (W G~ += a P G~), so the objective costs no product:
f = <W - W0~, W G~ - B>. Rows whose support is empty or already solved have R = 0; their
steps are a = b = 0 (no division by zero). Dead features are outside every support (G~ is
zero there); where the mask keeps them they get the dense weights, as in `masked_lstsq`
(they do not enter the objective), so K -> infinity gives exactly `masked_lstsq`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np

from .checks import check_gram, check_int, check_mask, check_positive, check_weights
from .admm import precondition
from .methods import DEFAULT_POLISH_DAMP

#: how many steps `polish_iterates` takes when not told (the step-through's length)
POLISH_STEPS = 10


class PolishRecord(NamedTuple):
    """One step of the finish in a result's ``polish`` (k = 0: the method's own weights).

    objective: tr((W - W0~) G~ (W - W0~)^T), the units of the ADMM history's objective;
    residual: ||(B - W G~) * S||_F, zero at the exact masked solution.
    """

    k: int
    objective: float
    residual: float


@dataclass(frozen=True)
class PolishState:
    """One CG iterate, in preconditioned coordinates (original weights = W / scale)."""

    k: int
    W: np.ndarray
    R: np.ndarray
    P: np.ndarray
    scale: np.ndarray
    objective: float
    residual: float


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den per row, 0 where den = 0 (an empty or solved row takes no step)."""
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def cg_step(W, WG, R, P, B, G, S):
    """W = W + a P, R = (B - W G~) * S, P = R + b P: one CG step on every row at once.

    a = |R|^2 / <P, P G~> and b = |R_new|^2 / |R|^2 per row. Returns (W, W G~, R, P).

    Parameters
    ----------
    W, WG, R, P, B : (d_out, d_in), WG = W G~.  G : (d_in, d_in).  S : (d_out, d_in) bool.
    """
    PG = P @ G
    rr = np.sum(R * R, axis=1)
    a = _ratio(rr, np.sum(P * PG, axis=1))[:, None]
    W = W + a * P
    WG = WG + a * PG
    R_new = (B - WG) * S
    b = _ratio(np.sum(R_new * R_new, axis=1), rr)[:, None]
    return W, WG, R_new, R_new + b * P


def polish_iterates(
    W: np.ndarray,
    XtX: np.ndarray,
    mask: np.ndarray,
    W_start: np.ndarray,
    *,
    damp: float = DEFAULT_POLISH_DAMP,
    iters: int = POLISH_STEPS,
) -> Iterator[PolishState]:
    """Yield W_k, k = 0..iters: CG on G~_SS w_S = (W0~ G~)_S per row, from W_start * M.

    The step-through form of the finish (`prune_layer(..., polish_iters=K)` takes the last
    state). Entries of W_start outside the mask are ignored; the result is exactly zero
    there.

    Parameters
    ----------
    W : (d_out, d_in) dense weights.  XtX : (d_in, d_in).  mask : (d_out, d_in) bool.
    W_start : (d_out, d_in), the method's weights (original coordinates).
    damp : lambda of G = XtX + lambda diag(XtX), as in `masked_lstsq`.
    """
    W = np.asarray(check_weights(W), dtype=np.float64)
    XtX = np.asarray(check_gram(XtX, W.shape[1]), dtype=np.float64)
    mask = check_mask(mask, W.shape)
    W_start = np.asarray(W_start, dtype=np.float64)
    if W_start.shape != W.shape or not np.all(np.isfinite(W_start)):
        raise ValueError(f"W_start must be a finite array of W's shape {W.shape}, got {W_start.shape}")
    check_positive("damp", damp, allow_zero=True)
    check_int("iters", iters, minimum=0)
    W0, G, scale, live = precondition(W, XtX, damp)
    B, S = W0 @ G, mask & live[None, :]
    Wk = np.where(mask & ~live[None, :], W0, W_start * scale[None, :] * mask)
    WG = Wk @ G
    R = (B - WG) * S
    P = R
    for k in range(iters + 1):
        if k:
            Wk, WG, R, P = cg_step(Wk, WG, R, P, B, G, S)
        yield PolishState(k, Wk, R, P, scale, float(np.sum((Wk - W0) * (WG - B))),
                          float(np.linalg.norm(R)))
