"""Splitting work across processes and machines with no coordination but an index.

Ranks come from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) unless given
explicitly; shard i belongs to rank i % world_size. Every stage that works per
shard (download, embed) uses this, so a multi-node run needs nothing but torchrun
(or the same command started with --rank/--world-size on each machine). Training
(DDP) and generation (rows split by index, gathered on rank 0) join torchrun's
process group through ``process_group``.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside 0..{self.world_size - 1}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        return index % self.world_size == self.rank


def current_rank(rank: Optional[int] = None, world_size: Optional[int] = None) -> Rank:
    """Explicit values win; else torchrun's environment; else a single process."""
    env = os.environ
    return Rank(
        rank=int(rank if rank is not None else env.get("RANK", 0)),
        world_size=int(world_size if world_size is not None else env.get("WORLD_SIZE", 1)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
    )


@contextmanager
def process_group(rank: Rank, device=None) -> Iterator[bool]:
    """Join torchrun's process group for the duration of the block, when there is
    more than one process and no group yet (nccl on CUDA, gloo on the CPU).

    Yields whether collectives are available (several processes under torchrun).
    """
    import torch
    import torch.distributed as dist

    if rank.world_size <= 1:
        yield False
        return
    created = False
    if not dist.is_initialized():
        cuda = device is not None and torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
        created = True
    try:
        yield True
    finally:
        if created:
            dist.destroy_process_group()
