"""ALPS (Meng et al., NeurIPS 2024): the support from an L0-constrained ADMM whose rho grows on a
schedule, then PCG on it (the finish's CG, `solvers.polish`)."""

from __future__ import annotations

import torch

from admm_prune.reference.methods import REGISTRY

from ..solvers.admm import mask_update, precondition_gram
from ..solvers.alps import alps_steps
from ..solvers.polish import polish_steps
from .admm import device_history
from .base import MethodImpl, Pruned


class ALPS(MethodImpl):
    spec = REGISTRY["alps"]

    def prepare(self, XtX, damp, rho):
        return precondition_gram(XtX, damp)  # G~ + rho I changes with rho: factorized per weight

    def preconditioned(self, prepared):
        return prepared

    def prune(self, problem, W, prepared, settings) -> Pruned:
        G, scale, live = prepared
        W0 = W * scale[None, :]
        B = W0 @ G
        history = ()
        if problem.mask is None:
            records, state = [], None
            for state in alps_steps(W0, G, live, B, problem.sparsity, settings.pattern, settings.group,
                                    settings.alps_rho, settings.alps_iters, settings.track_objective, reuse=True,
                                    residuals=settings.track_residuals):
                records.append(state._replace(W=None, Z=None, U=None, M=None))  # keep the scalars only
            history = device_history(records, W0.numel(), W0.device)
            M = mask_update(state.W, torch.zeros_like(W0), live, problem.sparsity, settings.pattern, settings.group)
            start = state.W.mul_(M)
        else:
            M = problem.mask.clone()
            start = W0 * M
        for step in polish_steps(W0, G, live, B, M, start, settings.alps_pcg_iters, reuse=True):
            pass
        return Pruned(step.W.div_(scale[None, :]), M, history, (G, W0, B))
