"""Chest-radiograph-like views of a phantom CT: a digitally reconstructed radiograph (DRR), a lung mask, findings.

Why: the 2D half of medtransfer (ResNet-50 classification and U-Net segmentation of radiographs) needs data on a
fresh machine too. Projecting the 3D phantom gives radiographs whose findings follow from the anatomy that was drawn
(an enlarged heart, fluid at the lung base, a nodule), so a 2D model has real cues to learn, and its lung mask is
exact.

The DRR follows Beer-Lambert: HU become linear attenuation ``mu = mu_water * (1 + HU / 1000)`` (clipped at 0),
integrated along the anterior-posterior axis (array axis 1, y); the detector sees ``I = exp(-sum(mu * dy))``. A
radiograph shows ``-log I`` (the line integral ``p``) windowed to [0, 1], so dense paths (bone, mediastinum) are
bright and air is black. The window is ``[0, p_99.5]`` of the image, an automatic exposure like a detector's.

Orientation of every 2D array: rows run from superior (row 0) to inferior, columns from the patient's right to the
patient's left, as a frontal chest radiograph is displayed (viewer facing the patient).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

# Linear attenuation of water near a chest radiograph's effective energy (~70 keV), per millimetre.
MU_WATER_PER_MM = 0.0193

# The multi-label vector of the 2D dataset, in this order (names as in ChestX-ray14 where one exists).
FINDINGS_2D: tuple[str, ...] = ("nodule", "cardiomegaly", "effusion")

_AP_AXIS = 1  # array axis y runs anterior -> posterior


def line_integrals(hu: np.ndarray, spacing_y_mm: float, *, mu_water: float = MU_WATER_PER_MM) -> np.ndarray:
    """``p = sum_y mu * dy`` for a ``[z, y, x]`` HU volume -> ``(D, W)`` in array orientation (not flipped)."""
    mu = np.clip(mu_water * (1.0 + hu.astype(np.float32) / 1000.0), 0.0, None)
    return mu.sum(axis=_AP_AXIS, dtype=np.float64).astype(np.float32) * np.float32(spacing_y_mm)


def radiograph(
    hu: np.ndarray,
    spacing: Sequence[float],
    *,
    size: int | tuple[int, int] | None = None,
    mu_water: float = MU_WATER_PER_MM,
    percentile: float = 99.5,
) -> np.ndarray:
    """A frontal radiograph of a ``[z, y, x]`` HU volume: float32 in [0, 1], bones bright, superior at row 0.

    ``size`` resamples to ``(rows, cols)`` (an int for a square image); the native size is ``(D, W)`` with pixel
    spacing ``(spacing[0], spacing[2])``. Transmission ``I = exp(-p)`` is what a detector measures; its negative
    log is ``p`` itself, so the display value is ``p`` windowed.
    """
    p = line_integrals(hu, float(spacing[_AP_AXIS]), mu_water=mu_water)
    top = float(np.percentile(p, percentile))
    image = np.clip(p / top, 0.0, 1.0) if top > 0 else np.zeros_like(p)
    return resize_2d(to_display(image), size, order=1)


def project_mask(mask: np.ndarray, *, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """The frontal shadow of a 3D binary mask (any voxel along y) as uint8 0/1, in radiograph orientation."""
    shadow = to_display(np.any(mask, axis=_AP_AXIS).astype(np.float32))
    if size is None:
        return shadow.astype(np.uint8)
    # Resample the shadow as a fraction and cut at one half: nearest-neighbour would drop thin parts unevenly.
    return (resize_2d(shadow, size, order=1) >= 0.5).astype(np.uint8)


def to_display(projection: np.ndarray) -> np.ndarray:
    """Array orientation ``(z, x)`` -> radiograph orientation: superior at the top (z grows toward the head)."""
    return np.ascontiguousarray(projection[::-1, :])


def resize_2d(image: np.ndarray, size: int | tuple[int, int] | None, *, order: int = 1) -> np.ndarray:
    """Resample a 2D array to ``size`` (rows, cols); ``None`` keeps it. Spline ``order`` as scipy.ndimage.zoom."""
    if size is None:
        return image
    rows, cols = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    if (rows, cols) == image.shape:
        return image
    factors = (rows / image.shape[0], cols / image.shape[1])
    out = ndimage.zoom(image.astype(np.float32), factors, order=order, mode="nearest", grid_mode=True)
    return np.clip(out, float(image.min()), float(image.max())).astype(np.float32)


def pixel_spacing(
    shape3d: Sequence[int], spacing: Sequence[float], size: int | tuple[int, int] | None
) -> tuple[float, float]:
    """Spacing (mm) of the radiograph's rows and columns, for a volume of ``shape3d`` at ``spacing``."""
    native = (shape3d[0], shape3d[2])
    if size is None:
        return float(spacing[0]), float(spacing[2])
    rows, cols = (size, size) if isinstance(size, (int, np.integer)) else size
    return float(spacing[0]) * native[0] / rows, float(spacing[2]) * native[1] / cols


def findings_vector(findings: Mapping[str, Any]) -> np.ndarray:
    """0/1 float32 vector over :data:`FINDINGS_2D` from a phantom's findings dict."""
    return np.array([1.0 if findings.get(name) else 0.0 for name in FINDINGS_2D], dtype=np.float32)


def cardiothoracic_ratio(heart: np.ndarray, thorax: np.ndarray) -> float:
    """Widest heart shadow over widest inner thorax shadow (the radiologist's measure on a frontal film).

    ``heart`` and ``thorax`` are 3D masks; widths are counted in columns of their frontal projections, so the
    ratio does not depend on spacing. Above 0.5 is read as cardiomegaly.
    """
    def widest(mask: np.ndarray) -> int:
        cols = np.any(mask, axis=_AP_AXIS)  # (D, W)
        has = cols.any(axis=1)
        if not has.any():
            return 0
        first = np.argmax(cols, axis=1)
        last = cols.shape[1] - 1 - np.argmax(cols[:, ::-1], axis=1)
        return int(np.max(np.where(has, last - first + 1, 0)))

    chest = widest(thorax)
    return widest(heart) / chest if chest else 0.0
