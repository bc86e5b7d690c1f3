"""What every method implementation provides: its registry entry and two named steps.

`prepare` computes, once per Gram and compute dtype, what depends on the inputs only
(ADMM: G~ and the inverse of G~ + rho I; SparseGPT: the inverse-Hessian factor); `prune`
prunes one weight given it. ``gpu.prune.prune_shared`` runs these for every weight that
reads one input, then the finish (`polish_iters`) if asked: a method never sees a model,
a hook or a flag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from admm_prune.reference.methods import Method
from admm_prune.reference.prune import IterationRecord


@dataclass(frozen=True)
class Settings:
    """The per-call settings a method's `prune` reads (validated by the caller)."""

    pattern: str
    group: str
    rho: float
    damp: float
    iters: int
    mask_steps: int
    track_objective: bool
    track_residuals: bool
    alps_rho: float
    alps_iters: int
    alps_pcg_iters: int


class Pruned(NamedTuple):
    """One weight pruned: W_hat and M in the compute dtype; the ADMM history (else ());
    ``precondition`` = (G~, W~0, B = W~0 G~) when the method formed them (the finish reuses
    them when it solves with the same G~)."""

    W: torch.Tensor
    mask: torch.Tensor
    history: tuple[IterationRecord, ...] = ()
    precondition: tuple | None = None


class MethodImpl:
    """Base of the torch implementations: `spec` is the method's `reference.methods.Method`."""

    spec: Method

    def prepare(self, XtX: torch.Tensor, damp: float, rho: float):
        """What depends on XtX only (XtX in the compute dtype); None when nothing does."""
        return None

    def preconditioned(self, prepared):
        """(G~, scale, live) inside `prepared` when the method forms them (the finish reuses them
        at the method's damping), else None."""
        return None

    def prune(self, problem, W: torch.Tensor, prepared, settings: Settings) -> Pruned:
        """Prune `W` (the problem's weight in the compute dtype; never modified)."""
        raise NotImplementedError
