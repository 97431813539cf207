"""Volume Fusion: exact fusion arithmetic, exact foreground counts, draw distributions, view cropping and contrast."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medtransfer.pretext.volume_fusion import (
    VolumeFusion,
    _crop_two_views,
    _draw_blocks,
    _draw_view_params,
    _intensity,
    _pair,
    _tails,
    crop_two_views,
    fuse,
    fuse_shuffle,
)

SPATIAL = (12, 14, 16)
BMIN, BMAX = (2, 2, 2), (6, 6, 6)


def gen(seed: int = 0, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def patches(n: int = 16, spatial=SPATIAL, seed: int = 1, device: str = "cpu"):
    g = gen(seed, device)
    return (torch.rand(n, 1, *spatial, generator=g, device=device),
            torch.rand(n, 1, *spatial, generator=g, device=device))


def block_ids(grid, spatial) -> torch.Tensor:
    """(N, D, H, W) block id of every voxel, straight from the definition; off-grid voxels get table.shape[1]."""
    m = grid.table.shape[1]
    parts = []
    for axis, dim in enumerate(spatial):
        rel = torch.arange(dim, device=grid.size.device)[None] - grid.offset[:, axis, None]
        idx = torch.div(rel, grid.size[:, axis, None], rounding_mode="floor")
        parts.append((idx, (rel >= 0) & (idx < grid.count[:, axis, None])))
    (i_d, v_d), (i_h, v_h), (i_w, v_w) = parts
    c_h, c_w = grid.count[:, 1], grid.count[:, 2]
    ids = (i_d[:, :, None, None] * c_h[:, None, None, None] + i_h[:, None, :, None]) * c_w[:, None, None, None] \
        + i_w[:, None, None, :]
    on = v_d[:, :, None, None] & v_h[:, None, :, None] & v_w[:, None, None, :]
    return torch.where(on, ids, m)


def within_sigma(count: float, trials: int, p: float, k: float = 5.0) -> bool:
    return abs(count - trials * p) <= k * math.sqrt(trials * p * (1 - p)) + 1e-9


def check_fusion_consistency(p1, p2, fused, label, grid, num_classes, ratio, bmin, bmax):
    """Every property fuse promises, checked against the grid it drew (reproduced with the same seed)."""
    k = num_classes - 1
    spatial = p1.shape[2:]
    assert label.dtype == torch.int64 and label.shape == p1.shape and fused.dtype == p1.dtype
    assert int(label.min()) >= 0 and int(label.max()) <= k
    expected = (label.to(p1.dtype) / k) * p1 + (1 - label.to(p1.dtype) / k) * p2
    torch.testing.assert_close(fused, expected, atol=1e-6, rtol=0)
    ids = block_ids(grid, spatial)[:, None]
    off_grid = ids >= grid.table.shape[1]
    assert torch.equal(label[off_grid], torch.zeros_like(label[off_grid]))  # off-grid voxels are background
    for s in range(p1.shape[0]):
        dims = torch.tensor(spatial)
        size, offset, count = grid.size[s].cpu(), grid.offset[s].cpu(), grid.count[s].cpu()
        lo, hi = torch.tensor(bmin).clamp(max=dims), torch.tensor(bmax).clamp(max=dims)
        assert bool(((size >= lo) & (size <= hi)).all())
        assert torch.equal(count, dims // size)
        assert bool(((offset >= 0) & (offset <= dims % size)).all())
        total = int(count.prod())
        # the label is the per-block class broadcast over each block
        table = grid.table[s]
        sample_ids = ids[s]
        on = sample_ids < grid.table.shape[1]
        assert torch.equal(label[s][on], table[sample_ids[on]])
        foreground_ids = torch.unique(sample_ids[on & (label[s] > 0)])
        assert len(foreground_ids) == math.floor(ratio * total)
        assert int((table[:total] > 0).sum()) == math.floor(ratio * total)
        assert int((table[total:] != 0).sum()) == 0
        assert len(torch.unique(sample_ids[on])) == total  # every grid block covers voxels


# --- fuse ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_classes,ratio", [(5, 0.7), (3, 0.5), (2, 1.0)])
def test_fuse_matches_its_grid_and_the_mixing_formula(num_classes, ratio):
    p1, p2 = patches()
    fused, label = fuse(p1, p2, gen(3), num_classes, ratio, BMIN, BMAX)
    grid = _draw_blocks(p1.shape[0], SPATIAL, p1.device, gen(3), num_classes, ratio, BMIN, BMAX)
    assert len({tuple(s) for s in grid.size.tolist()}) > 1  # several block sizes in one batch
    assert bool((block_ids(grid, SPATIAL) >= grid.table.shape[1]).any())  # and voxels off the grid
    check_fusion_consistency(p1, p2, fused, label, grid, num_classes, ratio, BMIN, BMAX)


def test_fuse_endpoints_are_exact_copies():
    p1, p2 = patches(8)
    fused, label = fuse(p1, p2, gen(5), 5, 0.7, BMIN, BMAX)
    assert torch.equal(fused[label == 0], p2[label == 0])
    assert torch.equal(fused[label == 4], p1[label == 4])
    fused, label = fuse(p1, p2, gen(5), 5, 0.0, BMIN, BMAX)
    assert torch.equal(fused, p2) and int(label.max()) == 0


def test_fuse_default_blocks_on_a_small_patch_are_clamped():
    p1, p2 = patches(4, spatial=(6, 7, 40))
    fused, label = fuse(p1, p2, gen(2))
    grid = _draw_blocks(4, (6, 7, 40), p1.device, gen(2), 5, 0.7, (8, 8, 8), (32, 32, 32))
    assert grid.size[:, 0].eq(6).all() and grid.size[:, 1].eq(7).all()
    check_fusion_consistency(p1, p2, fused, label, grid, 5, 0.7, (8, 8, 8), (32, 32, 32))


def test_block_sizes_offsets_classes_and_selection_are_uniform():
    n = 4000
    grid = _draw_blocks(n, (20, 20, 20), torch.device("cpu"), gen(11), 5, 0.7, (2, 3, 4), (6, 5, 9))
    for axis, (lo, hi) in enumerate(((2, 6), (3, 5), (4, 9))):
        values = grid.size[:, axis]
        assert int(values.min()) == lo and int(values.max()) == hi
        for v in range(lo, hi + 1):
            assert within_sigma(int((values == v).sum()), n, 1 / (hi - lo + 1))
    # offsets uniform on 0..dim mod size, e.g. for size 6 on 20: 0..2
    sel = grid.size[:, 0] == 6
    off = grid.offset[sel, 0]
    for v in range(3):
        assert within_sigma(int((off == v).sum()), int(sel.sum()), 1 / 3)
    classes = grid.table[grid.table > 0]
    for k in range(1, 5):
        assert within_sigma(int((classes == k).sum()), classes.numel(), 0.25)
    # with a fixed block size every block is foreground with probability floor(0.7 * M) / M
    fixed = _draw_blocks(2000, (8, 8, 8), torch.device("cpu"), gen(4), 5, 0.7, (4, 4, 4), (4, 4, 4))
    per_block = (fixed.table > 0).sum(dim=0)
    assert fixed.table.shape[1] == 8
    for c in per_block.tolist():
        assert within_sigma(c, 2000, 5 / 8)


def test_fuse_is_reproducible_and_seed_dependent():
    p1, p2 = patches(4)
    a = fuse(p1, p2, gen(7), block_min=BMIN, block_max=BMAX)
    b = fuse(p1, p2, gen(7), block_min=BMIN, block_max=BMAX)
    c = fuse(p1, p2, gen(8), block_min=BMIN, block_max=BMAX)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_fuse_keeps_dtype():
    p1, p2 = patches(2)
    fused, label = fuse(p1.double(), p2.double(), gen(1), block_min=BMIN, block_max=BMAX)
    assert fused.dtype == torch.float64 and label.dtype == torch.int64


def block_box(j: int, size, offset, count) -> tuple[slice, slice, slice]:
    """Voxel slices of block id j (row-major over the (D, H, W) block counts)."""
    i_d, rest = divmod(j, count[1] * count[2])
    index = (i_d, *divmod(rest, count[2]))
    return tuple(slice(o + i * b, o + (i + 1) * b) for o, i, b in zip(offset, index, size))


# --- shuffle variant ---------------------------------------------------------------------------------------------

def test_fuse_shuffle_pastes_whole_blocks_from_permuted_sources():
    p1, p2 = patches(6)
    fused, label = fuse_shuffle(p1, p2, gen(9), 0.7, BMIN, BMAX)
    grid = _draw_blocks(6, SPATIAL, p1.device, gen(9), 2, 0.7, BMIN, BMAX, shuffle=True)
    assert label.dtype == torch.int64 and set(label.unique().tolist()) <= {0, 1}
    assert torch.equal(fused[label == 0], p2[label == 0])
    for s in range(6):
        size, offset, count = grid.size[s].tolist(), grid.offset[s].tolist(), grid.count[s].tolist()
        total = count[0] * count[1] * count[2]
        source = grid.source[s, :total]
        assert sorted(source.tolist()) == list(range(total))  # a permutation of the sample's blocks
        pasted = [j for j in range(total) if grid.table[s, j] > 0]
        assert len(pasted) == math.floor(0.7 * total)

        mask = torch.zeros(SPATIAL, dtype=torch.bool)
        for j in pasted:
            destination, origin = block_box(j, size, offset, count), block_box(int(source[j]), size, offset, count)
            assert torch.equal(fused[s, 0][destination], p1[s, 0][origin])
            mask[destination] = True
        assert torch.equal(label[s, 0] > 0, mask)


def test_volume_fusion_callable():
    p1, p2 = patches(3)
    vf = VolumeFusion(num_classes=3, block_min=BMIN, block_max=BMAX)
    _, label = vf(p1, p2, gen(1))
    assert torch.equal(label, fuse(p1, p2, gen(1), 3, 0.7, BMIN, BMAX)[1]) and vf.label_classes == 3
    shuffle = VolumeFusion(block_min=BMIN, block_max=BMAX, shuffle=True)
    assert torch.equal(shuffle(p1, p2, gen(1))[0], fuse_shuffle(p1, p2, gen(1), 0.7, BMIN, BMAX)[0])
    assert shuffle.label_classes == 2 and "shuffle=True" in repr(shuffle)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_classes": 1}, "num_classes"),
    ({"foreground_ratio": 1.5}, "foreground_ratio"),
    ({"block_min": (4, 4, 4), "block_max": (2, 8, 8)}, "block_min must be <= block_max"),
    ({"block_min": (0, 4, 4)}, "block_min"),
    ({"block_max": (4, 4)}, "block_max"),
])
def test_fusion_argument_errors(kwargs, match):
    p1, p2 = patches(1)
    with pytest.raises(ValueError, match=match):
        fuse(p1, p2, **kwargs)
    with pytest.raises(ValueError, match=match):
        VolumeFusion(**kwargs)


def test_fusion_shape_errors():
    p1, p2 = patches(2)
    with pytest.raises(ValueError, match=r"patch1 must be a float tensor of shape \(N, 1, D, H, W\)"):
        fuse(p1[:, 0], p2[:, 0])
    with pytest.raises(ValueError, match="patch2"):
        fuse(p1, torch.cat([p2, p2], dim=1))
    with pytest.raises(ValueError, match="share shape"):
        fuse_shuffle(p1, p2[:1])
    with pytest.raises(ValueError, match="patch1"):
        fuse((p1 * 10).long(), p2)


# --- views ---------------------------------------------------------------------------------------------------------

DEFAULTS = {"scale": (0.7, 1.5), "aug_mode": 3, "flip_rate": 0.5, "contrast_low": (0.1, 2.0),
            "contrast_high": (98.0, 99.9), "gamma": (0.7, 1.5), "invert_rate": 0.25}


def view_args(**over):
    d = dict(DEFAULTS, **over)
    return (d["scale"], d["aug_mode"], d["flip_rate"], d["contrast_low"], d["contrast_high"], d["gamma"],
            d["invert_rate"])


def test_crop_two_views_shapes_range_and_determinism():
    vol = torch.randn(1, 20, 24, 28, generator=gen(0)) * 300
    a1, b1 = crop_two_views(vol, (8, 10, 12), gen(4))
    a2, b2 = crop_two_views(vol, (8, 10, 12), gen(4))
    assert a1.shape == b1.shape == (1, 8, 10, 12) and a1.dtype == vol.dtype
    assert torch.equal(a1, a2) and torch.equal(b1, b2) and not torch.equal(a1, b1)
    for v in (a1, b1):
        assert bool(v.isfinite().all()) and float(v.min()) >= 0 and float(v.max()) <= 1 + 1e-6


def test_view_parameters_are_used_and_scales_respected():
    vol = torch.randn(1, 30, 30, 30, generator=gen(0))
    _, params = _crop_two_views(vol, (10, 12, 20), gen(6), *view_args(), 1e-6)
    assert params == _draw_view_params(vol.shape[1:], (10, 12, 20), vol.device, gen(6), *view_args())
    for v in range(300):
        p = _draw_view_params((30, 30, 30), (10, 12, 20), torch.device("cpu"), gen(v), *view_args())
        for sc, start, crop in zip(p.scale, p.start, p.crop):
            for o, s, st, c in zip((10, 12, 20), sc, start, crop):
                assert 0.7 <= s <= 1.5 and c == min(int(o * s), 30) and 0 <= st <= 30 - c


def test_view_flip_and_invert_rates():
    n = 4000
    flips = invert = 0
    for v in range(n):
        p = _draw_view_params((16, 16, 16), (8, 8, 8), torch.device("cpu"), gen(v), *view_args())
        flips += sum(sum(f) for f in p.flip)
        invert += p.invert
    assert within_sigma(flips, 6 * n, 0.5) and within_sigma(invert, n, 0.25)
    p = _draw_view_params((16, 16, 16), (8, 8, 8), torch.device("cpu"), gen(1), *view_args(aug_mode=1))
    assert p.scale == ((1.0,) * 3,) * 2 and not any(map(any, p.flip)) and p.intensity


def test_aug_mode_zero_is_a_plain_crop():
    vol = torch.randn(1, 12, 13, 14, generator=gen(0))
    (a, b), p = _crop_two_views(vol, (6, 7, 8), gen(2), *view_args(aug_mode=0), 1e-6)
    for view, (d, h, w) in zip((a, b), p.start):
        assert torch.equal(view, vol[:, d:d + 6, h:h + 7, w:w + 8])


def test_flipped_view_equals_flipped_crop():
    vol = torch.randn(1, 12, 13, 14, generator=gen(0))
    for seed in range(8):
        (a, _), p = _crop_two_views(vol, (6, 7, 8), gen(seed), *view_args(aug_mode=2, scale=(1.0, 1.0)), 1e-6)
        (d, h, w), dims = p.start[0], [i + 1 for i, f in enumerate(p.flip[0]) if f]
        assert torch.equal(a, vol[:, d:d + 6, h:h + 7, w:w + 8].flip(dims))


def test_constant_and_small_volumes_give_finite_views():
    for vol in (torch.full((1, 10, 10, 10), 3.0), torch.zeros(1, 10, 10, 10)):
        for v in crop_two_views(vol, (8, 8, 8), gen(0)):
            assert bool(v.isfinite().all())
    small = torch.randn(1, 4, 20, 5, generator=gen(1))
    (a, _), p = _crop_two_views(small, (8, 8, 8), gen(3), *view_args(aug_mode=0), 1e-6)
    assert p.pad == ((2, 2), (0, 0), (2, 1)) and a.shape == (1, 8, 8, 8)
    assert torch.equal(a[:, 2:6, :, 2:7], small[:, :, p.start[0][1]:p.start[0][1] + 8, :])
    assert float(a.min()) == float(small.min())  # padded with the volume's minimum


def numpy_intensity(x: np.ndarray, p0: float, p1: float, g: float, eps: float) -> np.ndarray:
    """The published contrast + gamma, written densely from spec 4b (with the eps guard)."""
    v0, v1 = np.percentile(x, [p0, p1])
    lo, hi = x.min(), x.max()
    y = np.where(x < v0, 0.1 * (x - lo) / (v0 - lo + eps),
                 np.where(x > v1, 0.9 + 0.1 * (x - v1) / (hi - v1 + eps), 0.1 + 0.8 * (x - v0) / (v1 - v0 + eps)))
    y_lo, y_hi = y.min(), y.max()
    return ((y - y_lo) / (y_hi - y_lo + eps)) ** g * (y_hi - y_lo) + y_lo


def ct_like(n: int, seed: int, ties: bool) -> torch.Tensor:
    g = gen(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * 200
    if ties:  # a third of the voxels at the clipping value, the rest on a coarse integer grid
        x = x.round().clamp(min=-150)
        x[: n // 3] = -1000.0
        x = x[torch.randperm(n, generator=g)]
    return x


def extremes(x: torch.Tensor) -> tuple[float, float]:
    return float(x.min()), float(x.max())


@pytest.mark.parametrize("n", [5001, 150_000])
@pytest.mark.parametrize("ties", [False, True])
def test_tails_give_exact_percentiles_and_complete_tails(n, ties):
    x = ct_like(n, 3, ties)
    for p0, p1 in [(0.1, 99.9), (2.0, 98.0), (1.37, 99.51), (0.0, 100.0), (33.4, 50.0), (60.0, 40.0)]:
        v0, v1, index = _tails(x, p0, p1, *extremes(x))
        np.testing.assert_allclose([v0, v1], np.percentile(x.numpy(), [p0, p1]), rtol=1e-12, atol=1e-9)
        kept = torch.zeros(n, dtype=torch.bool)
        kept[slice(None) if index is None else index] = True
        assert bool(kept[(x < v0) | (x > v1)].all())
        if (p0, p1) == (2.0, 98.0) and n > 100_000:
            assert index is not None and len(index) < n // 10  # the fast path was taken


def test_tails_with_ties_at_both_extremes_count_instead_of_selecting():
    x = torch.randn(150_000, generator=gen(4), dtype=torch.float64).clamp(-1.0, 1.0)  # ~16% at each extreme
    v0, v1, index = _tails(x, 2.0, 98.0, -1.0, 1.0)
    assert (v0, v1) == (-1.0, 1.0) and index is not None and len(index) == 0


def test_pair_reads_ranks_or_reports_a_miss():
    x = torch.randn(10_000, generator=gen(0), dtype=torch.float64)
    ordered = x.sort().values
    low = x[x <= ordered[1300]]
    assert _pair(x, (1234, 1235), float(ordered[1300]), True, float(ordered[0]), low, 10_000 - len(low)) == \
        [float(ordered[1234]), float(ordered[1235])]
    low = x[x <= ordered[1234]]  # the bound holds rank 1234 but not 1235
    assert _pair(x, (1234, 1235), float(ordered[1234]), True, float(ordered[0]), low, 10_000 - len(low)) is None
    high = x[x >= ordered[8000]]
    assert _pair(x, (8500, 8501), float(ordered[8000]), False, float(ordered[-1]), high, 10_000 - len(high)) == \
        [float(ordered[8500]), float(ordered[8501])]
    assert _pair(x, (7900, 7901), float(ordered[8000]), False, float(ordered[-1]), high, 10_000 - len(high)) is None
    tied = x.clamp(min=float(ordered[200]))  # 201 voxels at the minimum: ranks 0..200
    assert _pair(tied, (199, 200), float(ordered[200]), True, float(ordered[200]), None, 0) == [float(ordered[200])] * 2
    assert _pair(tied, (200, 201), float(ordered[200]), True, float(ordered[200]), None, 0) is None


def test_tails_fall_back_when_the_subsample_misleads():
    x = torch.randn(150_000, generator=gen(2), dtype=torch.float64)
    x[:: 150_000 // 16384] = 50.0  # the strided subsample sees only this value: both bounds miss
    v0, v1, index = _tails(x, 1.0, 99.0, *extremes(x))
    np.testing.assert_allclose([v0, v1], np.percentile(x.numpy(), [1.0, 99.0]), rtol=1e-12)
    kept = torch.zeros(150_000, dtype=torch.bool)
    kept[slice(None) if index is None else index] = True
    assert bool(kept[(x < v0) | (x > v1)].all())
    np.testing.assert_allclose(_intensity(x, 1.0, 99.0, 1.2, 1e-6).numpy(),
                               numpy_intensity(x.numpy(), 1.0, 99.0, 1.2, 1e-6), rtol=0, atol=1e-9)


@pytest.mark.parametrize("ties", [False, True])
def test_intensity_matches_the_dense_formula(ties):
    for n in (4000, 150_000):
        x = ct_like(n, 5, ties)
        for p0, p1, g in [(0.5, 99.0, 0.7), (1.9, 98.2, 1.5), (0.1, 99.9, 1.0)]:
            y = _intensity(x, p0, p1, g, 1e-6)
            np.testing.assert_allclose(y.numpy(), numpy_intensity(x.numpy(), p0, p1, g, 1e-6), rtol=0, atol=1e-9)
            assert float(y.min()) >= 0 and float(y.max()) <= 1
            inverted = _intensity(x, p0, p1, g, 1e-6, invert=True, out=torch.empty_like(x))
            np.testing.assert_allclose(inverted.numpy(), 1 - y.numpy(), rtol=0, atol=1e-12)


def test_float32_views_match_the_dense_formula_on_the_resized_view():
    """End to end in float32 (the benchmark's dtype): exp/log gamma and the tail fix against numpy in float64."""
    vol = torch.randn(1, 70, 70, 70, generator=gen(7)).mul_(300).clamp_(min=-400)  # ties at the minimum
    for seed in range(3):
        (a, b), p = _crop_two_views(vol, (48, 48, 48), gen(seed), *view_args(), 1e-6)
        for view, start, crop, flip, p0, p1, g in zip((a, b), p.start, p.crop, p.flip, p.p0, p.p1, p.gamma):
            box = vol[:, start[0]:start[0] + crop[0], start[1]:start[1] + crop[1], start[2]:start[2] + crop[2]]
            x = torch.nn.functional.interpolate(box[None], size=(48, 48, 48), mode="trilinear",
                                                align_corners=False)[0].flip([i + 1 for i in range(3) if flip[i]])
            ref = numpy_intensity(x.double().numpy(), p0, p1, g, 1e-6)
            ref = 1 - ref if p.invert else ref
            assert view.dtype == torch.float32
            np.testing.assert_allclose(view.double().numpy(), ref, rtol=0, atol=2e-5)


def test_intensity_anchor_points():
    x = ct_like(5001, 1, False)
    v0, v1, _ = _tails(x, 1.0, 99.0, *extremes(x))
    y = _intensity(torch.cat([x, torch.tensor([v0, v1], dtype=x.dtype)]), 1.0, 99.0, 1.0, 1e-12)
    # the two appended voxels barely move the percentiles; v0 -> 0.1 and v1 -> 0.9 up to that shift
    assert abs(float(y[-2]) - 0.1) < 1e-3 and abs(float(y[-1]) - 0.9) < 1e-3
    assert float(y.min()) == 0.0 and abs(float(y.max()) - 1) < 1e-9
    assert torch.equal(torch.argsort(y[:-2], stable=True), torch.argsort(x, stable=True))  # monotone


@pytest.mark.parametrize("args,kwargs,match", [
    ((torch.zeros(10, 10, 10), (4, 4, 4)), {}, r"volume must be .* \(1, D, H, W\)"),
    ((torch.zeros(2, 10, 10, 10), (4, 4, 4)), {}, "volume"),
    ((torch.zeros(1, 10, 10, 10), (4, 4)), {}, "output_size"),
    ((torch.zeros(1, 10, 10, 10), (4000, 4000, 4000)), {}, "output_size"),
    ((torch.zeros(1, 10, 10, 10), (4, 4, 4)), {"aug_mode": 5}, "aug_mode"),
    ((torch.zeros(1, 10, 10, 10), (4, 4, 4)), {"scale": (0.0, 1.0)}, "scale"),
    ((torch.zeros(1, 10, 10, 10), (4, 4, 4)), {"contrast_low": (3.0, 1.0)}, "contrast_low"),
    ((torch.zeros(1, 10, 10, 10), (4, 4, 4)), {"flip_rate": -0.1}, "flip_rate"),
    ((torch.zeros(1, 10, 10, 10), (4, 4, 4)), {"eps": 0.0}, "eps"),
])
def test_crop_two_views_argument_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        crop_two_views(*args, **kwargs)


# --- CUDA ------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_in_distribution():
    stats = {}
    for device in ("cpu", "cuda"):
        p1, p2 = patches(64, spatial=(16, 16, 16), device=device)
        fused, label = fuse(p1, p2, gen(0, device), 5, 0.7, (2, 2, 2), (6, 6, 6))
        assert fused.device.type == device and label.device.type == device
        grid = _draw_blocks(64, (16, 16, 16), p1.device, gen(0, device), 5, 0.7, (2, 2, 2), (6, 6, 6))
        check_fusion_consistency(p1, p2, fused, label, grid, 5, 0.7, (2, 2, 2), (6, 6, 6))
        classes = grid.table[grid.table > 0].cpu()
        stats[device] = [int((classes == k).sum()) / classes.numel() for k in range(1, 5)]
        fused_s, label_s = fuse_shuffle(p1, p2, gen(0, device), 0.7, (2, 2, 2), (6, 6, 6))
        assert torch.equal(fused_s[label_s == 0], p2[label_s == 0])
        a, b = crop_two_views(torch.randn(1, 20, 20, 20, device=device), (8, 8, 8), gen(1, device))
        assert a.device.type == device and bool(a.isfinite().all() and b.isfinite().all())
    for f_cpu, f_cuda in zip(stats["cpu"], stats["cuda"]):
        assert abs(f_cpu - 0.25) < 0.05 and abs(f_cuda - 0.25) < 0.05
