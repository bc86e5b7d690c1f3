"""Input validation shared by every public function: fail early, name the argument."""

from __future__ import annotations

import numbers

from typing import NamedTuple

import numpy as np

from .schedule import prune_count
from . import methods
from .errors import AdmmPruneError

METHODS = ("magnitude", "wanda", "sparsegpt", "admm", "admm-grad", "alps")
GROUPS = ("row", "layer")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"N:M"`` -> (N, M) with 0 < N < M."""
    if pattern == "unstructured":
        return None
    if isinstance(pattern, str) and pattern.count(":") == 1:
        n_str, m_str = pattern.split(":")
        if n_str.strip().isdigit() and m_str.strip().isdigit():
            n, m = int(n_str), int(m_str)
            if 0 < n < m:
                return n, m
    raise AdmmPruneError(
        f"pattern must be 'unstructured' or 'N:M' with integers 0 < N < M, got {pattern!r}"
    )


def check_group(group: str) -> str:
    if group not in GROUPS:
        raise AdmmPruneError(f"group must be one of {GROUPS}, got {group!r}")
    return group


def check_method(method: str) -> str:
    if method not in METHODS:
        raise AdmmPruneError(f"method must be one of {METHODS}, got {method!r}")
    return method


def check_fraction(name: str, value, *, upper_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise AdmmPruneError(f"{name} must be a real number in [0, 1), got {value!r}", field=name)
    if not (0.0 <= value < 1.0):
        raise AdmmPruneError(f"{name} must be in [0, 1), got {value!r}", field=name)
    return float(value)


def check_positive(name: str, value, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise AdmmPruneError(f"{name} must be a finite number {bound}, got {value!r}", field=name)
    return float(value)


def check_int(name: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise AdmmPruneError(f"{name} must be an integer >= {minimum}, got {value!r}", field=name)
    return int(value)


def check_weights(W: np.ndarray) -> np.ndarray:
    W = np.asarray(W)
    if W.ndim != 2 or W.shape[0] == 0 or W.shape[1] == 0:
        raise AdmmPruneError(f"W must be a non-empty 2-D array (d_out, d_in), got shape {W.shape}")
    if not np.all(np.isfinite(W)):
        raise AdmmPruneError("W contains NaN or Inf")
    return W


def check_gram(XtX: np.ndarray, d_in: int) -> np.ndarray:
    XtX = np.asarray(XtX)
    if XtX.shape != (d_in, d_in):
        raise AdmmPruneError(f"XtX must have shape (d_in, d_in) = ({d_in}, {d_in}), got {XtX.shape}")
    if not np.all(np.isfinite(XtX)):
        raise AdmmPruneError("XtX contains NaN or Inf")
    if np.any(np.diag(XtX) < 0):
        raise AdmmPruneError("XtX must be a Gram matrix X^T X: its diagonal has negative entries")
    return XtX


def check_mask(mask, shape: tuple[int, int]) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise AdmmPruneError(f"mask must have the shape of W {tuple(shape)}, got {mask.shape}")
    if mask.dtype != np.bool_:
        raise AdmmPruneError(f"mask must be a boolean array (True = kept), got dtype {mask.dtype}")
    return mask


def check_divisible(d_in: int, nm: tuple[int, int] | None) -> None:
    if nm is not None and d_in % nm[1] != 0:
        raise AdmmPruneError(
            f"pattern {nm[0]}:{nm[1]} needs d_in divisible by {nm[1]}, but W has d_in = {d_in}"
        )


def check_mask_target(sparsity, pattern: str, group: str, d_in: int):
    """`select_mask`'s scalar arguments, checked: (N:M or None, sparsity s, exact N:M?).

    N:M with ``sparsity=None`` means s = 1 - N/M; a smaller s is the gradual N:M mask.
    """
    check_group(group)
    nm = parse_pattern(pattern)
    if nm is None:
        if sparsity is None:
            raise AdmmPruneError("sparsity is required for the unstructured pattern")
        return None, check_fraction("sparsity", sparsity), False
    check_divisible(d_in, nm)
    full = 1.0 - nm[0] / nm[1]
    s = full if sparsity is None else check_fraction("sparsity", sparsity)
    if s > full + 1e-9:
        raise AdmmPruneError(f"sparsity={sparsity!r} exceeds what pattern {pattern} allows ({full:g})")
    return nm, s, s >= full - 1e-9


def resolve_sparsity(sparsity, nm: tuple[int, int] | None, *, allow_none: bool) -> float | None:
    """The target sparsity: given, or implied by N:M (1 - N/M); a contradiction is an error."""
    if nm is not None:
        implied = 1.0 - nm[0] / nm[1]
        if sparsity is not None and abs(check_fraction("sparsity", sparsity) - implied) > 1e-9:
            raise AdmmPruneError(
                f"sparsity={sparsity!r} contradicts pattern {nm[0]}:{nm[1]}, which implies "
                f"{implied:g}; pass sparsity=None"
            )
        return implied
    if sparsity is None:
        if allow_none:
            return None
        raise AdmmPruneError("sparsity is required for the unstructured pattern")
    return check_fraction("sparsity", sparsity)


class Problem(NamedTuple):
    W: np.ndarray
    XtX: np.ndarray
    sparsity: float | None
    nm: tuple[int, int] | None
    mask: np.ndarray | None


def check_mask_sparsity(mask: np.ndarray, sparsity: float, nm, group: str) -> None:
    """A mask given together with a sparsity must have it (and its pattern)."""
    d_out, d_in = mask.shape
    if nm is not None:
        groups = mask.reshape(d_out * d_in // nm[1], nm[1]).sum(axis=1)
        if np.any(groups > nm[0]):
            raise AdmmPruneError(f"mask does not satisfy the pattern {nm[0]}:{nm[1]}")
        return
    pruned = (~mask).sum(axis=1) if group == "row" else np.array([(~mask).sum()])
    want = prune_count(d_in if group == "row" else mask.size, sparsity)
    if np.any(pruned != want):
        raise AdmmPruneError(
            f"mask has {int((~mask).sum())} pruned weights, but sparsity={sparsity!r} with "
            f"group={group!r} means {want} per {group}; pass sparsity=None with mask="
        )


def check_target(sparsity, pattern: str, group: str, d_in: int, *, with_mask: bool):
    """The scalar half of `check_problem`: (sparsity s or None, N:M or None).

    Shared by both backends (the torch twin checks its tensors, then calls this), so the
    same bad value raises the same ValueError everywhere. With a mask, ``sparsity=None``
    is allowed (the mask says it); without one, N:M implies s = 1 - N/M.
    """
    check_group(group)
    nm = parse_pattern(pattern)
    check_divisible(d_in, nm)
    if with_mask:
        return (None if sparsity is None else check_fraction("sparsity", sparsity)), nm
    return resolve_sparsity(sparsity, nm, allow_none=False), nm


def check_problem(W, XtX, sparsity, pattern, group, mask) -> Problem:
    """Validate one layer's inputs before any work (ValueError naming the argument)."""
    W = check_weights(W)
    XtX = check_gram(XtX, W.shape[1])
    s, nm = check_target(sparsity, pattern, group, W.shape[1], with_mask=mask is not None)
    if mask is not None:
        mask = check_mask(mask, W.shape)
        if s is not None:
            check_mask_sparsity(mask, s, nm, group)
    return Problem(W, XtX, s, nm, mask)


def check_finish(method: str, polish_iters, polish_damp):
    """`prune_layer`'s finish settings: K >= 0 steps, damping >= 0 or None; returns polish_damp."""
    check_int("polish_iters", polish_iters, minimum=0)
    if polish_iters and methods.get(method).needs == "weights":
        raise AdmmPruneError("polish_iters needs the inputs' Gram XtX; method='magnitude' reads only "
                         "the weights (use wanda, sparsegpt, admm, admm-grad or alps)")
    return None if polish_damp is None else check_positive("polish_damp", polish_damp, allow_zero=True)


def check_result(W_hat: np.ndarray, dtype) -> np.ndarray:
    """The pruned weights, refused (ValueError naming W) if they do not fit `dtype` finitely."""
    out = np.asarray(W_hat).astype(dtype, copy=False)
    if not np.all(np.isfinite(out)):
        big = float(np.max(np.abs(W_hat[np.isfinite(W_hat)]), initial=0.0))
        raise AdmmPruneError(
            f"W: the pruned weights do not fit {np.dtype(dtype).name} (largest finite |value| "
            f"{big:.3g}); prune a float32/float64 copy of W, or rescale it")
    return out


def check_solver(rho, damp, iters, mask_steps) -> None:
    check_positive("rho", rho)
    check_positive("damp", damp, allow_zero=True)
    check_int("iters", iters, minimum=1)
    check_int("mask_steps", mask_steps, minimum=0)
    if mask_steps > iters:
        raise AdmmPruneError(f"mask_steps must be <= iters ({iters}), got {mask_steps}")


def check_alps(rho, iters, pcg_iters) -> None:
    """ALPS's settings: starting rho > 0, iterations >= 1, PCG steps >= 0."""
    check_positive("alps_rho", rho)
    check_int("alps_iters", iters, minimum=1)
    check_int("alps_pcg_iters", pcg_iters, minimum=0)
