"""Voxel grids in the world, and results on a prepared grid put back onto the grid the input came on.

A grid is a spatial shape plus the geometry of :class:`~medtransfer.data.types.Image` (array order, LPS): voxel
``idx`` sits at ``origin + direction.T @ (idx * spacing)``. Two grids are related by an affine map of indices, so
moving values from one to the other is one :func:`scipy.ndimage.affine_transform` per channel: exact, and cheap.

:func:`to_original_grid` inverts the geometric preprocessing steps (``reorient``, ``resample``,
``crop_foreground``) from the records they leave in ``image.meta["preprocess"]``, last step first:

* reorient and resample only change the grid; consecutive ones become a single world-coordinate map, sampled with
  linear interpolation and edge values extended past the last voxel (the convention of the ``Resample`` step);
* a crop is undone by padding: voxels outside the box were never seen by the model and get the background
  (probability 1 for class 0 of a softmax, 0 for a one-channel sigmoid).

The values moved are class **probabilities** (softmax, or sigmoid for one channel), interpolated linearly and only
then turned into labels, as nnU-Net does; nearest-neighbour on a label map shifts boundaries by up to half a voxel
of the coarser grid. The divisor padding of sliding-window inference is cropped off by
:func:`medtransfer.train.inference.sliding_window_predict` itself, so it never reaches this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from scipy import ndimage

from ..errors import DataError
from .preprocess import uncrop
from .types import Image

GEOMETRIC_STEPS = ("reorient", "resample", "crop_foreground")


@dataclass(frozen=True)
class Grid:
    """A spatial shape and its world geometry (array order)."""

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: np.ndarray

    @classmethod
    def of(cls, image: Image | Mapping[str, Any], shape: Sequence[int] | None = None) -> Grid:
        """The grid of an :class:`Image`, or of a cache entry's ``meta`` (``spacing``, ``origin``, ``direction``,
        ``shape`` with channels in front)."""
        if isinstance(image, Image):
            geo = (image.spacing, image.origin, image.direction)
            shape = image.spatial_shape if shape is None else shape
        else:
            geo = (image["spacing"], image["origin"], image["direction"])
            shape = image["shape"][-len(image["spacing"]):] if shape is None else shape
        spacing, origin, direction = geo
        return cls(tuple(int(s) for s in shape), tuple(map(float, spacing)), tuple(map(float, origin)),
                   np.asarray(direction, float))

    @property
    def dims(self) -> int:
        return len(self.shape)

    def to_world(self, index) -> np.ndarray:
        """World positions of indices ``(..., dims)``."""
        return np.asarray(self.origin) + (np.asarray(index, float) * np.asarray(self.spacing)) @ self.direction

    def to_index(self, world) -> np.ndarray:
        """Continuous indices of world positions ``(..., dims)``; the inverse of :meth:`to_world`."""
        rel = np.asarray(world, float) - np.asarray(self.origin)
        return np.linalg.solve(self.direction.T, rel.reshape(-1, self.dims).T).T.reshape(rel.shape) / np.asarray(
            self.spacing)

    def same_as(self, other: Grid, tol: float = 1e-4) -> bool:
        return (self.shape == other.shape and np.allclose(self.spacing, other.spacing, atol=tol)
                and np.allclose(self.origin, other.origin, atol=tol)
                and np.allclose(self.direction, other.direction, atol=tol))


def index_map(src: Grid, dst: Grid) -> tuple[np.ndarray, np.ndarray]:
    """``(matrix, offset)`` with ``src index = matrix @ dst index + offset`` for the same world point."""
    offset = src.to_index(dst.to_world(np.zeros(dst.dims)))
    matrix = np.stack([src.to_index(dst.to_world(np.eye(dst.dims)[a])) - offset for a in range(dst.dims)], axis=1)
    return matrix, offset


def resample_to(array: np.ndarray, src: Grid, dst: Grid, *, order: int = 1) -> np.ndarray:
    """``array`` (``src.shape``, float) sampled at the voxels of ``dst`` by world position; edge values extend."""
    if src.same_as(dst):
        return np.asarray(array, np.float32)
    matrix, offset = index_map(src, dst)
    if np.allclose(matrix, np.diag(np.diag(matrix)), atol=1e-12):
        matrix = np.diag(matrix)  # axis-aligned grids (no rotation between them): scipy's faster zoom path
    out = np.empty(dst.shape, np.float32)
    ndimage.affine_transform(np.asarray(array, np.float32), matrix, offset=offset, output_shape=dst.shape,
                             output=out, order=order, mode="nearest", prefilter=False)
    return out


def undo_chain(prepared: Grid, records: Sequence[Mapping[str, Any]]) -> list[tuple[str, Grid, Grid, Mapping]]:
    """The geometric steps of ``records`` last first, each as ``(step, grid before, grid after, record)``."""
    chain, grid = [], prepared
    for rec in reversed([r for r in records if r.get("step") in GEOMETRIC_STEPS]):
        if rec["step"] == "crop_foreground":
            start = np.array([a for a, _ in rec["box"]], float)
            origin = grid.to_world(-start)
            before = Grid(tuple(rec["shape_before"]), grid.spacing, tuple(origin), grid.direction)
        elif rec["step"] == "resample":
            before = Grid(tuple(rec["shape_before"]), tuple(rec["spacing_before"]), grid.origin, grid.direction)
        else:  # reorient: new axis a was old axis perm[a]
            inv = np.argsort(rec["permutation"])
            before = Grid(tuple(grid.shape[i] for i in inv), tuple(grid.spacing[i] for i in inv),
                          tuple(rec["origin_before"]), np.asarray(rec["direction_before"], float))
        chain.append((rec["step"], before, grid, rec))
        grid = before
    return chain


def original_grid(prepared: Grid, records: Sequence[Mapping[str, Any]]) -> Grid:
    """The grid an image had before the steps of ``records`` made ``prepared`` of it."""
    chain = undo_chain(prepared, records)
    return chain[-1][1] if chain else prepared


def _channel_back(values: np.ndarray, prepared: Grid, chain, fill: float, target: Grid) -> np.ndarray:
    data, at = np.asarray(values, np.float32), prepared  # `at`: the grid `data` is on
    for step, before, after, rec in chain:
        if step != "crop_foreground":
            continue  # grid-only steps are folded into the next world-coordinate map
        data, at = uncrop(resample_to(data, at, after), rec, value=fill), before
    return resample_to(data, at, target)


def probabilities_back(
    probabilities: np.ndarray, prepared: Grid, records: Sequence[Mapping[str, Any]], original: Grid | None = None
) -> Iterator[np.ndarray]:
    """Each channel of ``probabilities`` ``(C, *prepared.shape)`` on the original grid, one at a time.

    ``original`` defaults to the grid the records lead back to; when given it must have the same world geometry
    (a different voxel grid would need its own resampling, which is not what undoing the pipeline means)."""
    chain = undo_chain(prepared, records)
    start = chain[-1][1] if chain else prepared
    target = start if original is None else original
    if not start.same_as(target, tol=1e-3):
        raise DataError(
            f"the prepared image's records lead back to a grid of shape {start.shape}, spacing {start.spacing}, "
            f"origin {start.origin}, not to the original's {target.shape}, {target.spacing}, {target.origin}; "
            "the prediction and the image it should go back to do not belong together"
        )
    n = probabilities.shape[0]
    for c in range(n):
        fill = 1.0 if n > 1 and c == 0 else 0.0  # outside a crop: background
        yield _channel_back(probabilities[c], prepared, chain, fill, target)


def labels_back(probabilities: np.ndarray, prepared: Grid, records: Sequence[Mapping[str, Any]],
                original: Grid | None = None) -> np.ndarray:
    """The label map on the original grid: per-channel :func:`probabilities_back`, then argmax (or ``p > 0.5`` for
    one channel); keeps one channel and the running best in memory, not all of them."""
    best = labels = None
    n = probabilities.shape[0]
    for c, p in enumerate(probabilities_back(probabilities, prepared, records, original)):
        if n == 1:
            return (p > 0.5).astype(np.uint8)
        if best is None:
            best, labels = p, np.zeros(p.shape, np.uint8 if n <= 256 else np.int16)
        else:
            better = p > best
            labels[better], best[better] = c, p[better]
    return labels


def to_original_grid(probabilities: np.ndarray, prepared: Image, original: Image | Grid | None = None) -> np.ndarray:
    """Labels for ``original`` from class ``probabilities`` ``(C, *spatial)`` predicted on ``prepared`` (the
    output of a pipeline on ``original``; its ``meta["preprocess"]`` records say how to undo it)."""
    records = prepared.meta.get("preprocess", [])
    if isinstance(original, Image):
        done = len(original.meta.get("preprocess", []))  # steps applied before the pipeline stay applied
        records, original = records[done:], Grid.of(original)
    return labels_back(probabilities, Grid.of(prepared), records, original)
