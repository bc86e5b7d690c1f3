"""Numerics of the torch backend: a Cholesky that survives rounding, the factor of
G~ + rho I the ADMM W update applies, and the float32 matmul precision guard.

Validation lives in `checks`; this module only computes.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from admm_prune.reference.errors import FactorizationError

log = logging.getLogger("admm_prune.gpu")


def cholesky(A: torch.Tensor, what: str, *, upper: bool = False, tries: int = 8) -> torch.Tensor:
    """Cholesky factor of the SPD matrix A (``torch.linalg.cholesky_ex``: one host sync).

    If the factorization fails (rounding on a nearly singular matrix, typically in float32),
    add 1e-6 * mean(diag A) to the diagonal, ten times more on each retry, and log a
    warning saying how much was added; after `tries` failures, a `FactorizationError` (a user
    error naming ``damp``).
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
    raise FactorizationError(f"Cholesky of '{what}' failed even with {float(jitter):.3g} added to its diagonal; the "
                             f"Gram matrix is not usable (overflowing or degenerate activations): try a larger damp "
                             f"or dtype float32")


@dataclass(frozen=True)
class InverseFactor:
    """(G~ + rho I) factorized: ``solve(R)`` = R (G~ + rho I)^-1, one GEMM.

    The contract of `factorize` on both backends (the reference's `CholeskyFactor` does
    two triangular solves instead); `admm.factorize` has the measurements that chose the
    explicit inverse here. ``inverse`` is symmetric, (d_in, d_in).
    """

    inverse: torch.Tensor

    def solve(self, R: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """R (G~ + rho I)^-1, into `out` if given (it must not alias R)."""
        return torch.matmul(R, self.inverse, out=out)


def inverse_factor(A: torch.Tensor, what: str) -> InverseFactor:
    """A^-1 for SPD A, as ``cholesky_solve(I, L)``; A's buffer is reused for the identity.

    Two triangular solves (2 d^3 flops), not ``cholesky_inverse(L)`` (LAPACK potri,
    2/3 d^3): same accuracy and, on the H200, the same time (torch's CUDA cholesky_inverse
    is that solve), but MKL's potri collapses on a CPU shared with other jobs: d = 1536
    took 23 s (vs 0.24 s for the solves) on this project's 2-core machine under load. On
    an idle core potri is ~3x faster (d = 1536: 34 ms vs 96 ms), a few % of an ADMM layer.
    """
    L = cholesky(A, what)
    A.zero_().diagonal().fill_(1.0)
    return InverseFactor(torch.cholesky_solve(A, L))


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
