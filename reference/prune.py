"""`prune_layer`: one linear layer, any method, checked inputs, exactly sparse output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ._checks import check_method, check_problem, check_solver
from .admm import admm_iterates, z_update
from .masks import magnitude_scores, select_mask, wanda_scores
from .sparsegpt import sparsegpt

#: damping used when ``damp=None``: the official ADMM code's 0.1, SparseGPT's own 0.01
DEFAULT_DAMP = {"admm": 0.1, "admm-grad": 0.1, "sparsegpt": 0.01}


class IterationRecord(NamedTuple):
    """One ADMM iteration in a result's history (see `admm.ADMMState`)."""

    k: int
    objective: float
    primal_residual: float
    dual_residual: float
    sparsity: float


@dataclass(frozen=True)
class PruneResult:
    """Pruned weights W (d_out, d_in), keep-mask (True = kept), ADMM history (else empty)."""

    W: np.ndarray
    mask: np.ndarray
    history: tuple[IterationRecord, ...] = ()


def prune_layer(
    W: np.ndarray,
    XtX: np.ndarray,
    sparsity: float | None,
    *,
    method: str = "admm-grad",
    pattern: str = "unstructured",
    group: str = "row",
    rho: float = 1.0,
    damp: float | None = None,
    iters: int = 20,
    mask_steps: int = 15,
    mask: np.ndarray | None = None,
    track_objective: bool = True,
) -> PruneResult:
    """W^ = argmin ||X W^T - X W^^T||^2 over W^ = W^ * M, with M chosen by `method`.

    Methods: ``magnitude`` (|W|, no update), ``wanda`` (|W| ||X_j||, no update),
    ``sparsegpt`` (OBS sweep, its own mask), ``admm`` (Wanda mask once, then the ADMM
    update: the paper's ADMM1), ``admm-grad`` (mask re-selected from |W + U| on the cubic
    schedule during the first `mask_steps` iterations, then fixed: ADMM-Grad).

    With `mask` given the mask is the caller's: ``admm``/``admm-grad`` run the fixed-mask
    ADMM update on it, ``sparsegpt`` its OBS update, ``magnitude``/``wanda`` apply it;
    `sparsity` may then be None.

    Parameters
    ----------
    W : (d_out, d_in) dense weights.  XtX : (d_in, d_in) = sum over tokens of x x^T.
    sparsity : fraction pruned in [0, 1); None for N:M (implied 1 - N/M) or with `mask`.
    pattern : ``"unstructured"`` or ``"N:M"`` (at most N nonzeros per M consecutive inputs).
    group : ``"row"`` (per output row, Wanda) or ``"layer"`` (whole matrix, official code).
    rho, iters, mask_steps : ADMM penalty (preconditioned units), iterations, mask updates.
    damp : damping lambda of G = XtX + lambda diag(XtX) (ADMM, default 0.1) or of
        H + lambda mean(diag H) I (SparseGPT, default 0.01).
    track_objective : record the objective in the history (one extra product per iteration).

    Returns float64 arrays; the output is exactly zero outside the mask.
    """
    check_method(method)
    p = check_problem(W, XtX, sparsity, pattern, group, mask)
    check_solver(rho, 0.0 if damp is None else damp, iters, 0 if mask is not None else mask_steps)
    damp = DEFAULT_DAMP.get(method, 0.0) if damp is None else damp
    W, XtX = np.asarray(p.W, np.float64), np.asarray(p.XtX, np.float64)

    if method in ("magnitude", "wanda"):
        if p.mask is None:
            scores = magnitude_scores(W) if method == "magnitude" else wanda_scores(W, XtX)
            M = select_mask(scores, p.sparsity, pattern, group)
        else:
            M = p.mask
        return PruneResult(W * M, M)
    if method == "sparsegpt":
        Wp, M = sparsegpt(W, XtX, p.sparsity, p.nm, group, damp=damp, mask=p.mask)
        return PruneResult(Wp, M)

    history, state = [], None
    for state in admm_iterates(
        W, XtX, p.sparsity, pattern=pattern, group=group, rho=rho, damp=damp, iters=iters,
        mask_steps=mask_steps if method == "admm-grad" else 0, mask=p.mask,
        track_objective=track_objective,
    ):
        history.append(IterationRecord(state.k, state.objective, state.primal_residual,
                                       state.dual_residual, state.sparsity))
    Z = z_update(state.W, state.U, state.M)  # exactly sparse (official code, final Z)
    return PruneResult(Z / state.scale[None, :], state.M, tuple(history))


def prune_shared(Ws, XtX, sparsity, **kwargs) -> list[PruneResult]:
    """Prune several weights that read the same input (q/k/v, gate/up) with one XtX.

    The reference simply prunes each on its own; the torch backend shares the Gram's
    factorization and must give the same results.
    """
    return [prune_layer(W, XtX, sparsity, **kwargs) for W in Ws]
