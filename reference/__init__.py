"""admm_prune.reference: layer-wise LLM pruning with the ADMM weight update, NumPy/SciPy only.

The readable half of the project: every equation of Boža (2024) is one short function
named after its symbols. ``admm_prune.gpu`` mirrors this API name for name on torch tensors;
property tests check that the two compute the same thing. Imports without torch.

Conventions (paper_notes/notation.md): W is (d_out, d_in) in ``nn.Linear`` layout; XtX is
the (d_in, d_in) Gram matrix of the layer's inputs; a mask is bool, True = kept.
"""

from .checks import METHODS, parse_pattern
from .errors import AdmmPruneError
from .methods import Method
from .options import DEFAULTS, SolverOptions
from .admm import (
    ADMMState, CholeskyFactor, admm_iterates, factorize, mask_update, objective, precondition,
    u_update, w_update, z_update,
)
from .alps import ALPSState, RhoStep, alps_iterates, rescale_dual, rho_update, support_change
from .masks import magnitude_scores, select_mask, wanda_scores
from .owl import outlier_ratio, owl_sparsities
from .polish import PolishRecord, PolishState, cg_step, polish_iterates
from .prune import (
    DEFAULT_DAMP, DEFAULT_POLISH_DAMP, IterationRecord, PruneResult, prune_layer, prune_shared,
)
from .schedule import cubic_sparsity, prune_count
from .solve import masked_lstsq, reconstruction_error
from .sparsegpt import sparsegpt

__all__ = [
    # schedule and masks
    "cubic_sparsity", "prune_count", "parse_pattern", "magnitude_scores", "wanda_scores",
    "select_mask",
    # the ADMM equations
    "precondition", "factorize", "z_update", "u_update", "w_update", "mask_update",
    "objective", "admm_iterates",
    # the finish on the support (conjugate gradient)
    "cg_step", "polish_iterates",
    # ALPS: the support from an L0-constrained ADMM with a growing rho
    "support_change", "rho_update", "rescale_dual", "alps_iterates",
    # OWL per-block sparsity
    "outlier_ratio", "owl_sparsities",
    # baselines and drivers
    "sparsegpt", "prune_layer", "prune_shared",
    # oracles
    "masked_lstsq", "reconstruction_error",
    # types and constants
    "ADMMState", "ALPSState", "RhoStep", "CholeskyFactor", "IterationRecord", "PolishRecord", "PolishState",
    "PruneResult", "METHODS", "DEFAULT_DAMP", "DEFAULT_POLISH_DAMP",
    # the settings written once, the registry's entry type, the one error base
    "SolverOptions", "DEFAULTS", "Method", "AdmmPruneError",
]
