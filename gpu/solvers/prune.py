"""`prune_layer` and `prune_shared` on torch tensors: checked inputs, exactly sparse output.

The twin of `admm_prune.reference.prune`. `prune_shared` is the workhorse: the weights
that read one input (q/k/v, gate/up) share everything that depends only on XtX (the
preconditioned Gram G~ and the inverse of G~ + rho I for ADMM, the inverse-Hessian factor
for SparseGPT), computed once; each weight then runs exactly the code it would run
alone, so the results equal separate `prune_layer` calls bit for bit.
"""

from __future__ import annotations

import torch

from admm_prune.reference.checks import Problem, check_alps, check_finish, check_solver
from admm_prune.reference.errors import AdmmPruneError
from admm_prune.reference.options import DEFAULTS, SolverOptions
from admm_prune.reference.prune import DEFAULT_POLISH_DAMP, PolishRecord, PruneResult

from .. import methods
from .admm import precondition_gram
from .checks import check_problem, check_result, compute_dtype
from .linalg import matmul_precision
from .polish import polish_steps


def prune_layer(
    W: torch.Tensor,
    XtX: torch.Tensor,
    sparsity: float | None,
    *,
    method: str = DEFAULTS.method,
    pattern: str = DEFAULTS.pattern,
    group: str = DEFAULTS.group,
    rho: float = DEFAULTS.rho,
    damp: float | None = DEFAULTS.damp,
    iters: int = DEFAULTS.iters,
    mask_steps: int = DEFAULTS.mask_steps,
    mask: torch.Tensor | None = None,
    track_objective: bool = True,
    polish_iters: int = DEFAULTS.polish_iters,
    polish_damp: float | None = DEFAULTS.polish_damp,
    alps_rho: float = DEFAULTS.alps_rho,
    alps_iters: int = DEFAULTS.alps_iters,
    alps_pcg_iters: int = DEFAULTS.alps_pcg_iters,
    allow_tf32: bool = False,
    track_residuals: bool = True,
) -> PruneResult:
    """W^ = argmin ||X W^T - X W^^T||^2 over W^ = W^ * M, with M chosen by `method`.

    As the reference's `prune_layer` (methods, mask, defaults, history, the finish
    `polish_iters`/`polish_damp` and its records in ``polish``, ALPS's `alps_rho`,
    `alps_iters`, `alps_pcg_iters`), on W's device. W may be
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
        polish_iters=polish_iters, polish_damp=polish_damp, alps_rho=alps_rho, alps_iters=alps_iters,
        alps_pcg_iters=alps_pcg_iters, allow_tf32=allow_tf32, track_residuals=track_residuals,
    )[0]


def prune_shared(Ws, XtX, sparsity, **kwargs) -> list[PruneResult]:
    """Prune several weights that read the same input (q/k/v, gate/up) with one XtX.

    One Gram preconditioning and one factorization for all of them (ADMM: G~ and
    (G~ + rho I)^-1; SparseGPT: the inverse-Hessian factor; the finish: its G~ when its
    damping differs from ADMM's); results equal `prune_layer` on each. Keyword arguments
    as `prune_layer`'s. All inputs are checked before any work.
    """
    return _prune_shared(list(Ws), XtX, sparsity, **kwargs)


def _engine_method(options: SolverOptions, needs: str):
    """The method of `options` and the settings its `prune` reads, for the engine's paths that
    give it no Gram (`needs`: what the path hands it); no damping, no mask steps, no tracking."""
    impl = methods.get(options.method)
    if impl.spec.needs != needs:
        raise AdmmPruneError(f"method {options.method} needs the inputs' {impl.spec.needs}", field="method")
    return impl, methods.Settings(options.pattern, options.group, options.rho, 0.0, options.iters, 0, False, False,
                                  options.alps_rho, options.alps_iters, options.alps_pcg_iters)


@torch.no_grad()
def prune_weights(W: torch.Tensor, sparsity: float | None, options: SolverOptions) -> PruneResult:
    """W^ = W * M for a method that reads only the weights (magnitude): no Gram, no inputs.

    `options` gives the method, pattern and group (validated there); W is trusted (the
    engine checked the checkpoint). The result is in W's dtype."""
    impl, settings = _engine_method(options, "weights")
    out = impl.prune(Problem(W, None, sparsity, options.nm, None), W.to(compute_dtype(W)), None, settings)
    return PruneResult(check_result(out.W, W.dtype), out.mask)


@torch.no_grad()
def prune_norms(Ws: list, norms: torch.Tensor, sparsity: float | None, options: SolverOptions) -> list[PruneResult]:
    """W^ = W * M, M from |W_ij| ||X_j|| with ||X_j||^2 = `norms`_j = (X^T X)_jj [d_in]: a method
    that reads only the inputs' column norms (Wanda), given them as a vector, never as a
    d_in x d_in matrix (485 MB for a LLaMA-7B down_proj in float32).

    The engine's path (its twin is `prune_shared` with a diagonal XtX, which gives the same
    masks bit for bit); the Ws and norms are trusted (the engine checked them)."""
    impl, settings = _engine_method(options, "norms")
    results = []
    for W in Ws:
        out = impl.prune(Problem(W, norms, sparsity, options.nm, None), W.to(compute_dtype(W)), None, settings)
        results.append(PruneResult(check_result(out.W, W.dtype), out.mask))
    return results


@torch.no_grad()
def _prune_shared(
    Ws: list, XtX, sparsity, *, method: str = DEFAULTS.method, pattern: str = DEFAULTS.pattern,
    group: str = DEFAULTS.group, rho: float = DEFAULTS.rho, damp: float | None = DEFAULTS.damp,
    iters: int = DEFAULTS.iters, mask_steps: int = DEFAULTS.mask_steps, mask=None, track_objective: bool = True,
    polish_iters: int = DEFAULTS.polish_iters, polish_damp: float | None = DEFAULTS.polish_damp,
    alps_rho: float = DEFAULTS.alps_rho, alps_iters: int = DEFAULTS.alps_iters,
    alps_pcg_iters: int = DEFAULTS.alps_pcg_iters, allow_tf32: bool = False, track_residuals: bool = True,
) -> list[PruneResult]:
    impl = methods.get(method)
    problems = []
    for W in Ws:
        problems.append(check_problem(W, problems[0].XtX if problems else XtX, sparsity, pattern,
                                      group, mask, gram_checked=bool(problems)))
    mask_steps = mask_steps if impl.spec.mask_steps and mask is None else 0  # only ADMM-Grad's are used
    check_solver(rho, 0.0 if damp is None else damp, iters, mask_steps)
    check_alps(alps_rho, alps_iters, alps_pcg_iters)
    polish_damp = check_finish(method, polish_iters, polish_damp)
    if not problems:
        return []
    damp = (impl.spec.default_damp or 0.0) if damp is None else damp
    if polish_damp is None:
        polish_damp = damp if impl.spec.finish_own_damp else DEFAULT_POLISH_DAMP
    settings = methods.Settings(pattern, group, rho, damp, iters, mask_steps, track_objective, track_residuals,
                                alps_rho, alps_iters, alps_pcg_iters)
    shared = {}  # compute dtype -> (the method's prepared state, the finish's (G~, scale, live))
    results = []
    with matmul_precision(problems[0].W.device, allow_tf32):
        for p in problems:
            dtype = compute_dtype(p.W, p.XtX)
            if dtype not in shared:
                shared[dtype] = _prepare(impl, p.XtX, dtype, damp, rho, polish_iters, polish_damp)
            prepared, finish = shared[dtype]
            W = p.W.to(dtype)
            out = impl.prune(p, W, prepared, settings)
            W_hat, polish = out.W, ()
            if polish_iters:
                W_hat, polish = _finish(W, out, finish, polish_iters)
            results.append(PruneResult(check_result(W_hat, p.W.dtype), out.mask, out.history, polish))
    return results


def _prepare(impl, XtX, dtype, damp, rho, polish_iters, polish_damp) -> tuple:
    """What depends on XtX only, per compute dtype: the method's (`MethodImpl.prepare`) and the
    finish's G~ (the method's own when it forms one at the same damping)."""
    if impl.spec.needs != "gram" and not polish_iters:
        return None, None
    XtX_c = XtX.to(dtype)
    prepared = impl.prepare(XtX_c, damp, rho) if impl.spec.needs == "gram" else None
    finish = None
    if polish_iters:
        finish = impl.preconditioned(prepared) if polish_damp == damp else None
        finish = finish if finish is not None else precondition_gram(XtX_c, polish_damp)
    return prepared, finish


def _finish(W, out, finish, polish_iters) -> tuple:
    """The finish on the method's mask: `polish_iters` CG steps from its weights."""
    G, scale, live = finish
    if out.precondition is not None and out.precondition[0] is G:
        W0, B = out.precondition[1:]
    else:  # the finish's own damping
        W0 = W * scale[None, :]
        B = W0 @ G
    steps, step = [], None
    for step in polish_steps(W0, G, live, B, out.mask, out.W.mul_(scale[None, :]), polish_iters, reuse=True):
        steps.append(step._replace(W=None, R=None, P=None))
    return step.W.div_(scale[None, :]), _polish_history(steps, W0.device)


def _polish_history(steps, device) -> tuple[PolishRecord, ...]:
    """The finish's device records as PolishRecords, with one host sync."""
    rows = torch.stack([torch.stack([s.objective.double(), s.residual.double()])
                        for s in steps]).tolist()
    return tuple(PolishRecord(s.k, obj, res) for s, (obj, res) in zip(steps, rows))
