"""`prune_layer` and `prune_shared` on torch tensors: checked inputs, exactly sparse output.

The twin of `admm_prune.reference.prune`. `prune_shared` is the workhorse: the weights
that read one input (q/k/v, gate/up) share everything that depends only on XtX (the
preconditioned Gram G~ and the inverse of G~ + rho I for ADMM, the inverse-Hessian factor
for SparseGPT), computed once; each weight then runs exactly the code it would run
alone, so the results equal separate `prune_layer` calls bit for bit.
"""

from __future__ import annotations

import torch

from admm_prune.reference._checks import check_finish, check_method, check_solver
from admm_prune.reference.prune import (
    DEFAULT_DAMP, DEFAULT_POLISH_DAMP, IterationRecord, PolishRecord, PruneResult,
)

from ._checks import check_problem, check_result, compute_dtype
from .admm import _admm_steps, _precondition_gram, factorize, z_update
from .linalg import matmul_precision
from .masks import _select, magnitude_scores, wanda_scores
from .polish import _polish_steps
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
    polish_iters: int = 0,
    polish_damp: float | None = None,
    allow_tf32: bool = False,
    track_residuals: bool = True,
) -> PruneResult:
    """W^ = argmin ||X W^T - X W^^T||^2 over W^ = W^ * M, with M chosen by `method`.

    As the reference's `prune_layer` (methods, mask, defaults, history, the finish
    `polish_iters`/`polish_damp` and its records in ``polish``), on W's device. W may be
    fp16/bf16/fp32/fp64; the work is done in float64 if W or XtX is float64, else in
    float32, and the result comes back in W's dtype (mask: bool, same device); a result
    that does not fit W's dtype (fp16 overflows at 65504) raises a ValueError naming W.
    Inputs are never modified and never aliased by the result.

    allow_tf32 : let float32 CUDA matmuls use TF32 (faster, ~1e-3 relative precision per
        product). Off by default: the call pins cuBLAS to IEEE fp32 and restores the
        previous setting on return (`linalg.matmul_precision`). Not in the reference.
    track_objective : record the objective (one extra GEMM per iteration); sparsity is
        always recorded. The finish records its objective at no extra cost.
    track_residuals : record the primal and dual residuals (four elementwise passes per
        iteration, as much as ~20 % of a CPU solve); NaN in the history when off. The
        engine turns it off: it reads no history. Not in the reference.
    """
    return prune_shared(
        [W], XtX, sparsity, method=method, pattern=pattern, group=group, rho=rho, damp=damp,
        iters=iters, mask_steps=mask_steps, mask=mask, track_objective=track_objective,
        polish_iters=polish_iters, polish_damp=polish_damp, allow_tf32=allow_tf32,
        track_residuals=track_residuals,
    )[0]


def prune_shared(Ws, XtX, sparsity, **kwargs) -> list[PruneResult]:
    """Prune several weights that read the same input (q/k/v, gate/up) with one XtX.

    One Gram preconditioning and one factorization for all of them (ADMM: G~ and
    (G~ + rho I)^-1; SparseGPT: the inverse-Hessian factor; the finish: its G~ when its
    damping differs from ADMM's); results equal `prune_layer` on each. Keyword arguments
    as `prune_layer`'s. All inputs are checked before any work.
    """
    return _prune_shared(list(Ws), XtX, sparsity, **kwargs)


@torch.no_grad()
def _prune_shared(
    Ws: list, XtX, sparsity, *, method: str = "admm-grad", pattern: str = "unstructured",
    group: str = "row", rho: float = 1.0, damp: float | None = None, iters: int = 20,
    mask_steps: int = 15, mask=None, track_objective: bool = True, polish_iters: int = 0,
    polish_damp: float | None = None, allow_tf32: bool = False, track_residuals: bool = True,
) -> list[PruneResult]:
    check_method(method)
    problems = []
    for W in Ws:
        problems.append(check_problem(W, problems[0].XtX if problems else XtX, sparsity, pattern,
                                      group, mask, gram_checked=bool(problems)))
    check_solver(rho, 0.0 if damp is None else damp, iters, 0 if mask is not None else mask_steps)
    polish_damp = check_finish(method, polish_iters, polish_damp)
    if not problems:
        return []
    damp = DEFAULT_DAMP.get(method, 0.0) if damp is None else damp
    if polish_damp is None:
        polish_damp = damp if method in ("admm", "admm-grad") else DEFAULT_POLISH_DAMP
    shared = {}  # compute dtype -> what depends on XtX only
    results = []
    with matmul_precision(problems[0].W.device, allow_tf32):
        for p in problems:
            dtype = compute_dtype(p.W, p.XtX)
            if dtype not in shared:
                shared[dtype] = _shared(p.XtX, dtype, method, damp, rho, polish_iters, polish_damp)
            results.append(_prune_one(p, method, dtype, shared[dtype], pattern, group, rho, iters,
                                      mask_steps, track_objective, polish_iters, track_residuals))
    return results


def _shared(XtX, dtype, method, damp, rho, polish_iters, polish_damp) -> dict:
    """What depends on XtX only, per compute dtype: ADMM's G~ and factor, SparseGPT's R,
    the finish's G~ (ADMM's own when the dampings agree)."""
    out = {}
    if method in ("magnitude", "wanda") and not polish_iters:
        return out
    XtX_c = XtX.to(dtype)
    if method == "sparsegpt":
        out["sparsegpt"] = inverse_hessian_factor(XtX_c, damp)
    elif method in ("admm", "admm-grad"):
        G, scale, live = _precondition_gram(XtX_c, damp)
        out["admm"] = (G, scale, live, factorize(G, rho))
    if polish_iters:
        same = "admm" in out and polish_damp == damp
        out["polish"] = out["admm"][:3] if same else _precondition_gram(XtX_c, polish_damp)
    return out


def _prune_one(p, method, dtype, shared, pattern, group, rho, iters, mask_steps, track_objective,
               polish_iters, track_residuals=True):
    W = p.W.to(dtype)
    history, W0, B = (), None, None
    if method in ("magnitude", "wanda"):
        if p.mask is None:
            scores = magnitude_scores(W) if method == "magnitude" else wanda_scores(W, p.XtX)
            M = _select(scores, p.sparsity, pattern, group)  # scores finite: W and XtX checked
            del scores
        else:
            M = p.mask.clone()
        W_hat = W * M
    elif method == "sparsegpt":
        R, dead = shared["sparsegpt"]
        W_hat, M = _sweep(W, R, dead, p.sparsity, p.nm, group, 128, p.mask)
    else:
        G, scale, live, factor = shared["admm"]
        W0 = W * scale[None, :]
        B = W0 @ G
        records, state = [], None
        for state in _admm_steps(
            W0, G, live, factor, B, p.sparsity, pattern, group, rho, iters,
            mask_steps if method == "admm-grad" else 0, p.mask, track_objective, reuse=True,
            residuals=track_residuals,
        ):
            records.append(state._replace(W=None, Z=None, U=None, M=None))  # keep the scalars only
        history = _history(records, W0.numel(), W0.device)
        M = state.M
        W_hat = z_update(state.W, state.U, M).div_(scale[None, :])  # exactly sparse (official code, final Z)
        del state
    polish = ()
    if polish_iters:
        G, scale, live = shared["polish"]
        if W0 is None or shared.get("admm", (None,))[0] is not G:  # the finish's own damping
            W0 = W * scale[None, :]
            B = W0 @ G
        steps, step = [], None
        for step in _polish_steps(W0, G, live, B, M, W_hat.mul_(scale[None, :]), polish_iters,
                                  reuse=True):
            steps.append(step._replace(W=None, R=None, P=None))
        W_hat = step.W.div_(scale[None, :])
        polish = _polish_history(steps, W0.device)
    return PruneResult(check_result(W_hat, p.W.dtype), M, history, polish)


def _history(steps, numel: int, device) -> tuple[IterationRecord, ...]:
    """The steps' device records as IterationRecords, with one host sync for all of them."""
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=device)
    cols = [torch.stack([nan if v is None else v.double()
                         for v in (s.objective, s.primal_residual, s.dual_residual, s.kept)])
            for s in steps]
    rows = torch.stack(cols).tolist()
    return tuple(IterationRecord(s.k, obj, primal, dual, 1.0 - int(kept) / numel)
                 for s, (obj, primal, dual, kept) in zip(steps, rows))


def _polish_history(steps, device) -> tuple[PolishRecord, ...]:
    """The finish's device records as PolishRecords, with one host sync."""
    rows = torch.stack([torch.stack([s.objective.double(), s.residual.double()])
                        for s in steps]).tolist()
    return tuple(PolishRecord(s.k, obj, res) for s, (obj, res) in zip(steps, rows))
