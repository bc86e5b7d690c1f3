"""admm_prune.gpu: the torch twin of `admm_prune.reference`, for pruning real models.

Every public reference function has a twin here with the same name and the same
parameters in the same order (tests/test_packaging.py); the result types are the
reference's own (`PruneResult`, `IterationRecord`, `ADMMState`, `Preconditioned`), holding
tensors. The property tests (tests/test_parity.py) check that both compute the same thing:
float64 on the CPU to 1e-9, float32 on CUDA to measured tolerances. The math modules take
tensors and return tensors; the model loop lives in `pipeline`.

Device and dtype
    Work happens on W's device (XtX and mask must be there too; nothing is moved). It is
    done in float64 if W or XtX is float64, else in float32: fp16/bf16 weights are lifted
    to fp32, and `prune_layer`/`prune_shared` return W's dtype. Lower-level functions
    return the compute dtype.

TF32
    `prune_layer(..., allow_tf32=False)` is an addition to a reference signature (twins
    add only trailing keyword-only options: this one, and the ``out=``/``work=`` buffers
    of the step functions; the mirror test checks that each twin's parameters start with
    the reference's). By
    default the call pins float32 CUDA matmuls to IEEE fp32 and restores the previous
    setting on return; ``allow_tf32=True`` opts in. Nothing is set at import. The
    lower-level functions follow torch's global setting (default: no TF32). The engine
    opts in on CUDA (`PruneConfig.matmul_precision` "high", ``--matmul-precision highest``
    to keep IEEE); its Gram sums stay float64 either way.

Speed
    ADMM: one Cholesky factorization of G~ + rho I per Gram, turned into its inverse
    (`admm.factorize` has the measurements that chose inverse + GEMM over cholesky_solve),
    then per iteration one GEMM (two with ``track_objective=True``) and a few elementwise
    passes; no host sync inside the loop. Masks: topk/argsort on the device
    (`masks` has the measurements). SparseGPT: the blocked column sweep, rows vectorized,
    one GEMM per block of 128 columns. `prune_shared` factorizes once for all weights
    reading one input (7 factorizations -> 4 per LLaMA block).

Peak memory per layer (ADMM; float32 = 4 bytes; the caller's W and XtX not counted)
    Gram-sized (d_in x d_in): G~ and (G~ + rho I)^-1, kept while the group's weights run;
    a third (the Cholesky factor) only while factorizing, before any weight is touched.
    Weight-sized (d_out x d_in), while one weight's ADMM runs (`prune_layer` reuses
    buffers): W0~, B = W0~ G~, W, U, Z, Z_prev, one scratch = 7; a mask step adds topk's
    values and int64 indices (1.5 buffers' worth at 50 % sparsity, 2.7 at 90 %), an int32
    cumsum and four bool masks (2 more): ~12 at most. Nothing scales with the number of
    calibration tokens. Peak ~ max(3 G, 2 G + 12 W):

    ========================  ==============  ==========  ===========
    layer, W (d_out, d_in)    G = d_in^2 * 4  W           peak
    ========================  ==============  ==========  ===========
    LLaMA-7B q/k/v/o          64 MiB          64 MiB      0.9 GiB
    (4096, 4096)
    LLaMA-7B gate/up          64 MiB          172 MiB     2.1 GiB
    (11008, 4096)
    LLaMA-7B down             462 MiB         172 MiB     2.9 GiB
    (4096, 11008)
    LLaMA-2-70B q/o           256 MiB         256 MiB     3.5 GiB
    (8192, 8192)
    LLaMA-2-70B k/v (GQA)     256 MiB         32 MiB      0.9 GiB
    (1024, 8192)
    LLaMA-2-70B gate/up       256 MiB         896 MiB     11.0 GiB
    (28672, 8192)
    LLaMA-2-70B down          3.06 GiB        896 MiB     16.6 GiB
    (8192, 28672)
    ========================  ==============  ==========  ===========

    Measured (CPU, peak RSS above the inputs): LLaMA-7B down_proj, admm-grad at 50 %:
    2.4 GiB. ``group="layer"`` selects over the flattened matrix: the same counts.
    SparseGPT: at most 3 Gram-sized buffers (H, its factor, H^-1, then the factor of H^-1)
    and 3 weight-sized ones (W^T being swept, the result, the input cast); measured 0.9 GiB
    on LLaMA-7B down_proj. `benchmarks/bench_layers.py` reports the CUDA peak per shape.
    The finish (``polish_iters`` > 0) runs after the method's buffers are released: W0~,
    B, W, W G~, R, P and two scratch = 8 weight-sized buffers, plus its own Gram-sized G~
    when its damping differs from ADMM's (after wanda/sparsegpt, or ``polish_damp``).
"""

import sys as _sys
from pathlib import Path as _Path

try:  # a core install (numpy + scipy) has the reference only: say what to install, in one line
    import torch as _torch  # noqa: F401
except ImportError as _error:
    _message = f"admm_prune.gpu needs torch ({_error}): pip install 'admm-prune[gpu]'"
    _argv = getattr(_sys, "orig_argv", _sys.argv)
    if _Path(_sys.argv[0]).stem in ("admm-prune", "admm-prune-script") or any(
            a == "-m" and b == __name__ for a, b in zip(_argv, _argv[1:])):  # a command, not an import
        raise SystemExit(f"admm-prune: error: {_message}") from None
    raise ImportError(_message, name=__name__) from None

from admm_prune.reference import (
    METHODS, DEFAULT_DAMP, DEFAULT_POLISH_DAMP, ADMMState, ALPSState, IterationRecord, PolishRecord,
    PolishState, PruneResult, RhoStep,
)
from admm_prune.reference.admm import Preconditioned
from admm_prune.reference.checks import parse_pattern
from admm_prune.reference.owl import owl_sparsities  # scalar math on a few numbers per model
from admm_prune.reference.schedule import cubic_sparsity, prune_count

from .solvers.admm import (
    admm_iterates, factorize, mask_update, objective, precondition, u_update, w_update, z_update,
)
from .solvers.alps import alps_iterates, rescale_dual, rho_update, support_change
from .solvers.linalg import InverseFactor
from .solvers.masks import magnitude_scores, select_mask, wanda_scores
from .solvers.owl import outlier_ratio
from .solvers.polish import cg_step, polish_iterates
from .solvers.prune import prune_layer, prune_shared
from .solvers.solve import masked_lstsq, reconstruction_error
from .solvers.sparsegpt import sparsegpt

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
    "ADMMState", "ALPSState", "RhoStep", "IterationRecord", "PolishRecord", "PolishState", "PruneResult",
    "Preconditioned", "InverseFactor", "METHODS", "DEFAULT_DAMP", "DEFAULT_POLISH_DAMP",
]
