"""OWL's outlier ratio on torch tensors (the twin of `admm_prune.reference.owl`).

Only `outlier_ratio` runs on the device (it reads every weight of a block); the per-block
targets `owl_sparsities` are scalar math on one number per block and are the reference's
own function, re-exported by `admm_prune.gpu` (as `cubic_sparsity` is).

The block's scores are never concatenated (OWL's code flattens all of them into one
tensor: 0.8 GB for a LLaMA-7B block in float32): two passes over the weights, one for the
pooled mean, one for the count above M times it, one weight's scores alive at a time.
Sums are accumulated in float64.
"""

from __future__ import annotations

from typing import Sequence

import torch

from admm_prune.reference.owl import check_block

from .checks import as_tensor, compute_dtype


def _scores(W: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """A = |W| * ||X_j|| in the compute dtype (fp16/bf16 weights in float32)."""
    dtype = compute_dtype(W, c)
    return torch.abs(W.to(dtype)).mul_(c.to(dtype)[None, :])


@torch.no_grad()
def outlier_ratio(Ws: Sequence[torch.Tensor], col_norms: Sequence[torch.Tensor], m: float = 5.0) -> float:
    """D = #{A_ij > m mean(A)} / #A, A = |W| ||X_j||_2 pooled over the block's linears.

    As the reference's `outlier_ratio`; each norm vector must be on its weight's device.
    Two host syncs.
    """
    Ws = [as_tensor(W) for W in Ws]
    col_norms = [as_tensor(c, W.device) for c, W in zip(col_norms, Ws)]
    check_block(Ws, col_norms, m)
    count = sum(W.numel() for W in Ws)
    total = sum(_scores(W, c).sum(dtype=torch.float64) for W, c in zip(Ws, col_norms))
    threshold = m * float(total) / count
    above = sum(torch.count_nonzero(_scores(W, c) > threshold) for W, c in zip(Ws, col_norms))
    return int(above) / count
