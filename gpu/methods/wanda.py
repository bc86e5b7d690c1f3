"""Wanda (Sun et al. 2024): scores |W_ij| ||X_j||, no update."""

from __future__ import annotations

import torch

from admm_prune.reference.methods import REGISTRY

from ..solvers.masks import wanda_scores
from .magnitude import Magnitude


class Wanda(Magnitude):
    spec = REGISTRY["wanda"]

    def scores(self, W, problem):
        if problem.XtX.ndim == 1:  # the engine's column norms diag(XtX) (`prune.prune_norms`)
            return torch.abs(W) * torch.sqrt(problem.XtX.to(W.dtype))[None, :]
        return wanda_scores(W, problem.XtX)  # scores finite: W and XtX checked
