"""Several processes, one run: torch.distributed as the engine sees it.

Launched by ``torchrun --nproc-per-node N -m admm_prune.gpu prune ...`` (or any code that
has initialised a process group before calling `run_prune`), every rank runs the same
block loop on its share of the calibration windows (data parallel); a block's Grams are
summed across ranks (``all_reduce``); its linear groups (q/k/v, o, gate/up, down: one
factorization each) are assigned to ranks by their cost and solved there, and the pruned
weights are broadcast from their owner, so every rank continues with the same block. Only
rank 0 stages and writes. Perplexity splits the windows and sums the losses.

A single process (no process group) is `Dist()`: world size 1, every collective a no-op.
Backends: ``nccl`` on CUDA, ``gloo`` on CPU; every collective has the process group's
timeout, so a rank that fails cannot leave the others waiting forever.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as td

from ..config import PipelineError

DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank, world size, and the collectives the loop uses."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows (windows) of `rows`: rank, rank + world, ... (all of them alone)."""
        return rows[self.rank::self.world] if self.active else rows

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In place: the sum of `t` over the ranks."""
        if self.active:
            td.all_reduce(t, op=td.ReduceOp.SUM)
        return t

    def broadcast_(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """In place: `t` as rank `src` has it."""
        if self.active:
            td.broadcast(t, src=src)
        return t

    def broadcast_object(self, obj, src: int = 0):
        """`obj` (picklable) as rank `src` has it."""
        if not self.active:
            return obj
        box = [obj]
        td.broadcast_object_list(box, src=src)
        return box[0]

    def gather_objects(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def assign(self, costs: list[float]) -> list[int]:
        """The rank that does each job: longest job first, to the least loaded rank."""
        load = [0.0] * self.world
        owner = [0] * len(costs)
        for j in sorted(range(len(costs)), key=lambda j: -costs[j]):
            r = min(range(self.world), key=lambda r: (load[r], r))
            owner[j] = r
            load[r] += costs[j]
        return owner


def current() -> Dist:
    """The process group this process belongs to, if one is initialised; else a single process."""
    if td.is_available() and td.is_initialized():
        return Dist(td.get_rank(), td.get_world_size())
    return Dist()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str | None, timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    CUDA ranks use ``cuda:LOCAL_RANK`` with nccl, CPU ranks gloo. A rank whose device is
    missing fails with one line before joining (the others then time out on joining)."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = (device is None and torch.cuda.is_available()) or (device is not None and device.startswith("cuda"))
    if cuda:
        if not torch.cuda.is_available() or local >= torch.cuda.device_count():
            raise PipelineError(f"rank with LOCAL_RANK {local} needs cuda:{local}, but "
                                f"{torch.cuda.device_count()} CUDA devices are visible")
        torch.cuda.set_device(local)
    td.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return current()


def rank_device(device: str | None, dist: Dist) -> str | None:
    """The device of this rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` when several ranks run."""
    if dist.active and (device is None and torch.cuda.is_available() or device == "cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', dist.rank))}"
    return device


def finish(dist: Dist):
    if dist.active and td.is_initialized():
        td.destroy_process_group()
