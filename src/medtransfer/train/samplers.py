"""Class-balanced training order for imbalanced classification (``data.sampling: balanced``).

LUNA16's candidate list holds about 500 false positives per nodule; drawn uniformly, most batches of 24 hold no
nodule at all. :class:`BalancedClassSampler` keeps the epoch length (one draw per training case) but gives every class
the same share of it: each class is drawn through fresh random permutations of its members, repeated as often as its
share needs (so a minority case is drawn ``share / members`` times, rounded up or down, never twice before every other
case of its class has been drawn once), and a majority class is subsampled without replacement. The order comes from
``(seed, epoch)`` alone, as :class:`~medtransfer.train.distributed.EpochShuffleSampler`'s does, and shards across
ranks the same way, so a resumed run sees the same batches.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch

from ..errors import MedTransferError
from .distributed import get_rank, get_world_size


class BalancedClassSampler(torch.utils.data.Sampler):
    """Indices of a dataset whose item ``i`` has class ``classes[i]``: ``len(classes)`` draws per epoch, split
    equally between the classes present (the remainder of the division to classes chosen at random per epoch)."""

    def __init__(self, classes: Sequence[int], seed: int = 0, *, rank: Optional[int] = None,
                 world_size: Optional[int] = None) -> None:
        if not classes:
            raise ValueError("BalancedClassSampler: no training cases")
        self.classes = [int(c) for c in classes]
        self.members = {c: [i for i, k in enumerate(self.classes) if k == c] for c in sorted(set(self.classes))}
        self.seed = int(seed)
        self._rank, self._world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _shard(self) -> tuple[int, int]:
        world = self._world_size if self._world_size is not None else get_world_size()
        return (self._rank if self._rank is not None else get_rank()), world

    def __len__(self) -> int:
        return -(-len(self.classes) // self._shard()[1])

    def epoch_order(self) -> list[int]:
        """All ranks' draws of the current epoch, before sharding."""
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)  # the stream of EpochShuffleSampler for (seed, epoch)
        n, labels = len(self.classes), list(self.members)
        share = [n // len(labels)] * len(labels)
        for j in torch.randperm(len(labels), generator=g)[: n % len(labels)].tolist():
            share[j] += 1
        draws: list[int] = []
        for c, k in zip(labels, share):
            idx = torch.tensor(self.members[c])
            rounds = -(-k // len(idx))
            draws += torch.cat([idx[torch.randperm(len(idx), generator=g)] for _ in range(rounds)])[:k].tolist()
        return [draws[i] for i in torch.randperm(n, generator=g).tolist()]

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order()
        rank, world = self._shard()
        total = len(self) * world
        order += order[: total - len(order)]  # pad by wrapping, as DistributedSampler does
        return iter(order[rank:total:world])


def balanced_sampler(targets: Sequence, seed: int, where: str) -> BalancedClassSampler:
    """The sampler for the training targets (one class index per case); multi-label or missing targets are
    refused, naming ``where`` (the dataset)."""
    if any(t is None or isinstance(t, (list, tuple)) for t in targets):
        raise MedTransferError(f"data.sampling: balanced needs one class per training case; {where} has multi-label "
                               "or missing targets: use data.sampling: shuffle")
    return BalancedClassSampler([int(t) for t in targets], seed)
