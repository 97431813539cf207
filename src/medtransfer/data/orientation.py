"""Where voxels are in the world, and the one canonical orientation every image is brought to.

Geometry convention (see :class:`~medtransfer.data.types.Image`): everything is in *array* axis order. A 3D array is
indexed ``[z, y, x]``; ``spacing``, ``origin`` and the rows and columns of ``direction`` are the reverse of
SimpleITK's ``(x, y, z)`` ones, so world coordinates are LPS written in the order (S, P, L). The world position of
voxel ``idx`` is ``origin + direction.T @ (idx * spacing)``; :func:`voxel_to_world` computes it.

Canonical orientation (what :func:`medtransfer.data.io.read_image` returns by default, and what the
:class:`~medtransfer.data.preprocess.Reorient` step produces): the array axes are permuted and flipped until
``direction`` is as close to the identity as possible, i.e. array axis 0 runs towards Superior, axis 1 towards
Posterior and axis 2 towards patient Left (SimpleITK's "LPS identity": x -> L, y -> P, z -> S). Only whole axes move,
so no voxel is interpolated and every voxel keeps its world position (the origin moves to the voxel that becomes
index 0). Oblique scans keep their residual rotation in ``direction``. :func:`reorient_to_canonical` records the
original shape, geometry, permutation and flips in ``image.meta["original"]``; :func:`undo_reorientation` uses it to
bring a prediction made in canonical space back to the orientation and geometry the input had on disk.

One algorithm (:func:`canonical_axes`) decides the permutation for both reading and preprocessing, so an image read
with ``reorient=False`` and passed through ``Reorient`` lands on exactly the grid ``read_image`` would have given.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import DataError
from .types import Image


def voxel_to_world(image: Image, index) -> np.ndarray:
    """World (LPS, array order) positions of voxel indices ``index`` (shape ``(..., spatial_dims)``)."""
    idx = np.asarray(index, float) * np.asarray(image.spacing, float)
    return np.asarray(image.origin, float) + idx @ np.asarray(image.direction, float)


def canonical_axes(direction: np.ndarray) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """Which old axis becomes each new axis, and whether it is flipped, to bring ``direction`` near the identity.

    New axis ``a`` is the old axis most aligned with world axis ``a``; pairs are taken largest cosine first so an
    oblique scan still maps one-to-one."""
    m = np.abs(np.asarray(direction, float))
    n = m.shape[0]
    perm = [-1] * n
    for flat in np.argsort(-m, axis=None, kind="stable"):
        old, new = divmod(int(flat), n)
        if perm[new] < 0 and old not in perm:
            perm[new] = old
    flips = tuple(bool(direction[perm[a], a] < 0) for a in range(n))
    return tuple(perm), flips


def permute_axes(image: Image, perm: Sequence[int], flips: Sequence[bool], meta: dict[str, Any] | None = None) -> Image:
    """``image`` with spatial axis ``a`` taken from old axis ``perm[a]``, reversed where ``flips[a]``; channels stay
    in front and every voxel keeps its world position. ``meta`` replaces a copy of ``image.meta`` when given.

    Shared by :func:`reorient_to_canonical` and the ``Reorient`` preprocessing step, which apply the image's
    permutation to its label too (a label must follow the image even if its own header is slightly off)."""
    d, nc = image.spatial_dims, image.array.ndim - image.spatial_dims
    direction = np.asarray(image.direction, float)
    arr = image.array.transpose(tuple(range(nc)) + tuple(nc + p for p in perm))
    flip_axes = tuple(nc + a for a in range(d) if flips[a])
    arr = np.ascontiguousarray(np.flip(arr, flip_axes) if flip_axes else arr)
    first = np.zeros(d)  # old index of the voxel that becomes index 0
    for a in range(d):
        if flips[a]:
            first[perm[a]] = image.spatial_shape[perm[a]] - 1
    origin = voxel_to_world(image, first)
    signs = np.where(flips, -1.0, 1.0)[:, None]
    return Image(
        array=arr,
        spacing=tuple(float(image.spacing[p]) for p in perm),
        origin=tuple(float(o) for o in origin),
        direction=direction[list(perm)] * signs,
        path=image.path,
        meta=dict(image.meta) if meta is None else meta,
    )


def _original(image: Image, perm, flips) -> dict[str, Any]:
    """The ``meta["original"]`` record: the geometry ``image`` had and the permutation/flips that left it."""
    return {
        "shape": list(image.spatial_shape), "spacing": list(image.spacing), "origin": list(image.origin),
        "direction": np.asarray(image.direction, float).tolist(), "perm": list(perm), "flips": list(flips),
    }  # fmt: skip


def reorient_to_canonical(image: Image) -> Image:
    """Permute/flip the array to the canonical orientation (module docstring); world positions are unchanged."""
    d = image.spatial_dims
    direction = np.asarray(image.direction, float)
    perm, flips = canonical_axes(direction)
    meta = dict(image.meta, original=_original(image, perm, flips))
    if perm == tuple(range(d)) and not any(flips):
        return Image(image.array, image.spacing, image.origin, direction, image.path, meta)
    return permute_axes(image, perm, flips, meta)


def undo_reorientation(image: Image, like: Image) -> Image:
    """``image`` (e.g. a prediction on ``like``'s canonical grid) in the orientation and geometry ``like`` was read in.

    ``like`` without ``meta["original"]`` (built by hand) just lends its geometry; the spatial shapes must match."""
    orig = like.meta.get("original")
    if orig is None:
        orig = _original(like, range(like.spatial_dims), [False] * like.spatial_dims)
    perm, flips = orig["perm"], orig["flips"]
    expected = tuple(orig["shape"][p] for p in perm)
    if image.spatial_shape != expected:
        raise DataError(
            f"cannot write the image back in the geometry of {like.path}: its spatial shape {image.spatial_shape} "
            f"differs from that image's {expected}; resample or un-crop the prediction to that grid first."
        )
    nc, d = image.array.ndim - len(expected), len(expected)
    arr = image.array
    flip_axes = tuple(nc + a for a in range(d) if flips[a])
    if flip_axes:
        arr = np.flip(arr, flip_axes)
    arr = arr.transpose(tuple(range(nc)) + tuple(nc + int(i) for i in np.argsort(perm)))
    return Image(
        array=np.ascontiguousarray(arr),
        spacing=tuple(orig["spacing"]),
        origin=tuple(orig["origin"]),
        direction=np.asarray(orig["direction"], float),
        path=image.path,
        meta={k: v for k, v in image.meta.items() if k != "original"},
    )
