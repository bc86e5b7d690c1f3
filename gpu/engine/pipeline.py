"""Prune a whole causal LM layer by layer: the block loop and the run around it.

The plumbing half of the torch backend; each job has its own room:

    config.py                what a run is asked to do (`PruneConfig`, `EvalConfig`), validated once
    engine/context.py        what a run works with (`RunContext`: device, ranks, ...), computed once
    engine/calibration.py    block-0 input capture, a block over every sample, Gram hooks
    checkpoint/sources.py    the model one block at a time: in memory, streamed from its shards, staged
    checkpoint/shards.py     reading a safetensors checkpoint folder (and its NaN scan)
    checkpoint/staging.py    each finished block on disk at once, the manifest, resume
    checkpoint/output.py     the output checked before any work, the checkpoint assembled at the end
    checkpoint/lock.py       one run per output: the lock held from before any work to the end
    checkpoint/diskspace.py  the space a run needs, a full disk or a file-size limit in one line
    evaluation/evaluate.py   perplexity (streamed block by block), zero-shot, `run_eval`
    engine/report.py         per-linear records, versions, peak memory
    engine/blocks.py         one block: its linears, their Grams, each group's solve; OWL's block targets
    engine/pipeline.py       this file: the block loop (`prune_model`) and the main job (`run_prune`)

Per block: (1) run the block on every calibration sample with forward pre-hooks that
accumulate one Gram per distinct input (q/k/v share one, gate/up share one: 4 Grams, not 7),
each forward stopped once down_proj's input is seen (`calibrate_block`: its outputs are not
needed); (2) prune each group's linears with one factorization (`prune_shared`); (3) run the
pruned block again to make the next block's inputs (not after the last pruned block); (4)
hand the block to the staging folder, which writes it at once. `true_sequential=True`
instead collects each group's Gram after the groups before it in the block are pruned (4
partial forward passes per block instead of 1, each stopped at its group's input).

Memory. Host: the tensors outside the blocks, one block, the calibration activations
(unless on the device); it does not grow with depth (`paper_notes/streaming.md`). Device:

    one block (weights) + 2 x nsamples x seqlen x hidden activations
    + one d_in x d_in Gram and its factor + a few d_out x d_in buffers

Measured on an H200 (paper_notes/pipeline_shapes_h200.md; fp16, 128 x 2048 calibration
tokens): LLaMA-7B blocks peak at 9.4 GiB for every method, LLaMA-2-70B blocks at 21.6 GiB
(Wanda), 26.1 GiB (SparseGPT), 29.2 GiB (ADMM-Grad). `offload_activations=True` keeps the
activations on the CPU and streams them, for smaller cards.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from admm_prune.reference.errors import AdmmPruneError

from ..data import corpus as data_mod
from ..checkpoint import models as models_mod
from .blocks import block_targets, check_finite, check_model, prune_block
from .calibration import capture_block_inputs, release_memory, run_block, visiting
from ..config import DTYPES, PipelineError, PruneConfig
from .context import RunContext, this_rank_device
from ..checkpoint.diskspace import WriteError, bytes_needed, no_room, warn_if_short, writing
from .distributed import current
from ..evaluation.evaluate import load_eval_windows, naming, perplexity
from ..checkpoint.lock import OutputBusy
from ..checkpoint.output import OutputPlan, after_failure, assemble, extras_writer, publish
from .reconstruct import DenseStream, ReconstructionRecord, reconstruct_block
from .report import (
    LinearRecord, PhaseTimer, PruneReport, achieved_block_sparsity, exclusive_phases, mean_layer_error, peak_memory,
    process_seconds, versions,
)
from ..checkpoint.sources import BlockSource, InMemoryModel, StagedBlocks, as_source, block_state_dict, open_model, rest_state_dict
from ..checkpoint.staging import Staging, start_staging
from .writer import BlockWriter

log = logging.getLogger(__name__)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says what is on disk."""


def prune_model(model, calib_ids: torch.Tensor | None, cfg: PruneConfig, callback: Callable | None = None,
                staging: Staging | None = None, targets: list[float] | None = None,
                phases: list | None = None, ctx: RunContext | None = None,
                reconstruction: list | None = None) -> tuple[list[LinearRecord], list[float]]:
    """Prune the decoder blocks of `model` (a model in memory, pruned in place, or a block
    source such as `sources.StreamedModel`), one block at a time.

    Blocks already finished in `staging` (a resumed run) are read back and only run forward
    to make the next block's inputs; each newly pruned block is handed to `staging`, which
    writes it on a thread of its own (`writer.BlockWriter`) while the next block runs. Blocks
    past ``cfg.num_blocks`` are staged unchanged. `targets`: each block's sparsity (default:
    `block_targets`, i.e. uniform or OWL as the config says). `phases`, when given, gets each
    pruned block's seconds per phase (`report.PhaseTimer`). Returns one record per pruned linear and
    the seconds each block took. `callback(block_idx, name, W_dense, XtX, result)` is called
    after each linear (XtX is None for magnitude). `ctx`: the run's context (default: computed
    from `cfg` in this process). With ``cfg.reconstruct_steps`` each pruned block's kept weights
    are then tuned towards the dense model's block outputs (`reconstruct.py`); `reconstruction`,
    when given, gets each block's `ReconstructionRecord` as a dict.
    """
    source = as_source(model)
    ctx = ctx or RunContext.of(cfg, source)
    dist, device, store, nblocks = ctx.dist, ctx.device, ctx.store, ctx.num_blocks
    check_model(source.model, cfg)
    done = dist.broadcast_object(staging.finished if staging is not None else {})  # rank 0 stages
    if targets is None:
        targets = block_targets(source, calib_ids, cfg, ctx)["targets"]
    inps = kwargs = outs = dense = None
    if cfg.spec.needs != "weights" or cfg.reconstruct_steps:
        inps, kwargs = capture_block_inputs(source.model, dist.share(calib_ids), device, store, cfg.progress)
        outs = torch.empty_like(inps) if nblocks > 1 else None  # only forwards between pruned blocks
        dense = (DenseStream(inps[:cfg.reconstruct_windows], device, cfg.reconstruct_inputs == "dense")
                 if cfg.reconstruct_steps else None)  # the reconstruction's targets (and inputs)
    records, block_seconds, timers = [], [], {}
    bar = tqdm(range(source.num_blocks), desc=f"prune {cfg.method}", disable=not cfg.progress)
    with BlockWriter(staging) if staging is not None else contextlib.nullcontext() as writer:
        for i in bar:
            t0 = time.perf_counter()
            timer = timers[i] = PhaseTimer(device)
            if dense is not None and i in done and i < nblocks:  # resumed: the dense block from the source
                with source.block(i) as dense_block, visiting([dense_block], device), timer("forward"):
                    dense.advance(dense_block, kwargs.at(i))
            with contextlib.ExitStack() as stack:
                with timer("load"):
                    staged = dist.broadcast_object(staging.read_block(i) if i in done and dist.main else None)
                    block = stack.enter_context(source.block(i, tensors=staged))
                    stack.enter_context(visiting([block], device))
                if i in done:  # pruned before the interruption: its forward only
                    recs, recon = [LinearRecord(**r) for r in done[i]["records"]], done[i].get("reconstruction")
                else:
                    recs, recon = (_prune_block(block, i, inps, outs, kwargs and kwargs.at(i), dense, cfg, targets[i], callback, timer,
                                                ctx) if i < nblocks else ([], None))
                if reconstruction is not None and recon is not None:
                    reconstruction.append(recon)
                if inps is not None and i < nblocks - 1:  # the next block's inputs (none after the last)
                    if i in done or dense is None:  # (a reconstruction's last forward made them)
                        with timer("forward"):
                            run_block(block, inps, kwargs.at(i), device, outs)
                    check_finite(outs, f"block {i} outputs after pruning")
                    inps, outs = outs, inps
                if writer is not None and i not in done:  # written on the writer's thread
                    info = {"records": [asdict(r) for r in recs], "seconds": time.perf_counter() - t0,
                            "phases": exclusive_phases(timer.seconds), **({"reconstruction": recon} if recon else {})}
                    with timer("write_wait"):  # the copy to the CPU, and a free place in the writer's queue
                        writer.put(i, block_state_dict(source.model, block, i), info)
                seconds = done[i]["seconds"] if i in done else time.perf_counter() - t0
            release_memory(device)
            if i < nblocks:
                records += recs
                block_seconds.append(seconds)
                _log_block(bar, i, recs, seconds, i in done)
    if phases is not None:  # each pruned block's, with its write's seconds on the writer's thread
        written = writer.seconds if writer is not None else {}
        phases += [done[i].get("phases", {}) if i in done else
                   {**exclusive_phases(timers[i].seconds), **({"write": written[i]} if i in written else {})}
                   for i in range(nblocks)]
    return records, block_seconds


def _prune_block(block, i: int, inps, outs, kwargs, dense: DenseStream | None, cfg: PruneConfig, sparsity,
                 callback, timer: PhaseTimer, ctx: RunContext) -> tuple[list[LinearRecord], dict | None]:
    """Block i pruned, then reconstructed when there is a dense stream (whose last forward
    writes the next block's inputs into `outs`); its records and its reconstruction's."""
    if dense is not None:
        with timer("forward"):
            dense.advance(block, kwargs)  # D_{i+1}, before the block is pruned
    recs = prune_block(block, i, inps, kwargs, cfg, sparsity, ctx.device, callback, timer, ctx.dist)
    if dense is None:
        return recs, None
    with timer("reconstruct"):
        return recs, asdict(_reconstruct(block, i, recs, inps, dense, kwargs, cfg, ctx, outs))


def _log_block(bar, i: int, recs: list[LinearRecord], seconds: float, resumed: bool):
    err = mean_layer_error(r.error_pruned for r in recs)
    bar.set_postfix(err="-" if err is None else f"{err:.4f}", s=f"{seconds:.1f}")
    log.info("block %d: %.1f s%s, mean layer error %s", i, seconds, " (resumed)" if resumed else "",
             "not measured" if err is None else f"{err:.5f}")


def _reconstruct(block, i: int, recs: list[LinearRecord], inps, dense: DenseStream, kwargs, cfg: PruneConfig,
                 ctx: RunContext, outs) -> ReconstructionRecord:
    """Block i's reconstruction (its pruned linears tuned, masks fixed; its outputs into `outs`), logged."""
    rec = reconstruct_block(block, i, [r.name for r in recs], inps, dense.targets, kwargs, ctx.device,
                            steps=cfg.reconstruct_steps, lr=cfg.reconstruct_lr, batch=cfg.reconstruct_batch,
                            seed=cfg.seed, dist=ctx.dist, out=outs, train_inps=dense.inputs)
    if rec.reverted:
        log.info("block %d reconstruction reverted: %d steps did not lower the output error %.5f; the pruned "
                 "weights are kept (%.1f s)", i, rec.steps, rec.error_before, rec.seconds)
    else:
        log.info("block %d reconstruction: output error %.5f -> %.5f (%d steps, %.1f s)", i, rec.error_before,
                 rec.error_after, rec.steps, rec.seconds)
    return rec


def run_prune(cfg: PruneConfig, model=None, tokenizer=None, callback: Callable | None = None) -> PruneReport:
    """The main job: load, calibrate, evaluate dense, prune, evaluate pruned, save.

    `model`/`tokenizer` may be passed in (already in memory; pruned in place) instead of
    `cfg.model`, which is streamed from its shards one block at a time. With ``cfg.out`` the
    blocks are staged beside it as they finish (``cfg.resume`` continues an interrupted run)
    and the checkpoint is renamed into place at the end; from before any work to the end,
    rank 0 holds the output's lock (`lock.OutputLock`: a second run into the same `out` stops
    at once, naming this one). The report times each step (``run_phases``,
    `report.RUN_PHASES`) and the run to its assembled checkpoint, where the peak memory is
    taken too: ``total_seconds`` from this call, ``wall_seconds`` from the process's start.
    """
    t_start, dist, steps = time.perf_counter(), current(), PhaseTimer()
    plan = OutputPlan(cfg.out, cfg.overwrite) if cfg.out is not None else None  # checked on every rank
    plan = plan if dist.main else None  # rank 0 alone stages and writes
    _lock_output(plan, dist)
    cfg.warn_unused()
    source = staging = None
    try:
        with steps("open"):
            ctx, source, tokenizer = _open_source(cfg, model, tokenizer)
        report = PruneReport(config=asdict(cfg), versions=versions(), model=_model_identity(source, ctx.device))
        report.world_size = ctx.dist.world
        report.matmul_precision = cfg.matmul_precision if ctx.device.type == "cuda" else "highest"  # CPU: IEEE
        report.run_phases = steps.seconds  # filled in as the steps run
        with steps("calibration"):
            calib_ids = _calibration(cfg, tokenizer, ctx, report)
        with steps("eval_windows"):
            windows = _eval_windows(cfg, tokenizer, ctx, report)
        with steps("staging"):
            staging = _open_staging(cfg, plan, source, ctx, report)
            if staging is not None:
                staging.write_rest(rest_state_dict(source.model))
        if windows is not None:
            with steps("dense_perplexity"):
                report.perplexity["dense"] = _perplexity(source, windows, cfg, ctx, "dense")
        with steps("prune"):
            _prune(source, calib_ids, cfg, callback, staging, ctx, report)
        if windows is not None:
            with steps("pruned_perplexity"):
                report.perplexity["pruned"] = _perplexity(_pruned(source, staging, ctx), windows, cfg, ctx,
                                                          "pruned")
        final = _assemble(staging, plan, cfg, source, tokenizer, steps)
        _ended(report, t_start, ctx.device)  # after the assembly, before report.json is written
        _publish(staging, plan, cfg, final, report)
    except RunInterrupted:
        raise
    except BaseException as error:
        # an interruption or a full disk: --resume continues; a user error found mid-run (a
        # damaged checkpoint, NaN in a block) stops the rerun at the same place
        resumable = isinstance(error, (KeyboardInterrupt, WriteError)) or not isinstance(error, AdmmPruneError)
        kept = after_failure(staging, plan, resumable)
        if isinstance(error, KeyboardInterrupt):
            raise RunInterrupted(kept or "nothing was written") from None
        if isinstance(error, WriteError):
            raise WriteError(no_room(error, source.model if source else None,
                                     staging.path.parent if staging else None, plan is not None, kept)) from error
        if kept:
            log.error("%s", kept)
        raise
    finally:
        if plan is not None:
            plan.release()
    return report


def _lock_output(plan: OutputPlan | None, dist):
    """Rank 0 takes the output's lock; a busy output stops every rank, before any work."""
    busy = None
    if plan is not None:
        try:
            plan.lock()
        except OutputBusy as error:
            busy = error
    busy = dist.broadcast_object(busy)
    if busy is not None:
        raise busy


def _open_source(cfg: PruneConfig, model, tokenizer) -> tuple[RunContext, BlockSource, object]:
    """The run's context and its model as a block source, checked before any work (the device
    before the model is read, then every stored weight, window lengths, N:M divisibility)."""
    device = this_rank_device(cfg.device, current())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if model is None:
        source, tokenizer = open_model(cfg.model, DTYPES.get(cfg.dtype), cfg.cache_dir)
    else:
        source = InMemoryModel(model.eval())
    models_mod.check_tokenizer_fits(source.model, tokenizer)
    source.check_finite()  # every stored weight, before any work
    check_model(source.model, cfg)
    return RunContext.of(cfg, source, device), source, tokenizer


def _model_identity(source: BlockSource, device) -> dict:
    ident = {**source.identity(), "device": str(device), "dtype": str(source.model.dtype).removeprefix("torch.")}
    if ident.get("name") in (None, models_mod.DEFAULT_MODEL):
        ident["revision"] = models_mod.embedded_revision()
    elif "/snapshots/" in ident.get("path", ""):
        ident["revision"] = ident["path"].split("/snapshots/")[1].split("/")[0]
    return ident


def _calibration(cfg: PruneConfig, tokenizer, ctx: RunContext, report: PruneReport) -> torch.Tensor | None:
    """The calibration windows (None: the method reads only the weights), described in the report."""
    if not cfg.needs_calibration:
        calib_ids, report.calibration = None, {"mode": "none", "reason": f"{cfg.method} reads only the weights"}
    else:
        with naming("--calib", cfg.calib):
            texts = data_mod.load_texts(cfg.calib, split="train")
            calib_ids, report.calibration = data_mod.sample_calibration(texts, tokenizer, cfg.nsamples, cfg.seqlen,
                                                                        cfg.seed)
    log.info("calibration: %s", report.calibration)
    if calib_ids is not None and calib_ids.shape[0] < ctx.dist.world:
        raise PipelineError(f"nsamples: {calib_ids.shape[0]} calibration windows for {ctx.dist.world} ranks; "
                            f"every rank needs at least one")
    return calib_ids


def _eval_windows(cfg: PruneConfig, tokenizer, ctx: RunContext, report: PruneReport) -> torch.Tensor | None:
    """The perplexity windows (None: no perplexity), counted in the report."""
    if cfg.eval is None:
        return None
    with naming("--eval", cfg.eval, "eval_seqlen" if cfg.eval_seqlen else "seqlen"):
        windows = load_eval_windows(cfg.eval, cfg.eval_split, tokenizer, cfg.eval_seqlen or cfg.seqlen,
                                    cfg.eval_windows)
    report.perplexity.update(windows=int(windows.shape[0]), seqlen=int(windows.shape[1]))
    if windows.shape[0] < ctx.dist.world:
        raise PipelineError(f"eval_windows: {windows.shape[0]} windows for {ctx.dist.world} ranks")
    return windows


def _open_staging(cfg: PruneConfig, plan: OutputPlan | None, source: BlockSource, ctx: RunContext,
                  report: PruneReport) -> Staging | None:
    """Rank 0's staging folder: beside `out`, or a scratch one for a streamed model without
    `out` (the pruned perplexity reads its blocks back), resumed when asked; none else."""
    staging = Staging(plan.out) if plan else (Staging.scratch() if source.streamed and ctx.dist.main else None)
    if plan:
        plan.make_parents()
    fingerprint = {**cfg.fingerprint(), "dtype": report.model["dtype"],  # the checkpoint's own when None
                   "calibration_sha256": report.calibration.get("sha256"),
                   "model": {k: v for k, v in report.model.items() if k != "device"}, "device": ctx.device.type,
                   "world_size": ctx.dist.world}
    report.resumed_blocks = start_staging(staging, fingerprint, cfg.resume, ctx.dist)
    if staging is not None:  # a warning now rather than a full disk later
        staged = sum(entry["bytes"] for entry in staging.finished.values())
        warn_if_short(staging.path.parent, bytes_needed(source.model, staged, final_copy=plan is not None))
    return staging


def _perplexity(model, windows: torch.Tensor, cfg: PruneConfig, ctx: RunContext, which: str) -> float:
    value = perplexity(model, windows, ctx.device, cfg.offload_activations, cfg.progress, desc=f"{which} perplexity")
    log.info("%s perplexity: %.3f", which, value)
    return value


def _prune(source: BlockSource, calib_ids, cfg: PruneConfig, callback: Callable | None, staging: Staging | None,
           ctx: RunContext, report: PruneReport):
    """Each block's target sparsity, then the block loop; both go into the report."""
    t0 = time.perf_counter()
    report.block_sparsity = block_targets(source, calib_ids, cfg, ctx)
    records, report.block_seconds = prune_model(source, calib_ids, cfg, callback, staging,
                                                report.block_sparsity["targets"], report.block_phases, ctx,
                                                report.block_reconstruction if cfg.reconstruct_steps else None)
    report.prune_seconds = time.perf_counter() - t0
    report.linears = [asdict(r) for r in records]
    report.block_sparsity["achieved"] = achieved_block_sparsity(records)


def _pruned(source: BlockSource, staging: Staging | None, ctx: RunContext) -> BlockSource:
    """The pruned model as every rank reads it: rank 0's staged blocks (streamed), or `source`
    itself (pruned in place)."""
    shared = ctx.dist.broadcast_object(staging.shared() if staging is not None else None)  # rank 0's
    return StagedBlocks(source, Staging.view(*shared)) if source.streamed else source


def _assemble(staging: Staging | None, plan: OutputPlan | None, cfg: PruneConfig, source: BlockSource, tokenizer,
              steps: PhaseTimer) -> Path | None:
    """The checkpoint's folder made from the staged files (rank 0, with `out`), else None."""
    if plan is None:
        return None
    with steps("assemble"), writing(f"the checkpoint in {staging.path / 'final'}"):
        return assemble(staging, cfg.max_shard_size, extras_writer(source.model, tokenizer), cfg.shard_per_block)


def _publish(staging: Staging | None, plan: OutputPlan | None, cfg: PruneConfig, final: Path | None,
             report: PruneReport):
    """The assembled folder, with report.json, renamed onto `out`; or the scratch staging removed."""
    if final is not None:
        late_sigint = publish(staging, final, cfg.overwrite, report)
        log.info("saved to %s", plan.out)
        if late_sigint:
            raise RunInterrupted(f"after the checkpoint was complete: {plan.out} holds it")
    elif staging is not None:
        staging.discard()


def _ended(report: PruneReport, t_start: float, device: torch.device):
    """The run's end: peak memory, seconds since `t_start` (run_prune's call) and since the process started."""
    report.peak_memory = peak_memory(device)
    report.total_seconds = time.perf_counter() - t_start
    report.wall_seconds = process_seconds()


__all__ = ["RunInterrupted", "prune_model", "run_prune"]
