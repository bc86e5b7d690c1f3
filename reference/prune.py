"""`prune_layer`: one linear layer, any method, checked inputs, exactly sparse output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .checks import check_alps, check_finish, check_method, check_problem, check_result, check_solver
from . import methods
from .methods import DEFAULT_DAMP, DEFAULT_POLISH_DAMP  # noqa: F401  (public through admm_prune.reference)
from .admm import admm_iterates, mask_update, z_update
from .alps import alps_iterates
from .masks import magnitude_scores, select_mask, wanda_scores
from .options import DEFAULTS
from .polish import PolishRecord, polish_iterates
from .sparsegpt import sparsegpt




class IterationRecord(NamedTuple):
    """One ADMM iteration in a result's history (see `admm.ADMMState`)."""

    k: int
    objective: float
    primal_residual: float
    dual_residual: float
    sparsity: float


@dataclass(frozen=True)
class PruneResult:
    """Pruned weights W (d_out, d_in), keep-mask (True = kept), ADMM history (else empty),
    the finish's records k = 0..polish_iters (empty without a finish; k = 0 is the method's
    own result, so ``polish[0].objective`` vs ``polish[-1].objective`` is what it gained)."""

    W: np.ndarray
    mask: np.ndarray
    history: tuple[IterationRecord, ...] = ()
    polish: tuple[PolishRecord, ...] = ()


def prune_layer(
    W: np.ndarray,
    XtX: np.ndarray,
    sparsity: float | None,
    *,
    method: str = DEFAULTS.method,
    pattern: str = DEFAULTS.pattern,
    group: str = DEFAULTS.group,
    rho: float = DEFAULTS.rho,
    damp: float | None = DEFAULTS.damp,
    iters: int = DEFAULTS.iters,
    mask_steps: int = DEFAULTS.mask_steps,
    mask: np.ndarray | None = None,
    track_objective: bool = True,
    polish_iters: int = DEFAULTS.polish_iters,
    polish_damp: float | None = DEFAULTS.polish_damp,
    alps_rho: float = DEFAULTS.alps_rho,
    alps_iters: int = DEFAULTS.alps_iters,
    alps_pcg_iters: int = DEFAULTS.alps_pcg_iters,
) -> PruneResult:
    """W^ = argmin ||X W^T - X W^^T||^2 over W^ = W^ * M, with M chosen by `method`.

    Methods: ``magnitude`` (|W|, no update), ``wanda`` (|W| ||X_j||, no update),
    ``sparsegpt`` (OBS sweep, its own mask), ``admm`` (Wanda mask once, then the ADMM
    update: the paper's ADMM1), ``admm-grad`` (mask re-selected from |W + U| on the cubic
    schedule during the first `mask_steps` iterations, then fixed: ADMM-Grad), ``alps``
    (support from the L0-constrained ADMM with a growing rho, `alps.alps_iterates`, then
    `alps_pcg_iters` PCG steps on it: Meng et al. 2024).

    With `mask` given the mask is the caller's: ``admm``/``admm-grad`` run the fixed-mask
    ADMM update on it, ``sparsegpt`` its OBS update, ``alps`` its PCG finish from W * M,
    ``magnitude``/``wanda`` apply it; `sparsity` may then be None.

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
    polish_iters : K steps of the finish on the final mask (`polish.polish_iterates`: CG on
        the masked normal equations, warm-started from the method's weights), for every
        method that reads XtX (wanda, sparsegpt, admm, admm-grad). 0 (default) is the
        paper's method exactly; K -> infinity gives `masked_lstsq` on the method's mask.
    polish_damp : lambda of the finish's G = XtX + lambda diag(XtX); None: `damp` after
        admm/admm-grad/alps, DEFAULT_POLISH_DAMP (0.1) after wanda/sparsegpt.
    alps_rho, alps_iters, alps_pcg_iters : ALPS's starting rho, its iteration cap and its
        PCG steps on the final support (read by ``alps`` only; its history holds the
        ADMM iterations it ran).

    Returns float64 arrays; the output is exactly zero outside the mask. Inputs are never
    modified and never aliased by the result.
    """
    spec = methods.get(check_method(method))
    p = check_problem(W, XtX, sparsity, pattern, group, mask)
    check_solver(rho, 0.0 if damp is None else damp, iters,
                 mask_steps if spec.mask_steps and mask is None else 0)
    check_alps(alps_rho, alps_iters, alps_pcg_iters)
    polish_damp = check_finish(method, polish_iters, polish_damp)
    damp = (spec.default_damp or 0.0) if damp is None else damp
    W, XtX = np.asarray(p.W, np.float64), np.asarray(p.XtX, np.float64)

    history = ()
    if method in ("magnitude", "wanda"):
        if p.mask is None:
            scores = magnitude_scores(W) if method == "magnitude" else wanda_scores(W, XtX)
            M = select_mask(scores, p.sparsity, pattern, group)
        else:
            M = p.mask.copy()
        W_hat = W * M
    elif method == "sparsegpt":
        W_hat, M = sparsegpt(W, XtX, p.sparsity, pattern, group, damp=damp, mask=p.mask)
    elif method == "alps":
        W_hat, M, history = _alps(W, XtX, p, pattern, group, damp, alps_rho, alps_iters, alps_pcg_iters,
                                  track_objective)
    else:
        records, state = [], None
        for state in admm_iterates(
            W, XtX, p.sparsity, pattern=pattern, group=group, rho=rho, damp=damp, iters=iters,
            mask_steps=mask_steps if spec.mask_steps else 0, mask=p.mask,
            track_objective=track_objective,
        ):
            records.append(IterationRecord(state.k, state.objective, state.primal_residual,
                                           state.dual_residual, state.sparsity))
        Z = z_update(state.W, state.U, state.M)  # exactly sparse (official code, final Z)
        W_hat, M, history = Z / state.scale[None, :], state.M, tuple(records)

    polish = ()
    if polish_iters:
        if polish_damp is None:
            polish_damp = damp if spec.finish_own_damp else DEFAULT_POLISH_DAMP
        records, state = [], None
        for state in polish_iterates(W, XtX, M, W_hat, damp=polish_damp, iters=polish_iters):
            records.append(PolishRecord(state.k, state.objective, state.residual))
        W_hat, polish = state.W / state.scale[None, :], tuple(records)
    return PruneResult(check_result(W_hat, np.float64), M, history, polish)


def _alps(W, XtX, p, pattern, group, damp, rho, iters, pcg_iters, track_objective):
    """ALPS: (W_hat, M, history). M = top |W| of the last iterate (the caller's mask if given),
    then `pcg_iters` PCG steps on M from W * M (`polish_iterates`: the same CG)."""
    records, state = [], None
    if p.mask is None:
        for state in alps_iterates(W, XtX, p.sparsity, pattern=pattern, group=group, rho=rho, damp=damp,
                                   iters=iters, track_objective=track_objective):
            records.append(IterationRecord(state.k, state.objective, state.primal_residual,
                                           state.dual_residual, state.sparsity))
        live = np.diag(XtX) > 0
        M = mask_update(state.W, np.zeros_like(state.W), live, p.sparsity, pattern, group)
        W_start = state.W * M / state.scale[None, :]
    else:
        M, W_start = p.mask.copy(), W * p.mask
    for step in polish_iterates(W, XtX, M, W_start, damp=damp, iters=pcg_iters):
        pass
    return step.W / step.scale[None, :], M, tuple(records)


def prune_shared(Ws, XtX, sparsity, **kwargs) -> list[PruneResult]:
    """Prune several weights that read the same input (q/k/v, gate/up) with one XtX.

    The reference simply prunes each on its own; the torch backend shares the Gram's
    factorization and must give the same results.
    """
    return [prune_layer(W, XtX, sparsity, **kwargs) for W in Ws]
