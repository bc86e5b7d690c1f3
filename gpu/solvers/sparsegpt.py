"""SparseGPT (Frantar & Alistarh 2023) on torch tensors: the blocked OBS column sweep.

The twin of `admm_prune.reference.sparsegpt` (same masks, same update, same two
differences from IST-DASLab/sparsegpt: exact prune counts, dead features scored 0). The
sweep works on W^T so that a column of W is a contiguous row: per column one multiply and
one rank-1 update (``addr_``) of the rest of the block, all over the d_out rows at once;
per block of 128 columns the error is pushed to the columns right of it with one GEMM.
The per-column loop is inherent to the method (column i's update depends on column
i-1's), so on a GPU SparseGPT is launch-bound long before it is FLOP-bound: on an H200,
150-460 ms per LLaMA-7B layer at 10-47x its FLOP floor, where ADMM runs at 1.1-1.5x
(paper_notes/layer_benchmark_h200.md).
"""

from __future__ import annotations

import torch

from admm_prune.reference.schedule import prune_count

from admm_prune.reference.checks import check_int, check_positive

from .checks import check_problem, compute_dtype
from .linalg import cholesky
from .masks import prune_lowest, nm_protected
from admm_prune.reference.options import DEFAULTS
from admm_prune.reference.methods import DEFAULT_DAMP


def inverse_hessian_factor(XtX: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of (H + damp mean(diag H) I)^-1, dead features set to H_jj = 1.

    Returns (R, dead); computed in XtX's dtype. The same R as the original's
    ``cholesky(cholesky_inverse(cholesky(H)), upper=True)``, with one factorization instead
    of two and without forming H^-1: with J the reversal permutation and
    J H J = L2 L2^T (Cholesky), H^-1 = J L2^-T L2^-1 J = (J L2^-1 J)^T (J L2^-1 J), and
    J L2^-1 J is upper triangular with a positive diagonal, so it is the factor:

        R = J L2^-1 J,   L2 = cholesky(J H J)     (d^3/3 + d^3 flops instead of ~8/3 d^3)

    It is also the more accurate route (the error of L2^-1 grows with cond(H)^(1/2), that
    of a formed H^-1 with cond(H)), and it cannot hit the original's notorious failure of
    the second Cholesky on a rounded H^-1. A failed factorization of H is retried with
    added damping and a logged warning.
    """
    H = XtX.clone()
    dead = H.diagonal() == 0
    H.diagonal().masked_fill_(dead, 1.0)
    H.diagonal().add_(damp * H.diagonal().mean())
    L2 = cholesky(H.flip(0, 1), "H + damp mean(diag H) I")
    H.zero_().diagonal().fill_(1.0)  # reuse the buffer: the identity
    return torch.linalg.solve_triangular(L2, H, upper=False).flip(0, 1), dead


def _scores(Wt: torch.Tensor, d: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """OBS scores w^2 / [H^-1]_jj^2 of rows of W^T, transposed back to (d_out, columns)."""
    s = Wt**2 / d[:, None] ** 2
    return s.masked_fill_(dead[:, None], 0.0).T


def _block_mask(scores: torch.Tensor, i1: int, i2: int, sparsity: float, group: str) -> torch.Tensor:
    """Keep-mask (d_out, i2 - i1) of one column block, its prune count allocated so the totals are exact."""
    if group == "row":
        k = prune_count(i2, sparsity) - prune_count(i1, sparsity)
        return prune_lowest(scores, k)
    d_out = scores.shape[0]
    k = prune_count(d_out * i2, sparsity) - prune_count(d_out * i1, sparsity)
    return prune_lowest(scores.reshape(1, -1), k).reshape(scores.shape)


def sparsegpt_sweep(
    W: torch.Tensor, R: torch.Tensor, dead: torch.Tensor, sparsity: float | None,
    nm: tuple[int, int] | None, group: str, blocksize: int, mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The column sweep given the factor R; W and mask are not modified (nor aliased)."""
    d_out, d_in = W.shape
    if nm is not None:
        blocksize = max(nm[1], blocksize // nm[1] * nm[1])
    # (d_in, d_out): column j of W is row j here. A copy always: for d_out = 1 or d_in = 1,
    # W.T is contiguous already and .contiguous() would return a view of the caller's W.
    Wt = W.T.clone(memory_format=torch.contiguous_format)
    Mt = (torch.ones(d_in, d_out, dtype=torch.bool, device=W.device) if mask is None
          else mask.T.clone(memory_format=torch.contiguous_format))
    for i1 in range(0, d_in, blocksize):
        i2 = min(i1 + blocksize, d_in)
        W1, M1, R1 = Wt[i1:i2], Mt[i1:i2], R[i1:i2, i1:i2]  # views: updated in place
        d, dead1 = R1.diagonal(), dead[i1:i2]
        if mask is None and nm is None:
            M1.copy_(_block_mask(_scores(W1, d, dead1), i1, i2, sparsity, group).T)
        # P[i] = (1 - M[:, i]) / d_i, so that err = (w - q) / d_i = w * P[i]: one kernel
        P = torch.logical_not(M1).to(W.dtype).div_(d[:, None])
        Err1 = torch.empty_like(W1)
        # the per-column views, made in bulk (on a GPU the sweep is bound by per-column overhead)
        w_rows, p_rows, e_rows, r_rows = W1.unbind(0), P.unbind(0), Err1.unbind(0), R1.unbind(0)
        for i in range(i2 - i1):
            if mask is None and nm is not None and i % nm[1] == 0:
                j = slice(i, i + nm[1])
                M1[j] = nm_protected(_scores(W1[j], d[j], dead1[j]), *nm).T
                torch.div(torch.logical_not(M1[j]).to(W.dtype), d[j, None], out=P[j])
            torch.mul(w_rows[i], p_rows[i], out=e_rows[i])  # err = (w - q) / d
            W1[i:].addr_(r_rows[i][i:], e_rows[i], alpha=-1)  # the columns right of i
        W1.mul_(M1)  # q = w * M: exactly zero where pruned
        Wt[i2:].addmm_(R[i1:i2, i2:].T, Err1, alpha=-1)
    return Wt.T.contiguous(), Mt.T.contiguous()


@torch.no_grad()
def sparsegpt(
    W: torch.Tensor,
    XtX: torch.Tensor,
    sparsity: float | None,
    pattern: str = DEFAULTS.pattern,
    group: str = DEFAULTS.group,
    damp: float = DEFAULT_DAMP["sparsegpt"],
    blocksize: int = 128,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """OBS column sweep; returns (pruned W, keep-mask). With `mask` given, only the update.

    As the reference's (checked inputs, W not modified); results in the compute dtype
    (float64 if W or XtX is, else float32) on W's device.
    """
    p = check_problem(W, XtX, sparsity, pattern, group, mask)
    check_positive("damp", damp, allow_zero=True)
    check_int("blocksize", blocksize, minimum=1)
    dtype = compute_dtype(p.W, p.XtX)
    R, dead = inverse_hessian_factor(p.XtX.to(dtype), damp)
    return sparsegpt_sweep(p.W.to(dtype), R, dead, p.sparsity, p.nm, group, blocksize, p.mask)
