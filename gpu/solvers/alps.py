"""ALPS (Meng et al., NeurIPS 2024) on torch tensors: the L0-constrained ADMM with a growing rho.

The twin of `admm_prune.reference.alps` (read its docstring for the method): the same
updates (`admm.w_update`, `admm.mask_update` + `admm.z_update`, `admm.u_update`), the same
schedule (`rho_update`, the reference's own scalar function) and `rescale_dual`.

Where the contract differs from the reference:

* each new rho is one `admm.factorize` (the explicit inverse of G~ + rho I, 2 d^3 flops,
  as many as the paper's Q diag(1/(L + rho)) Q^T), so the W update stays one GEMM;
* the support is compared every `RHO_EVERY` iterations: one host sync there (the count of
  entries that moved decides rho); the other records stay on the device;
* the loop `alps_steps` takes `reuse=True` from `prune_layer` and then writes W, Z, U into
  fixed buffers (a yielded state is valid until the next).
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import torch

from admm_prune.reference.alps import (  # noqa: F401  (rho_update: the same scalar math on both backends)
    ALPSState, RHO_EVERY, SETTLE_AFTER, SETTLE_SHARE, rho_update,
)
from admm_prune.reference.checks import check_int, check_positive
from admm_prune.reference.methods import DEFAULT_DAMP
from admm_prune.reference.options import DEFAULTS

from .admm import device_objective, factorize, mask_update, precondition, u_update, w_update, z_update
from .checks import check_problem, compute_dtype


def support_change(M: torch.Tensor, M_prev: torch.Tensor) -> int:
    """c = |{(i, j): M_ij != M_prev_ij}|: entries that entered or left the support (one sync)."""
    return int(torch.count_nonzero(M != M_prev))


def rescale_dual(U: torch.Tensor, rho: float, rho_new: float) -> torch.Tensor:
    """U = U rho / rho_new: the same unscaled dual V = rho U under the new penalty."""
    return U * (rho / rho_new)


class _Step(NamedTuple):
    """One iterate with its records still on the device (objective None when not tracked)."""

    k: int
    W: torch.Tensor
    Z: torch.Tensor
    U: torch.Tensor
    M: torch.Tensor
    rho: float
    changed: int
    verdict: str
    kept: torch.Tensor
    objective: torch.Tensor | None
    primal_residual: torch.Tensor | None
    dual_residual: torch.Tensor | None


def alps_steps(
    W0: torch.Tensor, G: torch.Tensor, live: torch.Tensor, B: torch.Tensor, sparsity: float, pattern: str,
    group: str, rho: float, iters: int, track_objective: bool, reuse: bool = False, residuals: bool = True,
) -> Iterator[_Step]:
    """The ALPS loop (the reference's `alps_iterates`), one host sync per support check."""
    zeros = torch.zeros_like(W0)
    M_start = mask_update(W0, zeros, live, sparsity, pattern, group)
    kept_t = M_start.count_nonzero()
    kept = int(kept_t)
    Z, U, M_ref, grown = z_update(W0, zeros, M_start), torch.zeros_like(W0), M_start, False
    Wk = torch.empty_like(W0) if reuse else None
    spare = torch.empty_like(W0) if reuse else None  # the buffer of the next Z
    tmp = torch.empty_like(W0) if reuse else None
    factor = factorize(G, rho)
    for t in range(1, iters + 1):
        Wk = w_update(factor, B, Z, U, rho, out=Wk if reuse else None, work=tmp)
        M = mask_update(Wk, U, live, sparsity, pattern, group, work=tmp)
        Z_prev, Z = Z, z_update(Wk, U, M, out=spare)
        U = u_update(U, Wk, Z, out=U if reuse else None)
        changed, verdict, step = -1, "", None
        if t % RHO_EVERY == 0:
            changed, M_ref = support_change(M, M_ref), M
            step = rho_update(rho, changed, kept, grown)
            verdict = "settled" if t > SETTLE_AFTER and changed < SETTLE_SHARE * kept else step.verdict
        primal = dual = None
        if residuals:
            primal = torch.linalg.vector_norm(Wk - Z)
            dual = rho * torch.linalg.vector_norm(Z - Z_prev)
        obj = device_objective(Z, W0, G) if track_objective else None
        yield _Step(t, Wk, Z, U, M, rho, changed, verdict, kept_t, obj, primal, dual)
        if verdict in ("stop", "settled"):
            return
        if reuse:
            spare = Z_prev
        if step is not None and step.rho != rho:
            if step.verdict == "restart":
                Z = z_update(W0, zeros, M_start, out=Z if reuse else None)
                U = U.zero_() if reuse else torch.zeros_like(W0)
            else:
                U = U.mul_(rho / step.rho) if reuse else rescale_dual(U, rho, step.rho)
            rho = step.rho
            factor = factorize(G, rho)
        grown = grown if step is None else step.grown


@torch.no_grad()  # per step: the decorator wraps each next()
def alps_iterates(
    W: torch.Tensor,
    XtX: torch.Tensor,
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

    As the reference's `alps_iterates`; tensors stay on W's device in the compute dtype
    (float64 if W or XtX is, else float32). Each yielded state's floats cost one host sync.

    Parameters
    ----------
    W : (d_out, d_in) dense weights.  XtX : (d_in, d_in).
    sparsity : target; for N:M the implied 1 - N/M (pass None).
    """
    p = check_problem(W, XtX, sparsity, pattern, group, None)
    check_positive("rho", rho)
    check_positive("damp", damp, allow_zero=True)
    check_int("iters", iters, minimum=1)
    dtype = compute_dtype(p.W, p.XtX)
    W0, G, scale, live = precondition(p.W.to(dtype), p.XtX.to(dtype), damp)
    numel = W0.numel()
    for s in alps_steps(W0, G, live, W0 @ G, p.sparsity, pattern, group, rho, iters, track_objective):
        obj = float("nan") if s.objective is None else float(s.objective)
        yield ALPSState(s.k, s.W, s.Z, s.U, s.M, scale, s.rho, s.changed, s.verdict,
                        1.0 - int(s.kept) / numel, obj, float(s.primal_residual), float(s.dual_residual))
