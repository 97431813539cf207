"""Volume Fusion's two views of one volume: random-resized crops, flips, adaptive contrast, gamma and inversion
(PyMIC's ``Crop4VolumeFusion``; paper and method in :mod:`.volume_fusion`, which re-exports these names).

Deviations from the published code, on purpose (those of the fusion step are listed in :mod:`.volume_fusion`):

- Everything runs on torch tensors on the input's device with an explicit ``torch.Generator`` living on that device
  (``None``: torch's global RNG), batched; the published code uses numpy/``random`` per sample. Same algorithm,
  different random streams.
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
"""

from __future__ import annotations

import math
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
