"""Distributed helpers for the loop: process-group start under ``torchrun``, rank queries, object gathering, and the
epoch-seeded sampler that makes data order a function of ``(seed, epoch)`` only.

The sampler follows ``torch.utils.data.DistributedSampler``'s contract (``set_epoch``; pad the permutation to a
multiple of the world size; rank ``r`` takes every ``world_size``-th index from ``r``), so one process with batch
``B * W`` sees the same samples per step as ``W`` ranks with batch ``B`` each.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

__all__ = [
    "EpochShuffleSampler",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "get_rank",
    "get_world_size",
    "all_gather_object",
    "barrier",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed() -> tuple[int, int]:
    """Start the process group when launched by ``torchrun`` with ``WORLD_SIZE > 1`` (nccl on CUDA, gloo on CPU);
    a no-op when already started or single-process. Returns ``(rank, world_size)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return get_rank(), get_world_size()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` when single-process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


class EpochShuffleSampler(torch.utils.data.Sampler):
    """Indices ``0..dataset_len-1`` in an order drawn from ``(seed, epoch)`` alone; sharded across ranks.

    ``rank``/``world_size`` default to the process group's, read when iterating, so a loader built before
    :func:`init_distributed` still shards. ``shuffle=False`` keeps the natural order (validation).
    """

    def __init__(
        self,
        dataset_len: int,
        seed: int = 0,
        *,
        shuffle: bool = True,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> None:
        if dataset_len <= 0:
            raise ValueError(f"dataset_len must be > 0, got {dataset_len}")
        self.dataset_len = int(dataset_len)
        self.seed = int(seed)
        self.shuffle = shuffle
        self._rank = rank
        self._world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _shard(self) -> tuple[int, int]:
        world = self._world_size if self._world_size is not None else get_world_size()
        rank = self._rank if self._rank is not None else get_rank()
        return rank, world

    def __len__(self) -> int:
        _, world = self._shard()
        return -(-self.dataset_len // world)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator()
            # One stream per (seed, epoch); the large odd multiplier keeps (seed, epoch + 1) != (seed + 1, epoch).
            g.manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            order = list(range(self.dataset_len))
        rank, world = self._shard()
        total = len(self) * world
        order += order[: total - len(order)]  # pad by wrapping, as DistributedSampler does
        return iter(order[rank:total:world])
