"""Bounding boxes in voxels and in the world, boxes from masks, and boxes put back on the grid a scan came on.

Two forms (see ``briefs/DETECTION_API.md``, the contract the detection code is written against):

* **voxel boxes** ``(N, 2 * dims)`` float, corner mode in *array* axis order ``(lo_0, .., lo_{d-1}, hi_0, ..,
  hi_{d-1})``, in continuous index coordinates where voxel ``i`` spans ``[i, i + 1)``: one voxel ``i`` is the box
  ``[i, i + 1)`` and the size is ``hi - lo``. This is MONAI's ``StandardMode`` (``"xyzxyz"``/``"xyxy"``) with
  MONAI's first axis = our first array axis. The *centre* of voxel ``i`` is at ``i + 0.5`` here, while
  :class:`~medtransfer.data.geometry.Grid` (and SimpleITK) put it at index ``i``: the conversions shift by 0.5.
* **world boxes** ``(N, 2 * dims)``, MONAI's ``"cccwhd"`` (``"ccwh"`` in 2D) in LPS millimetres on the *world* axes
  ``(x, y, z)`` = (L, P, S): centre and size of the world-axis-aligned box. medtransfer's world vectors are in array
  order (S, P, L), so the conversions reverse the order. LUNA16's ``coordX, coordY, coordZ`` and MONAI's LUNA16
  datalists are in this frame (MONAI's transforms turn the RAS affine of its ITK reader back to LPS for them,
  ``affine_lps_to_ras=True``); a nodule of diameter ``d`` is the cube ``w = h = d``.

A box through a rotated (oblique) grid becomes the axis-aligned hull of its ``2 ** dims`` mapped corners, so it
grows; its centre is exact for any direction (the hull of a parallelepiped is centred on the parallelepiped's
centre). On axis-aligned grids, flipped, permuted or anisotropic, the conversions are exact inverses.
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from ..errors import DataError
from .geometry import Grid, index_map, original_grid

__all__ = [
    "as_boxes", "box_centres", "box_iou", "boxes_from_mask", "boxes_to_original", "clip_boxes", "voxel_to_world",
    "world_to_voxel",
]  # fmt: skip


def as_boxes(boxes: Any, dims: int, what: str = "boxes") -> np.ndarray:
    """``boxes`` as a float64 ``(N, 2 * dims)`` array; ``()``/``[]`` is ``(0, 2 * dims)``."""
    arr = np.asarray(boxes if len(boxes) else np.zeros((0, 2 * dims)), float)
    if arr.ndim == 1 and arr.size == 2 * dims:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 2 * dims:
        raise DataError(f"{what}: shape {arr.shape}, expected (N, {2 * dims}) for {dims}D boxes")
    return arr


def _corners(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``(N, 2 ** d, d)`` corners of boxes given by their low and high corners ``(N, d)``."""
    picks = np.array(list(itertools.product((0, 1), repeat=lo.shape[1])), bool)  # (2**d, d)
    return np.where(picks[None], hi[:, None], lo[:, None])


def _hull(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return points.min(axis=1), points.max(axis=1)


def voxel_to_world(boxes: Any, grid: Grid) -> np.ndarray:
    """World ``cccwhd`` (``ccwh`` in 2D) boxes of voxel boxes on ``grid``."""
    d = grid.dims
    b = as_boxes(boxes, d)
    world = grid.to_world(_corners(b[:, :d], b[:, d:]) - 0.5)[..., ::-1]  # array order (S, P, L) -> (x, y, z)
    lo, hi = _hull(world)
    return np.concatenate([(lo + hi) / 2, hi - lo], axis=1)


def world_to_voxel(world_boxes: Any, grid: Grid) -> np.ndarray:
    """Voxel boxes on ``grid`` of world ``cccwhd`` (``ccwh``) boxes; the inverse of :func:`voxel_to_world`."""
    d = grid.dims
    w = as_boxes(world_boxes, d, "world boxes")
    centre, size = w[:, :d], w[:, d:]
    corners = _corners(centre - size / 2, centre + size / 2)[..., ::-1]  # (x, y, z) -> array order
    lo, hi = _hull(grid.to_index(corners) + 0.5)
    return np.concatenate([lo, hi], axis=1)


def clip_boxes(boxes: Any, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(boxes clipped to [0, shape], keep)``: ``keep`` marks the boxes with a positive size after clipping."""
    d = len(shape)
    b = as_boxes(boxes, d).copy()
    upper = np.tile(np.asarray(shape, float), 2)
    b = np.clip(b, 0.0, upper)
    keep = (b[:, d:] > b[:, :d]).all(axis=1)
    return b, keep


def box_centres(boxes: Any) -> np.ndarray:
    """``(N, d)`` centres of voxel (corner-mode) boxes."""
    b = np.asarray(boxes, float)
    d = b.shape[-1] // 2
    return (b[..., :d] + b[..., d:]) / 2


def box_iou(a: Any, b: Any) -> np.ndarray:
    """``(N, M)`` intersection over union of corner-mode boxes ``a`` ``(N, 2d)`` and ``b`` ``(M, 2d)``; a pair
    with an empty union (two zero-size boxes) has IoU 0."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    d = a.shape[-1] // 2
    lo = np.maximum(a[:, None, :d], b[None, :, :d])
    hi = np.minimum(a[:, None, d:], b[None, :, d:])
    inter = np.clip(hi - lo, 0, None).prod(axis=-1)
    vol_a = np.clip(a[:, d:] - a[:, :d], 0, None).prod(axis=-1)
    vol_b = np.clip(b[:, d:] - b[:, :d], 0, None).prod(axis=-1)
    union = vol_a[:, None] + vol_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def boxes_from_mask(
    mask: np.ndarray, *, instances: bool, classes: Mapping[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(voxel boxes (N, 2d) float64, labels (N,) int64)`` of the objects of ``mask`` (spatial array).

    ``instances=True``: each non-zero value is one object (its voxels need not touch), labelled 1, or
    ``classes[value]`` when a mapping is given. ``instances=False``: a binary or multi-class mask; each connected
    component of each class (full connectivity: voxels touching at a corner belong together) is one object labelled
    with its class value. Objects come in the order of their value, then of their first voxel in array order.
    """
    mask = np.asarray(mask)
    if mask.dtype.kind == "f":
        if not np.array_equal(mask, np.round(mask)):
            raise DataError("boxes_from_mask: the mask has fractional values; give integer labels")
        mask = mask.astype(np.int64)
    d = mask.ndim
    boxes: list[list[float]] = []
    labels: list[int] = []

    def add(slices, label: int) -> None:
        boxes.append([float(s.start) for s in slices] + [float(s.stop) for s in slices])
        labels.append(label)

    if instances:
        ids = [int(v) for v in np.unique(mask) if v != 0]
        if ids and min(ids) < 0:
            raise DataError(f"boxes_from_mask: negative instance id {min(ids)}; instance ids must be positive")
        missing = [i for i in ids if classes is not None and i not in classes]
        if missing:
            raise DataError(f"boxes_from_mask: instances {missing} have no class in the mapping; add them")
        found = ndimage.find_objects(np.where(mask > 0, mask, 0).astype(np.int64)) if ids else []
        for i in ids:
            add(found[i - 1], 1 if classes is None else int(classes[i]))
    else:
        structure = ndimage.generate_binary_structure(d, d)
        for value in (int(v) for v in np.unique(mask) if v != 0):
            components, n = ndimage.label(mask == value, structure=structure)
            for slices in ndimage.find_objects(components)[:n]:
                add(slices, value)
    return np.asarray(boxes, float).reshape(-1, 2 * d), np.asarray(labels, np.int64)


def boxes_to_original(prepared_boxes: Any, meta: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(voxel boxes on the original image grid, world cccwhd boxes)`` of voxel boxes on a prepared array.

    ``meta`` is the preprocessing record :meth:`PreparedCache.load` returns (``shape``, ``spacing``, ``origin``,
    ``direction``, ``preprocess``). The voxel boxes go through the index map between the two grids (one hull of
    the mapped corners), the world boxes straight from the prepared grid."""
    prepared = Grid.of(meta)
    d = prepared.dims
    b = as_boxes(prepared_boxes, d, "prepared boxes")
    original = original_grid(prepared, meta.get("preprocess", []))
    matrix, offset = index_map(original, prepared)
    corners = _corners(b[:, :d], b[:, d:]) - 0.5
    lo, hi = _hull(corners @ matrix.T + offset + 0.5)
    return np.concatenate([lo, hi], axis=1), voxel_to_world(b, prepared)
