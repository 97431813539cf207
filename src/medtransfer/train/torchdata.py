"""Torch datasets over a :class:`~medtransfer.data.cache.PreparedCache` (memory-mapped prepared cases).

Batches are dicts ``{"image": float32 (N, C, *spatial), "label": ..., "case_id": list[str]}`` as the training loop
(``train/loop.py``) expects: segmentation labels are int64 ``(N, *spatial)``, classification targets int64 ``(N,)``
(one class per case) or float32 ``(N, K)`` (multi-label 0/1 vectors), detection targets float32
``(N, n_max, 2 * dims + 1)`` (voxel corner box + 1-based label, rows of -1 padding; :class:`BoxPatchDataset`).

Reproducibility: a patch depends only on ``(seed, epoch, index)``; each item draws from its own
``np.random.default_rng([seed, epoch, index])``, so the patches do not depend on worker count, on item order or on
resuming mid-run. The epoch reaches the dataset through :meth:`PatchDataset.set_epoch`, which
:class:`EpochSync` calls whenever the loop calls ``loader.sampler.set_epoch(epoch)``.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..data.cache import PreparedCache
from ..data.sampling import balanced_crop, extract_patch, random_crop
from ..errors import MedTransferError

# nnU-Net samples 1/3 of its patches around foreground (oversample_foreground_percent = 0.33); sampling.py default.
DEFAULT_FG_RATIO = 0.33


def _with_channels(array: np.ndarray, dims: int) -> np.ndarray:
    return array[None] if array.ndim == dims else array


def centre_fit(array: np.ndarray, size: Sequence[int], value: float = 0.0) -> np.ndarray:
    """Centre-crop or pad (with ``value``) the last ``len(size)`` axes of ``array`` to ``size``."""
    shape = array.shape[-len(size):]
    start = [(s - k) // 2 for s, k in zip(shape, size)]  # negative where the array is smaller: padded both sides
    return extract_patch(array, start, tuple(int(k) for k in size), value)


class PatchDataset(Dataset):
    """One random patch per case per epoch for segmentation (2D or 3D).

    ``fg_ratio``: the share of patches centred on a foreground voxel (``balanced_crop``); 0 gives uniform random
    crops. ``pad_value``: the image value where a patch overhangs a small volume (0 after every intensity preset).
    """

    def __init__(
        self,
        cache: PreparedCache,
        case_ids: Sequence[str],
        patch_size: Sequence[int],
        *,
        seed: int = 0,
        fg_ratio: float = DEFAULT_FG_RATIO,
        pad_value: float = 0.0,
    ) -> None:
        if not case_ids:
            raise MedTransferError("PatchDataset: no cases (the split left this part empty)")
        self.cache = cache
        self.case_ids = list(case_ids)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.seed = int(seed)
        self.fg_ratio = float(fg_ratio)
        self.pad_value = float(pad_value)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.case_ids)

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def __getitem__(self, index: int) -> dict[str, Any]:
        case_id = self.case_ids[index]
        image, label, _ = self.cache.load(case_id)
        if label is None:
            raise MedTransferError(f"case {case_id!r} has no label map; segmentation needs one for every training case")
        dims = len(self.patch_size)
        rng = self.rng(index)
        if self.fg_ratio > 0:
            img, lab = balanced_crop(image, label, self.patch_size, rng, self.fg_ratio, value=self.pad_value)
        else:
            img, lab = random_crop(image, label, self.patch_size, rng, value=self.pad_value)
        img = _with_channels(np.asarray(img, dtype=np.float32), dims)
        lab = np.asarray(lab)
        if lab.ndim > dims:  # a (1, *spatial) label map
            lab = lab.reshape(lab.shape[-dims:])
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img)),
            "label": torch.from_numpy(np.ascontiguousarray(lab.astype(np.int64))),
            "case_id": case_id,
        }


class CaseDataset(Dataset):
    """Whole prepared cases for classification, centre-cropped or padded to ``patch_size``.

    Targets come from the cache manifest (``meta["target"]``, written from the dataset description): an int gives
    an int64 scalar, a list a float32 multi-label vector.
    """

    def __init__(
        self, cache: PreparedCache, case_ids: Sequence[str], patch_size: Sequence[int], *, pad_value: float = 0.0
    ) -> None:
        if not case_ids:
            raise MedTransferError("CaseDataset: no cases (the split left this part empty)")
        self.cache = cache
        self.case_ids = list(case_ids)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.pad_value = float(pad_value)

    def set_epoch(self, epoch: int) -> None:  # deterministic items; kept for a uniform interface
        pass

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        case_id = self.case_ids[index]
        image, _, meta = self.cache.load(case_id)
        target = meta.get("target")
        if target is None:
            raise MedTransferError(f"case {case_id!r} has no class target; classification needs one for every case")
        img = centre_fit(_with_channels(np.asarray(image, dtype=np.float32), len(self.patch_size)), self.patch_size,
                         self.pad_value)
        if isinstance(target, (list, tuple)):
            label = torch.tensor([float(t) for t in target], dtype=torch.float32)
        else:
            label = torch.tensor(int(target), dtype=torch.int64)
        return {"image": torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)), "label": label,
                "case_id": case_id}


def max_boxes(cache: PreparedCache, case_ids: Sequence[str]) -> int:
    """The most boxes any of ``case_ids`` has (at least 1): the row count of the padded detection targets."""
    return max([len(cache.boxes(c)[0]) for c in case_ids] + [1])


class BoxPatchDataset(Dataset):
    """Detection patches (2D, 2.5D or 3D): one crop per case per epoch with the boxes inside it.

    With probability ``pos_ratio`` (and when the case has boxes) the crop holds one of its boxes, drawn uniformly,
    whole where the patch is large enough (the box sits anywhere in the patch; MONAI's ``RandCropBoxByPosNegLabeld``
    with ``whole_box``), so that small lesions are seen; else the crop is uniform. Boxes are shifted into the crop,
    clipped to it, and those left empty are dropped. ``label``: float32 ``(n_max, 2 * dims + 1)``, box (voxel
    corners, array order) + 1-based label, rows of -1 padding.
    """

    def __init__(self, cache: PreparedCache, case_ids: Sequence[str], patch_size: Sequence[int], *, n_max: int,
                 seed: int = 0, pos_ratio: float = 0.5, pad_value: float = 0.0) -> None:
        if not case_ids:
            raise MedTransferError("BoxPatchDataset: no cases (the split left this part empty)")
        self.cache, self.case_ids = cache, list(case_ids)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.n_max, self.seed, self.pos_ratio, self.pad_value = int(n_max), int(seed), float(pos_ratio), float(pad_value)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.case_ids)

    def _start(self, shape: Sequence[int], boxes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        size = np.asarray(self.patch_size)
        top = np.maximum(np.asarray(shape) - size, 0)  # a patch larger than the image starts at 0 (padded after)
        d = len(size)
        if len(boxes) and rng.random() < self.pos_ratio:
            box = boxes[rng.integers(len(boxes))]
            lo = np.clip(np.ceil(box[d:] - size), 0, top)  # start at most this low keeps the box's far end inside
            hi = np.clip(np.floor(box[:d]), 0, top)
            lo = np.minimum(lo, hi)  # a box larger than the patch: any start that overlaps it
            return np.array([rng.integers(a, b + 1) for a, b in zip(lo.astype(int), hi.astype(int))])
        return np.array([rng.integers(0, t + 1) for t in top])

    def __getitem__(self, index: int) -> dict[str, Any]:
        case_id = self.case_ids[index]
        image, _, _ = self.cache.load(case_id)
        boxes, labels = self.cache.boxes(case_id)
        d = len(self.patch_size)
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        start = self._start(image.shape[-d:], boxes, rng)
        img = extract_patch(_with_channels(np.asarray(image, dtype=np.float32), d), start, self.patch_size,
                            self.pad_value)
        shifted = boxes.astype(np.float64) - np.concatenate([start, start])
        lo = np.clip(shifted[:, :d], 0, self.patch_size)
        hi = np.clip(shifted[:, d:], 0, self.patch_size)
        keep = (hi > lo).all(axis=1)
        rows = np.concatenate([lo[keep], hi[keep], labels[keep, None].astype(np.float64)], axis=1)
        label = np.full((self.n_max, 2 * d + 1), -1.0, np.float32)
        label[:len(rows)] = rows[: self.n_max]
        return {"image": torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)),
                "label": torch.from_numpy(label), "case_id": case_id}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images and labels; case ids stay a list of strings."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "label": torch.stack([it["label"] for it in items]),
        "case_id": [it["case_id"] for it in items],
    }


class EpochSync(Sampler):
    """Wraps an epoch-seeded sampler so that ``set_epoch`` also reaches the dataset (its patch draws)."""

    def __init__(self, sampler: Sampler, dataset: Dataset) -> None:
        self.sampler = sampler
        self.dataset = dataset

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict() if hasattr(self.sampler, "state_dict") else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if hasattr(self.sampler, "load_state_dict"):
            self.sampler.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:  # e.g. the wrapped sampler's epoch, seed
        if name in ("sampler", "dataset"):
            raise AttributeError(name)
        return getattr(self.sampler, name)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    sampler: Optional[Sampler] = None,
    workers: int = 0,
    drop_last: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader with :func:`collate`; ``sampler`` (training) is wrapped in :class:`EpochSync`."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSync(sampler, dataset) if sampler is not None else None,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        drop_last=drop_last,
        persistent_workers=False,  # workers are rebuilt each epoch, so they see the dataset's new epoch
    )
