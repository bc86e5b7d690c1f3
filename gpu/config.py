"""What a run is asked to do: frozen configurations, validated once, where the values enter.

The CLI parses flags into these; the library takes them. Every check of a user value lives
here (the engine below trusts them), and errors name the config field; the CLI maps field
names to flags (``eval_seqlen`` -> ``--eval-seqlen``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from admm_prune.reference._checks import (
    check_group, check_method, check_positive, parse_pattern, resolve_sparsity,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROFILES = ("uniform", "owl")
MIN_SEQLEN = 2  # one rule for calibration and evaluation windows: a next-token loss needs two


class PipelineError(ValueError):
    """A user-facing error of the pipeline (bad configuration, NaN in a block, ...)."""


def _positive_int(name: str, value, minimum: int = 1, optional: bool = False):
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise PipelineError(f"{name} must be {what}, got {value!r}")


def _patterns(name: str, value) -> tuple[str, ...]:
    """`value` (a tuple or list of regular expressions) as a tuple, each one compiled once here."""
    if isinstance(value, str) or not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
        raise PipelineError(f"{name} must be a tuple of regular expressions, got {value!r}")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as e:
            raise PipelineError(f"{name}: {pattern!r} is not a regular expression ({e})") from None
    return tuple(value)


def _check_dtype(dtype: str):
    if dtype not in DTYPES:
        raise PipelineError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")


@dataclass(frozen=True)
class PruneConfig:
    """Everything a pruning run needs; the CLI only parses flags into this.

    Defaults follow the paper: ADMM-Grad at 50 %, 128 calibration windows of 2048 tokens
    from C4, WikiText-2 perplexity. ``seqlen`` is never taken from the model's
    ``max_position_embeddings`` (131072 on Llama-3.x).
    """

    model: str | None = None  # hub id, local dir, or None / "smollm2" for the embedded default
    method: str = "admm-grad"
    sparsity: float | None = 0.5
    pattern: str = "unstructured"
    group: str = "row"
    rho: float = 1.0
    damp: float | None = None  # None: 0.1 for ADMM, 0.01 for SparseGPT
    iters: int = 20
    mask_steps: int = 15  # ADMM-Grad only
    polish_iters: int = 0  # PCG steps on the final support after the method (0: the paper's method)
    sparsity_profile: str = "uniform"  # or "owl": per-block targets from outlier ratios (Yin et al.)
    owl_m: float = 5.0  # OWL's outlier threshold M
    owl_lambda: float = 0.08  # OWL's lambda: block targets within sparsity +- lambda
    layer_errors: bool | None = None  # None: measured where the Gram is needed anyway (not wanda, magnitude)
    # which nn.Linear of each decoder layer is pruned: re.search on its name in the layer
    # ("self_attn.q_proj"); no targets: every linear (`models.prunable_linears`)
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    calib: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    eval: str | None = "wikitext2"  # None: no perplexity
    eval_split: str = "test"
    eval_seqlen: int | None = None  # None: same as seqlen
    eval_windows: int | None = None  # None: all windows
    out: str | None = None
    overwrite: bool = False
    resume: bool = False  # continue an interrupted run from the staging folder beside `out`
    max_shard_size: int = 5_000_000_000  # bytes; consecutive blocks share a shard up to this
    device: str | None = None  # None: cuda if available, else cpu
    dtype: str = "float32"
    true_sequential: bool = False
    offload_activations: bool = False
    num_blocks: int | None = None  # prune only the first K blocks (quick checks)
    allow_tf32: bool = False
    cache_dir: str | None = None
    progress: bool = True

    def __post_init__(self):
        try:
            check_method(self.method)
            check_group(self.group)
            nm = parse_pattern(self.pattern)
            sparsity = resolve_sparsity(self.sparsity, nm, allow_none=False)
            check_positive("rho", self.rho)
            if self.damp is not None:
                check_positive("damp", self.damp, allow_zero=True)
        except ValueError as e:
            raise PipelineError(str(e)) from None
        object.__setattr__(self, "sparsity", sparsity)
        object.__setattr__(self, "nm", nm)
        _positive_int("nsamples", self.nsamples)
        _positive_int("iters", self.iters)
        _positive_int("seqlen", self.seqlen, MIN_SEQLEN)
        _positive_int("eval_seqlen", self.eval_seqlen, MIN_SEQLEN, optional=True)
        _positive_int("eval_windows", self.eval_windows, optional=True)
        _positive_int("num_blocks", self.num_blocks, optional=True)
        _positive_int("max_shard_size", self.max_shard_size)
        if self.method == "admm-grad" and (
                isinstance(self.mask_steps, bool) or not isinstance(self.mask_steps, int)
                or not 0 <= self.mask_steps <= self.iters):
            raise PipelineError(f"mask_steps must be an integer in [0, iters={self.iters}], got {self.mask_steps!r}")
        _check_dtype(self.dtype)
        for name in ("targets", "ignore"):
            object.__setattr__(self, name, _patterns(name, getattr(self, name)))
        _positive_int("polish_iters", self.polish_iters, minimum=0)
        if self.polish_iters and self.method == "magnitude":
            raise PipelineError("polish_iters needs a method that sees inputs; magnitude reads only the weights")
        if self.sparsity_profile not in PROFILES:
            raise PipelineError(f"sparsity_profile must be one of {PROFILES}, got {self.sparsity_profile!r}")
        if self.sparsity_profile == "owl":
            if nm is not None:
                raise PipelineError(f"sparsity_profile owl is defined for unstructured sparsity only; pattern "
                                    f"{self.pattern} fixes every block at {sparsity:g}")
            try:
                check_positive("owl_m", self.owl_m)
                check_positive("owl_lambda", self.owl_lambda, allow_zero=True)
            except ValueError as e:
                raise PipelineError(str(e)) from None
            if sparsity + self.owl_lambda >= 1:
                raise PipelineError(f"sparsity + owl_lambda must be < 1, got {sparsity} + {self.owl_lambda}")
        if self.layer_errors and self.method == "magnitude":
            raise PipelineError("layer_errors needs calibration inputs; magnitude reads only the weights")
        if self.resume and self.out is None:
            raise PipelineError("resume needs out: the staging folder lives beside it")

    @property
    def measure_errors(self) -> bool:
        """Layer errors need the full Gram: Wanda alone needs only its diagonal, magnitude nothing."""
        if self.layer_errors is None:
            return self.method not in ("magnitude", "wanda")
        return self.layer_errors

    @property
    def solver_kwargs(self) -> dict:
        """The keyword arguments of `prune_shared` this run uses."""
        return dict(method=self.method, pattern=self.pattern, group=self.group, rho=self.rho,
                    damp=self.damp, iters=self.iters, mask_steps=self.mask_steps,
                    polish_iters=self.polish_iters, track_objective=False, allow_tf32=self.allow_tf32,
                    track_residuals=False)

    def fingerprint(self) -> dict:
        """The fields that decide the pruned weights: a resumed run must match them all."""
        keep = ("method", "sparsity", "pattern", "group", "rho", "damp", "iters", "mask_steps",
                "calib", "nsamples", "seqlen", "seed", "dtype", "true_sequential", "num_blocks",
                "allow_tf32", "polish_iters", "sparsity_profile", "targets", "ignore")
        owl = ("owl_m", "owl_lambda") if self.sparsity_profile == "owl" else ()
        return {k: getattr(self, k) for k in keep + owl}


@dataclass(frozen=True)
class EvalConfig:
    """Evaluate a (saved or hub) model: perplexity on `eval`, zero-shot accuracy on `tasks`."""

    model: str | None = None
    eval: str | None = "wikitext2"  # None: no perplexity
    tasks: tuple[str, ...] = ()  # zero-shot tasks through lm-eval (see zeroshot.TASKS)
    task_data: str | None = None  # folder with the task files (zeroshot module docstring)
    limit: int | None = None  # at most this many documents per task
    batch_size: int = 1
    eval_split: str = "test"
    seqlen: int = 2048
    eval_windows: int | None = None
    device: str | None = None
    dtype: str = "float32"
    offload_activations: bool = False
    cache_dir: str | None = None
    progress: bool = True
    baseline: str | None = None  # a second model (e.g. the dense one) evaluated the same way
    out: str | None = None  # path prefix: writes OUT.json and OUT.md

    def __post_init__(self):
        _positive_int("seqlen", self.seqlen, MIN_SEQLEN)
        _positive_int("eval_windows", self.eval_windows, optional=True)
        _positive_int("batch_size", self.batch_size)
        _positive_int("limit", self.limit, optional=True)
        _check_dtype(self.dtype)
        if self.tasks and self.task_data is None:
            raise PipelineError("tasks needs task_data, the folder holding the task files")
        if self.eval is None and not self.tasks:
            raise PipelineError("nothing to evaluate: give eval or tasks")


def resolve_device(device: str | None) -> torch.device:
    """The compute device: `device` checked, or cuda when available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise PipelineError(f"device {device!r} is not a valid torch device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"device {device!r} requested, but CUDA is not available")
    return dev
