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

Deviations from the published code, on purpose:

- Everything runs on torch tensors on the input's device with an explicit ``torch.Generator`` living on that device
  (``None``: torch's global RNG), batched; the published code uses numpy/``random`` per sample. Same algorithm,
  different random streams.
- Block tiling: the published triple Python loop over blocks is replaced by per-axis block indices (``(coord -
  offset) // block``, off-grid coordinates sent to a zero slot) into a per-sample table of block classes padded to
  the largest block count of the batch, expanded axis by axis (:func:`_expand_blocks`), so samples with different
  block sizes share one batch.
- Block-size bounds are clamped to the patch size (a patch smaller than ``block_min`` gets one block of its full size
  on that axis instead of no block at all).
- Crops are resized with ``F.interpolate(mode="trilinear", align_corners=False)`` instead of ``scipy.ndimage.zoom``
  (order 1); the two linear interpolations place samples slightly differently at the borders.
- Contrast, gamma and inversion act on each view after its crop, resize and flips, with the percentiles, minimum and
  maximum of that view (float32 arithmetic for float16/bfloat16 volumes).
- The adaptive contrast no longer works in place and its divisions by ``p0 - min`` and ``max - p1`` (zero for flat
  volumes, giving NaN/Inf in the original) are guarded by ``eps``; a constant volume yields finite output.
- Percentiles are exact, with ``numpy.percentile``'s linear interpolation, but not by sorting the view (the costliest
  step of the pipeline): a strided subsample brackets each wanted order statistic, which is then selected among the
  few voxels beyond the bracket (or counted, for ties at the view's extreme); a missed bracket falls back to
  ``torch.kthvalue``. The gamma power is computed as ``exp(gamma * log(z))`` (float32: within 2e-5 of the float64
  formula on [0, 1]).
- An axis of the volume shorter than ``output_size`` is padded, centred, with the volume's minimum before the crops
  are drawn, so the views keep the volume's voxel size. The published ``random_resized_crop`` does not fail there
  either but stretches: its crop of ``min(int(out * scale), size)`` voxels, at most the whole short axis, is zoomed
  to ``output_size``. The two agree only where every axis is at least ``output_size``; to pretrain as published on
  such data, choose a patch no larger than the smallest volume (or resample the volumes to reach the patch size).
- Range convention: the adaptive contrast maps every view onto [0, 1]; gamma keeps that range; the inversion is
  ``1 - x`` on that range, applied to both views with probability ``invert_rate``. All three belong to the intensity
  step that runs for ``aug_mode`` 1 and 3 only; with ``aug_mode`` 0 or 2 the views keep the volume's intensities.

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

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PERCENTILE_SAMPLE = 1 << 14  # strided subsample that brackets the wanted order statistics (exact either way)
MAX_OUTPUT_VOXELS = 512**3  # crop_two_views refuses larger output sizes (a typo rather than a patch)


# --- validation ------------------------------------------------------------------------------------------------

def _triple(value: Sequence[int], name: str) -> tuple[int, int, int]:
    try:
        out = tuple(int(v) for v in value)
    except TypeError:
        raise ValueError(f"{name} must be three positive integers (D, H, W), got {value!r}") from None
    if len(out) != 3 or min(out) < 1 or any(float(a) != b for a, b in zip(value, out)):
        raise ValueError(f"{name} must be three positive integers (D, H, W), got {value!r}")
    return out  # type: ignore[return-value]


def _range(value: Sequence[float], name: str, low: float, high: float, *,
           open_low: bool = False) -> tuple[float, float]:
    lo_ok = (lambda v: v > low) if open_low else (lambda v: v >= low)
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}") from None
    if not (lo_ok(a) and b <= high and a <= b):
        bound = f"({low}" if open_low else f"[{low}"
        raise ValueError(f"{name} must satisfy low <= high within {bound}, {high}], got {value!r}")
    return a, b


def _probability(value: float, name: str) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return float(value)


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


# --- two views of one volume ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ViewParams:
    """Drawn parameters of the two views (all python values, view index first): ``start`` and ``crop`` per axis,
    ``scale`` per axis, ``flip`` per axis, percentiles ``p0``/``p1`` (percent), ``gamma``, and one ``invert`` for both.
    ``pad`` is the (before, after) padding applied per axis to the volume before cropping."""

    pad: tuple[tuple[int, int], ...]
    scale: tuple[tuple[float, float, float], tuple[float, float, float]]
    start: tuple[tuple[int, int, int], tuple[int, int, int]]
    crop: tuple[tuple[int, int, int], tuple[int, int, int]]
    flip: tuple[tuple[bool, bool, bool], tuple[bool, bool, bool]]
    p0: tuple[float, float]
    p1: tuple[float, float]
    gamma: tuple[float, float]
    invert: bool
    intensity: bool


def _draw_view_params(shape: Sequence[int], output_size: tuple[int, int, int], device: torch.device,
                      generator: torch.Generator | None, scale: tuple[float, float], aug_mode: int, flip_rate: float,
                      contrast_low: tuple[float, float], contrast_high: tuple[float, float],
                      gamma: tuple[float, float], invert_rate: float) -> ViewParams:
    """Draw everything for both views in one batch of uniforms (one host sync), then derive integers on the host."""
    u = torch.rand(2 * 3 * 3 + 2 * 3 + 1, generator=generator, device=device, dtype=torch.float64).tolist()
    pad = tuple(((o - s + 1) // 2, (o - s) // 2) if s < o else (0, 0) for s, o in zip(shape, output_size))
    size = [s + a + b for s, (a, b) in zip(shape, pad)]
    scales, starts, crops, flips = [], [], [], []
    for v in range(2):
        uv = u[9 * v: 9 * v + 9]
        sc = tuple(1.0 if aug_mode < 2 else scale[0] + (scale[1] - scale[0]) * uv[a] for a in range(3))
        crop = tuple(max(1, min(int(o * s), n)) for o, s, n in zip(output_size, sc, size))
        start = tuple(min(int(uv[3 + a] * (n - c + 1)), n - c) for a, (n, c) in enumerate(zip(size, crop)))
        flip = tuple(aug_mode >= 2 and uv[6 + a] < flip_rate for a in range(3))
        scales.append(sc), starts.append(start), crops.append(crop), flips.append(flip)
    w = u[18:]
    p0 = tuple(contrast_low[0] + (contrast_low[1] - contrast_low[0]) * w[i] for i in (0, 1))
    p1 = tuple(contrast_high[0] + (contrast_high[1] - contrast_high[0]) * w[i] for i in (2, 3))
    g = tuple(gamma[0] + (gamma[1] - gamma[0]) * w[i] for i in (4, 5))
    intensity = aug_mode in (1, 3)
    return ViewParams(pad=pad, scale=tuple(scales), start=tuple(starts), crop=tuple(crops), flip=tuple(flips),
                      p0=p0, p1=p1, gamma=g, invert=intensity and w[6] < invert_rate, intensity=intensity)


def _pair(row: torch.Tensor, ranks: tuple[int, int], bound: float, lower: bool, extreme: float,
          values: torch.Tensor | None, n_out: int) -> list[float] | None:
    """Order statistics ``ranks`` (0-based) of ``row`` if they lie on the ``lower`` (else upper) side of ``bound``,
    else None. ``values`` holds every voxel on that side (``n_out`` voxels of the row are not in it); None: ``bound``
    is the row's ``extreme`` and the ranks are read from the count of voxels equal to it."""
    n = row.numel()
    if values is None:
        ties = int(torch.count_nonzero(row <= extreme if lower else row >= extreme))
        return [extreme, extreme] if (ranks[1] < ties if lower else ranks[0] >= n - ties) else None
    pos = [r if lower else r - n_out for r in ranks]
    if min(pos) < 0 or max(pos) >= values.numel():
        return None
    pair = [float(values.kthvalue(p + 1).values) for p in pos]
    return pair if (pair[1] <= bound if lower else pair[0] >= bound) else None


def _tails(row: torch.Tensor, p0: float, p1: float, lo: float,
           hi: float) -> tuple[float, float, torch.Tensor | None]:
    """Percentiles ``v0``, ``v1`` (p0, p1 in percent) of the 1-D row (minimum ``lo``, maximum ``hi``), exact, with
    numpy's linear interpolation; plus ``index``: voxels of the row that include every voxel < v0 or > v1 (None:
    the whole row).

    A strided subsample of ``PERCENTILE_SAMPLE`` voxels gives a bound per percentile (about 5 sigma of the subsample
    rank beyond it), ``c0`` above the low one and ``a1`` below the high one; one pass keeps the voxels <= c0 or >= a1
    (a few percent) and the order statistics are selected among those. A bound equal to the row's extreme (ties, e.g.
    air in CT) is checked by counting instead; a bound that misses falls back to ``kthvalue`` on the whole row."""
    n = row.numel()
    pos = [p / 100 * (n - 1) for p in (p0, p1)]
    below = [min(math.floor(q), n - 1) for q in pos]
    ranks = [(b, min(b + 1, n - 1)) for b in below]
    pairs: list[list[float] | None] = [None, None]
    index = None
    if n > 4 * PERCENTILE_SAMPLE:
        sample = row[:: n // PERCENTILE_SAMPLE]
        m = sample.numel()
        bounds = []
        for q, side in zip(pos, (1, -1)):
            est = q * (m - 1) / (n - 1)
            i = est + side * (5 * math.sqrt(max(est * (1 - est / m), 1.0)) + 8)
            i = math.ceil(i) if side > 0 else math.floor(i)
            bounds.append(float(sample.kthvalue(i + 1).values) if 0 < i < m - 1 else side * math.inf)
        c0, a1 = bounds
        if c0 < a1 and c0 < math.inf and a1 > -math.inf:
            tie_lo, tie_hi = c0 <= lo, a1 >= hi
            mask = None if tie_lo and tie_hi else row >= a1 if tie_lo else row <= c0 if tie_hi else \
                (row <= c0) | (row >= a1)
            index = row.new_empty(0, dtype=torch.long) if mask is None else mask.nonzero().squeeze(1)
            values = row[index]
            n_out = n - values.numel()
            pairs = [_pair(row, ranks[0], c0, True, lo, None if tie_lo else values, n_out),
                     _pair(row, ranks[1], a1, False, hi, None if tie_hi else values, n_out)]
    elif n > 1:
        ordered = row.sort().values
        pairs = [[float(ordered[r]) for r in rr] for rr in ranks]
    if None in pairs:  # a missed bound: the tails may lie outside the kept voxels
        index = None
        pairs = [p or [float(row.kthvalue(r + 1).values) for r in rr] for p, rr in zip(pairs, ranks)]
    # numpy's linear interpolation between the two order statistics (a + (b - a) t, from b for t >= 0.5)
    v0, v1 = (a + (b - a) * t if t < 0.5 else b - (b - a) * (1 - t)
              for (a, b), t in zip(pairs, (q - b for q, b in zip(pos, below))))
    return v0, v1, index


def _intensity(row: torch.Tensor, p0: float, p1: float, gamma: float, eps: float, invert: bool = False,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Adaptive contrast then gamma (then ``1 - x`` if ``invert``) of a 1-D row, as one mapping written to ``out``:
    [min, v0] -> [0, 0.1], [v0, v1] -> [0.1, 0.9], [v1, max] -> [0.9, 1] (divisions guarded by eps), then
    y -> ((y - y_min) / (y_max - y_min + eps)) ** gamma * (y_max - y_min) + y_min.

    Every voxel is mapped with the middle segment (the gamma step's min-max scaling folded in), then the few tail
    voxels (:func:`_tails`'s index) are redone exactly; the contrast is monotone, so y_min and y_max are the images of
    the extremes. The power is ``exp(gamma * log(z) + log(range))`` in place (``pow`` costs three times more)."""
    lo, hi = (float(v) for v in torch.aminmax(row))
    v0, v1, index = _tails(row, p0, p1, lo, hi)
    s_lo, s_mid, s_hi = 0.1 / (v0 - lo + eps), 0.8 / (v1 - v0 + eps), 0.1 / (hi - v1 + eps)

    def contrast(v: float) -> float:
        return (v - lo) * s_lo if v < v0 else (v - v1) * s_hi + 0.9 if v > v1 else (v - v0) * s_mid + 0.1

    y_min, y_max = contrast(lo), contrast(hi)
    span = y_max - y_min
    inv = 1 / (span + eps)
    out = torch.empty_like(row) if out is None else out

    def scalar(v: float) -> torch.Tensor:
        return torch.tensor(v, dtype=row.dtype, device=row.device)

    torch.add(scalar((0.1 - v0 * s_mid - y_min) * inv), row, alpha=s_mid * inv, out=out)
    t = row if index is None else row[index]
    y = torch.where(t < v0, (t - lo) * s_lo, torch.where(t > v1, (t - v1) * s_hi + 0.9, (t - v0) * s_mid + 0.1))
    if index is None:
        out.copy_((y - y_min) * inv)
    else:
        out.index_copy_(0, index, (y - y_min) * inv)
    out.clamp_(min=0).log_()
    torch.add(scalar(math.log(span) if span > 0 else -math.inf), out, alpha=gamma, out=out).exp_()
    if invert:
        return torch.add(scalar(1 - y_min), out, alpha=-1, out=out)
    return out.add_(y_min) if y_min else out


def crop_two_views(volume: torch.Tensor, output_size: Sequence[int], generator: torch.Generator | None = None, *,
                   scale: tuple[float, float] = (0.7, 1.5), aug_mode: int = 3, flip_rate: float = 0.5,
                   contrast_low: tuple[float, float] = (0.1, 2.0), contrast_high: tuple[float, float] = (98.0, 99.9),
                   gamma: tuple[float, float] = (0.7, 1.5), invert_rate: float = 0.25,
                   eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent random-resized views (1, *output_size) of one volume (1, D, H, W); see the module docstring.

    Per view and axis: scale ~ U[scale] (1 for aug_mode 0/1), crop = min(int(out * scale), size), offset ~ uniform,
    trilinear resize to output_size. aug_mode >= 2: flip per axis with p flip_rate. aug_mode 1 or 3: adaptive contrast
    (p0 ~ U(contrast_low), p1 ~ U(contrast_high) percent) onto [0, 1], gamma ~ U(gamma) on min-max-scaled values with
    the range restored, and with p invert_rate both views become 1 - x. An axis shorter than output_size is first
    padded (centred, with the volume's minimum), where the published code stretches it to output_size (see the
    module docstring). Returns two tensors of the volume's dtype on its device; the
    generator, if given, must live on that device.
    """
    out, _ = _crop_two_views(volume, output_size, generator, scale, aug_mode, flip_rate, contrast_low,
                                  contrast_high, gamma, invert_rate, eps)
    return out


def _crop_two_views(volume, output_size, generator, scale, aug_mode, flip_rate, contrast_low, contrast_high, gamma,
                    invert_rate, eps) -> tuple[tuple[torch.Tensor, torch.Tensor], ViewParams]:
    if not isinstance(volume, torch.Tensor) or volume.ndim != 4 or volume.shape[0] != 1 or volume.numel() == 0 \
            or not volume.is_floating_point():
        got = tuple(volume.shape) if isinstance(volume, torch.Tensor) else type(volume).__name__
        raise ValueError(f"volume must be a non-empty float tensor of shape (1, D, H, W), got {got}")
    size = _triple(output_size, "output_size")
    if size[0] * size[1] * size[2] > MAX_OUTPUT_VOXELS:
        raise ValueError(f"output_size {size} has more than {MAX_OUTPUT_VOXELS} voxels")
    if int(aug_mode) != aug_mode or aug_mode not in (0, 1, 2, 3):
        raise ValueError(f"aug_mode must be 0, 1, 2 or 3, got {aug_mode!r}")
    scale = _range(scale, "scale", 0.0, float("inf"), open_low=True)
    contrast_low = _range(contrast_low, "contrast_low", 0.0, 100.0)
    contrast_high = _range(contrast_high, "contrast_high", 0.0, 100.0)
    gamma = _range(gamma, "gamma", 0.0, float("inf"), open_low=True)
    flip_rate, invert_rate = _probability(flip_rate, "flip_rate"), _probability(invert_rate, "invert_rate")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")

    params = _draw_view_params(volume.shape[1:], size, volume.device, generator, scale, int(aug_mode), flip_rate,
                               contrast_low, contrast_high, gamma, invert_rate)
    if any(a or b for a, b in params.pad):
        flat_pad = [p for pair in reversed(params.pad) for p in pair]  # F.pad wants the last axis first
        volume = F.pad(volume, flat_pad, value=float(volume.min()))
    low_precision = volume.dtype in (torch.float16, torch.bfloat16)
    views = []
    for start, crop, flip, p0, p1, g in zip(params.start, params.crop, params.flip, params.p0, params.p1,
                                            params.gamma):
        box = volume[:, start[0]:start[0] + crop[0], start[1]:start[1] + crop[1], start[2]:start[2] + crop[2]]
        view = box if crop == size else F.interpolate(box[None], size=size, mode="trilinear",
                                                      align_corners=False)[0]
        dims = [a + 1 for a in range(3) if flip[a]]
        view = view.flip(dims) if dims else view
        if params.intensity:
            row = view.reshape(-1).float() if low_precision else view.reshape(-1)
            view = _intensity(row, p0, p1, g, eps, params.invert).to(volume.dtype).view(1, *size)
        elif view is box:
            view = box.clone()
        views.append(view)
    return (views[0], views[1]), params
