"""One decoder block's pruning: its target linears, their Grams, each group's solve.

`prune_block` finds the block's prunable weights (`weights.prunable_weights`), groups those
that read the same input (`calibration.shared_input_groups`), collects one Gram per group
(or Wanda's column norms) over the calibration samples, and hands each group to
`prune_group`, which runs the method's solve (`prune.prune_shared`) and writes the weights
back. `block_targets` gives each block its sparsity (uniform or OWL), `check_model` what can
be checked from the config and the model's skeleton before any work. The loop over blocks
and the run around it are `pipeline.py`'s.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch
from tqdm.auto import tqdm

from admm_prune.reference import owl_sparsities
from admm_prune.reference.errors import FactorizationError

from ..checkpoint import models as models_mod
from ..checkpoint.adapter import adapter
from ..checkpoint.weights import Weight, prunable_weights
from .calibration import (
    GramCollector, NormCollector, calibrate_block, capture_block_inputs, run_block, shared_input_groups, visiting,
)
from ..solvers.checks import all_finite
from ..config import PipelineError, PruneConfig
from .context import RunContext
from .distributed import Dist
from ..solvers.owl import outlier_ratio
from ..solvers.prune import prune_norms, prune_shared, prune_weights
from .report import NO_TIMER, LinearRecord, PhaseTimer
from ..solvers.solve import reconstruction_errors
from ..checkpoint.sources import as_source

log = logging.getLogger(__name__)


def check_finite(tensor: torch.Tensor, what: str):
    if not all_finite(tensor):
        raise PipelineError(f"NaN/Inf in {what}; try dtype float32 or a larger damp")


@torch.no_grad()
def prune_group(block, block_idx: int, group: list[Weight], XtX: torch.Tensor | None, cfg: PruneConfig,
                sparsity: float | None, callback: Callable | None = None, timer: PhaseTimer = NO_TIMER,
                tokens: int | None = None) -> list[LinearRecord]:
    """Prune the weights of `group` (one shared input, one Gram; None for magnitude) in place
    to `sparsity` (the block's target: ``cfg.sparsity``, or OWL's for this block). A method
    that needs only the column norms (Wanda) gets diag(XtX) as a vector (`prune_norms`),
    unless layer errors, the finish or a callback asked for the full Gram. `tokens`: an expert's routed tokens; fewer than
    ``cfg.moe_min_tokens`` and its Gram is replaced by I (magnitude pruning, whatever the
    method: `fallback` in its record)."""
    names = [w.name for w in group]
    t0 = time.perf_counter()
    dense = [w.matrix(block).clone() for w in group]
    fallback = None
    if XtX is not None and tokens is not None and tokens < cfg.moe_min_tokens:
        fallback = f"{tokens} tokens < moe_min_tokens {cfg.moe_min_tokens}: magnitude (Gram = I)"
        XtX = torch.ones_like(XtX) if XtX.ndim == 1 else torch.eye(XtX.shape[0], dtype=XtX.dtype, device=XtX.device)
    with timer("solve"):
        if XtX is None:  # a method that reads only the weights: each weight on its own
            results = [prune_weights(W, sparsity, cfg) for W in dense]
        else:
            check_finite(XtX, f"block {block_idx} inputs of {names[0]} (Gram matrix)")
            try:
                if XtX.ndim == 1:  # column norms only (Wanda): never a d_in x d_in diagonal matrix
                    results = prune_norms(dense, XtX, sparsity, cfg)
                else:
                    results = prune_shared(dense, XtX, sparsity, **cfg.engine_solver_kwargs())
            except FactorizationError as e:  # the layer it happened in, said once here
                raise FactorizationError(f"block {block_idx} {', '.join(names)}: {e}") from None
    seconds = (time.perf_counter() - t0) / len(names)
    records = []
    for w, W, res in zip(group, dense, results):
        check_finite(res.W, f"block {block_idx} {w.name} pruned weights")
        w.write(block, res.W)
        errors = (None, None)
        if cfg.measure_errors and fallback is None:
            with timer("errors"):
                Wf = W.to(torch.float32)
                errors = reconstruction_errors(Wf, [Wf * res.mask, res.W.to(torch.float32)], XtX)
        records.append(LinearRecord(
            block=block_idx, name=w.name, shape=tuple(W.shape), sparsity=float((w.matrix(block) == 0).float().mean()),
            error_mask_only=errors[0], error_pruned=errors[1], seconds=seconds, tokens=tokens, fallback=fallback))
        if callback is not None:
            callback(block_idx, w.name, W, XtX, res)
    return records


@torch.no_grad()
def prune_block(block, i: int, inps, kwargs, cfg: PruneConfig, sparsity: float | None, device,
                callback: Callable | None = None, timer: PhaseTimer = NO_TIMER, dist: Dist = Dist(),
                ) -> list[LinearRecord]:
    """Prune one block in place: its target weights (`weights.prunable_weights`: linears and
    experts' slices) grouped by shared input (`shared_input_groups`, one sample's forward),
    Grams (or Wanda's column norms) from a forward over `inps`, then each group's solve. With
    several ranks the Grams and the experts' token counts are summed over the ranks' windows,
    each group is solved by one rank (`Dist.assign`, by cost) and its weights broadcast."""
    weights = prunable_weights(block, cfg.targets, cfg.ignore)
    needs = cfg.spec.needs
    if needs == "weights":  # |W| only: every rank computes the same, nothing to share
        return [r for w in weights for r in prune_group(block, i, [w], None, cfg, sparsity, callback, timer)]
    with timer("forward"):
        groups = shared_input_groups(block, weights, inps[:1], kwargs, device, cfg.moe_calibration)
    # Wanda's scores read only diag(XtX); the full Gram only for layer errors, the finish or a callback
    full = needs == "gram" or cfg.measure_errors or cfg.polish_iters > 0 or callback is not None
    collect = GramCollector if full else NormCollector
    records = []
    for stage in ([[g] for g in groups] if cfg.true_sequential else [groups]):
        leaders = [g[0] for g in stage]
        with collect(block, leaders, device, timer, stop=True, moe_calibration=cfg.moe_calibration) as collector, \
                timer("forward"):
            calibrate_block(block, inps, kwargs, device)
        owners = dist.assign([_solve_cost(block, g, cfg) for g in stage])
        with timer("share"):
            tokens = dist.sum_(torch.tensor([collector.tokens[w.name] for w in leaders], dtype=torch.float64,
                                            device=device)).tolist()
        mine = []
        for g, owner, n in zip(stage, owners, tokens):
            with timer("share"):  # summed in float64 over the ranks, then the solvers' float32, on the device
                gram = dist.sum_(collector.grams.pop(g[0].name).to(device)).float()  # one group's at a time
            if owner == dist.rank:
                routed = int(n) if g[0].expert is not None else None
                mine += prune_group(block, i, g, gram, cfg, sparsity, callback, timer, routed)
            del gram
        with timer("share"):
            for g, owner in zip(stage, owners):
                for w in g:
                    dist.broadcast_(w.stored(block), owner)
            order = [w.name for g in stage for w in g]
            records += sorted((r for rank in dist.gather_objects(mine) for r in rank), key=lambda r: order.index(r.name))
    return records


def _solve_cost(block, group: list[Weight], cfg: PruneConfig) -> float:
    """FLOPs of one group's solve: the d_in^3 factorization, d_out d_in^2 per ADMM step (used
    only to balance the groups over ranks; ALPS's longer search is not counted)."""
    shapes = [w.matrix(block).shape for w in group]
    d_in = shapes[0][1]
    return d_in**3 + sum(d_out * d_in**2 * (cfg.iters + cfg.polish_iters + 2) for d_out, _ in shapes)


def check_model(model, cfg: PruneConfig):
    """What can be known from the config and the skeleton: num_blocks within the depth, window
    lengths within the context, a target weight in every block, N:M divisibility."""
    shape = adapter(model)
    depth = shape.num_blocks
    if cfg.num_blocks is not None and cfg.num_blocks > depth:
        raise PipelineError(f"num_blocks {cfg.num_blocks} exceeds the {depth} decoder blocks of the model",
                            field="num_blocks")
    models_mod.check_seqlen_fits(model, seqlen=cfg.seqlen, eval_seqlen=cfg.eval_seqlen)
    for i, block in enumerate(shape.layers):
        try:
            weights = prunable_weights(block, cfg.targets, cfg.ignore)
        except models_mod.ModelError as error:
            raise models_mod.ModelError(f"{type(model).__name__}: {shape.block_prefix(i)}{error}") from None
        if not weights:
            raise PipelineError(f"targets {list(cfg.targets)} and ignore {list(cfg.ignore)} leave no linear of "
                                f"block {i} ({type(block).__name__}) to prune")
        for w in weights if cfg.nm is not None else ():
            d_in = w.in_features(block)
            if d_in % cfg.nm[1]:
                raise PipelineError(f"pattern {cfg.pattern} needs input sizes divisible by {cfg.nm[1]}, "
                                    f"but block {i} {w.name} has {d_in} inputs")


@torch.no_grad()
def block_targets(model, calib_ids: torch.Tensor | None, cfg: PruneConfig, ctx: RunContext | None = None) -> dict:
    """Each pruned block's sparsity: ``cfg.sparsity`` (uniform), or OWL's targets from the
    dense model's outlier ratios (one dense forward over the calibration windows per block).

    Returns {"profile", "targets": [...], and for OWL "ratios": [...], "sizes": [...]}."""
    source = as_source(model)
    ctx = ctx or RunContext.of(cfg, source)
    nblocks = ctx.num_blocks
    if cfg.sparsity_profile == "uniform":
        return {"profile": "uniform", "targets": [cfg.sparsity] * nblocks}
    dist, device, store = ctx.dist, ctx.device, ctx.store
    inps, kwargs = capture_block_inputs(source.model, dist.share(calib_ids), device, store, cfg.progress)
    outs = torch.empty_like(inps)
    ratios, sizes = [], []
    for i in tqdm(range(nblocks), desc="outlier ratios (dense)", disable=not cfg.progress, leave=False):
        with source.block(i) as block, visiting([block], device):
            weights = prunable_weights(block, cfg.targets, cfg.ignore)
            groups = shared_input_groups(block, weights, inps[:1], kwargs.at(i), device, cfg.moe_calibration)
            with NormCollector(block, [g[0] for g in groups], device, moe_calibration=cfg.moe_calibration) as norms:
                run_block(block, inps, kwargs.at(i), device, outs)
            Ws = [w.matrix(block) for g in groups for w in g]
            group_cols = [dist.sum_(norms.grams[g[0].name]).sqrt().float() for g in groups]  # one all_reduce each
            cols = [c for g, c in zip(groups, group_cols) for _ in g]
            ratios.append(outlier_ratio(Ws, cols, cfg.owl_m))
            sizes.append(sum(W.numel() for W in Ws))
        inps, outs = outs, inps
    targets = owl_sparsities(ratios, sizes, cfg.sparsity, cfg.owl_lambda, cfg.pattern)
    log.info("OWL targets (M %g, lambda %g): %s", cfg.owl_m, cfg.owl_lambda,
             " ".join(f"{t:.3f}" for t in targets))
    return {"profile": "owl", "m": cfg.owl_m, "lambda": cfg.owl_lambda, "ratios": ratios, "sizes": sizes,
            "targets": [float(t) for t in targets]}

