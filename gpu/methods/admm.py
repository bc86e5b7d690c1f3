"""ADMM (Boža 2024): the Wanda mask once, then the ADMM weight update (ADMM1); and ADMM-Grad,
the mask re-selected from |W + U| on the cubic schedule during the first `mask_steps` iterations."""

from __future__ import annotations

import torch

from admm_prune.reference.methods import REGISTRY
from admm_prune.reference.prune import IterationRecord

from ..solvers.admm import admm_steps, factorize, precondition_gram, z_update
from .base import MethodImpl, Pruned


class ADMM(MethodImpl):
    spec = REGISTRY["admm"]

    def prepare(self, XtX, damp, rho):
        G, scale, live = precondition_gram(XtX, damp)
        return G, scale, live, factorize(G, rho)

    def preconditioned(self, prepared):
        return prepared[:3]

    def prune(self, problem, W, prepared, settings) -> Pruned:
        G, scale, live, factor = prepared
        W0 = W * scale[None, :]
        B = W0 @ G
        records, state = [], None
        mask_steps = settings.mask_steps if self.spec.mask_steps else 0
        for state in admm_steps(W0, G, live, factor, B, problem.sparsity, settings.pattern, settings.group,
                                settings.rho, settings.iters, mask_steps, problem.mask,
                                settings.track_objective, reuse=True, residuals=settings.track_residuals):
            records.append(state._replace(W=None, Z=None, U=None, M=None))  # keep the scalars only
        history = device_history(records, W0.numel(), W0.device)
        M = state.M
        W_hat = z_update(state.W, state.U, M).div_(scale[None, :])  # exactly sparse (official code, final Z)
        return Pruned(W_hat, M, history, (G, W0, B))


class ADMMGrad(ADMM):
    spec = REGISTRY["admm-grad"]


def device_history(steps, numel: int, device) -> tuple[IterationRecord, ...]:
    """The steps' device records as IterationRecords, with one host sync for all of them."""
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=device)
    cols = [torch.stack([nan if v is None else v.double()
                         for v in (s.objective, s.primal_residual, s.dual_residual, s.kept)])
            for s in steps]
    rows = torch.stack(cols).tolist()
    return tuple(IterationRecord(s.k, obj, primal, dual, 1.0 - int(kept) / numel)
                 for s, (obj, primal, dual, kept) in zip(steps, rows))
