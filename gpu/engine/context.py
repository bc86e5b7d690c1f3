"""What a pruning run works with, computed once from its config and this process, then
passed down (instead of each function resolving the device and the ranks again)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import PruneConfig, resolve_device
from .distributed import Dist, current, rank_device


def this_rank_device(device: str | torch.device | None, dist: Dist) -> torch.device:
    """The compute device of this rank: `device` (a config's; ``cuda`` becomes this rank's
    ``cuda:LOCAL_RANK``), or the default, checked (a `torch.device` is not remapped)."""
    return resolve_device(rank_device(device, dist))


@dataclass(frozen=True)
class RunContext:
    """device: where blocks are computed (this rank's); store: where the block activations
    wait between blocks (the CPU with ``offload_activations``); dist: the ranks;
    num_blocks: how many blocks are pruned (the first ones; ``cfg.num_blocks`` or all)."""

    device: torch.device
    store: torch.device
    dist: Dist
    num_blocks: int

    @classmethod
    def of(cls, cfg: PruneConfig, source, device: torch.device | None = None) -> RunContext:
        """The context of `cfg` on `source` (a block source) in this process; `device`: already
        resolved by the caller (`this_rank_device`)."""
        dist = current()
        device = this_rank_device(cfg.device, dist) if device is None else device
        return cls(device=device, store=torch.device("cpu") if cfg.offload_activations else device, dist=dist,
                   num_blocks=min(cfg.num_blocks or source.num_blocks, source.num_blocks))
