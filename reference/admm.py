"""ADMM for the layer-wise pruning problem (Boža 2024), one short function per equation.

Problem, for a fixed mask M (weights in ``nn.Linear`` layout, d_out x d_in):

    minimize   tr((W - W0) G (W - W0)^T)   subject to  W = W * M,
    G = XtX + damp * diag(XtX).

The damping term is the official code's: it enters the target too, so it is a proximal
pull of the pruned weights toward the dense ones on every input feature.

Everything runs in preconditioned coordinates (``precondition``): the input features are
scaled to unit norm, so G~ has unit diagonal (1 + damp) and |W~| is the Wanda score. The
consensus splitting W = Z, with Z carrying the sparsity constraint, gives the three
updates, in the official code's order:

    Z = (W + U) * M                                       z_update
    U = U + W - Z                                         u_update
    W = (W0 G~ + rho (Z - U)) (G~ + rho I)^-1             w_update

``G~ + rho I`` is factorized once (Cholesky; `factorize` returns an object whose
``solve`` applies the inverse, the contract both backends share). ADMM-Grad re-selects M
from |W + U| on the cubic schedule during the first `mask_steps` iterations
(``mask_update``).

Dead input features (diag(XtX) = 0) cannot change the objective. They get scale 1 (no
division by zero), Wanda score 0 (so they are pruned before any live feature) and, where
the mask keeps them, they come back unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np
import scipy.linalg

from .checks import check_problem, check_solver
from .masks import select_mask
from .schedule import cubic_sparsity
from .options import DEFAULTS
from .methods import DEFAULT_DAMP


class Preconditioned(NamedTuple):
    """W~ = W D, G~ = D^-1 G D^-1 with D = diag(scale); ``live`` marks diag(XtX) > 0."""

    W: np.ndarray
    G: np.ndarray
    scale: np.ndarray
    live: np.ndarray


@dataclass(frozen=True)
class ADMMState:
    """One ADMM iterate, in preconditioned coordinates (original weights = Z / scale).

    k is the iteration count (1 = after the first round of updates); M is the mask used by
    this iteration's z_update; objective is tr((Z - W0~) G~ (Z - W0~)^T) at the feasible
    Z (NaN when not tracked); primal residual ||W_prev - Z||_F; dual residual
    rho ||Z - Z_prev||_F (Z_0 = W0~).
    """

    k: int
    W: np.ndarray
    Z: np.ndarray
    U: np.ndarray
    M: np.ndarray
    scale: np.ndarray
    sparsity: float
    objective: float
    primal_residual: float
    dual_residual: float


def precondition(W: np.ndarray, XtX: np.ndarray, damp: float) -> Preconditioned:
    """W~ = W D,  G~ = D^-1 (XtX + damp diag(XtX)) D^-1,  D = diag(||X_j||) (1 if dead).

    Parameters
    ----------
    W : (d_out, d_in).  XtX : (d_in, d_in).
    """
    norms = np.sqrt(np.maximum(np.diag(XtX), 0.0))
    live = norms > 0
    scale = np.where(live, norms, 1.0)
    G = XtX + damp * np.diag(np.diag(XtX))
    G = G / scale[:, None] / scale[None, :]
    return Preconditioned(W * scale[None, :], G, scale, live)


class CholeskyFactor(NamedTuple):
    """(G~ + rho I) factorized: ``solve(R)`` = R (G~ + rho I)^-1 for a (rows, d_in) R.

    The contract both backends' `factorize` return: an object whose ``solve`` applies the
    inverse of G~ + rho I from the right. Here: the Cholesky factor and two triangular
    solves per call; the torch twin (`gpu.linalg.InverseFactor`) keeps the explicit
    inverse and applies it with one GEMM (its module has the measurements).
    """

    cho: tuple  # scipy.linalg.cho_factor's (L, lower)

    def solve(self, R: np.ndarray) -> np.ndarray:
        """R (G~ + rho I)^-1; the matrix is symmetric, so solve for R^T."""
        return scipy.linalg.cho_solve(self.cho, R.T).T


def factorize(G: np.ndarray, rho: float) -> CholeskyFactor:
    """L L^T = G~ + rho I, once per layer; ``factorize(G, rho).solve(R)`` = R (G~ + rho I)^-1."""
    return CholeskyFactor(scipy.linalg.cho_factor(G + rho * np.eye(G.shape[0]), lower=True))


def z_update(W: np.ndarray, U: np.ndarray, M: np.ndarray) -> np.ndarray:
    """Z = (W + U) * M: projection onto the matrices supported on M."""
    return (W + U) * M


def u_update(U: np.ndarray, W: np.ndarray, Z: np.ndarray) -> np.ndarray:
    """U = U + W - Z: the scaled dual variable accumulates the constraint violation."""
    return U + W - Z


def w_update(factor, B: np.ndarray, Z: np.ndarray, U: np.ndarray, rho: float) -> np.ndarray:
    """W = (W0 G~ + rho (Z - U)) (G~ + rho I)^-1, with B = W0 G~ precomputed.

    `factor` is `factorize`'s: its ``solve`` applies (G~ + rho I)^-1 from the right.
    """
    return factor.solve(B + rho * (Z - U))


def mask_update(
    W: np.ndarray, U: np.ndarray, live: np.ndarray, sparsity: float, pattern: str, group: str
) -> np.ndarray:
    """M = top scores of |W + U| at `sparsity` (dead features score 0: pruned first)."""
    return select_mask(np.abs(W + U) * live[None, :], sparsity, pattern, group)


def objective(Z: np.ndarray, W0: np.ndarray, G: np.ndarray) -> float:
    """tr((Z - W0) G (Z - W0)^T), the damped reconstruction error (any coordinates)."""
    D = Z - W0
    return float(np.sum((D @ G) * D))


def admm_iterates(
    W: np.ndarray,
    XtX: np.ndarray,
    sparsity: float | None,
    *,
    pattern: str = DEFAULTS.pattern,
    group: str = DEFAULTS.group,
    rho: float = DEFAULTS.rho,
    damp: float = DEFAULT_DAMP["admm"],
    iters: int = DEFAULTS.iters,
    mask_steps: int = DEFAULTS.mask_steps,
    mask: np.ndarray | None = None,
    track_objective: bool = True,
) -> Iterator[ADMMState]:
    """Yield the ADMM iterates k = 1..iters, for reading the algorithm step by step.

    The mask: `mask` if given (fixed); else, with ``mask_steps == 0``, the Wanda mask
    (|W~| at the target sparsity) fixed once (the paper's ADMM1); else re-selected from
    |W + U| at iterations t < mask_steps with sparsity ``cubic_sparsity(t + 1,
    mask_steps, s)``, then fixed (ADMM-Grad). `prune_layer` turns the last iterate into
    exactly sparse weights in original coordinates.

    Parameters
    ----------
    W : (d_out, d_in) dense weights.  XtX : (d_in, d_in).  mask : (d_out, d_in) bool.
    sparsity : target; for N:M the implied 1 - N/M (pass None).
    """
    p = check_problem(W, XtX, sparsity, pattern, group, mask)
    check_solver(rho, damp, iters, 0 if mask is not None else mask_steps)  # a given mask is never re-selected
    sparsity, mask = p.sparsity, p.mask
    W0, G, scale, live = precondition(np.asarray(p.W, np.float64), np.asarray(p.XtX, np.float64), damp)
    B = W0 @ G
    factor = factorize(G, rho)
    if mask is not None:
        M, mask_steps = np.array(mask, bool), 0  # a copy: the states never alias the caller's mask
    elif mask_steps == 0:
        M = mask_update(W0, np.zeros_like(W0), live, sparsity, pattern, group)
    Wk, U, Z_prev = W0.copy(), np.zeros_like(W0), W0
    for t in range(iters):
        if t < mask_steps:
            M = mask_update(Wk, U, live, cubic_sparsity(t + 1, mask_steps, sparsity), pattern, group)
        Z = z_update(Wk, U, M)
        U = u_update(U, Wk, Z)
        primal = float(np.linalg.norm(Wk - Z))
        dual = float(rho * np.linalg.norm(Z - Z_prev))
        Wk = w_update(factor, B, Z, U, rho)
        obj = objective(Z, W0, G) if track_objective else float("nan")
        yield ADMMState(t + 1, Wk, Z, U, M, scale, 1.0 - float(M.mean()), obj, primal, dual)
        Z_prev = Z
