"""The cubic sparsity schedule of gradual pruning (Zhu & Gupta 2017) used by ADMM-Grad."""

from __future__ import annotations

import math


def prune_count(n: int, sparsity: float) -> int:
    """k = floor(s * n): how many of n weights a sparsity s removes.

    The 1e-9 slack absorbs binary rounding of s (0.29 * 100 = 28.999999999999996 -> 29).
    The same rule as Wanda and the official ADMM code (``int(numel * s)``).
    """
    return min(n, int(math.floor(sparsity * n + 1e-9)))


def cubic_sparsity(step: int, steps: int, sparsity: float) -> float:
    """s_t = s * (1 - (1 - t/T)^3): sparsity after mask update `step` of `steps`.

    step = 0 gives 0, step = steps gives the target s. ADMM-Grad's mask update at
    iteration t (0-based, t < steps) uses ``cubic_sparsity(t + 1, steps, s)``, so its last
    mask update reaches s exactly.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(step, int) or not 0 <= step <= steps:
        raise ValueError(f"step must be an integer in [0, steps={steps}], got {step!r}")
    return sparsity * (1.0 - (1.0 - step / steps) ** 3)
