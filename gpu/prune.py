"""`prune_layer` and `prune_shared` on torch tensors: checked inputs, exactly sparse output.

The twin of `admm_prune.reference.prune`. `prune_shared` is the workhorse: the weights
that read one input (q/k/v, gate/up) share everything that depends only on XtX (the
preconditioned Gram G~ and the inverse of G~ + rho I for ADMM, the inverse-Hessian factor
for SparseGPT), computed once; each weight then runs exactly the code it would run
alone, so the results equal separate `prune_layer` calls bit for bit.
"""

from __future__ import annotations

import torch

from admm_prune.reference._checks import check_method, check_solver
from admm_prune.reference.prune import DEFAULT_DAMP, IterationRecord, PruneResult

from ._checks import check_problem, compute_dtype, matmul_precision
from .admm import _admm_steps, _precondition_gram, factorize, z_update
from .masks import _select
from .sparsegpt import _sweep, inverse_hessian_factor


def prune_layer(
    W: torch.Tensor,
    XtX: torch.Tensor,
    sparsity: float | None,
    *,
    method: str = "admm-grad",
    pattern: str = "unstructured",
    group: str = "row",
    rho: float = 1.0,
    damp: float | None = None,
    iters: int = 20,
    mask_steps: int = 15,
    mask: torch.Tensor | None = None,
    track_objective: bool = True,
    allow_tf32: bool = False,
) -> PruneResult:
    """W^ = argmin ||X W^T - X W^^T||^2 over W^ = W^ * M, with M chosen by `method`.

    As the reference's `prune_layer` (methods, mask, defaults, history), on W's device.
    W may be fp16/bf16/fp32/fp64; the work is done in float64 if W or XtX is float64,
    else in float32, and the result comes back in W's dtype (mask: bool, same device).

    allow_tf32 : let float32 CUDA matmuls use TF32 (faster, ~1e-3 relative precision per
        product). Off by default: the call pins cuBLAS to IEEE fp32 and restores the
        previous setting on return (`_checks.matmul_precision`). Not in the reference.
    track_objective : record the objective (one extra GEMM per iteration); residuals and
        sparsity are always recorded.
    """
    return prune_shared(
        [W], XtX, sparsity, method=method, pattern=pattern, group=group, rho=rho, damp=damp,
        iters=iters, mask_steps=mask_steps, mask=mask, track_objective=track_objective,
        allow_tf32=allow_tf32,
    )[0]


def prune_shared(Ws, XtX, sparsity, **kwargs) -> list[PruneResult]:
    """Prune several weights that read the same input (q/k/v, gate/up) with one XtX.

    One Gram preconditioning and one factorization for all of them (ADMM: G~ and
    (G~ + rho I)^-1; SparseGPT: the inverse-Hessian factor); results equal `prune_layer`
    on each. Keyword arguments as `prune_layer`'s. All inputs are checked before any work.
    """
    return _prune_shared(list(Ws), XtX, sparsity, **kwargs)


@torch.no_grad()
def _prune_shared(
    Ws: list, XtX, sparsity, *, method: str = "admm-grad", pattern: str = "unstructured",
    group: str = "row", rho: float = 1.0, damp: float | None = None, iters: int = 20,
    mask_steps: int = 15, mask=None, track_objective: bool = True, allow_tf32: bool = False,
) -> list[PruneResult]:
    check_method(method)
    problems = []
    for W in Ws:
        problems.append(check_problem(W, problems[0].XtX if problems else XtX, sparsity, pattern,
                                      group, mask, gram_checked=bool(problems)))
    check_solver(rho, 0.0 if damp is None else damp, iters, 0 if mask is not None else mask_steps)
    if not problems:
        return []
    damp = DEFAULT_DAMP.get(method, 0.0) if damp is None else damp
    shared = {}  # compute dtype -> what depends on XtX only
    results = []
    with matmul_precision(problems[0].W.device, allow_tf32):
        for p in problems:
            dtype = compute_dtype(p.W, p.XtX)
            if dtype not in shared and method not in ("magnitude", "wanda"):
                XtX_c = p.XtX.to(dtype)
                if method == "sparsegpt":
                    shared[dtype] = inverse_hessian_factor(XtX_c, damp)
                else:
                    G, scale, live = _precondition_gram(XtX_c, damp)
                    shared[dtype] = (G, scale, live, factorize(G, rho))
                del XtX_c
            results.append(_prune_one(p, method, dtype, shared.get(dtype), pattern, group, rho,
                                      iters, mask_steps, track_objective))
    return results


def _prune_one(p, method, dtype, shared, pattern, group, rho, iters, mask_steps, track_objective):
    W_in = p.W
    if method in ("magnitude", "wanda"):
        if p.mask is None:
            scores = torch.abs(W_in.to(dtype))  # the checked |W| and |W| ||X_j||, no re-check
            if method == "wanda":
                scores.mul_(torch.sqrt(p.XtX.diagonal().to(dtype))[None, :])
            M = _select(scores, p.sparsity, pattern, group)
        else:
            M = p.mask
        return PruneResult(W_in * M, M)
    if method == "sparsegpt":
        R, dead = shared
        Wp, M = _sweep(W_in.to(dtype), R, dead, p.sparsity, p.nm, group, 128, p.mask)
        return PruneResult(Wp.to(W_in.dtype), M)

    G, scale, live, factor = shared
    W0 = W_in.to(dtype) * scale[None, :]
    records, state = [], None
    for state in _admm_steps(
        W0, G, live, factor, W0 @ G, p.sparsity, pattern, group, rho, iters,
        mask_steps if method == "admm-grad" else 0, p.mask, track_objective, reuse=True,
    ):
        records.append(state._replace(W=None, Z=None, U=None, M=None))  # keep the scalars only
    history = _history(records, W0.numel(), W0.device)
    Z = z_update(state.W, state.U, state.M)  # exactly sparse (official code, final Z)
    return PruneResult(Z.div_(scale[None, :]).to(W_in.dtype), state.M, history)


def _history(steps, numel: int, device) -> tuple[IterationRecord, ...]:
    """The steps' device records as IterationRecords, with one host sync for all of them."""
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=device)
    cols = [torch.stack([s.objective.double() if s.objective is not None else nan,
                         s.primal_residual.double(), s.dual_residual.double(),
                         s.kept.double()]) for s in steps]
    rows = torch.stack(cols).tolist()
    return tuple(IterationRecord(s.k, obj, primal, dual, 1.0 - int(kept) / numel)
                 for s, (obj, primal, dual, kept) in zip(steps, rows))
