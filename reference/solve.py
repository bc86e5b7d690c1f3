"""Exact solutions and error measures: the oracles the tests and the tutorial compare with.

What this module measures is the layer-wise objective, the paper's: for one linear,
||X W^T - X W^^T||^2 on the inputs X the pruned model gives it (`reconstruction_error`), and
its exact minimizer on a fixed mask (`masked_lstsq`). The engine can go past it with block
reconstruction (``admm_prune.gpu.engine.reconstruct``, torch autograd only, no NumPy twin): after a
block is pruned its kept weights are tuned, masks fixed, toward

    min over W^_l = W^_l * M_l of  sum over windows ||block_W^(H^_i) - D_{i+1}||^2

with H^_i the pruned model's input to block i and D_{i+1} the dense model's hidden state
after block i. Its target is the dense model's output, not the dense weights applied to
damaged inputs, and it couples the block's linears: tutorial chapter 9 shows why both matter.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from .checks import check_gram, check_mask, check_positive, check_weights
from .methods import DEFAULT_DAMP


def masked_lstsq(W: np.ndarray, XtX: np.ndarray, mask: np.ndarray, damp: float = DEFAULT_DAMP["admm"]) -> np.ndarray:
    """W^ = argmin tr((W^ - W) G (W^ - W)^T) s.t. W^ = W^ * M,  G = XtX + damp diag(XtX).

    Rows are independent: on a row's kept live support S (P = pruned inputs),
    W^_S = W_S + G_SS^-1 G_SP W_P, one small solve per row. Kept dead features
    (diag(XtX) = 0) do not enter the objective and are returned unchanged.

    Parameters
    ----------
    W : (d_out, d_in).  XtX : (d_in, d_in).  mask : (d_out, d_in) bool, True = kept.
    """
    W = np.asarray(check_weights(W), dtype=np.float64)
    XtX = np.asarray(check_gram(XtX, W.shape[1]), dtype=np.float64)
    mask = check_mask(mask, W.shape)
    check_positive("damp", damp, allow_zero=True)
    G = XtX + damp * np.diag(np.diag(XtX))
    live = np.diag(XtX) > 0
    out = W * mask
    for i in range(W.shape[0]):
        S = mask[i] & live
        P = ~mask[i]
        if S.any() and P.any():
            rhs = G[np.ix_(S, P)] @ W[i, P]
            G_SS = G[np.ix_(S, S)]
            try:
                out[i, S] += scipy.linalg.solve(G_SS, rhs, assume_a="pos")
            except np.linalg.LinAlgError:  # singular without damping: minimum-norm solution
                out[i, S] += scipy.linalg.lstsq(G_SS, rhs)[0]
    return out


def reconstruction_error(W_dense: np.ndarray, W_pruned: np.ndarray, XtX: np.ndarray) -> float:
    """||X (W^ - W)^T||^2 / ||X W^T||^2 = tr(D XtX D^T) / tr(W XtX W^T), D = W^ - W.

    Undamped. 0 when both are 0 (a layer that sees no input).
    """
    W_dense = np.asarray(check_weights(W_dense), dtype=np.float64)
    W_pruned = np.asarray(W_pruned, dtype=np.float64)
    if W_pruned.shape != W_dense.shape:
        raise ValueError(f"W_pruned must have the shape of W_dense {W_dense.shape}, got {W_pruned.shape}")
    XtX = np.asarray(check_gram(XtX, W_dense.shape[1]), dtype=np.float64)
    D = W_pruned - W_dense
    num = float(np.sum((D @ XtX) * D))
    den = float(np.sum((W_dense @ XtX) * W_dense))
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den
