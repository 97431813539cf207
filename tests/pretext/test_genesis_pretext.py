"""Models Genesis corruption: rates, ranges, exact shuffling semantics, Bezier maps, painting, errors, recipes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medtransfer.pretext import genesis as G
from medtransfer.pretext.genesis import MODERN_RECIPE, PUBLISHED_RECIPE, GenesisRates, RestorationLoss, corrupt

OFF = dict(flip_rate=0.0, local_rate=0.0, nonlinear_rate=0.0, paint_rate=0.0)  # every step off


def gen(seed: int = 0, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def ramp(n: int, shape=(16, 16, 16), dtype=torch.float32) -> torch.Tensor:
    """Distinct values in (0, 1) per voxel, the same cube for every sample."""
    v = math.prod(shape)
    return ((torch.arange(v, dtype=torch.float64) + 0.5) / v).to(dtype).view(1, 1, *shape).repeat(n, 1, 1, 1, 1)


# --- rates and argument checks ---------------------------------------------------------------------------------

def test_defaults_are_published_and_unknown_rate_is_type_error():
    r = GenesisRates()
    assert (r.flip_rate, r.max_flips, r.local_rate, r.local_blocks) == (0.4, 3, 0.5, 10_000)
    assert (r.nonlinear_rate, r.inverse_rate, r.paint_rate, r.inpaint_rate) == (0.9, 0.5, 0.9, 0.2)
    with pytest.raises(TypeError, match="flip_rat.*valid: flip_rate"):
        corrupt(ramp(1), flip_rat=0.5)


@pytest.mark.parametrize("kwargs, match", [
    ({"flip_rate": 1.5}, "flip_rate must be a probability"),
    ({"local_blocks": -1}, "local_blocks must be an integer"),
    ({"max_outpaint_boxes": 0}, "max_outpaint_boxes"),
    ({"depth_dim": 1}, "depth_dim"),
])
def test_bad_rates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenesisRates(**kwargs)


@pytest.mark.parametrize("batch, match", [
    (torch.rand(2, 16, 16, 16), r"shape \(N, 1, X, Y, Z\)"),
    (torch.rand(2, 2, 16, 16, 16), r"shape \(N, 1, X, Y, Z\)"),
    (torch.zeros(2, 1, 16, 16, 16, dtype=torch.int64), "floating-point"),
    (torch.full((1, 1, 16, 16, 16), 1.5), r"values must lie in \[0, 1\]"),
    (torch.full((1, 1, 16, 16, 16), float("nan")), r"values must lie in \[0, 1\]"),
    (torch.rand(1, 1, 16, 16, 8), "outpainting needs every spatial size of batch >= 14"),
])
def test_bad_batch(batch, match):
    with pytest.raises(ValueError, match=match):
        corrupt(batch, gen())


def test_small_cube_is_fine_without_outpainting():
    x = torch.rand(3, 1, 16, 16, 8)
    inputs, targets = corrupt(x, gen(), inpaint_rate=1.0)
    assert inputs.shape == targets.shape == x.shape


def test_all_off_gives_copies_and_keeps_the_input():
    x = torch.rand(4, 1, 16, 16, 8)
    keep = x.clone()
    inputs, targets = corrupt(x, gen(), **OFF)
    assert torch.equal(inputs, x) and torch.equal(targets, x) and torch.equal(x, keep)
    assert inputs.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_range_and_reproducibility(dtype):
    x = torch.rand(8, 1, 20, 20, 16, dtype=dtype)
    a = corrupt(x, gen(3), local_blocks=500)
    b = corrupt(x, gen(3), local_blocks=500)
    c = corrupt(x, gen(4), local_blocks=500)
    for t in a:
        assert t.dtype == dtype and t.shape == x.shape and 0 <= float(t.min()) and float(t.max()) <= 1
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


# --- 1. flip ---------------------------------------------------------------------------------------------------

def test_flip_count_and_axis_distribution():
    n, cfg = 4000, GenesisRates()
    count, slots = G._draw_flips(n, cfg, gen(), torch.device("cpu"))
    for k, p in enumerate([0.6, 0.4 * 0.6, 0.4**2 * 0.6, 0.4**3]):
        assert within(int((count == k).sum()), n, p)
    drawn = slots[slots >= 0]
    for a in range(3):
        assert within(int((drawn == a).sum()), drawn.numel(), 1 / 3)
    assert torch.equal((slots >= 0).sum(1), count)


def _flip_subsets(x: torch.Tensor, dims: tuple[int, ...]) -> list[torch.Tensor]:
    out = []
    for mask in range(1 << len(dims)):
        chosen = [d for i, d in enumerate(dims) if mask >> i & 1]
        out.append(x.flip(chosen) if chosen else x)
    return out


@pytest.mark.parametrize("official, depth_dim, flippable", [
    (False, -1, (2, 3, 4)), (True, -1, (2, 3)), (True, 2, (3, 4)),
])
def test_flips_move_input_and_target_together(official, depth_dim, flippable):
    n = 200
    x = ramp(n, (4, 5, 6))
    inputs, targets = corrupt(x, gen(1), **{**OFF, "flip_rate": 0.8}, official_flip=official, depth_dim=depth_dim)
    assert torch.equal(inputs, targets)
    allowed = _flip_subsets(x[:1], flippable)
    seen = set()
    for t in targets:
        match = [i for i, a in enumerate(allowed) if torch.equal(t[None], a)]
        assert match, "a target is not a flip along the allowed axes"
        seen.add(match[0])
    assert seen == set(range(len(allowed)))  # every combination occurs


# --- 2. local pixel shuffling ----------------------------------------------------------------------------------

def test_shuffle_block_ranges():
    spatial = (64, 45, 9)
    sides, corners = G._draw_shuffle_blocks(2, spatial, 20_000, gen(), torch.device("cpu"))
    for a, dim in enumerate(spatial):
        hi = max(1, dim // 10)
        assert set(sides[..., a].unique().tolist()) == set(range(1, hi + 1))
        assert int(corners[..., a].min()) == 0
        assert bool((corners[..., a] + sides[..., a] <= dim).all())
        assert int((corners[..., a] + sides[..., a]).max()) == dim


def test_shuffle_matches_sequential_semantics():
    """Replaying the drawn blocks: every voxel holds a value of the last block covering it (read from the original),
    each block's winning voxels take distinct values, uncovered voxels are unchanged, and a block that overlaps no
    other keeps its multiset of values."""
    spatial, count = (30, 30, 20), 40
    x = ramp(3, spatial, torch.float64)
    out = G._local_shuffle(x, count, gen(5))
    sides, corners = G._draw_shuffle_blocks(3, spatial, count, gen(5), torch.device("cpu"))
    assert not torch.equal(out, x)
    checked_isolated = 0
    for s in range(3):
        owner = torch.full(spatial, -1)
        regions = []
        for b in range(count):
            sl = tuple(slice(int(c), int(c + w)) for c, w in zip(corners[s, b], sides[s, b]))
            regions.append(sl)
            owner[sl] = b
        orig, res = x[s, 0], out[s, 0]
        assert torch.equal(res[owner < 0], orig[owner < 0])
        for b, sl in enumerate(regions):
            won = res[owner == b]
            allowed = set(orig[sl].flatten().tolist())
            assert set(won.tolist()) <= allowed and won.unique().numel() == won.numel()
            cover = torch.zeros(spatial, dtype=torch.bool)
            for other, sl2 in enumerate(regions):
                if other != b:
                    cover[sl2] = True
            if not cover[sl].any():
                checked_isolated += 1
                assert sorted(res[sl].flatten().tolist()) == sorted(orig[sl].flatten().tolist())
    assert checked_isolated > 20


def test_shuffle_permutation_is_uniform():
    """One 2x2x1 block per call: the value landing on its first voxel is uniform over the block's 4 values. One cube
    per call, as blocks of one call share the SHUFFLE_BANK permutations of their volume."""
    calls, spatial = 2400, (20, 20, 10)
    x = ramp(1, spatial, torch.float64)
    g, rank = gen(7), []
    for _ in range(calls):
        state = g.get_state()
        out = G._local_shuffle(x, 1, g)
        after = g.get_state()
        sides, corners = G._draw_shuffle_blocks(1, spatial, 1, g.set_state(state), torch.device("cpu"))
        g.set_state(after)
        if int(sides[0, 0, 0]) == 2 and int(sides[0, 0, 1]) == 2:
            cx, cy, cz = corners[0, 0].tolist()
            block = x[0, 0, cx:cx + 2, cy:cy + 2, cz].flatten()
            rank.append(int((block == out[0, 0, cx, cy, cz]).nonzero()))
    rank = torch.tensor(rank)
    assert within(len(rank), calls, 0.25)
    for r in range(4):
        assert within(int((rank == r).sum()), len(rank), 0.25)


def test_permutation_bank_rows_are_uniform_permutations():
    klass, row, classes = G._shape_classes((64, 64, 32), torch.device("cpu"))
    assert klass.numel() == row.numel() == 6 * 6 * 3 and sum(v.numel() for v, _ in classes) == 108
    for volume, offsets in classes:  # every class: volumes in [2**k, 2**(k + 1)), width its largest volume
        assert offsets.shape == (volume.numel(), int(volume.max())) and int(volume.max()) < 2 * int(volume.min())
        bank = G._permutation_bank(volume, G.SHUFFLE_BANK, offsets.shape[1], gen(20))
        assert bank.shape == (volume.numel(), G.SHUFFLE_BANK, offsets.shape[1])
        for c, v in enumerate(volume.tolist()):
            assert torch.equal(bank[c, :, :v].sort(1).values, torch.arange(v).expand(G.SHUFFLE_BANK, v))
    rows = G._permutation_bank(torch.tensor([3, 4]), 6000, 4, gen(21))  # many rows of one volume: uniform entries
    for position in range(4):
        for value in range(4):
            assert within(int((rows[1, :, position] == value).sum()), 6000, 0.25)
    assert rows[0, :, :3].sort(1).values.eq(torch.arange(3)).all() and bool((rows[0, :, 3] == 3).all())


def test_shuffled_blocks_read_their_own_block():
    """With thousands of overlapping blocks: every covered voxel holds the value of a voxel inside the box of the
    last block covering it, no two voxels of one block read the same voxel, uncovered voxels keep their value."""
    spatial, count, n = (32, 32, 20), 3000, 2
    x = ramp(n, spatial, torch.float64)
    out = G._local_shuffle(x, count, gen(22))
    sides, corners = G._draw_shuffle_blocks(n, spatial, count, gen(22), torch.device("cpu"))
    voxels = math.prod(spatial)
    coords = torch.stack(torch.meshgrid(*[torch.arange(d) for d in spatial], indexing="ij"), -1).view(-1, 3)
    for s in range(n):
        owner = torch.full(spatial, -1)
        for b in range(count):
            owner[tuple(slice(int(c), int(c + w)) for c, w in zip(corners[s, b], sides[s, b]))] = b
        owner = owner.view(-1)
        source = (out[s, 0].reshape(-1) * voxels - 0.5).round().long()  # ramp value -> voxel index
        visible = owner >= 0
        assert visible.float().mean() > 0.5 and torch.equal(source[~visible], torch.arange(voxels)[~visible])
        low, width = corners[s][owner[visible]], sides[s][owner[visible]]
        src = coords[source[visible]]
        assert bool(((src >= low) & (src < low + width)).all())
        pairs = owner[visible] * voxels + source[visible]
        assert pairs.unique().numel() == pairs.numel()


def test_local_rate():
    n = 600
    x = torch.rand(n, 1, 20, 20, 10)
    inputs, targets = corrupt(x, gen(2), **{**OFF, "local_rate": 0.5}, local_blocks=200)
    changed = (inputs != targets).flatten(1).any(1)
    assert within(int(changed.sum()), n, 0.5)
    assert torch.equal(inputs.flatten(1).sort(1).values[~changed], targets.flatten(1).sort(1).values[~changed])


# --- 3. non-linear intensity -----------------------------------------------------------------------------------

def _published_map(controls: np.ndarray, inverted: bool, v: np.ndarray) -> np.ndarray:
    """Spec 3b: Bernstein form in t from (1,1) at t=0 to (0,0) at t=1, 1e5 samples, sort x (and y unless inverted)."""
    a, b, c, d = controls
    t = np.linspace(0.0, 1.0, 100_000)
    basis = [t**3, 3 * t**2 * (1 - t), 3 * t * (1 - t) ** 2, (1 - t) ** 3]  # weights of (0,0), (a,b), (c,d), (1,1)
    xs = a * basis[1] + c * basis[2] + basis[3]
    ys = b * basis[1] + d * basis[2] + basis[3]
    xs = np.sort(xs)
    if not inverted:
        ys = np.sort(ys)
    return np.interp(v, xs, ys)


def test_bezier_lut_monotone_exact_ends_and_close_to_published():
    n = 64
    controls, _ = G._draw_curves(n, gen(8), torch.device("cpu"))
    inverted = torch.arange(n) % 2 == 1
    lut = G._bezier_lut(controls, inverted, torch.float64)
    steps = lut.diff(dim=1)
    assert bool((steps[~inverted] >= 0).all()) and bool((steps[inverted] <= 0).all())
    assert torch.equal(lut[~inverted, 0], torch.zeros(n // 2, dtype=torch.float64))
    assert torch.equal(lut[~inverted, -1], torch.ones(n // 2, dtype=torch.float64))
    assert torch.equal(lut[inverted, 0], torch.ones(n // 2, dtype=torch.float64))
    assert torch.equal(lut[inverted, -1], torch.zeros(n // 2, dtype=torch.float64))
    v = torch.rand(1, 5000, generator=gen(9), dtype=torch.float64)
    errors = []
    for i in range(n):
        ours = G._apply_lut(v, lut[i:i + 1]).numpy()[0]
        ref = _published_map(controls[i].numpy(), bool(inverted[i]), v.numpy()[0])
        errors.append(np.abs(ours - ref))
    errors = np.concatenate(errors)
    assert np.median(errors) < 1e-4 and np.quantile(errors, 0.999) < 5e-3


def test_nonlinear_and_inversion_rates():
    n = 1000
    x = ramp(n, (8, 8, 8))
    inputs, _ = corrupt(x, gen(10), **{**OFF, "nonlinear_rate": 0.9})
    flat, ref = inputs.flatten(1), x.flatten(1)
    changed = (flat != ref).any(1)
    assert within(int(changed.sum()), n, 0.9)
    inverted = flat[:, 0] > flat[:, -1]  # lowest input voxel ends up brightest
    assert within(int(inverted.sum()), int(changed.sum()), 0.5)
    assert not bool(inverted[~changed].any())
    steps = flat.diff(dim=1)  # the ramp increases along the voxels: a monotone map keeps or reverses that order
    assert bool((steps[changed & ~inverted] >= 0).all()) and bool((steps[inverted] <= 0).all())
    assert float(flat.min()) >= 0 and float(flat.max()) <= 1


# --- 4. painting -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["inpaint", "outpaint"])
def test_box_ranges_and_counts(kind):
    n, spatial, cfg = 4000, (64, 40, 32), GenesisRates()
    sides, corners, active = G._draw_boxes(n, spatial, kind, cfg, gen(11), torch.device("cpu"))
    for a, dim in enumerate(spatial):
        lo, hi = (dim // 6, dim // 3) if kind == "inpaint" else (dim - 4 * dim // 7, dim - 3 * dim // 7)
        assert set(sides[..., a].unique().tolist()) == set(range(lo, hi + 1))
        assert int(corners[..., a].min()) == 3
        assert bool((corners[..., a] <= dim - sides[..., a] - 3).all())
        assert bool((corners[..., a] == dim - sides[..., a] - 3).any())
    boxes = active.sum(1)
    assert torch.equal(active, torch.arange(5).expand(n, 5) < boxes[:, None])  # active boxes are a prefix
    if kind == "inpaint":  # every box, the first too, needs a draw < 0.95
        probs = [0.05 * 0.95**k for k in range(5)] + [0.95**5]
        counts = range(6)
    else:
        probs = [0.05 * 0.95**k for k in range(4)] + [0.95**4]
        counts = range(1, 6)
    for k, p in zip(counts, probs):
        assert within(int((boxes == k).sum()), n, p)


@pytest.mark.parametrize("boxes", [5, 12, 40, 64])  # bit codes in uint8, int16, int32, int64
def test_box_masks_match_slicing(boxes):
    spatial, n = (17, 15, 16), 6
    cfg = GenesisRates(inpaint_continue=0.97, max_inpaint_boxes=boxes)
    sides, corners, active = G._draw_boxes(n, spatial, "inpaint", cfg, gen(12), torch.device("cpu"))
    invert = torch.tensor([False, True, False, True, True, False])
    union = torch.zeros(n, 1, *spatial, dtype=torch.bool)
    for s in range(n):
        for k in range(boxes):
            if active[s, k]:
                union[(s, 0) + tuple(slice(int(c), int(c + w)) for c, w in zip(corners[s, k], sides[s, k]))] = True
    codes = G._box_codes(sides, corners, active, spatial)
    assert torch.equal(G._code_mask(*codes, boxes, None), union)
    assert torch.equal(G._code_mask(*codes, boxes, invert), union ^ invert.view(-1, 1, 1, 1, 1))
    assert torch.equal(G._code_mask(*codes, boxes, torch.ones(n, dtype=torch.bool)), ~union)
    assert int(active.sum(1).max()) > 8 or boxes == 5


def test_paint_rates_and_regions():
    n, spatial = 2000, (16, 16, 16)
    x = torch.full((n, 1, *spatial), 0.5)
    inputs, _ = corrupt(x, gen(13), **{**OFF, "paint_rate": 0.9})
    changed = (inputs != 0.5).flatten(1).float().mean(1)
    interior = torch.zeros(spatial, dtype=torch.bool)
    interior[3:13, 3:13, 3:13] = True  # every box lies inside [3, dim - 3)
    outside_changed = (inputs[:, 0, ~interior] != 0.5).any(1)
    out = changed > 0.5  # out-painting: noise at least everywhere outside the interior (76 %)
    inp = (changed > 0) & ~out
    assert within(int(out.sum()), n, 0.9 * 0.8)
    assert within(int(inp.sum()), n, 0.9 * 0.2 * 0.95)
    assert bool(outside_changed[out].all()) and not bool(outside_changed[inp].any())
    assert float(changed[inp].max()) <= 1000 / 4096


# --- loss and recipes ------------------------------------------------------------------------------------------

def test_restoration_loss():
    logits = torch.randn(2, 1, 4, 4, 4, requires_grad=True)
    target = torch.rand(2, 1, 4, 4, 4)
    loss = RestorationLoss()(logits, target)
    assert torch.allclose(loss, F.mse_loss(torch.sigmoid(logits), target))
    loss.backward()
    assert logits.grad is not None
    probs = torch.rand(2, 1, 4, 4, 4)
    assert torch.allclose(RestorationLoss(from_logits=False)(probs, target), F.mse_loss(probs, target))
    with pytest.raises(ValueError, match="same shape"):
        RestorationLoss()(logits, target[:1])


@pytest.mark.parametrize("recipe", [PUBLISHED_RECIPE, MODERN_RECIPE])
def test_recipes_validate(recipe):
    from medtransfer.train.config import FinetuneConfig

    cfg = FinetuneConfig.model_validate({"model": {"name": "genesis_unet3d"}, **recipe})
    assert cfg.optim.name == recipe["optim"]["name"] and cfg.optim.lr == recipe["optim"]["lr"]
    assert cfg.train.monitor == "loss"


# --- CUDA ------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_distribution():
    n = 512
    x = torch.rand(n, 1, 24, 24, 16, generator=gen(14))
    stats = {}
    for device in ("cpu", "cuda"):
        a = corrupt(x.to(device), gen(15, device), local_blocks=2000)
        b = corrupt(x.to(device), gen(15, device), local_blocks=2000)
        assert torch.equal(a[0], b[0]) and a[0].device.type == device
        inputs, targets = a[0].cpu(), a[1].cpu()
        assert 0 <= float(inputs.min()) and float(inputs.max()) <= 1
        flips = (targets != x).flatten(1).any(1).float().mean()
        changed = (inputs != targets).flatten(1).float().mean(1)
        stats[device] = (float(flips), float((changed > 0.5).float().mean()), float(changed.mean()))
    for cpu_value, cuda_value in zip(stats["cpu"], stats["cuda"]):
        assert abs(cpu_value - cuda_value) < 0.1


def _exact_bezier_map(controls: torch.Tensor, inverted: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The exact intensity map (n, m) at values ``v`` (1, m): solve x(s) = v for s by bisection (x is increasing in
    s for controls in [0, 1]; 34 bits put s within 3e-11, y within 1e-10), then y(s), or y(1 - s) for inverted
    curves."""
    a, b, c, d = (controls[:, i : i + 1] for i in range(4))
    x1, x2, x3 = 3 * a, 3 * c - 6 * a, 1 + 3 * a - 3 * c  # x(s) = ((x3 s + x2) s + x1) s, the Bernstein form expanded
    s = torch.zeros(controls.shape[0], v.shape[1], dtype=torch.float64)
    for k in range(1, 35):  # binary digits of s, largest first
        t = s + 2.0**-k
        s = torch.where(((x3 * t + x2) * t + x1) * t < v, t, s)
    s += 2.0**-35
    s = torch.where(inverted.view(-1, 1), 1 - s, s)
    return 3 * b * s * (1 - s) ** 2 + 3 * d * s**2 * (1 - s) + s**3


def test_bezier_lut_error_against_the_exact_curve():
    """The figures quoted in the genesis module docstring, on 128 seeded curves (half inverted)."""
    n = 128
    controls, _ = G._draw_curves(n, gen(21), torch.device("cpu"))
    inverted = torch.arange(n) % 2 == 1
    lut = G._bezier_lut(controls, inverted, torch.float64)
    size = G.LUT_SIZE
    grid = torch.linspace(0.0, 1.0, size, dtype=torch.float64).view(1, -1)
    # the table entries themselves (a polyline through CURVE_SAMPLES points) are the curve to within ~1e-6
    assert float((lut - _exact_bezier_map(controls, inverted, grid)).abs().max()) < 5e-6
    # random intensities read at the nearest entry, as corrupt() does
    v = torch.rand(1, 4000, generator=gen(22), dtype=torch.float64)
    errors = (G._apply_lut(v.expand(n, -1).contiguous(), lut) - _exact_bezier_map(controls, inverted, v)).abs()
    assert float(errors.median()) < 3e-5
    assert float(torch.quantile(errors.flatten(), 0.999)) < 4e-4
    # the largest error of each curve: the map is monotone, so within the cell of entry j, [(j - 1/2) h, (j + 1/2) h],
    # it is reached at a cell edge
    h = 1.0 / (size - 1)
    edges = ((torch.arange(size + 1, dtype=torch.float64) - 0.5) * h).clamp(0, 1).view(1, -1)
    at_edges = _exact_bezier_map(controls, inverted, edges)
    worst = torch.maximum((at_edges[:, :-1] - lut).abs(), (at_edges[:, 1:] - lut).abs()).max(dim=1).values
    assert float(worst.median()) < 3e-4
    assert float(torch.quantile(worst, 0.99)) < 5e-3
    # next to a vertical tangent (a or 1 - c near 0) a curve errs by more than the old "about 2e-3", but below 5e-2
    assert 2e-3 < float(worst.max()) < 5e-2
    steepest = controls[int(worst.argmax())]
    assert min(float(steepest[0]), 1 - float(steepest[2])) < 0.05
