"""Prune a whole causal LM layer by layer: calibrate, prune every decoder block, evaluate, save.

The plumbing half of the torch backend (the math lives in the other modules and takes
tensors only). The model stays where it was loaded (CPU); one decoder block at a time is
moved to the compute device, with the calibration activations of that block beside it:

    peak device memory = one block (weights) + 2 x nsamples x seqlen x hidden activations
                         + one d_in x d_in Gram and its factor + a few d_out x d_in buffers

Measured on an H200 (paper_notes/pipeline_shapes_h200.md; fp16 model, 128 x 2048
calibration tokens, activations on the device): LLaMA-7B blocks peak at 9.4 GiB for every
method (2 x 2.1 GiB activations dominate), LLaMA-2-70B blocks at 21.6 GiB (Wanda), 26.1 GiB
(SparseGPT) and 29.2 GiB (ADMM-Grad: the 28672 x 28672 fp32 Gram and inverse of down_proj,
3.1 GiB each). It does not grow with depth. `offload_activations=True` keeps the
activations on the CPU and streams them, for smaller cards.

Per block: (1) run the block on every calibration sample with forward hooks that accumulate
one Gram per distinct input (q/k/v share one, gate/up share one: 4 Grams, not 7); (2) prune
each group's linears with one factorization (`prune_shared`); (3) write the weights back;
(4) run the pruned block again to make the next block's inputs. `true_sequential=True`
instead collects each group's Gram after the groups before it in the block are pruned
(4 forward passes per block instead of 2).

The first block's inputs are captured with a ``forward_pre_hook(with_kwargs=True)`` that
keeps every keyword argument (``position_embeddings``, masks, ...) and stops the forward
with a private exception. No KV cache is ever passed along (``use_cache=False``): a cache
reused across calibration samples makes each sample attend to the previous ones.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import data as data_mod
from . import models as models_mod
from ._checks import compute_dtype
from .masks import _select
from .prune import PruneResult, prune_shared
from .solve import reconstruction_error

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PipelineError(ValueError):
    """A user-facing error of the pipeline (bad configuration, NaN in a block, ...)."""


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
    mask_steps: int = 15
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
    device: str | None = None  # None: cuda if available, else cpu
    dtype: str = "float32"
    true_sequential: bool = False
    offload_activations: bool = False
    num_blocks: int | None = None  # prune only the first K blocks (quick checks)
    allow_tf32: bool = False
    cache_dir: str | None = None
    progress: bool = True

    def __post_init__(self):
        from admm_prune.reference._checks import (
            check_group, check_method, check_positive, parse_pattern, resolve_sparsity,
        )

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
        for name in ("nsamples", "seqlen", "iters"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise PipelineError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("eval_seqlen", "eval_windows", "num_blocks"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise PipelineError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.mask_steps, int) or not 0 <= self.mask_steps <= self.iters:
            raise PipelineError(f"mask_steps must be an integer in [0, iters={self.iters}], got {self.mask_steps!r}")
        if self.dtype not in DTYPES:
            raise PipelineError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def nm(self):
        from admm_prune.reference import parse_pattern

        return parse_pattern(self.pattern)


@dataclass
class LinearRecord:
    """What happened to one linear layer (one row of the report)."""

    block: int
    name: str
    shape: tuple[int, int]
    sparsity: float
    error_mask_only: float | None  # relative error of W * M (the final mask, no weight update)
    error_pruned: float | None  # relative error of the pruned weights (None: magnitude, no inputs seen)
    seconds: float


@dataclass
class PruneReport:
    config: dict
    versions: dict
    calibration: dict = field(default_factory=dict)
    linears: list = field(default_factory=list)
    block_seconds: list = field(default_factory=list)
    total_seconds: float = 0.0
    prune_seconds: float = 0.0
    peak_memory: dict = field(default_factory=dict)
    perplexity: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "linears": len(self.linears),
            "mean_sparsity": sum(r["sparsity"] for r in self.linears) / max(len(self.linears), 1),
            "mean_layer_error": mean_layer_error(r["error_pruned"] for r in self.linears),
            "perplexity": self.perplexity,
            "prune_seconds": self.prune_seconds,
        }


def mean_layer_error(errors) -> float | None:
    """Mean of the measured layer errors; None when none was measured (magnitude)."""
    errs = [e for e in errors if e is not None]
    return sum(errs) / len(errs) if errs else None


class _StopForward(Exception):
    """Raised by the capture hook to stop the model's forward after block 0's inputs."""


def versions() -> dict:
    import numpy
    import scipy
    import transformers

    try:
        from importlib.metadata import version

        ours = version("admm-prune")
    except Exception:  # not installed (e.g. run from a source tree)
        ours = "source"
    return {
        "admm_prune": ours, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "numpy": numpy.__version__,
        "scipy": scipy.__version__, "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise PipelineError(f"device {device!r} is not a valid torch device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"device {device!r} requested, but CUDA is not available")
    return dev


def _to(obj, device):
    """Move tensors (also inside tuples/lists/dicts) to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_inputs(model, input_ids: torch.Tensor, device, store_device, progress=True):
    """Run the model up to decoder block 0 for each row of `input_ids` (batch 1).

    Returns (hidden states [n, seqlen, hidden] on `store_device`, the block's keyword
    arguments on `device`). Only the modules before the blocks (embeddings, rotary) are
    moved to `device`; the blocks stay where they are.
    """
    layers = model.model.layers
    captured: dict = {}

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured["hidden"] = hidden
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    pre = [m for n, m in model.model.named_children() if n not in ("layers", "norm")]
    homes = [(m, _module_device(m)) for m in pre]
    for m, _ in homes:
        m.to(device)
    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    hiddens, kwargs = [], None
    try:
        for i in tqdm(range(input_ids.shape[0]), desc="capture inputs", disable=not progress, leave=False):
            with contextlib.suppress(_StopForward):
                model.model(input_ids=input_ids[i:i + 1].to(device), use_cache=False)
            hiddens.append(captured["hidden"].to(store_device))
            if kwargs is None:
                kwargs = captured["kwargs"]
    finally:
        handle.remove()
        for m, home in homes:
            m.to(home)
    # never carry a KV cache between samples
    for k in ("past_key_value", "past_key_values", "cache"):
        if k in kwargs:
            kwargs[k] = None
    kwargs["use_cache"] = False
    return torch.cat(hiddens), _to(kwargs, device)


def _module_device(module) -> torch.device:
    p = next(module.parameters(), None)
    if p is None:
        b = next(module.buffers(), None)
        return b.device if b is not None else torch.device("cpu")
    return p.device


@torch.no_grad()
def run_block(block, hiddens: torch.Tensor, kwargs: dict, device, out: torch.Tensor | None = None):
    """Apply one block to every sample (batch 1); results written into `out` (or a new tensor)."""
    out = torch.empty_like(hiddens) if out is None else out
    for i in range(hiddens.shape[0]):
        out[i:i + 1] = _block_output(block(hiddens[i:i + 1].to(device), **kwargs)).to(out.device)
    return out


class GramCollector:
    """Forward hooks accumulating XtX = sum x x^T (fp32) of the inputs of chosen linears."""

    def __init__(self, block, names: list[str], device):
        self.grams: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.handles = []
        for name in names:
            linear = block.get_submodule(name)
            self.grams[name] = torch.zeros(linear.in_features, linear.in_features,
                                           dtype=torch.float32, device=device)
            self.tokens[name] = 0
            self.handles.append(linear.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float32)
            self.grams[name].addmm_(x.T, x)
            self.tokens[name] += x.shape[0]

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def _check_finite(tensor: torch.Tensor, what: str):
    if not bool(torch.isfinite(tensor).all()):
        raise PipelineError(f"NaN/Inf in {what}; try --dtype float32 or a larger --damp")


def _solver_kwargs(cfg: PruneConfig) -> dict:
    return dict(method=cfg.method, pattern=cfg.pattern, group=cfg.group, rho=cfg.rho,
                damp=cfg.damp, iters=cfg.iters, mask_steps=cfg.mask_steps,
                track_objective=False, allow_tf32=cfg.allow_tf32)


@torch.no_grad()
def prune_group(block, block_idx: int, names: list[str], XtX: torch.Tensor, cfg: PruneConfig,
                callback: Callable | None = None) -> list[LinearRecord]:
    """Prune the linears of `names` (one shared input, one Gram) in place."""
    linears = [block.get_submodule(n) for n in names]
    for n, lin in zip(names, linears):
        _check_finite(lin.weight, f"block {block_idx} {n} weights")
    _check_finite(XtX, f"block {block_idx} inputs of {names[0]} (Gram matrix)")
    t0 = time.perf_counter()
    dense = [lin.weight.detach().clone() for lin in linears]
    results = prune_shared(dense, XtX, cfg.sparsity, **_solver_kwargs(cfg))
    seconds = (time.perf_counter() - t0) / len(names)
    records = []
    for n, lin, W, res in zip(names, linears, dense, results):
        _check_finite(res.W, f"block {block_idx} {n} pruned weights")
        lin.weight.copy_(res.W.to(lin.weight.dtype))
        Wf = W.to(torch.float32)
        records.append(LinearRecord(
            block=block_idx, name=n, shape=tuple(W.shape),
            sparsity=float((lin.weight == 0).float().mean()),
            error_mask_only=reconstruction_error(Wf, Wf * res.mask, XtX),
            error_pruned=reconstruction_error(Wf, res.W.to(torch.float32), XtX),
            seconds=seconds,
        ))
        if callback is not None:
            callback(block_idx, n, W, XtX, res)
    return records


def _check_model_fits(model, cfg: PruneConfig):
    limit = models_mod.max_sequence_length(model)
    for name, value in (("seqlen", cfg.seqlen), ("eval_seqlen", cfg.eval_seqlen)):
        if value is not None and limit is not None and value > limit:
            raise PipelineError(f"--{name.replace('_', '-')} {value} exceeds the model's limit of {limit} positions")
    if cfg.nm is not None:
        m = cfg.nm[1]
        for i, block in enumerate(model.model.layers):
            for names in models_mod.linear_groups(block).values():
                for n in names:
                    d_in = block.get_submodule(n).in_features
                    if d_in % m:
                        raise PipelineError(
                            f"pattern {cfg.pattern} needs input sizes divisible by {m}, but "
                            f"block {i} {n} has {d_in} inputs")


def needs_calibration(method: str) -> bool:
    """Magnitude pruning ranks |W| alone: no calibration data, no block forwards."""
    return method != "magnitude"


@torch.no_grad()
def _prune_without_inputs(model, nblocks: int, cfg: PruneConfig, device,
                          callback: Callable | None) -> tuple[list[LinearRecord], list[float]]:
    """Magnitude pruning block by block: the same masks as `prune_layer(method="magnitude")`
    (which reads only |W|), without capturing inputs or running a forward. The layer
    reconstruction errors need inputs, so they are not measured (None); `callback` gets
    ``XtX=None``."""
    records: list[LinearRecord] = []
    block_seconds: list[float] = []
    for i in tqdm(range(nblocks), desc="prune magnitude", disable=not cfg.progress):
        t0 = time.perf_counter()
        block = model.model.layers[i]
        for names in models_mod.linear_groups(block).values():
            for n in names:
                lin = block.get_submodule(n)
                _check_finite(lin.weight, f"block {i} {n} weights")
                t1 = time.perf_counter()
                W = lin.weight.detach().clone()
                # |W| as prune_layer(method="magnitude") scores it; finiteness was checked just above
                mask = _select(torch.abs(W.to(device, compute_dtype(W))), cfg.sparsity, cfg.pattern, cfg.group)
                lin.weight.mul_(mask.to(lin.weight.device))
                records.append(LinearRecord(
                    block=i, name=n, shape=tuple(W.shape), sparsity=float((lin.weight == 0).float().mean()),
                    error_mask_only=None, error_pruned=None, seconds=time.perf_counter() - t1))
                if callback is not None:
                    callback(i, n, W, None, PruneResult(W=lin.weight.detach().clone(), mask=mask))
        block_seconds.append(time.perf_counter() - t0)
    log.info("magnitude: %d blocks in %.1f s, no calibration forwards", nblocks, sum(block_seconds))
    return records, block_seconds


def prune_model(model, calib_ids: torch.Tensor, cfg: PruneConfig,
                callback: Callable | None = None) -> tuple[list[LinearRecord], list[float]]:
    """Prune `model`'s decoder blocks in place, layer by layer.

    Returns one record per linear and the seconds each block took.

    `callback(block_idx, name, W_dense, XtX, result)` is called after each linear (for
    inspection and tests). The model may live on the CPU: each block visits the device.
    """
    device = resolve_device(cfg.device)
    store = torch.device("cpu") if cfg.offload_activations else device
    _check_model_fits(model, cfg)
    layers = model.model.layers
    nblocks = len(layers) if cfg.num_blocks is None else min(cfg.num_blocks, len(layers))
    if not needs_calibration(cfg.method):
        return _prune_without_inputs(model, nblocks, cfg, device, callback)
    inps, kwargs = capture_block_inputs(model, calib_ids, device, store, cfg.progress)
    outs = torch.empty_like(inps)
    records: list[LinearRecord] = []
    block_seconds: list[float] = []
    bar = tqdm(range(nblocks), desc=f"prune {cfg.method}", disable=not cfg.progress)
    for i in bar:
        t0 = time.perf_counter()
        block = layers[i]
        home = _module_device(block)
        block.to(device)
        groups = list(models_mod.linear_groups(block).values())
        stages = [[g] for g in groups] if cfg.true_sequential else [groups]
        for stage in stages:
            collector = GramCollector(block, [g[0] for g in stage], device)
            try:
                run_block(block, inps, kwargs, device, outs)
            finally:
                collector.remove()
            for g in stage:
                records += prune_group(block, i, g, collector.grams[g[0]], cfg, callback)
            del collector
        run_block(block, inps, kwargs, device, outs)
        _check_finite(outs, f"block {i} outputs after pruning")
        block.to(home)
        inps, outs = outs, inps
        if device.type == "cuda":
            torch.cuda.empty_cache()
        block_seconds.append(time.perf_counter() - t0)
        err = mean_layer_error(r.error_pruned for r in records if r.block == i)
        bar.set_postfix(err=f"{err:.4f}", s=f"{block_seconds[-1]:.1f}")
        log.info("block %d: %.1f s, mean layer error %.5f", i, block_seconds[-1], err)
    return records, block_seconds


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, device=None, offload_activations: bool = False,
               progress: bool = True, desc: str = "perplexity") -> float:
    """exp(mean token NLL) over non-overlapping windows, one block at a time on the device.

    The standard protocol (GPTQ/SparseGPT/Wanda): each window's loss is the mean
    cross-entropy of its seqlen - 1 next-token predictions; ppl = exp(mean window loss).
    Runs block by block like the pruning, so a model larger than the device still works.
    """
    device = resolve_device(device)
    store = torch.device("cpu") if offload_activations else device
    hid, kwargs = capture_block_inputs(model, windows, device, store, progress)
    buf = torch.empty_like(hid)
    for block in tqdm(model.model.layers, desc=desc, disable=not progress, leave=False):
        home = _module_device(block)
        block.to(device)
        run_block(block, hid, kwargs, device, buf)
        block.to(home)
        hid, buf = buf, hid
    head = [model.model.norm, model.lm_head]
    homes = [(m, _module_device(m)) for m in head]
    for m, _ in homes:
        m.to(device)
    losses = []
    try:
        for i in range(hid.shape[0]):
            logits = model.lm_head(model.model.norm(hid[i:i + 1].to(device))).float()
            target = windows[i:i + 1, 1:].to(device)
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                    target.reshape(-1))
            losses.append(float(nll))
    finally:
        for m, home in homes:
            m.to(home)
    value = math.exp(sum(losses) / len(losses))
    if not math.isfinite(value):
        raise PipelineError(f"{desc} is not finite ({value}); the model produces NaN/Inf")
    return value


@contextlib.contextmanager
def _naming(flag: str, source: str):
    """Prefix a data error with the flag and source it concerns."""
    try:
        yield
    except data_mod.DataError as e:
        if str(source) in str(e):
            raise
        raise data_mod.DataError(f"{flag} {source}: {e}") from None


def _eval_args(cfg) -> tuple:
    return cfg.device, cfg.offload_activations, cfg.progress


def load_eval_windows(source: str, split: str, tokenizer, seqlen: int, max_windows: int | None):
    """Perplexity windows of `source` (rows joined with "\n\n"), at most `max_windows`."""
    texts = data_mod.load_texts(source, split=split)
    windows = data_mod.tokenize_for_perplexity(data_mod.perplexity_text(texts), tokenizer, seqlen)
    return windows if max_windows is None else windows[:max_windows]


def peak_memory(device: torch.device) -> dict:
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mem = {"host_max_rss_gib": rss_kb / 2**20}
    if device.type == "cuda":
        mem["device_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return mem


def _prepare_out(cfg: PruneConfig) -> Path | None:
    if cfg.out is None:
        return None
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise PipelineError(f"--out {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise PipelineError(f"--out {out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _usual_mode(is_dir: bool) -> int:
    """The permissions open()/mkdir() would give under the process umask (mkstemp/mkdtemp give 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if is_dir else 0o666) & ~umask


def save_pruned(model, tokenizer, report: PruneReport, out: Path, overwrite: bool) -> None:
    """Write checkpoint + tokenizer + report.json to a temporary sibling, then rename it in."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "report.json").write_text(json.dumps(asdict(report), indent=2, default=str))
        for path in [tmp, *tmp.iterdir()]:  # mkdtemp makes 0700: give the usual permissions
            path.chmod(_usual_mode(path.is_dir()))
        if out.exists():
            if not overwrite:
                raise PipelineError(f"--out {out} appeared while pruning; not replacing it")
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run_prune(cfg: PruneConfig, model=None, tokenizer=None, callback: Callable | None = None) -> PruneReport:
    """The main job: load, calibrate, evaluate dense, prune, evaluate pruned, save.

    `model`/`tokenizer` may be passed in (already loaded) instead of `cfg.model`.
    """
    t_start = time.perf_counter()
    out = _prepare_out(cfg)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if model is None:
        model, tokenizer, info = models_mod.load_model(cfg.model, dtype=DTYPES[cfg.dtype], cache_dir=cfg.cache_dir)
    model.eval()
    _check_model_fits(model, cfg)
    report = PruneReport(config=asdict(cfg), versions=versions())

    calib_ids = None
    if needs_calibration(cfg.method):
        with _naming("--calib", cfg.calib):
            texts = data_mod.load_texts(cfg.calib, split="train")
            calib_ids, calib_info = data_mod.sample_calibration(texts, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed)
        report.calibration = calib_info
        log.info("calibration: %s", calib_info)
    else:
        report.calibration = {"mode": "none", "reason": f"{cfg.method} reads only the weights"}

    windows = None
    if cfg.eval is not None:
        with _naming("--eval", cfg.eval):
            windows = load_eval_windows(cfg.eval, cfg.eval_split, tokenizer,
                                        cfg.eval_seqlen or cfg.seqlen, cfg.eval_windows)
        report.perplexity["windows"] = int(windows.shape[0])
        report.perplexity["seqlen"] = int(windows.shape[1])
        report.perplexity["dense"] = perplexity(model, windows, *_eval_args(cfg), desc="dense perplexity")
        log.info("dense perplexity: %.3f", report.perplexity["dense"])

    t0 = time.perf_counter()
    records, report.block_seconds = prune_model(model, calib_ids, cfg, callback)
    report.prune_seconds = time.perf_counter() - t0
    report.linears = [asdict(r) for r in records]

    if windows is not None:
        report.perplexity["pruned"] = perplexity(model, windows, *_eval_args(cfg), desc="pruned perplexity")
        log.info("pruned perplexity: %.3f", report.perplexity["pruned"])
    report.peak_memory = peak_memory(device)
    report.total_seconds = time.perf_counter() - t_start
    if out is not None:
        save_pruned(model, tokenizer, report, out, cfg.overwrite)
        log.info("saved to %s", out)
    return report


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
        if not isinstance(self.seqlen, int) or self.seqlen < 2:
            raise PipelineError(f"seqlen must be an integer >= 2, got {self.seqlen!r}")
        if self.eval_windows is not None and (not isinstance(self.eval_windows, int) or self.eval_windows < 1):
            raise PipelineError(f"eval_windows must be a positive integer, got {self.eval_windows!r}")
        if self.dtype not in DTYPES:
            raise PipelineError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.tasks and self.task_data is None:
            raise PipelineError("--tasks needs --task-data, the folder holding the task files")
        if self.eval is None and not self.tasks:
            raise PipelineError("nothing to evaluate: give --eval or --tasks")


def linear_sparsity(model) -> float:
    """Fraction of exact zeros over the decoder blocks' prunable linears."""
    zeros = total = 0
    for block in model.model.layers:
        for names in models_mod.linear_groups(block).values():
            for n in names:
                w = block.get_submodule(n).weight
                zeros += int((w == 0).sum())
                total += w.numel()
    return zeros / max(total, 1)


def run_eval(cfg: EvalConfig, model=None, tokenizer=None) -> dict:
    """Perplexity and zero-shot accuracy of a model, with the sparsity it actually has.

    With ``cfg.baseline`` the baseline model (typically the dense one) is evaluated on the
    same windows and documents, and ``result["baseline"]`` and ``result["markdown"]`` (the two
    side by side) are added. With ``cfg.out`` the result is written to OUT.json and OUT.md.
    """
    out = _prepare_report_out(cfg.out)
    if model is None:
        model, tokenizer, _ = models_mod.load_model(cfg.model, dtype=DTYPES[cfg.dtype], cache_dir=cfg.cache_dir)
    result = _evaluate(cfg, model, tokenizer, cfg.model)
    if cfg.baseline is not None:
        del model
        base, base_tok, _ = models_mod.load_model(cfg.baseline, dtype=DTYPES[cfg.dtype], cache_dir=cfg.cache_dir)
        result["baseline"] = _evaluate(cfg, base, base_tok, cfg.baseline)
    result["markdown"] = format_eval_markdown(result)
    if out is not None:
        _write_atomic(out.with_suffix(".json"), json.dumps(result, indent=2, default=str))
        _write_atomic(out.with_suffix(".md"), result["markdown"])
        log.info("wrote %s and %s", out.with_suffix(".json"), out.with_suffix(".md"))
    return result


def _evaluate(cfg: EvalConfig, model, tokenizer, name) -> dict:
    model.eval()
    result = {"model": name or "smollm2", "dtype": cfg.dtype, "linear_sparsity": linear_sparsity(model)}
    if cfg.eval is not None:
        limit = models_mod.max_sequence_length(model)
        if limit is not None and cfg.seqlen > limit:
            raise PipelineError(f"--seqlen {cfg.seqlen} exceeds the model's limit of {limit} positions")
        with _naming("--eval", cfg.eval):
            windows = load_eval_windows(cfg.eval, cfg.eval_split, tokenizer, cfg.seqlen, cfg.eval_windows)
        result.update(eval=cfg.eval, windows=int(windows.shape[0]), seqlen=cfg.seqlen,
                      perplexity=perplexity(model, windows, cfg.device, cfg.offload_activations, cfg.progress))
    if cfg.tasks:
        from .zeroshot import run_zeroshot

        result["zeroshot"] = run_zeroshot(model, tokenizer, list(cfg.tasks), cfg.task_data, limit=cfg.limit,
                                          batch_size=cfg.batch_size, device=cfg.device)
    return result


def format_eval_markdown(result: dict) -> str:
    """One model's evaluation, or (with a baseline) the baseline and the model side by side."""
    base = result.get("baseline")
    runs = [result] if base is None else [base, result]
    lines = [" vs ".join(f"`{r['model']}` (linear sparsity {r['linear_sparsity']:.4f})" for r in runs)
             + f", {result['dtype']}.", ""]
    if "perplexity" in result:
        ppl = ", ".join(f"{r['perplexity']:.3f}" for r in runs)
        lines += [f"Perplexity on {result['windows']} windows of {result['seqlen']} tokens of "
                  f"`{result['eval']}`: {ppl}" + (" (baseline, model)." if base else "."), ""]
    if "zeroshot" in result:
        from .zeroshot import format_table

        zs = result["zeroshot"]
        if base is None:
            table = format_table(zs, labels=("model",))
        else:
            table = format_table(base["zeroshot"], zs, labels=("baseline", "model"))
        lines += [f"Zero-shot accuracy (lm-eval {zs['lm_eval_version']}, {zs['num_fewshot']}-shot, "
                  f"limit {zs['limit']}):", "", table, ""]
    return "\n".join(lines)


def _prepare_report_out(out: str | None) -> Path | None:
    """Check that the report's folder can be written before hours of evaluation."""
    if out is None:
        return None
    path = Path(out)
    if path.exists() and path.is_dir():
        raise PipelineError(f"--out {out} is a directory; give a path prefix such as runs/eval_dense")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise PipelineError(f"--out {out}: cannot write to {parent}")
    return path


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, _usual_mode(False))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
