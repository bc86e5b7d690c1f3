"""The solver's settings, each with its default, its one-line help and its check, written once.

`SolverOptions` is the one place where a setting such as ``mask_steps`` gets its default (15),
its help and its validation. ``prune_layer``/``prune_shared`` (both backends) take its fields
as keyword arguments and default to its values (``**options.solver_kwargs()`` passes a whole
set); the engine's ``PruneConfig`` and the bench's ``BenchConfig`` extend it; the CLI builds its
flags from the fields (`option` metadata: ``help``, and ``choices``/``metavar`` where they
apply). Errors raised here name the field (`AdmmPruneError.field`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from . import methods
from .checks import (
    GROUPS, check_fraction, check_group, check_int, check_positive, parse_pattern, resolve_sparsity,
)
from .errors import AdmmPruneError

PROFILES = ("uniform", "owl")


def option(default, help: str, **cli):
    """A dataclass field with its one-line help (and CLI hints: choices, metavar, flag)."""
    return dataclasses.field(default=default, metadata={"help": help, **cli})


def _checked(field: str, check, *args, **kwargs):
    """Run a `checks` function; its error names `field` (the flag the CLI shows)."""
    try:
        return check(*args, **kwargs)
    except AdmmPruneError as e:
        raise AdmmPruneError(str(e), field=field) from None


class Options:
    """Root of the option dataclasses: each subclass validates its own fields in
    ``__post_init__`` and calls ``super().__post_init__()`` (cooperative, any mix-in order)."""

    def __post_init__(self):
        pass


@dataclass(frozen=True)
class SolverOptions(Options):
    """What the solver does with each linear (and how sparsity is spread over the blocks)."""

    method: str = option("admm-grad", "pruning method (see the list above)", choices="methods")
    sparsity: float | None = option(0.5, "fraction of weights pruned per group ('none' with an N:M pattern)")
    pattern: str = option("unstructured", "'unstructured' or N:M, e.g. 2:4, 4:8")
    group: str = option("row", "compare scores per output row (Wanda) or over the whole matrix "
                               "(official code)", choices=GROUPS)
    rho: float = option(1.0, "ADMM penalty (preconditioned units)")
    damp: float | None = option(None, f"damping lambda (default: {methods.DEFAULT_DAMP['admm']:g} for ADMM, "
                                      f"{methods.DEFAULT_DAMP['sparsegpt']:g} for SparseGPT, "
                                      f"{methods.DEFAULT_DAMP['alps']:g} for ALPS)")
    iters: int = option(20, "ADMM iterations")
    mask_steps: int = option(15, "ADMM-Grad mask re-selections, within the first --iters")
    alps_rho: float = option(0.1, "ALPS: starting penalty rho (then x1.3/1.2/1.1 every 3 iterations as the "
                                  "support moves, as the paper)")
    alps_iters: int = option(300, "ALPS: at most this many ADMM iterations (it stops once the support is "
                                  "stable)")
    alps_pcg_iters: int = option(10, "ALPS: PCG steps on its final support (the paper's 10)", metavar="K")
    polish_iters: int = option(0, "finish on the final support: K preconditioned CG steps per row after the "
                                  "method (0 keeps the paper's method; see paper_notes/beyond_the_paper.md)",
                               metavar="K")
    polish_damp: float | None = option(None, f"damping of the finish (default: the method's own after admm "
                                             f"and admm-grad, {methods.DEFAULT_POLISH_DAMP:g} after wanda and "
                                             f"sparsegpt)")
    sparsity_profile: str = option("uniform", "the same sparsity in every block, or OWL's per-block targets "
                                              "from the dense model's outlier ratios (unstructured only)",
                                   choices=PROFILES)
    owl_m: float = option(5.0, "OWL's outlier threshold M")
    owl_lambda: float = option(0.08, "OWL's lambda: block targets stay within sparsity +- lambda")

    def __post_init__(self):
        super().__post_init__()
        spec = methods.get(self.method)
        _checked("group", check_group, self.group)
        nm = _checked("pattern", parse_pattern, self.pattern)
        sparsity = _checked("sparsity", resolve_sparsity, self.sparsity, nm, allow_none=False)
        object.__setattr__(self, "sparsity", sparsity)
        _checked("rho", check_positive, "rho", self.rho)
        if self.damp is not None:
            _checked("damp", check_positive, "damp", self.damp, allow_zero=True)
        _checked("iters", check_int, "iters", self.iters, minimum=1)
        if spec.mask_steps:
            check_mask_steps(self.mask_steps, self.iters)
        _checked("alps_rho", check_positive, "alps_rho", self.alps_rho)
        _checked("alps_iters", check_int, "alps_iters", self.alps_iters, minimum=1)
        _checked("alps_pcg_iters", check_int, "alps_pcg_iters", self.alps_pcg_iters, minimum=0)
        _checked("polish_iters", check_int, "polish_iters", self.polish_iters, minimum=0)
        if self.polish_iters and spec.needs == "weights":
            raise AdmmPruneError(f"polish_iters needs a method that sees inputs; {self.method} reads only the "
                                 f"weights", field="polish_iters")
        if self.polish_damp is not None:
            _checked("polish_damp", check_positive, "polish_damp", self.polish_damp, allow_zero=True)
        if self.sparsity_profile not in PROFILES:
            raise AdmmPruneError(f"sparsity_profile must be one of {PROFILES}, got {self.sparsity_profile!r}",
                                 field="sparsity_profile")
        if self.sparsity_profile == "owl":
            if nm is not None:
                raise AdmmPruneError(f"sparsity_profile owl is defined for unstructured sparsity only; pattern "
                                     f"{self.pattern} fixes every block at {sparsity:g}", field="sparsity_profile")
            _checked("owl_m", check_positive, "owl_m", self.owl_m)
            _checked("owl_lambda", check_positive, "owl_lambda", self.owl_lambda, allow_zero=True)
            if sparsity + self.owl_lambda >= 1:
                raise AdmmPruneError(f"sparsity + owl_lambda must be < 1, got {sparsity} + {self.owl_lambda}",
                                     field="owl_lambda")

    @property
    def nm(self) -> tuple[int, int] | None:
        """The parsed pattern: None (unstructured) or (N, M)."""
        return parse_pattern(self.pattern)

    @property
    def spec(self) -> methods.Method:
        """The method's registry entry."""
        return methods.get(self.method)

    def solver_kwargs(self) -> dict:
        """The keyword arguments of ``prune_layer``/``prune_shared`` these options set."""
        return {f: getattr(self, f) for f in SOLVER_KWARGS}


#: the fields of SolverOptions that ``prune_layer`` takes as keyword arguments
SOLVER_KWARGS = ("method", "pattern", "group", "rho", "damp", "iters", "mask_steps", "polish_iters",
                 "polish_damp", "alps_rho", "alps_iters", "alps_pcg_iters")



def check_mask_steps(mask_steps, iters) -> int:
    """ADMM-Grad's mask re-selections: an integer in [0, iters]."""
    if isinstance(mask_steps, bool) or not isinstance(mask_steps, int) or not 0 <= mask_steps <= iters:
        raise AdmmPruneError(
            f"mask_steps must be an integer in [0, iters={iters}], got {mask_steps!r} (mask_steps defaults to "
            f"{default('mask_steps')}: lower it with iters)", field="mask_steps")
    return mask_steps


def default(name: str):
    """The default of the SolverOptions field `name`, as written in the class."""
    return SolverOptions.__dataclass_fields__[name].default


def fraction(field: str, value) -> float:
    """`value` as a fraction in [0, 1), the error naming `field`."""
    return _checked(field, check_fraction, field, value)


#: the defaults, for signatures that spell them out (``iters: int = DEFAULTS.iters``)
DEFAULTS = SolverOptions()
