"""ALPS (Meng, Behdin, Wang, Mazumder, NeurIPS 2024): the support chosen by an L0-constrained
ADMM whose penalty rho grows on a schedule, then PCG on that support.

The objective is `admm`'s, in the same preconditioned coordinates (`admm.precondition`),
but the constraint is the sparsity set C itself (k kept per row or layer, or N:M) rather
than a fixed mask. ADMM on the splitting W = Z, Z in C, in the paper's order (W first):

    W = (W0~ G~ + rho (Z - U)) (G~ + rho I)^-1        w_update (admm.py)
    Z = P_C(W + U) = (W + U) * M,  M = top |W + U|    mask_update + z_update (admm.py)
    U = U + W - Z                                      u_update (admm.py)

Z starts at P_C(W0~) (the Wanda mask), U at 0. P_C is not convex, so with a fixed rho the
support can keep moving; ALPS grows rho by how much the support moved (`support_change`,
`rho_update`, every `RHO_EVERY` iterations) until it stops moving. U is the scaled dual,
U = V / rho with V the paper's dual, so a new rho rescales it (`rescale_dual`). At the
end M = top |W| (the paper projects W) and the weights W * M are finished by K steps of
preconditioned CG on the support: exactly `polish.polish_iterates` (G~ has a constant
diagonal, so ALPS's CG on G~ is Jacobi-preconditioned CG on G, the same update, per row).

Deliberate differences from the paper's code (mazumder-lab/ALPS), named so they can be
measured: the damping is this project's damp * diag(XtX) (damp * I in preconditioned
coordinates; `methods` gives ALPS 0.01) where ALPS adds 0.01 * mean(diag XtX) * I; the
group is `group` (per row by default, like every method here; the paper's code compares
the whole layer: ``group="layer"``); each new rho is one `admm.factorize` (the paper
reuses one eigendecomposition, Q diag(1/(L + rho)) Q^T: the same 2 d^3 flops per new
rho as the torch twin's inverse).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np

from .admm import factorize, mask_update, objective, precondition, u_update, w_update, z_update
from .checks import check_int, check_positive, check_problem
from .methods import DEFAULT_DAMP
from .options import DEFAULTS

#: the support is compared (and rho updated) every this many iterations
RHO_EVERY = 3
#: (share of the kept entries that moved, factor): the first row whose share is exceeded
RHO_GROWTH = ((0.1, 1.3), (0.005, 1.2))
#: the factor once rho has grown and the support still moves, by less than the last share
RHO_CREEP = 1.1
#: rho shrinks by this factor while it has never grown (it started too large: frozen support)
RHO_SHRINK = 5.0
#: rho never exceeds this
RHO_MAX = 1e6
#: after SETTLE_AFTER iterations, a share moved below SETTLE_SHARE ends the loop
SETTLE_AFTER, SETTLE_SHARE = 30, 3e-4


class RhoStep(NamedTuple):
    """What `rho_update` decided: the next rho, whether rho has grown so far, and the verdict
    (``grow``, ``shrink``, ``restart``: back to the start with the smaller rho, ``stop``)."""

    rho: float
    grown: bool
    verdict: str


@dataclass(frozen=True)
class ALPSState:
    """One ALPS iterate, in preconditioned coordinates (original weights = W / scale).

    rho is the penalty this iteration used; changed is `support_change` since the last
    check (-1 on iterations without a check); verdict is `rho_update`'s ("" without a
    check; ``settled`` when the share moved fell below SETTLE_SHARE); objective is
    tr((Z - W0~) G~ (Z - W0~)^T) at the feasible Z (NaN when not tracked); primal residual
    ||W - Z||_F; dual residual rho ||Z - Z_prev||_F.
    """

    k: int
    W: np.ndarray
    Z: np.ndarray
    U: np.ndarray
    M: np.ndarray
    scale: np.ndarray
    rho: float
    changed: int
    verdict: str
    sparsity: float
    objective: float
    primal_residual: float
    dual_residual: float


def support_change(M: np.ndarray, M_prev: np.ndarray) -> int:
    """c = |{(i, j): M_ij != M_prev_ij}|: entries that entered or left the support."""
    return int(np.count_nonzero(M != M_prev))


def rho_update(rho: float, changed: int, kept: int, grown: bool) -> RhoStep:
    """rho x 1.3 / 1.2 / 1.1 as c / k > 0.1 / > 0.005 / > 0; at c = 0 stop (rho / 5 if never grown).

    c = `changed`, k = `kept` >= 1. While rho has never grown, a support that hardly moves
    means rho started too large (the iterates froze near the start): rho / 5, and if the
    support moved a little, a restart from the start. Scalar math, shared by both backends.
    """
    for share, factor in RHO_GROWTH:
        if changed > share * kept:
            return RhoStep(min(rho * factor, RHO_MAX), True, "grow")
    if changed and grown:
        return RhoStep(min(rho * RHO_CREEP, RHO_MAX), True, "grow")
    if changed:
        return RhoStep(rho / RHO_SHRINK, False, "restart")
    return RhoStep(rho, True, "stop") if grown else RhoStep(rho / RHO_SHRINK, False, "shrink")


def rescale_dual(U: np.ndarray, rho: float, rho_new: float) -> np.ndarray:
    """U = U rho / rho_new: the same unscaled dual V = rho U under the new penalty."""
    return U * (rho / rho_new)


def alps_iterates(
    W: np.ndarray,
    XtX: np.ndarray,
    sparsity: float | None,
    *,
    pattern: str = DEFAULTS.pattern,
    group: str = DEFAULTS.group,
    rho: float = DEFAULTS.alps_rho,
    damp: float = DEFAULT_DAMP["alps"],
    iters: int = DEFAULTS.alps_iters,
    track_objective: bool = True,
) -> Iterator[ALPSState]:
    """Yield the ALPS iterates k = 1.. (at most `iters`; fewer once the support stops moving).

    `rho` is the starting penalty (the schedule moves it). The support of the last state is
    not yet ALPS's mask: `prune_layer` projects its W (M = top |W|) and runs the PCG finish.

    Parameters
    ----------
    W : (d_out, d_in) dense weights.  XtX : (d_in, d_in).
    sparsity : target; for N:M the implied 1 - N/M (pass None).
    """
    p = check_problem(W, XtX, sparsity, pattern, group, None)
    check_positive("rho", rho)
    check_positive("damp", damp, allow_zero=True)
    check_int("iters", iters, minimum=1)
    W0, G, scale, live = precondition(np.asarray(p.W, np.float64), np.asarray(p.XtX, np.float64), damp)
    B = W0 @ G
    M_start = mask_update(W0, np.zeros_like(W0), live, p.sparsity, pattern, group)
    kept = int(M_start.sum())
    Wk, Z, U, M_ref, grown = W0, z_update(W0, np.zeros_like(W0), M_start), np.zeros_like(W0), M_start, False
    factor = factorize(G, rho)
    for t in range(1, iters + 1):
        Wk = w_update(factor, B, Z, U, rho)
        M = mask_update(Wk, U, live, p.sparsity, pattern, group)
        Z_prev, Z = Z, z_update(Wk, U, M)
        U = u_update(U, Wk, Z)
        changed, verdict, step = -1, "", None
        if t % RHO_EVERY == 0:
            changed, M_ref = support_change(M, M_ref), M
            step = rho_update(rho, changed, kept, grown)
            verdict = "settled" if t > SETTLE_AFTER and changed < SETTLE_SHARE * kept else step.verdict
        obj = objective(Z, W0, G) if track_objective else float("nan")
        yield ALPSState(t, Wk, Z, U, M, scale, rho, changed, verdict, 1.0 - float(M.mean()), obj,
                        float(np.linalg.norm(Wk - Z)), float(rho * np.linalg.norm(Z - Z_prev)))
        if verdict in ("stop", "settled"):
            return
        if step is not None and step.rho != rho:
            if step.verdict == "restart":
                Z, U = z_update(W0, np.zeros_like(W0), M_start), np.zeros_like(W0)
            else:
                U = rescale_dual(U, rho, step.rho)
            rho = step.rho
            factor = factorize(G, rho)
        grown = grown if step is None else step.grown
