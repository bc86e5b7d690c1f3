"""Magnitude pruning: the largest |W| are kept; no inputs, no update."""

from __future__ import annotations

from admm_prune.reference.methods import REGISTRY

from ..solvers.masks import magnitude_scores, select_unchecked
from .base import MethodImpl, Pruned


class Magnitude(MethodImpl):
    spec = REGISTRY["magnitude"]

    def scores(self, W, problem):
        return magnitude_scores(W)

    def prune(self, problem, W, prepared, settings) -> Pruned:
        if problem.mask is None:
            M = select_unchecked(self.scores(W, problem), problem.sparsity, settings.pattern, settings.group)
        else:
            M = problem.mask.clone()
        return Pruned(W * M, M)
