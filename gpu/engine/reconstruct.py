"""Block reconstruction after pruning: the kept weights of a pruned block tuned so that its
outputs match the dense model's, with the masks fixed (EBFT-style, Guo et al. 2024).

The layer-wise problem ADMM solves is min ||X W^T - X W^^T||^2 per linear, on the inputs X the
*pruned* model gives that linear. What it leaves is the error a pruned block hands on to the
next: the block's output error. Here, after a block is pruned,

    min over the kept weights  sum_windows ||block^(H_i) - D_{i+1}||^2,   W^ = W^ * M fixed

where H_i is the pruned model's input to block i (the tuned blocks before it) and D_{i+1} the
dense model's hidden state after block i, on the same calibration windows (`DenseStream`).
With `--reconstruct-inputs dense` the steps read D_i instead of H_i (Shin et al. 2024: the
block learns the dense map, not to correct the error it is handed); the check and the next
block's inputs still use H_i.
Adam on minibatches of windows; the pruned entries stay exactly zero (their gradients are
masked and the weights multiplied by the mask after every step).

The step size is relative to each linear's scale: Adam runs on W / s, s = rms(W^ on its kept
entries), at the step size lr, so every weight moves by about lr x s per step. A rescale that
leaves the block's function alone (q, v, up x c; k, o, down / c) then tunes the same way: the
gradient of W / s and s itself do not change with c (`step_scale`). Every rank uses its own
windows and the gradients are summed over the ranks, so every rank takes the same step.

The tuning is kept only where it lowers the output error on the first `CHECK_WINDOWS` windows
(per rank): the forward that makes the next block's inputs measures the error after the
tuning on them for free, so the check costs one extra forward of those windows (before the
tuning), not of all of them.

Plumbing, not math: it runs a module forward and backward. The engine calls it between the
prune and the next block's forward (`pipeline.prune_model`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from ..checkpoint.weights import prunable_weights
from ..config import RECONSTRUCT_LR_MODE
from .calibration import block_output, run_block
from .distributed import Dist


@dataclass(frozen=True)
class ReconstructionRecord:
    """One block's reconstruction: relative output errors sum ||Y^ - D||^2 / sum ||D||^2 over
    the check windows (the first `CHECK_WINDOWS` of each rank), before and after the tuning,
    and its cost."""

    block: int
    error_before: float
    error_after: float
    steps: int
    seconds: float
    reverted: bool = False  # the tuning did not lower the error: the pruned weights were kept
    lr_mode: str = RECONSTRUCT_LR_MODE  # each linear's step: lr x step_scale(W^)


CHECK_WINDOWS = 8  # per rank: the windows on which the tuning must lower the block's output error


def step_scale(W: torch.Tensor) -> float:
    """s = sqrt(sum W^2 / nnz(W)): the root mean square of a pruned weight's kept entries (0 if none)."""
    kept = int(torch.count_nonzero(W))
    return float(W.detach().double().square().sum().div(max(kept, 1)).sqrt())


class DenseStream:
    """The dense model's hidden states on the calibration windows, one block ahead of time:
    `advance(block, kwargs)` runs the dense block i (with block i's keyword arguments) over
    them (before it is pruned), so `targets` then holds D_{i+1}, the reconstruction's targets
    for block i. With `keep_inputs`, `inputs` holds D_i as well (one more buffer), for tuning on
    the dense model's inputs (Shin et al. 2024) instead of the pruned model's."""

    def __init__(self, inps: torch.Tensor, device, keep_inputs: bool = False):
        self.targets, self.device = inps.clone(), device
        self.inputs = torch.empty_like(inps) if keep_inputs else None

    @torch.no_grad()
    def advance(self, dense_block, kwargs: dict) -> None:
        if self.inputs is not None:
            self.inputs.copy_(self.targets)
        run_block(dense_block, self.targets, kwargs, self.device, self.targets)  # sample i read, then written


@torch.no_grad()
def output_error(block, inps: torch.Tensor, targets: torch.Tensor, kwargs: dict, device, dist: Dist,
                 out: torch.Tensor | None = None, counted: int | None = None) -> float:
    """sum ||block(X_j) - D_j||^2 / sum ||D_j||^2 over the first `counted` windows j (default
    all that have a target; summed over the ranks). With `out`, every window is run and its
    outputs written there (the next block's inputs); without, only the counted ones."""
    counted = min(targets.shape[0] if counted is None else counted, inps.shape[0], targets.shape[0])
    num = torch.zeros((), dtype=torch.float64, device=device)
    den = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(inps.shape[0] if out is not None else counted):
        y = block_output(block(inps[i:i + 1].to(device), **kwargs))
        if out is not None:
            out[i:i + 1] = y.to(out.device)
        if i >= counted:
            continue
        d = targets[i:i + 1].to(device).double()
        num += (y.double() - d).square().sum()
        den += d.square().sum()
    num, den = dist.sum_(num), dist.sum_(den)
    return float(num / den) if float(den) > 0 else float(num)


def reconstruct_block(block, index: int, names: list[str], inps: torch.Tensor, targets: torch.Tensor,
                      kwargs: dict, device, *, steps: int, lr: float, batch: int, seed: int,
                      dist: Dist = Dist(), out: torch.Tensor | None = None,
                      train_inps: torch.Tensor | None = None) -> ReconstructionRecord:
    """W <- W - lr s Adam(s grad W), s = step_scale(W), masks fixed: Adam on W / s.

    Tunes the weights `names` of `block` (pruned linears or experts' slices, on `device`) in
    place through the block's own (routed) forward for `steps` Adam steps of `batch` windows
    each (per rank), towards `targets` (of the first targets.shape[0] windows of `inps`: the
    steps draw from these); `lr` is relative to each tuned parameter's scale s (its
    kept entries' root mean square; a packed experts parameter has one s for its experts), so
    each weight moves by about lr x s per step.

    The weights are tuned in float32 (a half-precision block is lifted for the tuning and cast
    back); everything else in the block stays frozen. If the tuned block's output error on the
    check windows is not below the pruned block's (a step size too large for this block), the
    pruned weights are put back and the record says ``reverted``. The minibatches are drawn
    from ``torch.Generator`` seeded by (`seed`, `index`): the same windows every run. `out`:
    where the final block's outputs on `inps` go (the next block's inputs: the forward that
    measures the error after the tuning makes them too). `train_inps`: the inputs the steps
    use, if not `inps` (the dense model's D_i); the check and `out` always use `inps`."""
    t0 = time.perf_counter()
    n = targets.shape[0]  # the windows with a target: the first n of `inps` (`--reconstruct-windows`)
    train_inps = inps[:n] if train_inps is None else train_inps
    before = output_error(block, inps, targets, kwargs, device, dist, counted=CHECK_WINDOWS)
    dtype = next(block.parameters()).dtype
    weights, masks = _tuned(block, names)
    start = [w.detach().clone() for w in weights]
    scales = [step_scale(w) for w in weights]
    with _trainable(block, weights, dtype):  # Adam on W / s: its gradient s grad W, its step lr s in W
        opt = torch.optim.Adam([{"params": [w], "lr": lr * s} for w, s in zip(weights, scales)])
        gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
        for _ in range(steps):
            opt.zero_grad(set_to_none=False)
            picks = torch.randperm(n, generator=gen)[:batch].tolist()
            for j in picks:  # one window at a time: the block's kwargs are made for batch 1
                y = block_output(block(train_inps[j:j + 1].to(device).float(), **kwargs))
                loss = (y - targets[j:j + 1].to(device).float()).square().mean() / len(picks)
                loss.backward()
            for w, m, s in zip(weights, masks, scales):
                dist.sum_(w.grad).div_(dist.world).mul_(m).mul_(s)
            opt.step()
            with torch.no_grad():  # outside the masks (pruned entries, experts not tuned) as they were
                for w, m, w0 in zip(weights, masks, start):
                    w.copy_(torch.where(m, w, w0.to(w.dtype)))
    after = output_error(block, inps, targets, kwargs, device, dist, out, CHECK_WINDOWS)
    reverted = not after < before  # too large a step size overshoots: never hand on a worse block
    if reverted:
        with torch.no_grad():
            for w, w0 in zip(weights, start):
                w.copy_(w0)
        after = output_error(block, inps, targets, kwargs, device, dist, out, CHECK_WINDOWS)
    return ReconstructionRecord(index, before, after, steps, time.perf_counter() - t0, reverted)


def _tuned(block, names: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The parameters holding the weights `names` and their masks: the nonzeros of the named
    weights (of a packed experts parameter, only the named experts' slices; the rest frozen)."""
    chosen = [w for w in prunable_weights(block) if w.name in set(names)]
    params, masks = [], []
    for w in chosen:
        p = w.parameter(block)
        if not any(p is q for q in params):
            params.append(p)
            masks.append(torch.zeros_like(p, dtype=torch.bool) if w.expert is not None else p.detach() != 0)
        if w.expert is not None:
            k = next(i for i, q in enumerate(params) if q is p)
            masks[k][w.expert] = p.detach()[w.expert] != 0
    return params, masks


@contextlib.contextmanager
def _trainable(block, weights: list[torch.Tensor], dtype):
    """`weights` require gradients (and the block computes in float32) for the duration; the
    block's other parameters are frozen; on exit everything is as it was, each parameter and
    buffer back in its own dtype (not the whole block cast to `dtype`: a float32 buffer of a
    half-precision block stays float32)."""
    flags = [(p, p.requires_grad) for p in block.parameters()]
    own = {(id(m), k): t.dtype for m in block.modules() for k, t in (*m._parameters.items(), *m._buffers.items())
           if t is not None}
    for p, _ in flags:
        p.requires_grad_(False)
    if dtype != torch.float32:
        block.float()
    for w in weights:
        w.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        for w in weights:
            w.grad = None
        if dtype != torch.float32:
            _restore_dtypes(block, own)
        for p, flag in flags:
            p.requires_grad_(flag)


def _restore_dtypes(block, own: dict) -> None:
    """Each parameter (in place: the same Parameter objects) and buffer of `block` back to the
    dtype `own` has for it."""
    with torch.no_grad():
        for m in block.modules():
            for k, p in m._parameters.items():
                if p is not None and p.dtype != own[(id(m), k)]:
                    p.data = p.data.to(own[(id(m), k)])
            for k, b in m._buffers.items():
                if b is not None and b.dtype != own[(id(m), k)]:
                    m._buffers[k] = b.to(own[(id(m), k)])
