"""Samples for pretraining: random patches of prepared volumes, ready-made Genesis cubes, two views for VolF.

Every dataset draws from a generator seeded by (seed, epoch, index), so a sample depends on nothing but those three
numbers: the same run gives the same samples with any number of loader workers, and a resumed run replays them.
Validation batches are drawn once, with a fixed generator, and kept (:func:`fixed_batches`), so the validation loss
of a pretext task moves only with the weights (Models Genesis validated on fresh random corruptions each time,
which made its early stopping chase noise).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.sampling import random_crop
from ..errors import MedTransferError


class _Seeded(Dataset):
    seed = 0
    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(int(self.rng(index).integers(2**62)))


class VolumePatches(_Seeded):
    """One random patch ``(1, *patch_size)`` per case and epoch from a :class:`~medtransfer.data.cache.PreparedCache`
    (labels, if any, are ignored). A volume smaller than the patch is padded with ``pad_value``."""

    def __init__(self, cache, case_ids: Sequence[str], patch_size: Sequence[int], *, seed: int = 0,
                 pad_value: float = 0.0) -> None:
        if not case_ids:
            raise MedTransferError("no volumes to pretrain on (the split left this part empty)")
        self.cache, self.case_ids = cache, list(case_ids)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.seed, self.pad_value = int(seed), float(pad_value)

    def __len__(self) -> int:
        return len(self.case_ids)

    def _patch(self, index: int, size: Sequence[int]) -> np.ndarray:
        image, _, _ = self.cache.load(self.case_ids[index])
        if image.ndim == len(size) + 1:  # (C, *spatial): pretext tasks use the first channel
            image = image[0]
        patch, _ = random_crop(image, None, tuple(size), self.rng(index), value=self.pad_value)
        return np.ascontiguousarray(patch, dtype=np.float32)

    def __getitem__(self, index: int) -> dict[str, Any]:
        patch = self._patch(index, self.patch_size)
        return {"image": torch.from_numpy(patch)[None], "label": torch.zeros((), dtype=torch.int64),
                "case_id": self.case_ids[index]}


class CubeArray(_Seeded):
    """Ready-made Models Genesis cubes ``(N, z, y, x)`` (``medtransfer data cubes`` or an official ``bat_*.npy``)."""

    def __init__(self, cubes: np.ndarray, indices: Sequence[int], *, seed: int = 0) -> None:
        if len(indices) == 0:
            raise MedTransferError("no cubes to pretrain on (the split left this part empty)")
        self.cubes, self.indices, self.seed = cubes, [int(i) for i in indices], int(seed)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        cube = np.array(self.cubes[self.indices[index]], dtype=np.float32)  # a writable copy of a memmap row
        return {"image": torch.from_numpy(cube)[None], "label": torch.zeros((), dtype=torch.int64),
                "case_id": f"cube_{self.indices[index]}"}


class TwoViews(VolumePatches):
    """Volume Fusion's input pair: a random region of up to ``region_scale`` x the patch size, then
    :func:`~medtransfer.pretext.volume_fusion.crop_two_views` (random-resized crops, flips, contrast, gamma,
    joint inversion) -> ``image`` = view 1, ``label`` = view 2; the loop fuses them on the device."""

    def __init__(self, cache, case_ids: Sequence[str], patch_size: Sequence[int], *, seed: int = 0,
                 pad_value: float = 0.0, region_scale: float = 1.5, view_options: Optional[dict] = None) -> None:
        super().__init__(cache, case_ids, patch_size, seed=seed, pad_value=pad_value)
        self.region_scale = float(region_scale)
        self.view_options = dict(view_options or {})

    def __getitem__(self, index: int) -> dict[str, Any]:
        from .volume_fusion import crop_two_views

        image, _, _ = self.cache.load(self.case_ids[index])
        shape = image.shape[-len(self.patch_size):]
        region = [min(s, max(p, math.ceil(p * self.region_scale))) for s, p in zip(shape, self.patch_size)]
        volume = torch.from_numpy(self._patch(index, region))[None]
        view1, view2 = crop_two_views(volume, self.patch_size, generator=self.generator(index), **self.view_options)
        return {"image": view1.float(), "label": view2.float(), "case_id": self.case_ids[index]}


def fixed_batches(dataset: Dataset, *, batch_size: int, count: int,
                  transform: Optional[Callable[..., tuple[torch.Tensor, torch.Tensor]]] = None,
                  seed: int = 0) -> list[dict[str, Any]]:
    """Up to ``count`` batches of ``dataset`` in index order, each sample at most once (the last batch may be
    shorter), passed once through ``transform(image, label, generator=...)`` with a fixed generator: a validation
    set that never changes."""
    from ..train.torchdata import collate

    gen = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, min(len(dataset), count * batch_size), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        if transform is not None:
            batch["image"], batch["label"] = transform(batch["image"], batch["label"], generator=gen)
        batches.append(batch)
    return batches


class LossOnlyMetrics:
    """The metric interface of the loop for tasks scored by their loss alone (restoration, multi-head)."""

    def reset(self) -> None:
        pass

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        pass

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def merge(self, states) -> None:
        pass

    def compute(self) -> dict[str, float]:
        return {}
