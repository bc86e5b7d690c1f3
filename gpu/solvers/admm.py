"""ADMM for the layer-wise pruning problem (Boža 2024) on torch tensors.

The twin of `admm_prune.reference.admm` (read its docstring for the derivation): the same
three updates in the official code's order, in preconditioned coordinates,

    Z = (W + U) * M                                       z_update
    U = U + W - Z                                         u_update
    W = (W0 G~ + rho (Z - U)) (G~ + rho I)^-1             w_update

Where the contract differs from the reference:

* ``factorize`` keeps the reference's contract (an object whose ``solve(R)`` is
  R (G~ + rho I)^-1) but holds the explicit inverse, computed once per layer from its
  Cholesky factor (``cholesky_ex``, then ``cholesky_solve`` of I): ``w_update`` is one
  GEMM with it, instead of two triangular solves with the factor per iteration. G~
  has unit diagonal and is PSD, so the eigenvalues of G~ + rho I lie in
  [rho, rho + d_in (1 + damp)]: with rho = 1 the inverse is as accurate as the solves
  (measured relative difference of the W update: ~3e-7 in float32, i.e. rounding; 4e-15
  in float64). Chosen by measurement (benchmarks/bench_layers.py, float32; the tables are
  in paper_notes/layer_benchmark*.md):

      W (d_out, d_in)   CPU, 1 core: solve / GEMM per iter (inverse, once)   H200: same
      (576, 576)        7.3 ms / 3.7 ms (7.5 ms)                              0.4 / <0.1 ms (0.4)
      (1536, 576)       18.6 ms / 9.6 ms (7.3 ms)                             0.4 / 0.1 ms (0.4)
      (576, 1536)       36.4 ms / 25.8 ms (102 ms)                            1.0 / 0.1 ms (1.3)
      (4096, 4096)      1.68 s / 1.30 s (1.69 s)                              5.8 / 2.8 ms (6.4)
      (11008, 4096)     4.58 s / 3.48 s (1.73 s)                              13.4 / 7.6 ms (6.5)
      (4096, 11008)     9.94 s / 9.07 s (26.6 s)                              28.3 / 19.8 ms (72.3)

  Over a layer's 20 iterations the inverse wins on every shape on the H200 (down_proj:
  0.47 s vs 0.57 s) and on the CPU wherever d_out >= d_in; on the CPU's down_proj the
  one-off inverse (2 d_in^3 flops) costs 2.7 solves and the total is 4 % worse (208 s vs
  199 s). One code path for both devices, chosen for the GPU, where pruning runs.
* The iterates' scalar records (residuals, objective, sparsity) stay on the device while
  the solver runs; ``admm_iterates`` converts them to Python floats per iterate (one host
  sync per iterate: it is the step-through API), ``prune_layer`` once at the end.
* Validation of tensors runs on the device (see `checks`).
* The updates take keyword-only ``out=``/``work=`` buffers (the only additions to the
  reference's signatures), and the fast loop `admm_steps` calls them with fixed buffers.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import torch

from admm_prune.reference.checks import check_solver
from admm_prune.reference.admm import ADMMState, Preconditioned
from admm_prune.reference.schedule import cubic_sparsity

from .checks import check_problem, compute_dtype
from .linalg import InverseFactor, inverse_factor
from .masks import select_unchecked
from admm_prune.reference.options import DEFAULTS
from admm_prune.reference.methods import DEFAULT_DAMP


def precondition(W: torch.Tensor, XtX: torch.Tensor, damp: float) -> Preconditioned:
    """W~ = W D,  G~ = D^-1 (XtX + damp diag(XtX)) D^-1,  D = diag(||X_j||) (1 if dead).

    Parameters
    ----------
    W : (d_out, d_in).  XtX : (d_in, d_in), on W's device; both in the compute dtype.
    """
    G, scale, live = precondition_gram(XtX, damp)
    return Preconditioned(W * scale[None, :], G, scale, live)


def precondition_gram(XtX: torch.Tensor, damp: float):
    """The W-independent half of `precondition`: (G~, scale, live), shared by a Gram's weights."""
    d = XtX.diagonal()
    norms = torch.sqrt(torch.clamp(d, min=0.0))
    live = norms > 0
    scale = torch.where(live, norms, torch.ones_like(norms))
    G = XtX.clone()
    G.diagonal().add_(damp * d)
    G.div_(scale[:, None]).div_(scale[None, :])
    return G, scale, live


def factorize(G: torch.Tensor, rho: float) -> InverseFactor:
    """(G~ + rho I)^-1 from one Cholesky, once per layer; ``solve(R)`` = R (G~ + rho I)^-1.

    The reference's contract (an object whose ``solve`` applies the inverse from the
    right); here it holds the explicit inverse so that `w_update` is a single GEMM (the
    measurements are in the module docstring; how the inverse is formed, in
    `linalg.inverse_factor`). A failed factorization (rounding) is retried with added
    damping and a logged warning.
    """
    A = G.clone()
    A.diagonal().add_(rho)
    return inverse_factor(A, "G~ + rho I")


def z_update(W: torch.Tensor, U: torch.Tensor, M: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Z = (W + U) * M: projection onto the matrices supported on M (into `out` if given).

    M may be bool or 0/1 in W's dtype (same result; the fast loop passes the latter, as a
    bool factor is cast to W's dtype on every call: 2.1 vs 1.0 ms at (3072, 576) on a CPU).
    """
    return torch.add(W, U, out=out).mul_(M)


def u_update(U: torch.Tensor, W: torch.Tensor, Z: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """U = U + W - Z: the scaled dual variable accumulates the constraint violation.

    `out` may be U itself (the update in place).
    """
    return torch.add(U, W, out=out).sub_(Z)


def w_update(
    factor: InverseFactor, B: torch.Tensor, Z: torch.Tensor, U: torch.Tensor, rho: float, *,
    out: torch.Tensor | None = None, work: torch.Tensor | None = None,
) -> torch.Tensor:
    """W = (W0 G~ + rho (Z - U)) (G~ + rho I)^-1, with B = W0 G~ precomputed.

    `factor` is `factorize`'s (one GEMM). `work`: a scratch buffer for B + rho (Z - U);
    `out` must not alias it, Z, U or B.
    """
    R = torch.sub(Z, U, out=work)
    if rho != 1.0:  # x * 1.0 == x: the pass is skipped at the default rho, same result
        R.mul_(rho)
    return factor.solve(R.add_(B), out=out)


def mask_update(
    W: torch.Tensor, U: torch.Tensor, live: torch.Tensor, sparsity: float, pattern: str, group: str,
    *, work: torch.Tensor | None = None,
) -> torch.Tensor:
    """M = top scores of |W + U| at `sparsity` (dead features score 0: pruned first).

    `work`: a scratch buffer for the scores. No finiteness check (that would be a host
    sync per mask step): W and U come from the solver, whose inputs were checked.
    """
    return select_unchecked(torch.add(W, U, out=work).abs_().mul_(live), sparsity, pattern, group)


def device_objective(Z: torch.Tensor, W0: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """`objective` as a 0-dim tensor on the device (no host sync): the solver loops' record."""
    D = Z - W0
    return (D @ G).mul_(D).sum()


def objective(Z: torch.Tensor, W0: torch.Tensor, G: torch.Tensor) -> float:
    """tr((Z - W0) G (Z - W0)^T), the damped reconstruction error (any coordinates)."""
    return float(device_objective(Z, W0, G))


class _Step(NamedTuple):
    """One iterate with its records still on the device (objective None when not tracked)."""

    k: int
    W: torch.Tensor
    Z: torch.Tensor
    U: torch.Tensor
    M: torch.Tensor
    kept: torch.Tensor
    objective: torch.Tensor | None
    primal_residual: torch.Tensor
    dual_residual: torch.Tensor


def _initial_mask(W0, live, sparsity, pattern, group, mask, mask_steps):
    """(M, mask_steps): the caller's mask (fixed), ADMM1's Wanda mask (fixed), or None."""
    if mask is not None:
        return mask.clone(), 0  # the states and the result never alias the caller's mask
    if mask_steps == 0:
        return mask_update(W0, torch.zeros_like(W0), live, sparsity, pattern, group), 0
    return None, mask_steps


def admm_steps(
    W0: torch.Tensor, G: torch.Tensor, live: torch.Tensor, factor: InverseFactor, B: torch.Tensor,
    sparsity: float | None, pattern: str, group: str, rho: float, iters: int, mask_steps: int,
    mask: torch.Tensor | None, track_objective: bool, reuse: bool = False, residuals: bool = True,
) -> Iterator[_Step]:
    """The ADMM loop, without host syncs (the records stay 0-dim device tensors).

    Each iteration calls the public `mask_update`, `z_update`, `u_update`, `w_update`.
    With ``reuse=True`` (`prune_layer`) they write into a fixed set of buffers (W, U, Z,
    Z_prev, one scratch) through their ``out=``/``work=`` arguments instead of allocating:
    on a CPU a fresh 180 MB tensor costs ~5x an in-place pass (page faults). Then a
    yielded state is only valid until the next one. With ``reuse=False``
    (`admm_iterates`) every state is fresh. Same operations, same rounding, either way
    (and the reference's). ``residuals=False`` skips the two residual norms (their
    records are None). W + U is formed twice (by z_update and u_update): one extra
    elementwise pass per iteration, ~1/d_in of the GEMM's time, for updates that are
    exactly the named functions.
    """
    M, mask_steps = _initial_mask(W0, live, sparsity, pattern, group, mask, mask_steps)
    kept = None if M is None else M.count_nonzero()
    Mz = None if M is None else M.to(W0.dtype)  # z_update multiplies by it: a bool M costs a cast per step
    Wk, U, Z_prev = W0, torch.zeros_like(W0), W0
    tmp = torch.empty_like(W0) if reuse else None
    spare = None  # a buffer free for the next Z (reuse)
    for t in range(iters):
        if t < mask_steps:
            M = mask_update(Wk, U, live, cubic_sparsity(t + 1, mask_steps, sparsity), pattern, group,
                            work=tmp)
            kept, Mz = M.count_nonzero(), M.to(W0.dtype)
        Z = z_update(Wk, U, Mz, out=spare)                     # z-update
        U = u_update(U, Wk, Z, out=U if reuse else None)       # u-update
        primal = dual = None  # residuals=False: not recorded (the engine reads no history)
        if residuals:
            primal = torch.linalg.vector_norm(torch.sub(Wk, Z, out=tmp))
            dual = rho * torch.linalg.vector_norm(torch.sub(Z, Z_prev, out=tmp))
        Wk = w_update(factor, B, Z, U, rho, out=Wk if reuse and Wk is not W0 else None,
                      work=tmp)                                # w-update
        obj = device_objective(Z, W0, G) if track_objective else None
        yield _Step(t + 1, Wk, Z, U, M, kept, obj, primal, dual)
        if reuse and Z_prev is not W0:
            spare = Z_prev
        Z_prev = Z


@torch.no_grad()  # per step: the decorator wraps each next()
def admm_iterates(
    W: torch.Tensor,
    XtX: torch.Tensor,
    sparsity: float | None,
    *,
    pattern: str = DEFAULTS.pattern,
    group: str = DEFAULTS.group,
    rho: float = DEFAULTS.rho,
    damp: float = DEFAULT_DAMP["admm"],
    iters: int = DEFAULTS.iters,
    mask_steps: int = DEFAULTS.mask_steps,
    mask: torch.Tensor | None = None,
    track_objective: bool = True,
) -> Iterator[ADMMState]:
    """Yield the ADMM iterates k = 1..iters, for reading the algorithm step by step.

    As the reference's `admm_iterates`; tensors stay on W's device in the compute dtype
    (float64 if W or XtX is, else float32). Each yielded state's floats cost one host sync.

    Parameters
    ----------
    W : (d_out, d_in) dense weights.  XtX : (d_in, d_in).  mask : (d_out, d_in) bool.
    sparsity : target; for N:M the implied 1 - N/M (pass None).
    """
    p = check_problem(W, XtX, sparsity, pattern, group, mask)
    check_solver(rho, damp, iters, 0 if mask is not None else mask_steps)  # a given mask is never re-selected
    dtype = compute_dtype(p.W, p.XtX)
    W0, G, scale, live = precondition(p.W.to(dtype), p.XtX.to(dtype), damp)
    factor = factorize(G, rho)
    numel = W0.numel()
    for s in admm_steps(W0, G, live, factor, W0 @ G, p.sparsity, pattern, group, rho, iters,
                         mask_steps, p.mask, track_objective):
        obj = float("nan") if s.objective is None else float(s.objective)
        yield ADMMState(s.k, s.W, s.Z, s.U, s.M, scale, 1.0 - int(s.kept) / numel, obj,
                        float(s.primal_residual), float(s.dual_residual))
