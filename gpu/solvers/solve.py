"""Exact solutions and error measures on torch tensors: the oracles, batched over rows."""

from __future__ import annotations

import torch

from admm_prune.reference.checks import check_positive

from .checks import as_tensor, check_gram, check_mask, check_weights, compute_dtype
from admm_prune.reference.methods import DEFAULT_DAMP

#: elements of the batched (rows, k, k) systems solved at once by `masked_lstsq`
_BATCH_ELEMENTS = 2**24


@torch.no_grad()
def masked_lstsq(W: torch.Tensor, XtX: torch.Tensor, mask: torch.Tensor, damp: float = DEFAULT_DAMP["admm"]) -> torch.Tensor:
    """W^ = argmin tr((W^ - W) G (W^ - W)^T) s.t. W^ = W^ * M,  G = XtX + damp diag(XtX).

    Rows are independent: on a row's kept live support S (P = pruned inputs),
    W^_S = W_S + G_SS^-1 G_SP W_P. Batched over rows: each row's support is gathered to the
    front (padded to the largest support with identity rows) and the systems are solved
    by batched Cholesky, a few thousand rows at a time; a row whose G_SS is singular (no
    damping) gets the minimum-norm solution (pseudo-inverse), as in the reference.

    Parameters
    ----------
    W : (d_out, d_in).  XtX : (d_in, d_in).  mask : (d_out, d_in) bool, True = kept.
    """
    W = check_weights(W)
    XtX = check_gram(XtX, W.shape[1], W.device)
    mask = check_mask(mask, W.shape, W.device)
    check_positive("damp", damp, allow_zero=True)
    dtype = compute_dtype(W, XtX)
    W, XtX = W.to(dtype), XtX.to(dtype)
    G = XtX.clone()
    G.diagonal().add_(damp * XtX.diagonal())
    S = mask & (XtX.diagonal() > 0)[None, :]
    out = W * mask
    rhs = (W * ~mask) @ G  # row i: (G_SP W_P)_j for every j (G symmetric)
    counts = S.sum(dim=1)
    k = int(counts.max())
    if k == 0:
        return out
    order = torch.argsort(torch.logical_not(S).to(torch.uint8), dim=1, stable=True)[:, :k]
    valid = torch.arange(k, device=W.device)[None, :] < counts[:, None]
    rows = max(1, _BATCH_ELEMENTS // (k * k))
    eye = torch.eye(k, dtype=dtype, device=W.device)
    for r0 in range(0, W.shape[0], rows):
        idx, v = order[r0:r0 + rows], valid[r0:r0 + rows]
        A = G[idx[:, :, None], idx[:, None, :]]
        A.mul_(v[:, :, None] & v[:, None, :]).add_(eye * ~v[:, None, :])  # identity on padding
        b = torch.gather(rhs[r0:r0 + rows], 1, idx).mul_(v)
        L, info = torch.linalg.cholesky_ex(A)
        x = torch.cholesky_solve(b[..., None], L)[..., 0]
        bad = info != 0
        if bool(bad.any()):  # singular without damping: minimum-norm solution
            x[bad] = (torch.linalg.pinv(A[bad], hermitian=True) @ b[bad][..., None])[..., 0]
        out[r0:r0 + rows].scatter_add_(1, idx, x.mul_(v))
    return out


@torch.no_grad()
def reconstruction_error(W_dense: torch.Tensor, W_pruned: torch.Tensor, XtX: torch.Tensor) -> float:
    """||X (W^ - W)^T||^2 / ||X W^T||^2 = tr(D XtX D^T) / tr(W XtX W^T), D = W^ - W.

    Undamped. 0 when both are 0 (a layer that sees no input). Computed in float64 if any
    input is float64, else float32; one host sync.
    """
    return reconstruction_errors(W_dense, [W_pruned], XtX)[0]


def reconstruction_errors(W_dense: torch.Tensor, W_pruned: list, XtX: torch.Tensor) -> list[float]:
    """`reconstruction_error` of each of `W_pruned` against one W_dense and XtX: the inputs
    checked and the denominator computed once (the engine's two errors per linear: 3
    GEMMs instead of 4), one host sync."""
    W_dense = check_weights(W_dense)
    XtX = check_gram(XtX, W_dense.shape[1], W_dense.device)
    W_pruned = [as_tensor(W, W_dense.device) for W in W_pruned]
    for W in W_pruned:
        if tuple(W.shape) != tuple(W_dense.shape):
            raise ValueError(f"W_pruned must have the shape of W_dense {tuple(W_dense.shape)}, "
                             f"got {tuple(W.shape)}")
    dtype = compute_dtype(W_dense, XtX, *W_pruned)
    W_dense, XtX = W_dense.to(dtype), XtX.to(dtype)
    sums = [(W_dense @ XtX).mul_(W_dense).sum()]
    for W in W_pruned:
        D = W.to(dtype) - W_dense
        sums.append((D @ XtX).mul_(D).sum())
    den, *nums = torch.stack(sums).tolist()
    if den == 0.0:
        return [0.0 if num == 0.0 else float("inf") for num in nums]
    return [num / den for num in nums]
