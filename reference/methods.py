"""The registry of pruning methods: what each one is and what it needs, written once.

Both backends, the engine, the bench and the CLI read this table instead of comparing
method names: a method's calibration needs (nothing, the column norms, or the full Gram),
its default damping, whether it re-selects its mask (`mask_steps`) and what damping the
finish uses after it. ``admm_prune.gpu.methods`` pairs each entry with its torch
implementation; a new method registers its `Method` there (`register`), in its own file.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import AdmmPruneError

#: what a method reads from calibration, cheapest first
NEEDS = ("weights", "norms", "gram")


@dataclass(frozen=True)
class Method:
    """A pruning method as the rest of the code sees it.

    name : the ``--method`` value.
    needs : ``"weights"`` (no calibration), ``"norms"`` (the inputs' squared column norms,
        diag(XtX): Wanda's scores) or ``"gram"`` (the full XtX).
    default_damp : the damping used when ``damp=None`` (None: the method takes no damping).
    mask_steps : the method re-selects its mask during the first `mask_steps` iterations.
    finish_own_damp : the finish (`polish_iters`) solves with the method's own damping
        (ADMM: the same problem); otherwise with `DEFAULT_POLISH_DAMP`.
    summary : one line for ``--help``.
    options : the `SolverOptions` fields only this method reads (ALPS's ``alps_*``): in the
        resume fingerprint only for it, and a warning where they are set for another method.
    """

    name: str
    needs: str
    default_damp: float | None
    mask_steps: bool
    finish_own_damp: bool
    summary: str
    options: tuple[str, ...] = ()

    def __post_init__(self):
        if self.needs not in NEEDS:
            raise ValueError(f"needs must be one of {NEEDS}, got {self.needs!r}")


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add `method` to the registry (once per name); returns it."""
    if method.name in REGISTRY and REGISTRY[method.name] != method:
        raise ValueError(f"method {method.name!r} is registered already")
    REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    """The registered method called `name` (AdmmPruneError naming ``method`` otherwise)."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise AdmmPruneError(f"method must be one of {tuple(REGISTRY)}, got {name!r}", field="method") from None


# The paper's methods (Boža 2024, Table 1) and its baselines.
register(Method("magnitude", "weights", None, False, False, "|W| only: no calibration data, no forwards"))
register(Method("wanda", "norms", None, False, False, "|W| ||X_j|| (Sun et al.), no weight update"))
register(Method("sparsegpt", "gram", 0.01, False, False, "OBS column sweep (Frantar & Alistarh), its own mask"))
register(Method("admm", "gram", 0.1, False, True, "Wanda mask once, then the ADMM update (the paper's ADMM1)"))
register(Method("admm-grad", "gram", 0.1, True, True,
                "mask re-selected from |W+U| on the cubic schedule, then ADMM (the paper's best)"))
# ALPS (Meng et al., NeurIPS 2024, arXiv 2406.07831): its code's ridge is 0.01 mean(diag XtX) I;
# here the same 0.01 in this project's damping, 0.01 diag(XtX) (reference/alps.py says why)
register(Method("alps", "gram", 0.01, False, True,
                "support from an L0-constrained ADMM whose rho grows on a schedule, then PCG on it "
                "(Meng et al.)", options=("alps_rho", "alps_iters", "alps_pcg_iters")))

#: damping used when ``damp=None``: the official ADMM code's 0.1, SparseGPT's own 0.01
DEFAULT_DAMP = {m.name: m.default_damp for m in REGISTRY.values() if m.default_damp is not None}
#: damping of the finish after a method that does not set its own (`Method.finish_own_damp`)
DEFAULT_POLISH_DAMP = 0.1
