"""Wanda (Sun et al. 2024): scores |W_ij| ||X_j||, no update."""

from __future__ import annotations

from admm_prune.reference.methods import REGISTRY

from ..solvers.masks import wanda_scores
from .magnitude import Magnitude


class Wanda(Magnitude):
    spec = REGISTRY["wanda"]

    def scores(self, W, problem):
        return wanda_scores(W, problem.XtX)  # scores finite: W and XtX checked
