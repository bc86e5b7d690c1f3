"""Side-by-side benchmark: every method at every sparsity on one model, and the peers in the same run.

One model, one calibration set (windows drawn once, reused by every run so the differences
are the methods'), one evaluation set. For each setting (50/60/70/80 % unstructured, 2:4 by
default) and each method: restore the dense weights, prune, time it, measure peak memory,
mean layer reconstruction error, perplexity. Peers run on the same windows when installed:
``llmcompressor`` (vllm-project/llm-compressor's ``oneshot`` with ``SparseGPTModifier`` and
``WandaPruningModifier``; LLaMA's seven projections per block targeted by name, a warning
where ours prunes others: `peers.peer_linears`). Our numbers are also reported as ratios to
llm-compressor's SparseGPT at the same setting.

Peak memory is the device's ``max_memory_allocated`` on CUDA; on the CPU it is the peak
resident set size above the level before the run, sampled every 20 ms (approximate).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from admm_prune.reference import parse_pattern
from admm_prune.reference.errors import AdmmPruneError
from admm_prune.reference.options import SolverOptions, option

from ..data import corpus as data_mod
from .. import methods as methods_mod
from ..checkpoint import models as models_mod
from ..checkpoint.adapter import adapter
from ..config import (
    DTYPES, MIN_SEQLEN, RECIPE_RECONSTRUCT_STEPS, CalibOptions, EngineOptions, ModelOptions, PipelineError,
    PruneConfig, ReconstructOptions, positive_int, resolve_device, seed_value, warn_unused,
)
from ..checkpoint.diskspace import writing
from ..engine.distributed import current
from ..evaluation.evaluate import linear_sparsity, load_eval_windows, naming, perplexity, prepare_report_out
from ..checkpoint.lock import prefix_lock
from .peers import PEER_METHODS, PEERS, llmcompressor_prune, peer_available, peer_linears
from ..engine.pipeline import prune_model
from .bench_report import format_markdown, ratios_to_peer, summarize
from .plot import plot_bench
from ..engine.report import mean_layer_error, phase_totals, versions, write_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig(SolverOptions, EngineOptions, ReconstructOptions, CalibOptions, ModelOptions):
    """Every method x setting on one model, on the same calibration and evaluation windows.

    The solver settings are `SolverOptions`' (shared by every run); `methods` and `settings`
    vary the method, sparsity and pattern (`VARIED`, not flags of their own); every other
    setting of a run (`EngineOptions`, `ReconstructOptions`, ...) is the bench's."""

    VARIED: ClassVar[tuple[str, ...]] = ("method", "sparsity", "pattern", "sparsity_profile", "offload_activations",
                                         "seed")  # reconstruct_steps: the steps of +reconstruct variants

    methods: tuple[str, ...] = option(("wanda", "sparsegpt", "admm", "admm-grad"),
                                      "comma-separated methods (see the list above); each may carry variants "
                                      "+owl, +polishK, +itersK, +reconstruct[K] (e.g. admm-grad+owl+polish10, "
                                      "admm-grad+reconstruct16)")
    settings: tuple[str, ...] = option(("0.5", "0.6", "0.7", "0.8", "2:4"),
                                       "comma-separated sparsities and N:M patterns")
    peers: tuple[str, ...] = option(PEERS, "peer implementations run on the same windows when installed "
                                           "('' for none)")
    peer_methods: tuple[str, ...] = option(PEER_METHODS, "the peers' methods to run")
    seeds: tuple[int, ...] = option((0,), "calibration seeds, comma-separated: every method and setting runs "
                                          "once per seed; the tables give mean and std over the seeds")
    baseline_method: str | None = option(None, "a --methods entry: each run's perplexity is also given as a "
                                               "ratio to it, paired per seed (same calibration), then averaged")
    reconstruct_steps: int = option(RECIPE_RECONSTRUCT_STEPS["admm-grad"],
                                    "Adam steps of the block reconstruction of the +reconstruct variants "
                                    "(+reconstructK sets its own K); the other runs do not reconstruct: each "
                                    "method runs as published", metavar="N")
    nsamples: int = option(64, "calibration windows")
    seqlen: int = option(512, "calibration window length in tokens")
    eval: str = option("wikitext2", "perplexity data (wikitext2, c4 or a local file)")
    eval_split: str = option("validation", "split of a hub evaluation dataset")
    eval_seqlen: int = option(2048, "perplexity window length in tokens")
    eval_windows: int | None = option(None, "at most this many perplexity windows (default: all)")
    out: str | None = option(None, "path prefix: writes OUT.md, OUT.json and OUT.png (perplexity against "
                                   "sparsity; needs matplotlib) when the bench completes (the runs so far: "
                                   "OUT.partial.md/.json/.png)")

    def __post_init__(self):
        # Every base's checks but SolverOptions', which would judge `method` (a default no run
        # uses; each variant's solver settings are checked below, as its runs use them).
        # SolverOptions is the first base, so the chain past it reaches all the others.
        super(SolverOptions, self).__post_init__()
        if not self.methods:
            raise PipelineError("methods is empty; name at least one, e.g. admm-grad", field="methods")
        if not self.settings:
            raise PipelineError("settings is empty; name at least one, e.g. 0.5 or 2:4", field="settings")
        solver = {f.name: getattr(self, f.name) for f in dataclasses.fields(SolverOptions)}
        for m in self.methods:
            method, overrides = parse_variant(m)
            if overrides.get("reconstruct_steps", 0) is None and not self.reconstruct_steps:
                raise PipelineError(f"methods: {m} needs reconstruct_steps > 0 (or +reconstructK)",
                                    field="reconstruct_steps")
            SolverOptions(**{**solver, **{k: v for k, v in overrides.items() if k in solver}, "method": method,
                             "sparsity_profile": "uniform"})
        for m in self.peer_methods:
            if m not in PEER_METHODS:
                raise PipelineError(f"peer_methods: unknown method {m!r}; choose from {PEER_METHODS}",
                                    field="peer_methods")
        for p in self.peers:
            if p not in PEERS:
                raise PipelineError(f"peers: unknown peer {p!r}; choose from {PEERS}", field="peers")
        for s in self.settings:
            _setting(s)
        if not self.seeds or len(set(self.seeds)) < len(self.seeds):
            raise PipelineError(f"seeds must be distinct integers, got {self.seeds!r}", field="seeds")
        for seed in self.seeds:
            seed_value("seeds", seed)
        if self.seed != 0:
            raise PipelineError("seed: the bench takes seeds (one or more), e.g. seeds=(3,)", field="seed")
        if self.baseline_method is not None and self.baseline_method not in self.methods:
            raise PipelineError(f"baseline_method {self.baseline_method!r} is not one of methods {self.methods}",
                                field="baseline_method")
        positive_int("eval_seqlen", self.eval_seqlen, MIN_SEQLEN)
        positive_int("eval_windows", self.eval_windows, optional=True)
        for name in ("owl_m", "owl_lambda"):  # read by every +owl variant, whatever sparsity_profile says
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (value == 0 and name == "owl_m"):
                raise PipelineError(f"{name} must be a finite number {'> 0' if name == 'owl_m' else '>= 0'}, "
                                    f"got {value!r}", field=name)
        if self.out is not None:
            prepare_report_out(self.out, (".json", ".md", ".png", ".partial.json", ".partial.md",
                                          ".partial.png"))  # before any work: fails now, not at the end

    def run_config(self, method: str, sparsity: float | None, pattern: str, overrides: dict,
                   seed: int = 0) -> PruneConfig:
        """The PruneConfig of one run: this bench's settings, the run's method and setting."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(PruneConfig)
                  if f.name in self.__dataclass_fields__ and f.name not in ("eval", "eval_split", "eval_seqlen",
                                                                             "eval_windows", "out", "progress")}
        if overrides.get("reconstruct_steps", 0) is None:
            overrides = {**overrides, "reconstruct_steps": self.reconstruct_steps}
        return PruneConfig(**{**shared, "method": method, "sparsity": sparsity, "pattern": pattern,
                              "sparsity_profile": "uniform", "eval": None, "progress": False, "seed": seed,
                              "reconstruct_steps": 0, **overrides})


def parse_variant(spec: str) -> tuple[str, dict]:
    """'admm-grad+owl+polish10+iters5' -> ('admm-grad', PruneConfig overrides).

    Suffixes: ``owl`` (sparsity_profile owl with the bench's owl_m/owl_lambda), ``polishK``
    (K PCG steps of the finish on the final support), ``itersK`` (K ADMM iterations, with
    round(0.75 K) mask steps as the paper's 15 of 20), ``reconstruct`` (block reconstruction
    with the bench's reconstruct_steps/lr/batch) or ``reconstructK`` (K steps)."""
    method, *extras = spec.split("+")
    if method not in methods_mod.names():
        raise PipelineError(f"methods: unknown method {method!r} in {spec!r}; choose from {methods_mod.names()}",
                            field="methods")
    overrides: dict = {}
    for extra in extras:
        digits = extra.lstrip("abcdefghijklmnopqrstuvwxyz")
        name = extra[: len(extra) - len(digits)]
        if extra == "owl":
            overrides["sparsity_profile"] = "owl"
        elif name == "polish" and digits.isdigit():
            overrides["polish_iters"] = int(digits)
        elif name == "iters" and digits.isdigit() and int(digits) > 0:
            overrides.update(iters=int(digits), mask_steps=round(0.75 * int(digits)))
        elif name == "reconstruct" and (digits == "" or (digits.isdigit() and int(digits) > 0)):
            overrides["reconstruct_steps"] = int(digits) if digits else None  # None: the bench's steps
        else:
            raise PipelineError(f"methods: unknown variant {extra!r} in {spec!r}; use +owl, +polishK, +itersK, "
                                f"+reconstruct or +reconstructK", field="methods")
    return method, overrides


def _setting(text: str) -> tuple[float | None, str]:
    """'0.5' -> (0.5, 'unstructured'); '2:4' -> (None, '2:4')."""
    try:
        if ":" in text:
            parse_pattern(text)
            return None, text
        value = float(text)
    except ValueError:
        raise PipelineError(f"settings: {text!r} is neither a sparsity in [0, 1) nor an N:M pattern",
                            field="settings") from None
    if not 0 <= value < 1:
        raise PipelineError(f"settings: sparsity {value} is outside [0, 1)", field="settings")
    return value, "unstructured"


class _PeakMemory:
    """Peak device memory (CUDA) or peak RSS growth (CPU, sampled) during a `with` block, in GiB."""

    def __init__(self, device: torch.device):
        self.device, self.gib = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._base = self._peak = _rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self._peak = max(self._peak, _rss())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss())
            self.gib = (self._peak - self._base) / 2**30
        return False


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def run_bench(cfg: BenchConfig, model=None, tokenizer=None) -> dict:
    """Every method x setting of `cfg` on one model (`model`/`tokenizer` in memory, or
    ``cfg.model``); returns the results. With ``cfg.out`` they are written after every run to
    OUT.partial.json/.md, and to OUT.json/.md once complete (`_save`); ``OUT.lock`` is held
    meanwhile: one bench per prefix."""
    warn_unused_settings(cfg)
    with prefix_lock(cfg.out, current().main):
        return _bench(cfg, model, tokenizer)


def warn_unused_settings(cfg: BenchConfig):
    """A warning for each group of settings that only some variants read, when no variant of
    `methods` does (`config.warn_unused`)."""
    variants = [(methods_mod.get(base).spec, overrides) for base, overrides in map(parse_variant, cfg.methods)]
    warn_unused(cfg, ("owl_m", "owl_lambda"), "only +owl variants read {it}",
                any(o.get("sparsity_profile") == "owl" for _, o in variants))
    warn_unused(cfg, ("reconstruct_steps",), "only +reconstruct variants (without their own K) read {it}",
                any("reconstruct_steps" in o and o["reconstruct_steps"] is None for _, o in variants))
    warn_unused(cfg, ("reconstruct_lr", "reconstruct_batch"), "only +reconstruct variants read {it}",
                any("reconstruct_steps" in o for _, o in variants))
    warn_unused(cfg, ("mask_steps",), "no variant that re-selects its mask without +itersK reads {it}",
                any(spec.mask_steps and "mask_steps" not in o for spec, o in variants))
    warn_unused(cfg, ("polish_damp",), "only +polishK variants read {it}",
                any(o.get("polish_iters", cfg.polish_iters) > 0 for _, o in variants))
    for own in {spec for spec, _ in variants} ^ set(methods_mod.specs.REGISTRY.values()):  # a method's own options
        warn_unused(cfg, own.options, f"only {own.name} variants read {{it}}")


def _bench(cfg: BenchConfig, model, tokenizer) -> dict:
    device = resolve_device(cfg.device)
    if model is None:
        model, tokenizer, _ = models_mod.load_model(cfg.model, dtype=DTYPES.get(cfg.dtype), cache_dir=cfg.cache_dir,
                                                   progress=cfg.progress)
    model.eval()
    models_mod.check_seqlen_fits(model, seqlen=cfg.seqlen, eval_seqlen=cfg.eval_seqlen)
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with naming("--calib", cfg.calib):
        texts = data_mod.load_texts(cfg.calib, split="train")
        tokens = data_mod.TokenCache(texts, tokenizer, cfg.seqlen)  # tokenized once, for every seed
        calibration = {seed: data_mod.sample_calibration(texts, tokenizer, cfg.nsamples, cfg.seqlen, seed, tokens)
                       for seed in cfg.seeds}
    with naming("--eval", cfg.eval, "eval_seqlen"):
        windows = load_eval_windows(cfg.eval, cfg.eval_split, tokenizer, cfg.eval_seqlen, cfg.eval_windows)
    eval_kw = dict(device=cfg.device, progress=cfg.progress)
    result = {"config": asdict(cfg), "versions": versions(), "device": str(device),
              "dtype": str(model.dtype).removeprefix("torch."),
              "model": cfg.model or getattr(model.config, "name_or_path", None) or "smollm2",
              "calibration": {str(seed): info for seed, (_, info) in calibration.items()},
              "eval_windows": int(windows.shape[0]), "runs": [], "skipped": {}}
    t0 = time.perf_counter()
    result["dense_perplexity"] = perplexity(model, windows, desc="dense", **eval_kw)  # once: no seed in it
    result["eval_seconds"] = time.perf_counter() - t0
    log.info("dense perplexity %.3f (%.0f s per evaluation)", result["dense_perplexity"], result["eval_seconds"])

    peers = []
    for peer in cfg.peers:
        why = peer_available(peer)
        if why is None:
            peers.append(peer)
            result["versions"][peer] = __import__(peer).__version__
        else:
            log.warning("skipping peer %s: %s", peer, why)
            result["skipped"][peer] = why
    block = models_mod.decoder_layers(model)[0]
    ours = models_mod.prunable_linears(block, cfg.targets, cfg.ignore)
    theirs = peer_linears(models_mod.prunable_linears(block), adapter(model).block_prefix(0))
    if peers and theirs != ours:
        log.warning("the peers prune %s in each block, ours %s: their rows compare different work",
                    ", ".join(theirs) or "nothing", ", ".join(ours))
        result["peer_linears"] = theirs
    jobs = [(seed, s, impl, m) for seed in cfg.seeds for s in cfg.settings for impl, m in
            [("admm-prune", m) for m in cfg.methods] + [(p, m) for p in peers for m in cfg.peer_methods]]
    with _partial_on_interrupt(cfg, result, len(jobs)):
        for seed, setting, impl, method in tqdm(jobs, desc="bench", disable=not cfg.progress):
            sparsity, pattern = _setting(setting)
            calib_ids = calibration[seed][0]
            if impl == "admm-prune":
                base, overrides = parse_variant(method)
                try:
                    pcfg = cfg.run_config(base, sparsity, pattern, overrides, seed)
                except AdmmPruneError as e:  # e.g. OWL at an N:M setting
                    result["skipped"][f"{method} {setting}"] = str(e)
                    continue
            model.load_state_dict(dense_state)
            errors = []
            with _PeakMemory(device) as mem:
                start = time.perf_counter()
                recon = []
                if impl == "admm-prune":
                    phases = []
                    records, _ = prune_model(model, calib_ids, pcfg, phases=phases, reconstruction=recon)
                    errors = [r.error_pruned for r in records]
                else:
                    llmcompressor_prune(model, tokenizer, calib_ids, method, sparsity, pattern)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - start
            run = {"seed": seed, "setting": setting, "impl": impl, "method": method, "prune_seconds": seconds,
                   "phase_seconds": phase_totals(phases) if impl == "admm-prune" else None,
                   "peak_memory_gib": mem.gib, "linear_sparsity": linear_sparsity(model),
                   "mean_layer_error": mean_layer_error(errors),
                   "block_output_error": ({"before": mean_layer_error(r["error_before"] for r in recon),
                                           "after": mean_layer_error(r["error_after"] for r in recon),
                                           "blocks": len(recon), "lowered": sum(r["error_after"] < r["error_before"]
                                                                                for r in recon),
                                           "reverted": sum(bool(r["reverted"]) for r in recon),
                                           "lr_mode": recon[0]["lr_mode"]} if recon else None),
                   "perplexity": perplexity(model, windows, desc=f"{impl} {method} {setting} seed {seed}", **eval_kw)}
            log.info("%s", run)
            result["runs"].append(run)
            _save(result, cfg, planned=len(jobs))  # after every run: a long benchmark keeps what it measured
    model.load_state_dict(dense_state)
    return _save(result, cfg)


@contextlib.contextmanager
def _partial_on_interrupt(cfg: BenchConfig, result: dict, planned: int):
    """An interruption (Ctrl-C, SIGTERM at the CLI) says where the runs so far are kept."""
    try:
        yield
    except KeyboardInterrupt:
        if cfg.out is None or not result["runs"]:
            raise
        raise KeyboardInterrupt(f"{len(result['runs'])} of {planned} runs kept in {cfg.out}.partial.json and .md "
                                f"(marked partial); {cfg.out}.json and .md are left as they were") from None


def _save(result: dict, cfg: BenchConfig, planned: int | None = None) -> dict:
    """The results so far: `planned` runs in all (None: the bench is complete).

    A complete bench writes OUT.json and OUT.md and removes OUT.partial.*; an unfinished one
    writes only OUT.partial.json/.md, marked partial, so an earlier complete OUT.json is never
    replaced by less (an interrupted bench leaves both)."""
    result["ratios"] = ratios_to_peer(result["runs"])
    result["summary"] = summarize(result["runs"], cfg.baseline_method)
    result["markdown"] = format_markdown(result)
    if planned is not None:
        result["partial"] = {"runs": len(result["runs"]), "planned": planned}
        result["markdown"] = (f"**Partial:** {len(result['runs'])} of {planned} runs (the bench was still running "
                              f"or was interrupted).\n\n" + result["markdown"])
    else:
        result.pop("partial", None)
    if cfg.out is not None:
        paths = _report_paths(cfg.out, partial=planned is not None)
        with writing(paths[0]):
            write_atomic(paths[0], json.dumps(result, indent=2, default=str))
        with writing(paths[1]):
            write_atomic(paths[1], result["markdown"])
        with writing(paths[2]):
            plot_bench(result, paths[2])
        if planned is None:
            for p in _report_paths(cfg.out, partial=True):
                p.unlink(missing_ok=True)
    return result


def _report_paths(out: str, partial: bool) -> tuple[Path, Path, Path]:
    """OUT.json, OUT.md and OUT.png, or OUT.partial.json, .md and .png."""
    stem = out + (".partial" if partial else "")
    return Path(stem + ".json"), Path(stem + ".md"), Path(stem + ".png")
