"""Patch sampling for training and padding for full-volume inference.

Arrays follow the medtransfer convention: the spatial axes are the *last* ``len(size)`` axes, anything in front
(channels) is carried along. Crops read only the patch, so a memory-mapped cached case (``np.load(mmap_mode="r")``)
is never loaded whole. A volume smaller than the patch is padded (centred) up to the patch size.

Randomness comes only from the ``np.random.Generator`` passed in: the same generator state gives the same patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import MedTransferError

_TORCH_MODES = {"constant": "constant", "edge": "replicate", "replicate": "replicate", "reflect": "reflect"}


def _size(size: int | Sequence[int], array: Any, label: Any | None) -> tuple[int, ...]:
    if isinstance(size, (int, np.integer)):  # a cube over the label's axes (spatial only), else over up to 3 axes
        size = (int(size),) * (label.ndim if label is not None else min(3, array.ndim))
    size = tuple(int(s) for s in size)
    if len(size) > array.ndim or any(s < 1 for s in size):
        raise MedTransferError(f"patch size {size} does not fit an array of shape {tuple(array.shape)}")
    return size


def _start_range(shape: Sequence[int], size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest allowed start per axis; on an axis shorter than the patch both are the centred start."""
    shape_a, size_a = np.asarray(shape), np.asarray(size)
    hi = shape_a - size_a
    lo = np.minimum(hi // 2, 0)  # negative only when the volume is smaller: the patch then overhangs both sides
    hi = np.maximum(hi, lo)
    return lo, hi


def extract_patch(array: Any, start: Sequence[int], size: Sequence[int], value: float = 0) -> Any:
    """``array[..., start:start+size]`` over the last ``len(size)`` axes, padded with ``value`` where it overhangs."""
    n = len(size)
    shape = array.shape[-n:]
    lo = [max(0, s) for s in start]
    hi = [min(d, s + k) for d, s, k in zip(shape, start, size)]
    lead = (slice(None),) * (array.ndim - n)
    patch = array[lead + tuple(slice(a, b) for a, b in zip(lo, hi))]
    pads = [(a - s, s + k - b) for a, b, s, k in zip(lo, hi, start, size)]
    if any(p != (0, 0) for p in pads):
        patch = _pad(patch, pads, "constant", value)
    return patch if not isinstance(patch, np.ndarray) else np.array(patch)  # a copy: detaches from a memmap


def random_crop(
    image: Any, label: Any | None, size: int | Sequence[int], rng: np.random.Generator, *, value: float = 0
) -> tuple[Any, Any | None]:
    """A patch at a uniformly random position (the same for image and label)."""
    size_t = _size(size, image, label)
    shape = image.shape[-len(size_t):]
    lo, hi = _start_range(shape, size_t)
    start = rng.integers(lo, hi + 1)
    return _crop_pair(image, label, start, size_t, value)


def balanced_crop(
    image: Any,
    label: Any,
    size: int | Sequence[int],
    rng: np.random.Generator,
    fg_ratio: float = 0.33,
    *,
    value: float = 0,
    foreground: np.ndarray | None = None,
) -> tuple[Any, Any]:
    """With probability ``fg_ratio`` a patch centred on a random foreground voxel (label > 0), moved inside the
    volume where the centre is near an edge; otherwise (or when the label is empty) a random patch.

    ``foreground``: flat indices of the foreground voxels (``np.flatnonzero(label > 0)``) when the caller has them
    already, so a large label is not scanned on every draw.
    """
    if not 0 <= fg_ratio <= 1:
        raise MedTransferError(f"fg_ratio={fg_ratio} must lie in [0, 1]")
    size_t = _size(size, image, label)
    n = len(size_t)
    shape = image.shape[-n:]
    lo, hi = _start_range(shape, size_t)
    if rng.random() < fg_ratio:
        if foreground is None:
            spatial = np.asarray(label).reshape(-1, *shape).any(axis=0) if np.ndim(label) > n else np.asarray(label)
            foreground = np.flatnonzero(spatial > 0)
        if len(foreground):
            centre = np.asarray(np.unravel_index(foreground[rng.integers(len(foreground))], shape))
            start = np.clip(centre - np.asarray(size_t) // 2, lo, hi)
            return _crop_pair(image, label, start, size_t, value)
    return _crop_pair(image, label, rng.integers(lo, hi + 1), size_t, value)


def _crop_pair(image: Any, label: Any | None, start: np.ndarray, size: tuple[int, ...], value: float):
    start_l = [int(s) for s in start]
    image_patch = extract_patch(image, start_l, size, value)
    return image_patch, (extract_patch(label, start_l, size, 0) if label is not None else None)


# -------------------------------------------------------------------------------------------------- padding


@dataclass(frozen=True)
class PadSpec:
    """What :func:`pad_to_multiple` added: ``(before, after)`` per trailing spatial axis, and the shape before."""

    pads: tuple[tuple[int, int], ...]
    shape: tuple[int, ...]


def pad_to_multiple(
    array: Any,
    multiple: int | Sequence[int],
    mode: str = "constant",
    value: float = 0,
    *,
    spatial_dims: int | None = None,
) -> tuple[Any, PadSpec]:
    """Pad the spatial axes (the last ``spatial_dims``, default ``len(multiple)`` or 3) up to a multiple of the
    network stride, split evenly before and after. Works on numpy arrays and torch tensors (on their device).

    ``mode``: ``"constant"`` (with ``value``), ``"edge"`` or ``"reflect"``. :func:`unpad` undoes it exactly, also on
    a prediction with another channel count.
    """
    if isinstance(multiple, (int, np.integer)):
        n = spatial_dims or min(3, array.ndim)
        multiple = (int(multiple),) * n
    multiple = tuple(int(m) for m in multiple)
    n = len(multiple)
    if spatial_dims is not None and spatial_dims != n:
        raise MedTransferError(f"multiple {multiple} has {n} values but spatial_dims={spatial_dims}")
    if n > array.ndim or any(m < 1 for m in multiple):
        raise MedTransferError(f"cannot pad an array of shape {tuple(array.shape)} to multiples of {multiple}")
    shape = tuple(int(s) for s in array.shape[-n:])
    totals = [(-s) % m for s, m in zip(shape, multiple)]
    pads = tuple((t // 2, t - t // 2) for t in totals)
    padded = _pad(array, list(pads), mode, value)
    return padded, PadSpec(pads, shape)


def unpad(padded: Any, pad_spec: PadSpec) -> Any:
    """Remove what :func:`pad_to_multiple` added (on the trailing spatial axes)."""
    n = len(pad_spec.pads)
    index = tuple(slice(a, a + s) for (a, _), s in zip(pad_spec.pads, pad_spec.shape))
    return padded[(slice(None),) * (padded.ndim - n) + index]


def _pad(array: Any, pads: list[tuple[int, int]], mode: str, value: float) -> Any:
    """Pad the trailing axes of a numpy array or torch tensor; ``pads`` per trailing axis."""
    if mode not in _TORCH_MODES:
        raise MedTransferError(f"padding mode {mode!r}; use 'constant', 'edge' or 'reflect'")
    if all(p == (0, 0) for p in pads):
        return array
    if isinstance(array, np.ndarray):
        full = [(0, 0)] * (array.ndim - len(pads)) + list(pads)
        if mode == "constant":
            return np.pad(array, full, mode="constant", constant_values=value)
        return np.pad(array, full, mode="edge" if mode in ("edge", "replicate") else "reflect")
    import torch.nn.functional as F

    flat = [p for pair in reversed(pads) for p in pair]  # torch wants the last axis first
    if mode == "constant":
        return F.pad(array, flat, mode="constant", value=value)
    # replicate/reflect need a batch and channel axis in front of the spatial ones
    lead = array.shape[: array.ndim - len(pads)]
    x = array.reshape(1, -1, *array.shape[array.ndim - len(pads):])
    out = F.pad(x, flat, mode=_TORCH_MODES[mode])
    return out.reshape(*lead, *out.shape[2:])
