"""Tensor validation, dtype policy and the TF32 guard shared by the torch backend.

The scalar checks (sparsity, pattern, group, method, solver settings) are the reference's
own (`admm_prune.reference._checks`), so both backends raise the same ValueError for the
same bad input. The tensor checks below are their twins on the device: each costs one
host sync (`bool(...)` of a reduction), never a copy of the tensor to the host.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch

from admm_prune.reference._checks import (
    Problem, check_divisible, check_fraction, check_group, parse_pattern, resolve_sparsity,
)
from admm_prune.reference.schedule import prune_count

log = logging.getLogger("admm_prune.gpu")


def as_tensor(x, device: torch.device | None = None) -> torch.Tensor:
    """A tensor as is; anything else (numpy, lists) converted, on `device` if given."""
    if isinstance(x, torch.Tensor):
        return x
    return torch.as_tensor(np.asarray(x), device=device)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (fp16/bf16/fp32 are computed in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_weights(W) -> torch.Tensor:
    W = as_tensor(W)
    if W.ndim != 2 or W.shape[0] == 0 or W.shape[1] == 0:
        raise ValueError(f"W must be a non-empty 2-D array (d_out, d_in), got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        W = W.to(torch.float32)
    if not bool(torch.isfinite(W).all()):
        raise ValueError("W contains NaN or Inf")
    return W


def check_same_device(name: str, x: torch.Tensor, device: torch.device) -> None:
    if x.device != device:
        raise ValueError(f"{name} must be on the device of W ({device}), got {x.device}")


def check_gram(XtX, d_in: int, device: torch.device) -> torch.Tensor:
    XtX = as_tensor(XtX, device)
    if tuple(XtX.shape) != (d_in, d_in):
        raise ValueError(f"XtX must have shape (d_in, d_in) = ({d_in}, {d_in}), got {tuple(XtX.shape)}")
    check_same_device("XtX", XtX, device)
    if not XtX.is_floating_point():
        XtX = XtX.to(torch.float32)
    # one sync for both checks
    finite, nonneg = torch.stack([torch.isfinite(XtX).all(), (XtX.diagonal() >= 0).all()]).tolist()
    if not finite:
        raise ValueError("XtX contains NaN or Inf")
    if not nonneg:
        raise ValueError("XtX must be a Gram matrix X^T X: its diagonal has negative entries")
    return XtX


def check_mask(mask, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    mask = as_tensor(mask, device)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask must have the shape of W {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a boolean array (True = kept), got dtype {mask.dtype}")
    check_same_device("mask", mask, device)
    return mask


def check_mask_sparsity(mask: torch.Tensor, sparsity: float, nm, group: str) -> None:
    """A mask given together with a sparsity must have it (and its pattern)."""
    d_out, d_in = mask.shape
    if nm is not None:
        kept = mask.reshape(d_out * d_in // nm[1], nm[1]).sum(dim=1)
        if bool((kept > nm[0]).any()):
            raise ValueError(f"mask does not satisfy the pattern {nm[0]}:{nm[1]}")
        return
    pruned = (~mask).sum(dim=1) if group == "row" else (~mask).sum().reshape(1)
    want = prune_count(d_in if group == "row" else mask.numel(), sparsity)
    if bool((pruned != want).any()):
        raise ValueError(
            f"mask has {int((~mask).sum())} pruned weights, but sparsity={sparsity!r} with "
            f"group={group!r} means {want} per {group}; pass sparsity=None with mask="
        )


def check_problem(W, XtX, sparsity, pattern, group, mask, *, gram_checked: bool = False) -> Problem:
    """The reference's `check_problem` on tensors (same order of checks, same messages).

    ``gram_checked``: XtX was validated already (several weights sharing one Gram); only
    its shape and device are checked again.
    """
    W = check_weights(W)
    if gram_checked:
        if tuple(XtX.shape) != (W.shape[1],) * 2:
            raise ValueError(f"XtX must have shape (d_in, d_in) = ({W.shape[1]}, {W.shape[1]}), "
                             f"got {tuple(XtX.shape)}")
        check_same_device("XtX", XtX, W.device)
    else:
        XtX = check_gram(XtX, W.shape[1], W.device)
    check_group(group)
    nm = parse_pattern(pattern)
    check_divisible(W.shape[1], nm)
    if mask is not None:
        mask = check_mask(mask, W.shape, W.device)
        s = None if sparsity is None else check_fraction("sparsity", sparsity)
        if s is not None:
            check_mask_sparsity(mask, s, nm, group)
        return Problem(W, XtX, s, nm, mask)
    return Problem(W, XtX, resolve_sparsity(sparsity, nm, allow_none=False), nm, None)


def cholesky(A: torch.Tensor, what: str, *, upper: bool = False, tries: int = 8) -> torch.Tensor:
    """Cholesky factor of the SPD matrix A (``torch.linalg.cholesky_ex``: one host sync).

    If the factorization fails (rounding on a nearly singular matrix, typically in float32),
    add 1e-6 * mean(diag A) to the diagonal, ten times more on each retry, and log a
    warning saying how much was added; raise after `tries` failures.
    """
    L, info = torch.linalg.cholesky_ex(A, upper=upper)
    if int(info) == 0:
        return L
    mean_diag = A.diagonal().mean()
    for t in range(tries):
        jitter = 1e-6 * 10.0**t * mean_diag
        log.warning("Cholesky of %s failed (minor %d not positive); retrying with %.3g added "
                    "to the diagonal", what, int(info), float(jitter))
        B = A.clone()
        B.diagonal().add_(jitter)
        L, info = torch.linalg.cholesky_ex(B, upper=upper)
        if int(info) == 0:
            return L
    raise ValueError(f"Cholesky of {what} failed even with damping added; the input is not "
                     "a usable Gram matrix (check it for overflow)")


_NEW_TF32_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")  # torch >= 2.9


@contextlib.contextmanager
def matmul_precision(device: torch.device, allow_tf32: bool):
    """Pin float32 CUDA matmuls to IEEE fp32 (or TF32 if `allow_tf32`) for this block.

    Saves and restores the process-wide cuBLAS flag (``torch.backends.cuda.matmul.
    fp32_precision`` on torch >= 2.9, else ``allow_tf32``): nothing changes outside the
    block, but the flag is global while the block runs, so do not run pruning and other
    float32 CUDA work concurrently from several threads. cuDNN is not used here (no
    convolutions), so its flag is left alone. No-op off CUDA.
    """
    if device.type != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    name = "fp32_precision" if _NEW_TF32_API else "allow_tf32"
    value = ("tf32" if allow_tf32 else "ieee") if _NEW_TF32_API else bool(allow_tf32)
    old = getattr(m, name)
    setattr(m, name, value)
    try:
        yield
    finally:
        setattr(m, name, old)
