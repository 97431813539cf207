"""Models Genesis: restore a cube from a randomly corrupted copy (flip, local shuffling, intensity curve, painting).

Paper: Z. Zhou, V. Sodha, J. Pang, M. B. Gotway, J. Liang, "Models Genesis", Medical Image Analysis 67, 2021
(first: "Models Genesis: Generic Autodidactic Models for 3D Medical Image Analysis", MICCAI 2019). The objective
is the MSE between the network's sigmoid output and the uncorrupted cube (:class:`RestorationLoss`).

:func:`corrupt` applies, per sample and in this order (spec 3b; rates are the fields of :class:`GenesisRates`):

1. **Flip** input and target together, up to ``max_flips`` times while ``U < flip_rate``, along an axis drawn
   uniformly from the three spatial axes (``official_flip=True``: from {channel (a no-op), the two axes other than
   ``depth_dim``}, the published off-by-one in which depth is never flipped).
2. **Local pixel shuffling** with p ``local_rate``: ``local_blocks`` blocks with sides ``U{1..max(1, dim // 10)}``
   and corners ``U{0..dim - side}`` (bounds inclusive); each block's voxels, read from the un-shuffled cube, are
   permuted uniformly at random and written back. Where blocks overlap the later block wins, as with the published
   sequential writes.
3. **Non-linear intensity** with p ``nonlinear_rate``: the cubic Bezier curve through (0,0), (a,b), (c,d), (1,1),
   ``a..d ~ U[0, 1)``, as an increasing map, or with p ``inverse_rate`` the decreasing one (map(0) = 1, map(1) = 0).
4. **Painting** with p ``paint_rate``; in-painting with p ``inpaint_rate``, else out-painting.
   In-painting: up to ``max_inpaint_boxes`` boxes, *each one, the first included*, drawn while
   ``U < inpaint_continue`` (as published: with the defaults 5 % of in-painted cubes get no box); sides
   ``U{dim // 6..dim // 3}``, corners ``U{3..dim - side - 3}``; filled with ``U[0, 1)`` noise.
   Out-painting: the cube becomes ``U[0, 1)`` noise except one box of the pre-painting cube, side
   ``dim - U{3 * dim // 7..4 * dim // 7}``, corner ``U{3..dim - side - 3}``, plus more such boxes while
   ``U < outpaint_continue``, ``max_outpaint_boxes`` in all.

How it is vectorised: flips copy only the flipped samples. Shuffling groups the blocks of a cube by volume class
([2**k, 2**(k+1))); per class one row gather from a per-call table (shape x bank permutation x in-block index,
padded to the class's largest volume with repeats) gives every block voxel and the voxel it reads, and one
``scatter_reduce(amax)`` of ``block * 2**32 + source`` keeps the last block per voxel; one gather reads the values
(on CPU one cube at a time, ``CPU_SHUFFLE_CHUNK``). The Bezier map is a per-sample look-up table read with one
``index_select``. Painting marks box k as bit k of per-(x, y) and per-z codes, so the noise mask is one ``&`` of
bytes, and fills the noise with one ``torch.where``.

Deviations from the published code (``pytorch/utils.py``), on purpose:

- The flip axis off-by-one is fixed by default (``official_flip`` reproduces it).
- Random draws come from torch on the batch's device with an explicit ``torch.Generator``; same seed, same output.
- Shuffle permutations come from a bank: per call, ``SHUFFLE_BANK`` uniform random permutations are drawn per block
  volume and every block uses one of those of its volume, chosen uniformly: marginally uniform as published, but
  blocks of one volume in one call (across the batch) share those permutations instead of each getting an
  independent ``np.random.shuffle``. Which voxels change, and from which block they read, is exact.
- The Bezier curve is sampled at ``CURVE_SAMPLES`` points (published: 1e5), as a polyline, into a ``LUT_SIZE``-entry
  uniform look-up table read at the nearest entry instead of ``np.interp`` over the raw samples. Measured against
  the exact curve (``x(s) = v`` solved for ``s``; the published map is within 3e-9 of it), the table entries are
  within about 1e-6, but the nearest-entry read moves the intensity by up to half a step (6.1e-5): over 16 million
  random (curve, intensity) pairs (4,000 curves x 4,000 intensities, two seeds) the error has a median of 2e-5,
  99.9 % of pairs are below 4e-4 and the largest was 5e-3 and 9e-3. The largest error of one curve over all
  intensities has a median of 1.5e-4 and is below 4e-3 for 99 % of curves, but reached 4.4e-2 among 4,000 curves.
  Those errors sit next to a vertical tangent of the curve (control ``a`` or ``1 - c`` near 0, intensities near 0
  or 1), where the map's slope is unbounded. ``test_bezier_lut_error_against_the_exact_curve`` checks these
  figures, with some margin, on 128 curves. Both coordinates of the curve are monotone for control values in
  [0, 1], so the published "sort x and y" / "sort x only" equal "s ascending" / "y reversed" here.
- Integer draws (block and box sides and corners) scale float32 uniforms (2**24 levels) instead of float64 ones.
- A cube side below 10 has block sides of 1 (the published ``randint(1, dim // 10)`` fails there); cubes too small
  for the painting boxes raise a ValueError instead of failing inside ``randint``.
- The input dtype is kept (the published code works in float64) and the input batch is never modified.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

CURVE_SAMPLES = 4096  # Bezier samples per curve
LUT_SIZE = 8192  # entries of the per-sample intensity look-up table on [0, 1] (nearest entry)
MAX_LOCAL_BLOCKS = 1_000_000  # more shuffled blocks per cube is a typo, not a setting
CPU_SHUFFLE_CHUNK = 1  # cubes per vectorised shuffle on CPU: bigger slot arrays fall out of cache (GPU: all)
SHUFFLE_BANK = 16  # uniform permutations drawn per block volume and local_shuffle call


@dataclass(frozen=True)
class GenesisRates:
    """Probabilities and counts of :func:`corrupt`; the defaults are the published ones (spec 3b)."""

    flip_rate: float = 0.4
    max_flips: int = 3
    local_rate: float = 0.5
    local_blocks: int = 10_000
    nonlinear_rate: float = 0.9
    inverse_rate: float = 0.5
    paint_rate: float = 0.9
    inpaint_rate: float = 0.2
    inpaint_continue: float = 0.95
    max_inpaint_boxes: int = 5
    outpaint_continue: float = 0.95
    max_outpaint_boxes: int = 5
    official_flip: bool = False
    depth_dim: int = -1

    def __post_init__(self) -> None:
        for name in ("flip_rate", "local_rate", "nonlinear_rate", "inverse_rate", "paint_rate", "inpaint_rate",
                     "inpaint_continue", "outpaint_continue"):
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
        limits = {"max_flips": (0, 64), "local_blocks": (0, MAX_LOCAL_BLOCKS), "max_inpaint_boxes": (0, 64),
                  "max_outpaint_boxes": (1, 64)}
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        if self.depth_dim not in (2, 3, 4, -3, -2, -1):
            raise ValueError(f"depth_dim must name a spatial dim of the (N, 1, X, Y, Z) batch (2, 3, 4 or -3, -2, -1), "
                             f"got {self.depth_dim!r}")


def make_rates(**rates) -> GenesisRates:
    """:class:`GenesisRates` from keyword overrides; an unknown name raises TypeError listing the valid ones."""
    valid = [f.name for f in fields(GenesisRates)]
    unknown = sorted(set(rates) - set(valid))
    if unknown:
        raise TypeError(f"unknown Models Genesis rate(s) {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
    return GenesisRates(**rates)


# --- validation and random integers ----------------------------------------------------------------------------

def _paint_sides(spatial: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest and largest box side per axis (inclusive) of in-painting or out-painting."""
    if kind == "inpaint":
        return spatial // 6, spatial // 3
    return spatial - 4 * spatial // 7, spatial - 3 * spatial // 7


def _check_batch(batch: torch.Tensor, cfg: GenesisRates) -> None:
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"batch must be a torch.Tensor of shape (N, 1, X, Y, Z), got {type(batch).__name__}")
    if batch.ndim != 5 or batch.shape[1] != 1 or batch.numel() == 0:
        raise ValueError(f"batch must have shape (N, 1, X, Y, Z) with N, X, Y, Z >= 1, got {tuple(batch.shape)}")
    if not batch.is_floating_point():
        raise ValueError(f"batch must be a floating-point tensor with values in [0, 1], got dtype {batch.dtype}")
    low, high = torch.aminmax(batch)
    low, high = float(low), float(high)
    if not (0.0 <= low and high <= 1.0):  # also rejects NaN
        raise ValueError(f"batch values must lie in [0, 1], got min {low} and max {high}")
    spatial = torch.tensor(batch.shape[2:])
    kinds = []
    if cfg.paint_rate > 0 and cfg.inpaint_rate > 0 and cfg.max_inpaint_boxes > 0 and cfg.inpaint_continue > 0:
        kinds.append("inpaint")
    if cfg.paint_rate > 0 and cfg.inpaint_rate < 1:
        kinds.append("outpaint")
    for kind in kinds:
        low_side, high_side = _paint_sides(spatial, kind)
        if bool((low_side < 1).any() or (spatial - high_side - 3 < 3).any()):
            need = 8 if kind == "inpaint" else 14
            raise ValueError(f"{kind}ing needs every spatial size of batch >= {need} (boxes keep 3 voxels from the "
                             f"border), got {tuple(batch.shape[2:])}; use larger cubes or paint_rate=0")


def _randint(low: torch.Tensor | int, high: torch.Tensor | int, shape: tuple[int, ...],
             generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform integers in [low, high], both inclusive, elementwise (low and high broadcast to shape)."""
    low = torch.as_tensor(low, device=device)
    high = torch.as_tensor(high, device=device)
    u = torch.rand(shape, generator=generator, device=device)  # float32: 2**24 levels, ranges here are small
    return torch.minimum(low + (u * (high - low + 1)).long(), high.expand(shape))


# --- 1. flip ---------------------------------------------------------------------------------------------------

def _draw_flips(n: int, cfg: GenesisRates, generator: torch.Generator | None,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: the number of flips (N,) and the axis slot (N, max_flips), -1 where no flip happened.

    Slots 0, 1, 2 are the spatial dims 2, 3, 4; with ``official_flip`` slot 0 is the channel (a no-op) and slots
    1, 2 are the two spatial dims other than ``depth_dim``."""
    shape = (n, cfg.max_flips)
    active = (torch.rand(shape, generator=generator, device=device) < cfg.flip_rate).long().cumprod(1).bool()
    slots = torch.randint(0, 3, shape, generator=generator, device=device)
    return active.sum(1), torch.where(active, slots, -1)


def _slot_dims(cfg: GenesisRates) -> tuple[int | None, int | None, int | None]:
    if not cfg.official_flip:
        return 2, 3, 4
    depth = cfg.depth_dim % 5
    others = [d for d in (2, 3, 4) if d != depth]
    return None, others[0], others[1]


def _apply_flips(x: torch.Tensor, slots: torch.Tensor, cfg: GenesisRates) -> torch.Tensor:
    # Flips along different axes commute, so each axis is flipped once where its flip count is odd.
    for slot, dim in enumerate(_slot_dims(cfg)):
        rows = torch.nonzero((slots == slot).sum(1) % 2 == 1).view(-1)
        if dim is not None and rows.numel() > 0:
            x = _on_rows(x, rows, lambda part, dim=dim: part.flip(dim))
    return x


def _on_rows(x: torch.Tensor, rows: torch.Tensor, fn) -> torch.Tensor:
    """``x`` with ``fn`` applied to the samples ``rows`` (in place when not all of them)."""
    return fn(x) if rows.numel() == x.shape[0] else x.index_copy_(0, rows, fn(x.index_select(0, rows)))


# --- 2. local pixel shuffling ----------------------------------------------------------------------------------

def _draw_shuffle_blocks(n: int, spatial: tuple[int, int, int], count: int, generator: torch.Generator | None,
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sides (n, count, 3) in [1, max(1, dim // 10)] and corners (n, count, 3) in [0, dim - side], inclusive."""
    dims = torch.tensor(spatial, device=device)
    u = torch.rand((n, count, 6), generator=generator, device=device)  # as _randint, fewer passes: a hot spot
    sides = u[..., :3].mul((dims // 10).clamp(min=1)).long().add_(1).clamp_(max=(dims // 10).clamp(min=1))
    return sides, u[..., 3:].mul(dims - sides + 1).long().clamp_(max=dims - sides)


@functools.lru_cache(maxsize=8)
def _shape_classes(spatial: tuple[int, int, int], device: torch.device):
    """Class (C,) and row in its class (C,) of block shape codes ``((sx - 1) * my + sy - 1) * mz + sz - 1``, and
    per class (volumes in [2**k, 2**(k+1))) the volumes (C_k,) and row-major in-block offsets (C_k, largest volume)."""
    max_sides = [max(1, d // 10) for d in spatial]
    grids = torch.meshgrid(*[torch.arange(1, m + 1, device=device) for m in max_sides], indexing="ij")
    sx, sy, sz = (g.reshape(-1, 1) for g in grids)
    volume = (sx * sy * sz).view(-1)
    local = torch.arange(int(volume.max()), device=device)
    offsets = (local // (sy * sz)) * (spatial[1] * spatial[2]) + (local // sz % sy) * spatial[2] + local % sz
    offsets = torch.where(local < volume.view(-1, 1), offsets, 0)
    klass = volume.log2().floor_().long()
    row, classes = torch.zeros_like(klass), []
    for k in klass.unique().tolist():
        codes = torch.nonzero(klass == k).view(-1)
        row[codes] = torch.arange(codes.numel(), device=device)
        width = int(volume[codes].max())
        classes.append((volume[codes], offsets[codes, :width].contiguous()))
    return torch.unique(klass, return_inverse=True)[1], row, classes


def _permutation_bank(volume: torch.Tensor, count: int, width: int, generator: torch.Generator | None) -> torch.Tensor:
    """(C, count, width): row [c, k] starts with a uniform random permutation of range(volume[c]).

    Codes of equal volume share their rows; the entries past a row's volume are >= the volume."""
    distinct, inverse = volume.unique(return_inverse=True)
    keys = torch.rand((distinct.numel(), count, width), generator=generator, device=volume.device, dtype=torch.float64)
    keys.masked_fill_(torch.arange(width, device=volume.device) >= distinct.view(-1, 1, 1), 2.0)
    return keys.argsort(-1).index_select(0, inverse)


def _shuffle_tables(spatial: tuple[int, int, int], generator: torch.Generator | None, device: torch.device):
    """Per class, the codes' voxel offsets (C_k, w) and the offsets of the voxels they read under every bank
    permutation (C_k * SHUFFLE_BANK, w); past a code's volume both repeat index 0 (harmless repeated writes)."""
    klass, row, classes = _shape_classes(spatial, device)
    tables = []
    for volume, offsets in classes:
        bank = _permutation_bank(volume, SHUFFLE_BANK, offsets.shape[1], generator)
        sources = offsets.gather(1, bank.flatten(1)).view_as(bank)
        past = torch.arange(offsets.shape[1], device=device) >= volume.view(-1, 1, 1)
        tables.append((offsets, torch.where(past, sources[..., :1], sources).flatten(0, 1)))
    return klass, row, tables


def _shuffle_chunk(x: torch.Tensor, sides: torch.Tensor, corners: torch.Tensor, pick: torch.Tensor,
                   tables, out: torch.Tensor) -> None:
    """Shuffle the drawn blocks of the cubes ``x`` (s, 1, X, Y, Z) into ``out``, s * X * Y * Z < 2**32."""
    klass, row, per_class = tables
    s, device, (ny, nz), voxels = x.shape[0], x.device, x.shape[3:], x[0].numel()
    my, mz = max(1, ny // 10), max(1, nz // 10)
    code = (((sides[..., 0] - 1) * my + sides[..., 1] - 1) * mz + sides[..., 2] - 1).view(-1)
    base = torch.arange(s, device=device).view(-1, 1) * voxels
    corner = (base + corners[..., 0] * (ny * nz) + corners[..., 1] * nz + corners[..., 2]).view(-1)
    # key = block * 2**32 + source voxel: the largest key at a voxel is the last block's. Unwritten voxels keep
    # -2**62 + their own index, whose low 32 bits are that index: they read themselves.
    keyed = torch.arange(code.numel(), device=device).mul_(1 << 32).add_(corner)
    group = klass.index_select(0, code)
    order = group.argsort()
    counts = torch.bincount(group, minlength=len(per_class)).tolist()
    code_row = row.index_select(0, code.index_select(0, order))
    corner, keyed = corner.index_select(0, order), keyed.index_select(0, order)
    source_row = pick.reshape(-1).index_select(0, order).add_(code_row * SHUFFLE_BANK)
    winner = torch.arange(s * voxels, device=device).sub_(1 << 62)
    lo = 0
    for (offsets, sources), count in zip(per_class, counts):
        part = slice(lo, lo + count)
        dest = offsets.index_select(0, code_row[part]).add_(corner[part, None])
        key = sources.index_select(0, source_row[part]).add_(keyed[part, None])
        winner.scatter_reduce_(0, dest.view(-1), key.view(-1), reduce="amax")
        lo += count
    torch.index_select(x.reshape(-1), 0, winner.bitwise_and_(0xFFFFFFFF), out=out.view(-1))


def _local_shuffle(x: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """Shuffle ``count`` blocks in every cube of ``x`` (S, 1, X, Y, Z); the last block writing a voxel wins."""
    s, device, spatial = x.shape[0], x.device, tuple(x.shape[2:])
    sides, corners = _draw_shuffle_blocks(s, spatial, count, generator, device)
    pick = torch.randint(0, SHUFFLE_BANK, (s, count), generator=generator, device=device)
    tables = _shuffle_tables(spatial, generator, device)
    chunk = CPU_SHUFFLE_CHUNK if device.type == "cpu" else max(1, (2**32 - 1) // x[0].numel())
    x, out = x.contiguous(), torch.empty_like(x, memory_format=torch.contiguous_format)
    for lo in range(0, s, chunk):
        part = slice(lo, lo + chunk)
        _shuffle_chunk(x[part], sides[part], corners[part], pick[part], tables, out[part])
    return out


# --- 3. non-linear intensity -----------------------------------------------------------------------------------

def _draw_curves(n: int, generator: torch.Generator | None,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Control values (n, 4) = (a, b, c, d) of the points (a, b), (c, d), and uniforms (n,) for the inversion."""
    controls = torch.rand((n, 4), generator=generator, device=device, dtype=torch.float64)
    return controls, torch.rand(n, generator=generator, device=device)


def _bezier_lut(controls: torch.Tensor, inverted: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-sample map values (n, LUT_SIZE) on the uniform grid ``j / (LUT_SIZE - 1)`` of [0, 1]."""
    n, device = controls.shape[0], controls.device
    s = torch.linspace(0.0, 1.0, CURVE_SAMPLES, device=device, dtype=torch.float64)
    b1, b2, b3 = 3 * s * (1 - s) ** 2, 3 * s**2 * (1 - s), s**3
    # Both coordinates are monotone in s for controls in [0, 1]; cummax only removes rounding wiggles.
    xs = (controls[:, 0:1] * b1 + controls[:, 2:3] * b2 + b3).cummax(1).values
    ys = (controls[:, 1:2] * b1 + controls[:, 3:4] * b2 + b3).cummax(1).values
    ys = torch.where(inverted.view(-1, 1), ys.flip(1), ys)
    slope = ys.diff(dim=1).div_(xs.diff(dim=1).clamp_(min=1e-300))
    intercept = ys[:, :-1] - slope * xs[:, :-1]
    # Polyline segment i: y = intercept_i + slope_i * x. Grid point j lies in segment #{i: xs_i <= j / (LUT_SIZE - 1)}
    # - 1 (a searchsorted of the grid), counted from the first grid point at or after every sample.
    first = (xs * (LUT_SIZE - 1)).ceil_().long().clamp_(0, LUT_SIZE)
    counts = torch.zeros((n, LUT_SIZE + 1), device=device, dtype=torch.long)
    counts.scatter_add_(1, first, torch.ones_like(first))
    segment = counts[:, :LUT_SIZE].cumsum(1).sub_(1).clamp_(0, CURVE_SAMPLES - 2)
    grid = torch.linspace(0.0, 1.0, LUT_SIZE, device=device, dtype=torch.float64)
    lut = torch.addcmul(intercept.gather(1, segment), slope.gather(1, segment), grid).clamp_(0, 1)
    lut[:, 0], lut[:, -1] = ys[:, 0], ys[:, -1]  # map(0) and map(1) exact: 0 and 1, or 1 and 0 when inverted
    sign = 1 - 2 * inverted.to(lut.dtype).view(-1, 1)  # monotone up to rounding; make it exactly monotone
    return lut.mul_(sign).cummax(1).values.mul_(sign).to(dtype)


def _apply_lut(x: torch.Tensor, lut: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """The nearest table entry per voxel, one int32 index_select, no lerp (the error this costs, largest next to a
    vertical tangent of the curve, is measured in the module docstring)."""
    n, size = lut.shape
    index = x.reshape(n, -1).mul(size - 1).add_(0.5).to(torch.int32)
    index.add_(torch.arange(0, n * size, size, device=x.device, dtype=torch.int32).view(-1, 1))
    out = x.view(-1) if inplace and x.dtype == lut.dtype and x.is_contiguous() else None
    return torch.index_select(lut.reshape(-1), 0, index.view(-1), out=out).view_as(x)


# --- 4. painting -----------------------------------------------------------------------------------------------

def _draw_boxes(n: int, spatial: tuple[int, int, int], kind: str, cfg: GenesisRates,
                generator: torch.Generator | None, device: torch.device):
    """Painting boxes: sides (n, K, 3), corners (n, K, 3) and active (n, K) bool; ``kind`` is inpaint or outpaint.

    In-painting box k is active when draws 0..k are all < inpaint_continue; out-painting box 0 always is, box k > 0
    when draws 1..k are < outpaint_continue. Corners lie in [3, dim - side - 3], inclusive."""
    if kind not in ("inpaint", "outpaint"):
        raise ValueError(f"kind must be 'inpaint' or 'outpaint', got {kind!r}")
    inpaint = kind == "inpaint"
    count = cfg.max_inpaint_boxes if inpaint else cfg.max_outpaint_boxes
    dims = torch.tensor(spatial, device=device)
    u = torch.rand((n, count), generator=generator, device=device)
    if inpaint:
        active = (u < cfg.inpaint_continue).long().cumprod(1).bool()
    else:
        active = torch.cat([torch.ones_like(u[:, :1]), (u[:, 1:] < cfg.outpaint_continue).float()], 1)
        active = active.long().cumprod(1).bool()
    low, high = _paint_sides(dims, kind)
    sides = _randint(low, high, (n, count, 3), generator, device)
    return sides, _randint(3, dims - sides - 3, (n, count, 3), generator, device), active


def _box_codes(sides: torch.Tensor, corners: torch.Tensor, active: torch.Tensor,
               spatial: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bit k of ``plane`` (n, X, Y) and of ``depth`` (n, Z) (int64) is set where active box k covers (x, y), z."""
    inside = []
    for axis, size in enumerate(spatial):
        coord = torch.arange(size, device=sides.device)
        start, stop = corners[..., axis, None], corners[..., axis, None] + sides[..., axis, None]
        inside.append((coord >= start) & (coord < stop))  # (n, K, size)
    bits = torch.ones_like(active, dtype=torch.long) << torch.arange(active.shape[1], device=active.device)
    bits = bits * active  # distinct bits: their (wrapping) sum is their bitwise or
    plane = ((inside[0][..., :, None] & inside[1][..., None, :]) * bits[..., None, None]).sum(1)
    return plane, (inside[2] * bits[..., None]).sum(1)


def _code_mask(plane: torch.Tensor, depth: torch.Tensor, count: int, invert: torch.Tensor | None) -> torch.Tensor:
    """(n, 1, X, Y, Z) bool: inside any box (``count`` bits at most), outside all of them where ``invert``."""
    dtype = next(d for d, b in ((torch.uint8, 8), (torch.int16, 16), (torch.int32, 32), (torch.long, 64)) if b >= count)
    hits = plane.to(dtype)[..., None] & depth.to(dtype)[:, None, None, :]  # (n, X, Y, Z), one byte each by default
    if invert is None or not bool(invert.any()):
        return hits.ne(0).unsqueeze(1)
    return (hits.eq(0) if bool(invert.all()) else hits.ne(0).logical_xor_(invert.view(-1, 1, 1, 1))).unsqueeze(1)


# --- public API ------------------------------------------------------------------------------------------------

def corrupt(batch: torch.Tensor, generator: torch.Generator | None = None,
            **rates) -> tuple[torch.Tensor, torch.Tensor]:
    """Models Genesis corruption of a batch (N, 1, X, Y, Z) with values in [0, 1], on any device.

    Returns ``(inputs, targets)``, both (N, 1, X, Y, Z) with the batch's dtype and device: ``targets`` is the
    (possibly flipped) batch, ``inputs`` the corrupted copy of it. ``rates`` override :class:`GenesisRates` fields
    (an unknown name raises TypeError). ``generator`` lives on the batch's device; None uses torch's global RNG."""
    cfg = make_rates(**rates)
    _check_batch(batch, cfg)
    n, device, spatial = batch.shape[0], batch.device, tuple(batch.shape[2:])

    targets = batch.contiguous().clone()
    if cfg.max_flips > 0:
        targets = _apply_flips(targets, _draw_flips(n, cfg, generator, device)[1], cfg)
    inputs = targets.clone()

    rows = torch.nonzero(torch.rand(n, generator=generator, device=device) < cfg.local_rate).view(-1)
    if cfg.local_blocks > 0 and rows.numel() > 0:
        inputs = _on_rows(inputs, rows, lambda part: _local_shuffle(part, cfg.local_blocks, generator))

    chosen = torch.rand(n, generator=generator, device=device) < cfg.nonlinear_rate
    controls, u_invert = _draw_curves(n, generator, device)
    rows = torch.nonzero(chosen).view(-1)
    if rows.numel() > 0:
        work = torch.promote_types(batch.dtype, torch.float32)
        lut = _bezier_lut(controls[rows], u_invert[rows] < cfg.inverse_rate, work)
        inputs = _on_rows(inputs, rows, lambda part: _apply_lut(part.to(work), lut, inplace=True).to(batch.dtype))

    paint = torch.rand(n, generator=generator, device=device) < cfg.paint_rate
    inpaint = paint & (torch.rand(n, generator=generator, device=device) < cfg.inpaint_rate)
    outpaint = paint & ~inpaint
    codes, bits = [], 1  # per (x, y) column and per z: bit k set by box k of the sample's painting kind
    for kind, chosen in (("inpaint", inpaint), ("outpaint", outpaint)):
        if bool(chosen.any()):
            sides, corners, active = _draw_boxes(n, spatial, kind, cfg, generator, device)
            codes.append(_box_codes(sides, corners, active & chosen.view(-1, 1), spatial))
            bits = max(bits, active.shape[1])
    if codes:
        mask = _code_mask(sum(c[0] for c in codes), sum(c[1] for c in codes), bits, outpaint)
        noise = torch.rand(inputs.shape, generator=generator, device=device, dtype=batch.dtype)
        torch.where(mask, noise, inputs, out=inputs)  # unpainted samples: no box, mask all False
    return inputs, targets


class RestorationLoss(nn.Module):
    """The published objective: MSE between ``sigmoid(logits)`` and the target cube (``from_logits=False``: the
    network already ends in a sigmoid, as the published UNet3D does, and its output is compared directly)."""

    def __init__(self, from_logits: bool = True) -> None:
        super().__init__()
        self.from_logits = from_logits

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape:
            raise ValueError(f"logits and target must have the same shape, got {tuple(logits.shape)} and "
                             f"{tuple(target.shape)}")
        prediction = torch.sigmoid(logits) if self.from_logits else logits
        return F.mse_loss(prediction, target.to(prediction.dtype))


# Published pretraining (pytorch/Genesis_Chest_CT.py, spec 3b): SGD lr 1 momentum 0.9, StepLR 40 epochs x 0.5,
# batch 6, early stop after 50 epochs without a better validation loss, up to 10,000 epochs.
PUBLISHED_RECIPE: dict = {
    "optim": {"name": "sgd", "lr": 1.0, "momentum": 0.9, "weight_decay": 0.0},
    "schedule": {"name": "step", "interval": "epoch", "step_size": 40, "gamma": 0.5},
    "train": {"max_epochs": 10_000, "early_stop_patience": 50, "monitor": "loss"},
    "data": {"batch_size": 6},
}

# Our choice, not a published one. SGD at lr 1 only trains because sigmoid + MSE gives tiny gradients; AdamW at 1e-3
# is the optimiser family of the Genesis downstream configs (spec 3c) and is insensitive to that scale. A linear
# warm-up over 500 steps then cosine decay over the run avoids the early blow-ups of a large first step on
# batch-statistics normalisation; clipping the global gradient norm at 1 damps the spikes of out-painted (mostly
# noise) batches; weight decay 1e-4 is the usual mild AdamW value. Early stopping is off: a cosine schedule has a
# fixed length, so the run is bounded by max_epochs (a budget, 200 epochs of random batches) instead.
MODERN_RECIPE: dict = {
    "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-4},
    "schedule": {"name": "cosine", "interval": "step", "warmup_steps": 500, "warmup": "linear"},
    "train": {"max_epochs": 200, "early_stop_patience": None, "monitor": "loss", "grad_clip": 1.0},
    "data": {"batch_size": 6},
}

__all__ = ["GenesisRates", "make_rates", "corrupt", "RestorationLoss", "PUBLISHED_RECIPE", "MODERN_RECIPE",
           "CURVE_SAMPLES", "LUT_SIZE"]
