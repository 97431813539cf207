"""Volume Fusion (VolF): pseudo-segmentation of two fused sub-volumes, as a pretext task for 3D segmentation networks.

Paper: G. Wang, J. Wu, X. Luo, X. Liu, K. Li, S. Zhang, "MIS-FM: 3D Medical Image Segmentation using Foundation
Models Pretrained on a Large-Scale Unannotated Dataset", arXiv:2306.16925, 2023. Published code: PyMIC (G. Wang et al.,
"PyMIC: A deep learning toolkit for annotation-efficient medical image segmentation", Computer Methods and Programs
in Biomedicine, 2023), transforms ``Crop4VolumeFusion``, ``VolumeFusion`` and ``VolumeFusionShuffle``.

Pipeline: :func:`crop_two_views` takes two random-resized, flipped, contrast-adjusted crops of one volume; :func:`fuse`
tiles each sample of a batch with blocks of one random size, marks ``floor(foreground_ratio * n_blocks)`` random blocks
as foreground with a class ``k ~ U{1..K}`` (``K = num_classes - 1``) and mixes ``(k/K) * view1 + (1 - k/K) * view2``
voxel-wise; the label ``k`` (0 for background blocks and voxels off the grid) is the segmentation target.
:class:`VolumeFusion` wraps :func:`fuse` / :func:`fuse_shuffle` for the training loop. Layout is medtransfer's
``(N, 1, D, H, W)``; axes are named (D, H, W) and treated alike.

The two views are drawn in :mod:`.volume_fusion_views` (its names are re-exported here).

Deviations from the published code, on purpose (those of the views are listed in :mod:`.volume_fusion_views`):

- Everything runs on torch tensors on the input's device with an explicit ``torch.Generator`` living on that device
  (``None``: torch's global RNG), batched; the published code uses numpy/``random`` per sample. Same algorithm,
  different random streams.
- Block tiling: the published triple Python loop over blocks is replaced by per-axis block indices (``(coord -
  offset) // block``, off-grid coordinates sent to a zero slot) into a per-sample table of block classes padded to
  the largest block count of the batch, expanded axis by axis (:func:`_expand_blocks`), so samples with different
  block sizes share one batch.
- Block-size bounds are clamped to the patch size (a patch smaller than ``block_min`` gets one block of its full size
  on that axis instead of no block at all).

The shuffle variant (:func:`fuse_shuffle`) is medtransfer's own, **not** the published ``VolumeFusionShuffle``.
Both paste blocks of view 1, taken from shuffled grid positions, into view 2 on the grid of :func:`fuse`, with
``floor(foreground_ratio * n_blocks)`` distinct destination blocks and distinct source blocks. The published
transform then blends each pasted block like :func:`fuse` does, ``(k/K) * source + (1 - k/K) * destination`` with
``k ~ U{1..K}`` (``cls_num``, default 5 -> K = 4), and labels it ``k``: ``K + 1`` classes {0..4}. medtransfer
replaces the destination block's voxels by the source block's (the published ``k = K`` case only, no blending) and
labels it 1: two classes {0, 1}, ``num_classes`` ignored. Here the destinations are drawn exactly as in
:func:`fuse`, and a random permutation ``perm`` of the sample's grid blocks gives destination block ``j`` the
source block ``perm[j]`` (same within-block position); a source may coincide with its destination (a fixed point
of the permutation), as in the published pairing of two independent shuffles.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .volume_fusion_views import (  # noqa: F401 - the views' names, re-exported: they lived here before the split
    MAX_OUTPUT_VOXELS,
    PERCENTILE_SAMPLE,
    ViewParams,
    _crop_two_views,
    _draw_view_params,
    _intensity,
    _pair,
    _probability,
    _range,
    _tails,
    _triple,
    crop_two_views,
)


# --- validation ------------------------------------------------------------------------------------------------

def _check_options(num_classes: int, foreground_ratio: float, block_min: Sequence[int],
                   block_max: Sequence[int]) -> tuple[int, float, tuple[int, int, int], tuple[int, int, int]]:
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2 (background plus K >= 1 mixing levels), got "
                         f"{num_classes!r}")
    lo, hi = _triple(block_min, "block_min"), _triple(block_max, "block_max")
    if any(a > b for a, b in zip(lo, hi)):
        raise ValueError(f"block_min must be <= block_max on every axis, got block_min={lo}, block_max={hi}")
    return int(num_classes), _probability(foreground_ratio, "foreground_ratio"), lo, hi


def _check_patches(patch1: torch.Tensor, patch2: torch.Tensor) -> None:
    for name, p in (("patch1", patch1), ("patch2", patch2)):
        if not isinstance(p, torch.Tensor) or p.ndim != 5 or p.shape[1] != 1 or not p.is_floating_point():
            got = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(f"{name} must be a float tensor of shape (N, 1, D, H, W), got {got}")
    if patch1.shape != patch2.shape or patch1.device != patch2.device or patch1.dtype != patch2.dtype:
        raise ValueError(f"patch1 and patch2 must share shape, dtype and device, got {tuple(patch1.shape)} "
                         f"{patch1.dtype} {patch1.device} and {tuple(patch2.shape)} {patch2.dtype} {patch2.device}")
    if patch1.numel() == 0:
        raise ValueError(f"patch1 must not be empty, got shape {tuple(patch1.shape)}")


# --- block grid --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockGrid:
    """The drawn tiling of a batch. ``size``, ``offset``, ``count``: (N, 3) int64 per axis (D, H, W); ``table``:
    (N, max_blocks) int64 class of each block id (0 = background; ids >= ``count.prod(1)`` are unused, 0);
    ``source``: (N, max_blocks) int64 permuted source block id per block (shuffle variant only, else None)."""

    size: torch.Tensor
    offset: torch.Tensor
    count: torch.Tensor
    table: torch.Tensor
    source: torch.Tensor | None = None


def _uniform_int(low: torch.Tensor, high: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Integers uniform in [low, high] (inclusive, elementwise) drawn with torch on ``low``'s device."""
    u = torch.rand(low.shape, generator=generator, device=low.device, dtype=torch.float64)
    return torch.minimum(low + (u * (high - low + 1).double()).long(), high)


def _rank_rows(keys: torch.Tensor) -> torch.Tensor:
    """Rank of each key within its row (0 = smallest): a random permutation when keys are i.i.d. uniform."""
    order = keys.argsort(dim=1)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(keys.shape[1], device=keys.device).expand_as(order).contiguous())
    return ranks


def _draw_blocks(n: int, spatial: Sequence[int], device: torch.device, generator: torch.Generator | None,
                 num_classes: int, foreground_ratio: float, block_min: Sequence[int], block_max: Sequence[int],
                 shuffle: bool = False) -> BlockGrid:
    dims = torch.tensor(list(spatial), device=device)
    lo = torch.tensor(list(block_min), device=device).clamp(max=dims).expand(n, 3)
    hi = torch.tensor(list(block_max), device=device).clamp(max=dims).expand(n, 3)
    size = _uniform_int(lo, hi, generator)
    count = dims.div(size, rounding_mode="floor")
    offset = _uniform_int(torch.zeros_like(size), dims - count * size, generator)
    total = count.prod(dim=1)
    max_blocks = int(total.max())
    unused = torch.arange(max_blocks, device=device) >= total[:, None]
    keys = torch.rand(n, max_blocks, generator=generator, device=device).masked_fill_(unused, 2.0)
    n_foreground = (total.double() * float(foreground_ratio)).floor().long()
    foreground = _rank_rows(keys) < n_foreground[:, None]
    if shuffle:
        classes = torch.ones(n, max_blocks, dtype=torch.long, device=device)
        src_keys = torch.rand(n, max_blocks, generator=generator, device=device).masked_fill_(unused, 2.0)
        source = src_keys.argsort(dim=1)  # a permutation of the used ids in the first `total` places
    else:
        u = torch.rand(n, max_blocks, generator=generator, device=device, dtype=torch.float64)
        classes = 1 + (u * (num_classes - 1)).long().clamp_(max=num_classes - 2)
        source = None
    table = torch.where(foreground, classes, torch.zeros_like(classes))
    return BlockGrid(size=size, offset=offset, count=count, table=table, source=source)


def _axis_index(grid: BlockGrid, spatial: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per axis: block index of every coordinate, (N, dim), and whether the coordinate lies on the grid."""
    out = []
    for axis, dim in enumerate(spatial):
        rel = torch.arange(dim, device=grid.size.device)[None] - grid.offset[:, axis, None]
        idx = rel.div(grid.size[:, axis, None], rounding_mode="floor")
        out.append((idx, (rel >= 0) & (idx < grid.count[:, axis, None])))
    return out


def _expand_blocks(grid: BlockGrid, table: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """Per-block values ``table`` (N, M) broadcast to every voxel: (N, D, H, W), 0 off the grid.

    Equivalent to gathering ``table`` at each voxel's block id ``(i_d * c_h + i_h) * c_w + i_w``, but separable: the
    table is laid out as a small (N, Cd+1, Ch+1, Cw+1) grid (Cx = the batch's largest block count on that axis; the
    last slot is 0, for off-grid coordinates) and expanded one axis at a time, W by a small gather, then H and D by
    selecting whole contiguous rows, so that the full-size step is a row copy instead of a per-voxel gather."""
    n, m = table.shape
    dev = table.device
    c_d, c_h, c_w = (int(c) + 1 for c in grid.count.amax(dim=0).tolist())
    j_d, j_h, j_w = (torch.where(valid, idx, slots - 1)
                     for (idx, valid), slots in zip(_axis_index(grid, spatial), (c_d, c_h, c_w)))
    i, j, k = (torch.arange(c, device=dev) for c in (c_d, c_h, c_w))
    cnt = grid.count[:, :, None, None, None]
    inside = (i.view(-1, 1, 1) < cnt[:, 0]) & (j.view(1, -1, 1) < cnt[:, 1]) & (k.view(1, 1, -1) < cnt[:, 2])
    linear = (i.view(1, -1, 1, 1) * cnt[:, 1] + j.view(1, 1, -1, 1)) * cnt[:, 2] + k.view(1, 1, 1, -1)
    grid3 = torch.where(inside, table.gather(1, linear.clamp(max=m - 1).view(n, -1)).view_as(linear),
                        torch.zeros((), dtype=table.dtype, device=dev))
    d, h, w = spatial
    along_w = grid3.gather(3, j_w.view(n, 1, 1, w).expand(n, c_d, c_h, w))
    base = torch.arange(n, device=dev).view(n, 1, 1) * c_d
    rows_h = ((base + torch.arange(c_d, device=dev).view(1, -1, 1)) * c_h + j_h.view(n, 1, h)).view(-1)
    along_h = along_w.reshape(-1, w).index_select(0, rows_h)
    rows_d = (base.view(n, 1) + j_d).view(-1)
    return along_h.view(n * c_d, h * w).index_select(0, rows_d).view(n, d, h, w)


# --- fusion --------------------------------------------------------------------------------------------------------

def fuse(patch1: torch.Tensor, patch2: torch.Tensor, generator: torch.Generator | None = None, num_classes: int = 5,
         foreground_ratio: float = 0.7, block_min: Sequence[int] = (8, 8, 8),
         block_max: Sequence[int] = (32, 32, 32)) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse two batches of views block-wise; returns ``(fused, label)``.

    patch1, patch2: (N, 1, D, H, W) float, same shape/dtype/device. Per sample: block size per axis ~ U{min..max}
    (bounds clamped to the patch size), grid offset per axis ~ U{0..dim mod block}, ``floor(foreground_ratio *
    n_blocks)`` blocks drawn without replacement get class ``k ~ U{1..K}``, ``K = num_classes - 1``; other blocks and
    voxels off the grid get 0. ``fused = (k/K) * patch1 + (1 - k/K) * patch2`` (as ``torch.lerp``, so k = 0 gives
    patch2 and k = K gives patch1 exactly), same dtype; ``label``: (N, 1, D, H, W) int64 in 0..K.
    """
    _check_patches(patch1, patch2)
    num_classes, foreground_ratio, lo, hi = _check_options(num_classes, foreground_ratio, block_min, block_max)
    n, spatial = patch1.shape[0], patch1.shape[2:]
    grid = _draw_blocks(n, spatial, patch1.device, generator, num_classes, foreground_ratio, lo, hi)
    label = _expand_blocks(grid, grid.table, spatial).unsqueeze(1)
    weight = _expand_blocks(grid, grid.table.to(patch1.dtype) / (num_classes - 1), spatial).unsqueeze(1)
    return torch.lerp(patch2, patch1, weight), label


def fuse_shuffle(patch1: torch.Tensor, patch2: torch.Tensor, generator: torch.Generator | None = None,
                 foreground_ratio: float = 0.7, block_min: Sequence[int] = (8, 8, 8),
                 block_max: Sequence[int] = (32, 32, 32)) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste ``floor(foreground_ratio * n_blocks)`` blocks of patch1, taken from shuffled grid positions, into patch2.

    medtransfer's variant, not the published ``VolumeFusionShuffle`` (which blends each pasted block with a weight
    ``k/K`` and labels it ``k`` in 1..K): here pasted blocks replace patch2's voxels whole and the label is binary.
    Same grid as :func:`fuse`; destination block ``j`` receives patch1's block ``perm[j]`` for a random permutation
    ``perm`` of the sample's blocks (see the module docstring). Returns ``(fused, label)``, label (N, 1, D, H, W)
    int64, 1 on pasted blocks and 0 elsewhere.
    """
    _check_patches(patch1, patch2)
    _, foreground_ratio, lo, hi = _check_options(2, foreground_ratio, block_min, block_max)
    n, spatial = patch1.shape[0], patch1.shape[2:]
    grid = _draw_blocks(n, spatial, patch1.device, generator, 2, foreground_ratio, lo, hi, shuffle=True)
    d, h, w = spatial
    # Linear voxel shift from destination block j to its source block: (block corner of source - of j) per axis.
    c_h, c_w = grid.count[:, 1, None], grid.count[:, 2, None]
    corner = [torch.stack((b // (c_h * c_w), (b // c_w) % c_h, b % c_w), dim=-1) * grid.size[:, None, :]
              for b in (grid.source, torch.arange(grid.table.shape[1], device=patch1.device).expand_as(grid.table))]
    shift = ((corner[0] - corner[1]) * torch.tensor([h * w, w, 1], device=patch1.device)).sum(dim=-1)
    shift = torch.where(grid.table > 0, shift, torch.zeros_like(shift))
    label = _expand_blocks(grid, grid.table, spatial)
    own = torch.arange(d * h * w, device=patch1.device).view(1, d, h, w)
    source_voxel = (own + _expand_blocks(grid, shift, spatial)).view(n, 1, -1)
    pasted = patch1.reshape(n, 1, -1).gather(2, source_voxel).view_as(patch1)
    label = label.unsqueeze(1)
    return torch.where(label > 0, pasted, patch2), label


class VolumeFusion:
    """Batch transform for the training loop: ``(view1, view2) -> (fused, label)`` via :func:`fuse` (or
    :func:`fuse_shuffle` with ``shuffle=True``, where the label is binary and ``num_classes`` is ignored)."""

    def __init__(self, num_classes: int = 5, foreground_ratio: float = 0.7, block_min: Sequence[int] = (8, 8, 8),
                 block_max: Sequence[int] = (32, 32, 32), shuffle: bool = False) -> None:
        self.num_classes, self.foreground_ratio, self.block_min, self.block_max = _check_options(
            num_classes, foreground_ratio, block_min, block_max)
        self.shuffle = bool(shuffle)

    @property
    def label_classes(self) -> int:
        """Number of label values the segmentation head must predict."""
        return 2 if self.shuffle else self.num_classes

    def __call__(self, view1: torch.Tensor, view2: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shuffle:
            return fuse_shuffle(view1, view2, generator, self.foreground_ratio, self.block_min, self.block_max)
        return fuse(view1, view2, generator, self.num_classes, self.foreground_ratio, self.block_min, self.block_max)

    def __repr__(self) -> str:
        return (f"VolumeFusion(num_classes={self.num_classes}, foreground_ratio={self.foreground_ratio}, "
                f"block_min={self.block_min}, block_max={self.block_max}, shuffle={self.shuffle})")
