"""The finish on the support on torch tensors: CG on the masked normal equations.

The twin of `admm_prune.reference.polish` (read its docstring for the method): K steps of
conjugate gradient on G~_SS w_S = (W0~ G~)_S for all rows at once, warm-started from a
method's weights; one (d_out, d_in) x (d_in, d_in) GEMM per step, like one ADMM
iteration. `cg_step` takes keyword-only ``out=``/``work=`` buffers (the only additions to
the reference's signature); the loop `polish_steps` that `prune_layer` runs calls it with
a fixed set of buffers (W, W G~, R, P, one scratch for P G~, one for the objective), so a
step allocates nothing weight-sized. The records stay on the device until the end.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import torch

from admm_prune.reference.checks import check_int, check_positive
from admm_prune.reference.polish import PolishState

from .checks import as_tensor, check_gram, check_mask, check_weights, compute_dtype
from .admm import precondition
from admm_prune.reference.methods import DEFAULT_POLISH_DAMP
from admm_prune.reference.polish import POLISH_STEPS


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den per row, 0 where den = 0 (an empty or solved row takes no step)."""
    pos = den > 0
    return torch.where(pos, num / torch.where(pos, den, torch.ones_like(den)), torch.zeros_like(num))


def cg_step(
    W: torch.Tensor, WG: torch.Tensor, R: torch.Tensor, P: torch.Tensor, B: torch.Tensor,
    G: torch.Tensor, S: torch.Tensor, *, out: tuple | None = None, work: torch.Tensor | None = None,
):
    """W = W + a P, R = (B - W G~) * S, P = R + b P: one CG step on every row at once.

    a = |R|^2 / <P, P G~> and b = |R_new|^2 / |R|^2 per row. Returns (W, W G~, R, P).
    `out`: four buffers for them (they may be W, WG, R, P themselves: the step in place);
    `work`: a scratch buffer for P G~, aliasing none of the others.
    """
    W_out, WG_out, R_out, P_out = (None,) * 4 if out is None else out
    PG = torch.matmul(P, G, out=work)
    rr = torch.linalg.vecdot(R, R)
    a = _ratio(rr, torch.linalg.vecdot(P, PG)).unsqueeze(1)
    W = torch.addcmul(W, a, P, out=W_out)
    WG = torch.addcmul(WG, a, PG, out=WG_out)
    R_new = torch.sub(B, WG, out=R_out).mul_(S)
    b = _ratio(torch.linalg.vecdot(R_new, R_new), rr).unsqueeze(1)
    return W, WG, R_new, torch.addcmul(R_new, b, P, out=P_out)


class _PolishStep(NamedTuple):
    """One iterate with its records still on the device."""

    k: int
    W: torch.Tensor
    R: torch.Tensor
    P: torch.Tensor
    objective: torch.Tensor
    residual: torch.Tensor


def polish_steps(
    W0: torch.Tensor, G: torch.Tensor, live: torch.Tensor, B: torch.Tensor, M: torch.Tensor,
    W_start: torch.Tensor, iters: int, reuse: bool = False,
) -> Iterator[_PolishStep]:
    """k = 0..iters, in preconditioned coordinates (W_start too), without host syncs.

    With ``reuse=True`` the iterates overwrite one set of buffers (a yielded state is valid
    until the next); W_start is then consumed as the first of them.
    """
    S = M & live[None, :]
    Wk = W_start.mul_(M) if reuse else W_start * M
    Wk = torch.where(M & ~live[None, :], W0, Wk, out=Wk if reuse else None)  # dead kept: dense
    WG = Wk @ G
    R = torch.sub(B, WG).mul_(S)
    P = R.clone()
    work, tmp = (torch.empty_like(W0), torch.empty_like(W0)) if reuse else (None, None)
    for k in range(iters + 1):
        if k:
            Wk, WG, R, P = cg_step(Wk, WG, R, P, B, G, S, out=(Wk, WG, R, P) if reuse else None,
                                   work=work)
        obj = torch.linalg.vecdot(torch.sub(Wk, W0, out=tmp).flatten(),
                                  torch.sub(WG, B, out=work).flatten())
        yield _PolishStep(k, Wk, R, P, obj, torch.linalg.vector_norm(R))


@torch.no_grad()  # per step: the decorator wraps each next()
def polish_iterates(
    W: torch.Tensor,
    XtX: torch.Tensor,
    mask: torch.Tensor,
    W_start: torch.Tensor,
    *,
    damp: float = DEFAULT_POLISH_DAMP,
    iters: int = POLISH_STEPS,
) -> Iterator[PolishState]:
    """Yield W_k, k = 0..iters: CG on G~_SS w_S = (W0~ G~)_S per row, from W_start * M.

    As the reference's `polish_iterates`; tensors stay on W's device in the compute dtype
    (float64 if W or XtX is, else float32). Each yielded state's floats cost one host sync.

    Parameters
    ----------
    W : (d_out, d_in) dense weights.  XtX : (d_in, d_in).  mask : (d_out, d_in) bool.
    W_start : (d_out, d_in), the method's weights (original coordinates).
    damp : lambda of G = XtX + lambda diag(XtX), as in `masked_lstsq`.
    """
    W = check_weights(W)
    XtX = check_gram(XtX, W.shape[1], W.device)
    mask = check_mask(mask, W.shape, W.device)
    W_start = as_tensor(W_start, W.device)
    if tuple(W_start.shape) != tuple(W.shape) or not bool(torch.isfinite(W_start).all()):
        raise ValueError(f"W_start must be a finite array of W's shape {tuple(W.shape)}, "
                         f"got {tuple(W_start.shape)}")
    check_positive("damp", damp, allow_zero=True)
    check_int("iters", iters, minimum=0)
    dtype = compute_dtype(W, XtX)
    W0, G, scale, live = precondition(W.to(dtype), XtX.to(dtype), damp)
    start = W_start.to(dtype) * scale[None, :]
    for s in polish_steps(W0, G, live, W0 @ G, mask, start, iters):
        yield PolishState(s.k, s.W, s.R, s.P, scale, float(s.objective), float(s.residual))
