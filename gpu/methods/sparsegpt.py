"""SparseGPT (Frantar & Alistarh 2023): the OBS column sweep with its own mask."""

from __future__ import annotations

from admm_prune.reference.methods import REGISTRY

from ..solvers.sparsegpt import inverse_hessian_factor, sparsegpt_sweep
from .base import MethodImpl, Pruned

BLOCKSIZE = 128  # columns per lazy-update block, as the official code


class SparseGPT(MethodImpl):
    spec = REGISTRY["sparsegpt"]

    def prepare(self, XtX, damp, rho):
        return inverse_hessian_factor(XtX, damp)

    def prune(self, problem, W, prepared, settings) -> Pruned:
        R, dead = prepared
        W_hat, M = sparsegpt_sweep(W, R, dead, problem.sparsity, problem.nm, settings.group, BLOCKSIZE,
                                   problem.mask)
        return Pruned(W_hat, M)
