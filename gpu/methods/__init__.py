"""The registry of torch implementations: one file per method, one line per method here.

Each implementation pairs a `reference.methods.Method` entry (what the method needs, its
default damping, ...) with `prepare`/`prune` (`base.MethodImpl`). The engine, the bench and
the CLI look methods up here and read their entries; nothing else compares method names.

Adding a method: a new file in this folder with its `Method` (``reference.methods.register``)
and its `MethodImpl`, and one line in `IMPLEMENTATIONS` below (README, "Adding a method").
"""

from __future__ import annotations

from admm_prune.reference import methods as specs

from .admm import ADMM, ADMMGrad
from .alps import ALPS
from .base import MethodImpl, Pruned, Settings
from .magnitude import Magnitude
from .sparsegpt import SparseGPT
from .wanda import Wanda

IMPLEMENTATIONS: dict[str, MethodImpl] = {impl.spec.name: impl for impl in (
    Magnitude(),
    Wanda(),
    SparseGPT(),
    ADMM(),
    ADMMGrad(),
    ALPS(),
)}


def get(name: str) -> MethodImpl:
    """The implementation of method `name` (AdmmPruneError naming ``method`` otherwise)."""
    specs.get(name)  # the one error message for an unknown name
    try:
        return IMPLEMENTATIONS[name]
    except KeyError:
        raise specs.AdmmPruneError(f"method {name!r} is registered but has no torch implementation",
                                    field="method") from None


def names() -> tuple[str, ...]:
    """The methods this backend implements, in registry order."""
    return tuple(IMPLEMENTATIONS)


__all__ = ["IMPLEMENTATIONS", "MethodImpl", "Pruned", "Settings", "get", "names"]
