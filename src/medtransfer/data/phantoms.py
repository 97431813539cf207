"""Embedded synthetic chest CT: the default dataset every command can run on, with no download.

Why: the demo, the tests and the benchmarks need CT-like volumes with per-voxel labels, case-level classes and
radiographs on a fresh machine. Each case is drawn from its seed alone (``np.random.default_rng(seed)``), so the
same seed gives byte-identical arrays and a dataset of ``n`` cases is reproducible from ``(seed, n)``.

Geometry. Arrays are ``[z, y, x]`` (see ``types.py``) in the canonical orientation of ``io.py``: z runs toward the
head (superior), y toward the back (posterior), x toward the patient's left; direction is the identity and the
volume is centred on the world origin. Anatomy is laid out in fractions of the field of view (``shape * spacing``)
and small structures (vessels, ribs, nodules) in fractions of the thorax size, so any grid holds a whole chest with
the same proportions; a 64^3 grid at 2.5 mm is a small thorax 16 cm across.

Drawing. Every structure is a smooth signed-distance-like field (ellipsoids, tapered capsules, periodic ribs and
vertebrae, lobulated or spiculated spheres) evaluated on coordinate grids, painted in anatomical order: a voxel's HU
moves toward the structure's value by the fraction of the voxel the structure covers (a linear ramp over one voxel,
i.e. partial volume), and its label becomes the structure's where the centre is inside. A Gaussian blur (the
scanner's point spread) and Gaussian noise (10-20 HU) finish the image.

Labels (:data:`LABELS`): 0 background (air, body wall, fat, muscle, ribs, mediastinum, airways, pleural fluid),
1 lung parenchyma, 2 heart, 3 liver, 4 spine (vertebral bone), 5 pulmonary vessel, 6 lesion (a lung nodule or a
liver lesion). Ribs, airways and fluid are drawn but left in the background, as many real label sets do.

Approximate HU: air -1000, fat -120..-80, soft tissue 35..50, lung -890..-850 (denser posteriorly), vessels 30..50,
heart 35..60, liver 50..70, trabecular bone 230..330 in a 550..750 cortex, ribs 350..550, fluid 0..15.

Case class (:data:`CLASSES`, ``PhantomCase.target``): 1 when the case holds a malignant lung nodule, else 0 (a
benign nodule or none). 80% of cases have one nodule, half of those malignant. The cues are visible: a malignant
nodule is larger (9-15% of the thorax half-width in radius), lobulated and usually spiculated, with heterogeneous
soft-tissue density; a benign one is small, smooth and often calcified (300-600 HU core).

Findings (``PhantomCase.findings``, JSON-ready): the drawn parameters and the 2D multi-label findings, each decided
by what was drawn: ``nodule``; ``cardiomegaly`` when the cardiothoracic ratio of the frontal projection is above 0.5
(30% of cases get an enlarged heart); ``effusion`` when posterior basal fluid fills at least 3% of a lung (25% of
cases get fluid); ``liver_lesion`` (30%, hypodense by 25-45 HU).
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from ..errors import DataError
from ..weights.io import atomic_write
from . import phantoms_2d
from .types import Image

logger = logging.getLogger(__name__)

LABELS: dict[int, str] = {0: "background", 1: "lung", 2: "heart", 3: "liver", 4: "spine", 5: "vessel", 6: "lesion"}
CLASSES: dict[int, str] = {0: "benign_or_no_nodule", 1: "malignant_nodule"}
FINDINGS_2D = phantoms_2d.FINDINGS_2D
MIN_EDGE = 16  # below this many voxels per axis the thorax no longer has room for its organs


@dataclass
class PhantomCase:
    """One synthetic case: the CT, its labels, its class and findings, and its frontal radiograph."""

    image: np.ndarray  # float32 HU, [z, y, x]
    label: np.ndarray  # uint8, values in LABELS
    spacing: tuple[float, float, float]
    target: int  # CLASSES
    findings: dict[str, Any]
    drr: np.ndarray  # float32 in [0, 1], (rows, cols), superior at row 0, patient's right on the left
    lung_mask_2d: np.ndarray  # uint8 0/1, same shape as drr
    findings_2d: np.ndarray  # float32 0/1 over FINDINGS_2D
    seed: int
    drr_spacing: tuple[float, float] = field(default=(1.0, 1.0))

    @property
    def origin(self) -> tuple[float, float, float]:
        """World position (S, P, L order, mm) of voxel 0: the volume is centred on the origin."""
        return tuple(-(n - 1) / 2 * s for n, s in zip(self.image.shape, self.spacing))  # type: ignore[return-value]

    def to_image(self) -> Image:
        """The CT as an :class:`Image` (canonical orientation, identity direction)."""
        return Image(self.image, tuple(self.spacing), self.origin, np.eye(3), meta={"phantom_seed": self.seed})

    def label_image(self) -> Image:
        return Image(self.label, tuple(self.spacing), self.origin, np.eye(3), meta={"phantom_seed": self.seed})

    def drr_image(self) -> Image:
        """The radiograph as 8-bit pixels (what the PNG holds)."""
        pixels = np.round(self.drr * 255.0).astype(np.uint8)
        return Image(pixels, self.drr_spacing, (0.0, 0.0), np.eye(2))

    def lung_mask_image(self) -> Image:
        return Image(self.lung_mask_2d, self.drr_spacing, (0.0, 0.0), np.eye(2))


def make_ct_phantom(
    seed: int,
    *,
    shape: Sequence[int] = (64, 64, 64),
    spacing: Sequence[float] = (2.5, 2.5, 2.5),
    drr_size: int | tuple[int, int] | None = None,
) -> PhantomCase:
    """Draw one chest CT phantom from ``seed``: HU volume, labels, case class, findings and radiograph.

    ``shape`` and ``spacing`` are in array order (D, H, W); ``drr_size`` resamples the radiograph (an int for a
    square image), by default it keeps the volume's (D, W) grid.
    """
    shape_t, spacing_t = _check_geometry(shape, spacing)
    _check_drr_size(drr_size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed={seed!r}: use a non-negative integer")
    rng = np.random.default_rng(int(seed))
    hu, label, findings, thorax = _draw_anatomy(rng, shape_t, spacing_t)

    blur = float(rng.uniform(0.45, 0.7))  # voxels: the scanner's point spread on top of the partial-volume ramp
    noise = float(rng.uniform(10.0, 20.0))
    hu = ndimage.gaussian_filter(hu, blur, mode="nearest", truncate=3.0)
    hu += np.float32(noise) * rng.standard_normal(shape_t, dtype=np.float32)
    np.clip(hu, -1024.0, 3071.0, out=hu)
    findings.update(blur_sigma_voxels=round(blur, 4), noise_sd_hu=round(noise, 3))

    ratio = phantoms_2d.cardiothoracic_ratio(label == 2, thorax)
    findings.update(cardiothoracic_ratio=round(ratio, 4), cardiomegaly=bool(ratio > 0.5))
    drr = phantoms_2d.radiograph(hu, spacing_t, size=drr_size)
    lung_2d = phantoms_2d.project_mask(np.isin(label, (1, 5)), size=drr_size)
    return PhantomCase(
        image=hu.astype(np.float32, copy=False),
        label=label,
        spacing=spacing_t,
        target=int(findings["malignant"]),
        findings=findings,
        drr=drr,
        lung_mask_2d=lung_2d,
        findings_2d=phantoms_2d.findings_vector(findings),
        seed=int(seed),
        drr_spacing=phantoms_2d.pixel_spacing(shape_t, spacing_t, drr_size),
    )


def case_seeds(seed: int, n: int) -> list[int]:
    """Independent per-case seeds of a dataset: case ``i`` of ``(seed, n)`` is the same for every ``n > i``."""
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(int(seed)).spawn(n)]


def write_phantom_dataset(
    out_dir: str | os.PathLike,
    n: int,
    seed: int,
    *,
    shape: Sequence[int] = (64, 64, 64),
    spacing: Sequence[float] = (2.5, 2.5, 2.5),
    with_2d: bool = True,
    drr_size: int | tuple[int, int] | None = None,
) -> Path:
    """Write ``n`` phantoms as an MSD-format dataset in ``out_dir``; returns the folder.

    Layout: ``imagesTr/phantom_XXX.nii.gz`` (HU, float32), ``labelsTr/phantom_XXX.nii.gz`` (uint8, :data:`LABELS`),
    ``dataset.json`` (MSD keys; each training item also carries its case class as ``"target"``, and
    ``"medtransfer"`` records the generator's arguments and per-case seeds), ``classification.csv``
    (``image,class``); with ``with_2d``: ``images2d/phantom_XXX.png`` (8-bit radiograph), ``masks2d/phantom_XXX.png``
    (lung mask, 0/1 class values), ``findings2d.csv`` (``image`` + one 0/1 column per :data:`FINDINGS_2D`).
    Every file is written atomically; ``dataset.json`` last, so a folder with it is complete. Files of an earlier
    run in the same folder that this run does not rewrite (``phantom_*`` beyond ``n``, 2D files without ``with_2d``)
    are removed, so folder listings agree with ``dataset.json``.
    """
    from .datasets import write_dataset_json
    from .io import write_image

    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise DataError(f"n={n!r}: the number of phantom cases must be a positive integer")
    shape_t, spacing_t = _check_geometry(shape, spacing)
    _check_drr_size(drr_size)
    root = Path(out_dir)
    width = max(3, len(str(n - 1)))
    seeds = case_seeds(seed, n)
    training, class_rows, finding_rows, written = [], [], [], set()
    with _progress(n) as advance:
        for i, case_seed in enumerate(seeds):
            case = make_ct_phantom(case_seed, shape=shape_t, spacing=spacing_t, drr_size=drr_size)
            name = f"phantom_{i:0{width}d}"
            image_rel, label_rel = f"imagesTr/{name}.nii.gz", f"labelsTr/{name}.nii.gz"
            write_image(case.to_image(), root / image_rel)
            write_image(case.label_image(), root / label_rel)
            training.append({"image": image_rel, "label": label_rel, "target": case.target})
            class_rows.append(f"{image_rel},{case.target}")
            if with_2d:
                write_image(case.drr_image(), root / "images2d" / f"{name}.png")
                write_image(case.lung_mask_image(), root / "masks2d" / f"{name}.png")
                values = ",".join(str(int(v)) for v in case.findings_2d)
                finding_rows.append(f"images2d/{name}.png,{values}")
            written.update((root / image_rel, root / label_rel, root / "images2d" / f"{name}.png",
                            root / "masks2d" / f"{name}.png"))  # fmt: skip
            advance()

    _write_text(root / "classification.csv", ["image,class", *class_rows])
    if with_2d:
        _write_text(root / "findings2d.csv", [",".join(("image", *FINDINGS_2D)), *finding_rows])
    _remove_stale(root, written if with_2d else {p for p in written if p.suffix != ".png"}, with_2d)
    generator = {
        "generator": "medtransfer.data.phantoms", "seed": int(seed), "shape": list(shape_t),
        "spacing": list(spacing_t), "drr_size": drr_size, "case_seeds": seeds,
        "classes": {str(k): v for k, v in CLASSES.items()}, "findings_2d": list(FINDINGS_2D),
    }  # fmt: skip
    write_dataset_json(
        root, "phantoms", LABELS, {0: "CT"}, training,
        description="Synthetic chest CT phantoms in HU (medtransfer); target = malignant lung nodule",
        reference="generated by medtransfer.data.phantoms (no patient data)", licence="Apache-2.0 (medtransfer)",
        release="1.0",
        medtransfer=generator,
    )  # fmt: skip
    logger.info("wrote %d phantom cases to %s", n, root)
    return root


# ---------------------------------------------------------------- anatomy


class _Grid:
    """Open coordinate grids in mm, centred on the volume; ``box`` cuts the sub-grid around a structure."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
        self.shape, self.spacing = shape, spacing
        axes = [((np.arange(n) - (n - 1) / 2) * s).astype(np.float32) for n, s in zip(shape, spacing)]
        self.z, self.y, self.x = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
        self.half = tuple(n * s / 2 for n, s in zip(shape, spacing))  # (Hz, Hy, Hx)
        self.scale = (self.half[1] + self.half[2]) / 2  # thorax half-width: the unit of small structures
        self.h = float(np.prod(spacing) ** (1 / 3))  # voxel size of the partial-volume ramp

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice]:
        """Index slices covering world coordinates [lo, hi] (mm, array order), clipped to the volume."""
        out = []
        for a, b, n, s in zip(lo, hi, self.shape, self.spacing):
            start = int(np.clip(np.floor(a / s + (n - 1) / 2), 0, n))
            stop = int(np.clip(np.ceil(b / s + (n - 1) / 2) + 1, 0, n))
            out.append(slice(start, max(start, stop)))
        return tuple(out)  # type: ignore[return-value]

    def coords(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.z[box[0]], self.y[:, box[1]], self.x[:, :, box[2]]

    def world(self, index: Sequence[int]) -> np.ndarray:
        return np.array([(i - (n - 1) / 2) * s for i, n, s in zip(index, self.shape, self.spacing)])


class _Canvas:
    """HU and label volumes that structures are painted onto, later ones over earlier ones."""

    def __init__(self, grid: _Grid) -> None:
        self.grid = grid
        self.hu = np.full(grid.shape, -1000.0, dtype=np.float32)
        self.label = np.zeros(grid.shape, dtype=np.uint8)

    def paint(self, sdf: np.ndarray, value: Any, label: int, box: tuple[slice, ...] | None = None) -> None:
        """Move HU toward ``value`` by the covered fraction of each voxel; relabel voxels whose centre is inside."""
        box = box or (slice(None),) * 3
        hu, lab = self.hu[box], self.label[box]
        sdf = np.broadcast_to(sdf, hu.shape)
        cover = np.clip(0.5 - sdf / np.float32(self.grid.h), 0.0, 1.0)
        hu += cover * (np.float32(value) - hu) if np.isscalar(value) else cover * (value - hu)
        lab[sdf < 0] = label


def _ellipsoid(dz, dy, dx, az, ay, ax) -> np.ndarray:
    """Approximate signed distance (mm) to an axis-aligned ellipsoid; pass ``dz=0`` for an elliptic cylinder."""
    k0 = np.sqrt((dz / az) ** 2 + (dy / ay) ** 2 + (dx / ax) ** 2)
    k1 = np.sqrt((dz / az**2) ** 2 + (dy / ay**2) ** 2 + (dx / ax**2) ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = k0 * (k0 - 1) / k1
    inside = -float(min(np.min(ay), np.min(ax)))  # the exact centre (0/0): any negative value keeps the sign
    return np.where(k1 > 0, d, inside).astype(np.float32)


def _capsules(grid: _Grid, segments: Sequence[tuple[np.ndarray, np.ndarray, float, float]]) -> np.ndarray:
    """Union of tapered capsules (start, end, start radius, end radius), each evaluated only in its bounding box."""
    out = np.full(grid.shape, np.inf, dtype=np.float32)
    for a, b, ra, rb in segments:
        pad = max(ra, rb) + 2 * grid.h
        box = grid.box(np.minimum(a, b) - pad, np.maximum(a, b) + pad)
        if any(s.start == s.stop for s in box):
            continue
        z, y, x = grid.coords(box)
        ab = b - a
        t = np.clip(((z - a[0]) * ab[0] + (y - a[1]) * ab[1] + (x - a[2]) * ab[2]) / max(ab @ ab, 1e-9), 0.0, 1.0)
        d = np.sqrt((z - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (x - a[2] - t * ab[2]) ** 2)
        view = out[box]
        np.minimum(view, d - (ra + t * (rb - ra)), out=view)
    return out


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], cells: int = 6) -> np.ndarray:
    """Low-frequency texture with unit-order amplitude: coarse Gaussian noise interpolated up to ``shape``."""
    coarse = rng.standard_normal((cells,) * 3).astype(np.float32)
    return ndimage.zoom(coarse, [n / cells for n in shape], order=1, mode="nearest", grid_mode=True)[
        : shape[0], : shape[1], : shape[2]
    ]


def _pick_center(region: np.ndarray, margin_mm: float, grid: _Grid, rng: np.random.Generator):
    """A voxel of ``region`` at least ``margin_mm`` from its border (uniform among those), or None."""
    if not region.any():
        return None
    where = np.nonzero(region)
    lo = [int(w.min()) for w in where]
    box = tuple(slice(a, int(w.max()) + 1) for a, w in zip(lo, where))
    inside = np.pad(region[box], 1)  # the crop's edge is not the region's border unless the region ends there
    depth = ndimage.distance_transform_edt(inside, sampling=grid.spacing)[1:-1, 1:-1, 1:-1]
    candidates = np.flatnonzero(depth > margin_mm)
    if candidates.size == 0:
        return None
    local = np.unravel_index(candidates[rng.integers(candidates.size)], depth.shape)
    return tuple(int(a + b) for a, b in zip(lo, local))


def _intersect(*sdfs: np.ndarray) -> np.ndarray:
    """Signed distance of the intersection of shapes (broadcast together)."""
    out = sdfs[0]
    for sdf in sdfs[1:]:
        out = np.maximum(out, sdf)
    return out


def _unit(v: Sequence[float]) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _draw_anatomy(rng: np.random.Generator, shape, spacing) -> tuple[np.ndarray, np.ndarray, dict[str, Any], np.ndarray]:
    """Paint the noise-free chest; returns HU, labels, findings and the thoracic cavity mask (for the CTR)."""
    g = _Grid(shape, spacing)
    c = _Canvas(g)
    hz, hy, hx = g.half
    s = g.scale
    tex = _smooth_field(rng, shape)

    # Body: an elliptic cylinder narrowing toward the shoulders; subcutaneous fat, then muscle, then the cavity.
    ax, ay, cy = rng.uniform(0.82, 0.9) * hx, rng.uniform(0.60, 0.72) * hy, rng.uniform(-0.05, 0.05) * hy
    widen = 1.0 - rng.uniform(0.02, 0.08) * g.z / hz
    fat_t, muscle_t = rng.uniform(0.03, 0.08) * s, rng.uniform(0.05, 0.08) * s
    fat_hu, soft_hu = rng.uniform(-120, -80), rng.uniform(35, 50)
    outer = _ellipsoid(0.0, g.y - cy, g.x, 1.0, ay * widen, ax * widen)
    c.paint(outer, fat_hu + 10 * tex, 0)
    inner = outer + np.float32(fat_t)
    c.paint(inner, soft_hu + 6 * tex, 0)
    cavity = inner + np.float32(muscle_t)
    cax, cay = ax - fat_t - muscle_t, ay - fat_t - muscle_t  # cavity semi-axes at mid-height

    # Ribs: tubes just outside the cavity, periodic in z and sloping down anteriorly; cartilage gap at the front.
    pitch, rib_r = rng.uniform(0.17, 0.22) * s, rng.uniform(0.025, 0.032) * s
    drop, phase, rib_hu = rng.uniform(1.5, 2.5) * pitch, rng.uniform(0, pitch), rng.uniform(350, 550)
    anterior = (1.0 - np.sin(np.arctan2(g.y - cy, g.x))) / 2  # 0 at the back, 1 at the front
    zr = g.z + drop * anterior - phase
    dz = zr - pitch * np.round(zr / pitch)
    ribs = np.sqrt(dz**2 + (cavity - 0.9 * rib_r) ** 2) - rib_r
    c.paint(np.maximum(ribs, (anterior - 0.85) * 4 * s), rib_hu, 0)

    # Lungs: ellipsoids cut by the cavity, the mediastinum and two diaphragm domes (the right one higher).
    med = rng.uniform(0.10, 0.16) * cax
    dome_r = rng.uniform(-0.45, -0.25) * hz
    dome_l = dome_r - rng.uniform(0.03, 0.12) * hz
    dome_r_sdf = _ellipsoid(g.z - (dome_r - 0.6 * hz), g.y - cy, g.x + 0.3 * cax, 0.6 * hz, 1.3 * cay, 0.8 * cax)
    dome_l_sdf = _ellipsoid(g.z - (dome_l - 0.5 * hz), g.y - cy, g.x - 0.35 * cax, 0.5 * hz, 1.3 * cay, 0.7 * cax)
    apex = rng.uniform(0.85, 1.0) * hz
    lung_hu, gradient = rng.uniform(-890, -850), rng.uniform(10, 30)
    sides = {}
    for name, sign in (("right", -1.0), ("left", 1.0)):
        cx, wx = sign * rng.uniform(0.42, 0.5) * cax, rng.uniform(0.52, 0.6) * cax
        lz = (apex + 1.2 * hz) / 2
        ell = _ellipsoid(g.z - (apex - lz), g.y - (cy + 0.05 * cay), g.x - cx, lz, 1.1 * cay, wx)
        sides[name] = _intersect(ell, cavity, med - sign * g.x, -dome_r_sdf, -dome_l_sdf)
    lungs = np.minimum(sides["right"], sides["left"])
    c.paint(lungs, lung_hu + gradient * (g.y - cy) / cay + 12 * tex, 1)

    # Pulmonary vessels: a tree from each hilum, bifurcating three times, thinning and shortening; kept in the lung.
    segments, hila = [], {}
    for name, sign in (("right", -1.0), ("left", 1.0)):
        hilum = np.array([rng.uniform(0.0, 0.2) * hz, cy + rng.uniform(-0.05, 0.1) * cay, sign * (med + 0.05 * cax)])
        hila[name] = hilum
        trunks = [(0.85, 0.1, 0.5), (0.1, 0.3, 1.0), (-0.85, 0.35, 0.45), (-0.5, -0.5, 0.6)]
        stack = [(hilum, _unit(np.array([tz, ty, sign * tx]) + rng.normal(0, 0.15, 3)),
                  rng.uniform(0.3, 0.4) * s, rng.uniform(0.04, 0.055) * s, 0) for tz, ty, tx in trunks]  # fmt: skip
        while stack:
            start, direction, length, radius, level = stack.pop()
            end = start + direction * length
            segments.append((start, end, radius, radius * 0.8))
            if level == 3:
                continue
            perp = _unit(np.cross(direction, rng.normal(size=3)))
            angle = rng.uniform(0.45, 0.7)
            for turn in (1.0, -1.0):
                child = _unit(direction * np.cos(angle) + turn * perp * np.sin(angle))
                stack.append((end, child, length * rng.uniform(0.65, 0.8), radius * 0.72, level + 1))
    c.paint(np.maximum(_capsules(g, segments), lungs), rng.uniform(30, 50), 5)

    # Airways: trachea down to the carina, main bronchi to the hila; a soft-tissue wall around air.
    r_tr = rng.uniform(0.06, 0.075) * s
    carina = np.array([max(h[0] for h in hila.values()) + 0.12 * hz, cy - 0.05 * cay, 0.0])
    airway = [(np.array([1.1 * hz, carina[1], 0.0]), carina, r_tr, r_tr)]
    airway += [(carina, h + np.array([0.03 * hz, 0, 0]), 0.7 * r_tr, 0.6 * r_tr) for h in hila.values()]
    air_sdf = _capsules(g, airway)
    c.paint(air_sdf - np.float32(0.02 * s), soft_hu, 0)
    c.paint(air_sdf, -990.0, 0)

    # Pleural effusion: fluid layering posteriorly (supine) at the base of one or both lungs.
    findings: dict[str, Any] = {"effusion": False, "effusion_side": None, "effusion_fraction": 0.0}
    if rng.random() < 0.25:
        side = str(rng.choice(["right", "left", "both"], p=[0.45, 0.25, 0.3]))
        depth, tilt = rng.uniform(0.3, 0.6), rng.uniform(0.3, 0.6)
        fractions = []
        for name in (("right", "left") if side == "both" else (side,)):
            base = dome_r if name == "right" else dome_l
            level = cy + cay * (1 - 2 * depth) + tilt * (g.z - base)
            fluid = np.maximum(sides[name], level - g.y)
            lung_voxels = max(int(np.count_nonzero(sides[name] < 0)), 1)
            fractions.append(np.count_nonzero(fluid < 0) / lung_voxels)
            c.paint(fluid, rng.uniform(0, 15), 0)
        fraction = float(max(fractions))
        findings.update(effusion=fraction >= 0.03, effusion_side=side, effusion_fraction=round(fraction, 4))

    # Liver under the right dome (below the diaphragm's thickness); a gastric air bubble under the left one.
    dia = np.float32(0.03 * s)
    liver_hu = rng.uniform(50, 70)
    liver = np.maximum(dome_r_sdf + dia, cavity)
    c.paint(liver, liver_hu + 5 * tex, 3)
    if rng.random() < 0.5:
        bubble = _ellipsoid(g.z - (dome_l - 0.12 * hz), g.y - (cy - 0.15 * cay), g.x - 0.45 * cax,
                            0.07 * hz, 0.15 * cay, 0.15 * cax)  # fmt: skip
        c.paint(np.maximum(bubble, np.maximum(dome_l_sdf + dia, cavity)), -950.0, 0)

    # Heart: a rotated ellipsoid on the left dome, pointing anterior-left, in pericardial fat; 30% enlarged.
    enlarged = rng.random() < 0.3
    scale = rng.uniform(1.25, 1.4) if enlarged else rng.uniform(0.88, 1.02)
    hcz, hcy, hcx = rng.uniform(0.24, 0.3) * hz * scale, rng.uniform(0.36, 0.42) * cay * scale, 0.52 * cax * scale
    centre = (dome_l + 0.7 * hcz, cy - rng.uniform(0.15, 0.28) * cay, rng.uniform(0.12, 0.2) * cax)
    rot = rng.uniform(-0.7, -0.35)
    dx, dy = g.x - centre[2], g.y - centre[1]
    rx, ry = np.cos(rot) * dx + np.sin(rot) * dy, -np.sin(rot) * dx + np.cos(rot) * dy
    heart = np.maximum(_ellipsoid(g.z - centre[0], ry, rx, hcz, hcy, hcx), cavity)
    c.paint(heart - np.float32(0.03 * s), fat_hu, 0)
    c.paint(heart, rng.uniform(45, 60), 2)
    c.paint(_ellipsoid(g.z - centre[0], ry, rx, 0.7 * hcz, 0.7 * hcy, 0.7 * hcx), rng.uniform(35, 45), 2)
    findings["heart_scale"] = round(float(scale), 4)

    # Spine: vertebral bodies between discs, a neural arch around the canal, spinous and transverse processes;
    # paraspinal muscle and the descending aorta beside it.
    r_vb = rng.uniform(0.09, 0.11) * s
    y_vb, x_vb = cy + cay + muscle_t - 0.4 * s, rng.uniform(-0.02, 0.02) * cax
    v_pitch, v_phase = rng.uniform(0.2, 0.26) * s, rng.uniform(0, 1)
    r_ao = rng.uniform(0.06, 0.075) * s
    c.paint(_ellipsoid(0.0, g.y - (y_vb + 0.3 * s), g.x - x_vb, 1.0, 0.35 * s, 0.17 * s), soft_hu, 0)
    c.paint(_ellipsoid(0.0, g.y - (y_vb - 0.2 * r_vb), g.x - (x_vb + r_vb + r_ao + 0.01 * s), 1.0, r_ao, r_ao),
            rng.uniform(35, 50), 0)  # fmt: skip
    zv = g.z / v_pitch - v_phase
    disc = np.abs(zv - np.round(zv)) * v_pitch - 0.12 * v_pitch  # < 0 inside a disc
    body = _ellipsoid(0.0, g.y - y_vb, g.x - x_vb, 1.0, 0.9 * r_vb, r_vb)
    r_c, arch_t = 0.05 * s, 0.035 * s
    y_c = y_vb + 0.9 * r_vb + 1.1 * r_c
    rho = np.sqrt((g.y - y_c) ** 2 + (g.x - x_vb) ** 2)
    arch = np.maximum(rho - (r_c + arch_t), r_c - rho)
    spinous = _ellipsoid(0.0, g.y - (y_c + r_c + 0.07 * s), g.x - x_vb, 1.0, 0.1 * s, 0.025 * s)
    transverse = _ellipsoid(0.0, g.y - y_c, g.x - x_vb, 1.0, 0.03 * s, 0.2 * s)
    posterior = np.maximum(np.minimum(np.minimum(arch, spinous), transverse), -disc - np.float32(0.05 * v_pitch))
    c.paint(np.maximum(body, disc), 80.0, 0)
    c.paint(np.minimum(np.maximum(body, -disc), posterior), rng.uniform(550, 750), 4)
    cortex = np.float32(max(0.02 * s, 0.6 * g.h))
    c.paint(np.maximum(body, -disc) + cortex, rng.uniform(230, 330), 4)

    _draw_lesions(c, g, rng, lungs, liver_hu, findings)
    return c.hu, c.label, findings, cavity < 0


def _draw_lesions(c: _Canvas, g: _Grid, rng: np.random.Generator, lungs: np.ndarray, liver_hu: float,
                  findings: dict[str, Any]) -> None:  # fmt: skip
    """The index lung nodule (malignant or benign, the case class) and an optional hypodense liver lesion."""
    s = g.scale
    has_nodule = rng.random() < 0.8
    malignant = has_nodule and rng.random() < 0.5
    findings.update(nodule=False, malignant=False, nodule_center=None, nodule_radius_mm=None,
                    nodule_calcified=False, nodule_spiculated=False)  # fmt: skip
    if has_nodule:
        r = (rng.uniform(0.09, 0.15) if malignant else rng.uniform(0.04, 0.075)) * s
        centre = _pick_center(np.isin(c.label, (1, 5)), r + g.h, g, rng)
        if centre is not None:
            lobes = _unit_rows(rng, rng.integers(3, 6)) if malignant else _unit_rows(rng, 2)
            lobe_a = rng.uniform(0.2, 0.45, len(lobes)) if malignant else rng.uniform(0.0, 0.06, len(lobes))
            spiculated = malignant and rng.random() < 0.7
            spikes = _unit_rows(rng, rng.integers(8, 17)) if spiculated else np.zeros((0, 3))
            spike_len, spike_p = rng.uniform(0.5, 1.2, len(spikes)), rng.uniform(40, 100, len(spikes))
            reach = r * (1 + lobe_a.sum() + spike_len.sum()) + 2 * g.h
            w = g.world(centre)
            box = g.box(w - reach, w + reach)
            z, y, x = g.coords(box)
            dz, dy, dx = z - w[0], y - w[1], x - w[2]
            rho = np.sqrt(dz**2 + dy**2 + dx**2) + np.float32(1e-6)
            radius = np.full(np.broadcast_shapes(dz.shape, dy.shape, dx.shape), r, dtype=np.float32)
            for d, a in zip(lobes, lobe_a):
                radius += r * a * np.maximum((dz * d[0] + dy * d[1] + dx * d[2]) / rho, 0) ** 3
            for d, length, p in zip(spikes, spike_len, spike_p):
                radius += r * length * np.maximum((dz * d[0] + dy * d[1] + dx * d[2]) / rho, 0) ** p
            sdf = np.maximum(rho - radius, lungs[box])
            calcified = (not malignant) and rng.random() < 0.6
            if malignant:
                value = rng.uniform(20, 45) + 20 * _smooth_field(rng, sdf.shape, 4)
            else:
                value = rng.uniform(10, 35)
            c.paint(sdf, value, 6, box)
            if calcified:
                c.paint(rho - np.float32(rng.uniform(0.5, 0.9) * r), rng.uniform(300, 600), 6, box)
            findings.update(nodule=True, malignant=bool(malignant), nodule_center=list(centre),
                            nodule_radius_mm=round(float(r), 3), nodule_calcified=bool(calcified),
                            nodule_spiculated=bool(spiculated))  # fmt: skip

    findings.update(liver_lesion=False, liver_lesion_center=None, liver_lesion_radius_mm=None)
    if rng.random() < 0.3:
        r = rng.uniform(0.06, 0.1) * s
        centre = _pick_center(c.label == 3, r * 1.2 + g.h, g, rng)
        if centre is not None:
            w = g.world(centre)
            box = g.box(w - 1.3 * r - 2 * g.h, w + 1.3 * r + 2 * g.h)
            z, y, x = g.coords(box)
            semi = r * rng.uniform(0.8, 1.2, 3)
            sdf = _ellipsoid(z - w[0], y - w[1], x - w[2], semi[0], semi[1], semi[2])
            c.paint(sdf, liver_hu - rng.uniform(25, 45), 6, box)
            findings.update(liver_lesion=True, liver_lesion_center=list(centre), liver_lesion_radius_mm=round(float(r), 3))


def _unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(int(n), 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# ---------------------------------------------------------------- helpers


def _check_geometry(shape: Sequence[int], spacing: Sequence[float]) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    try:
        shape_t = tuple(int(s) for s in shape)
        spacing_t = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise DataError(f"shape={shape!r}, spacing={spacing!r}: give three integers and three numbers (mm)") from None
    if len(shape_t) != 3 or any(s < MIN_EDGE for s in shape_t) or any(int(a) != a for a in shape):
        raise DataError(f"shape={shape!r}: a phantom needs three integer sizes of at least {MIN_EDGE} voxels (D, H, W)")
    if len(spacing_t) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing_t):
        raise DataError(f"spacing={spacing!r}: give three positive spacings in mm (D, H, W)")
    return shape_t, spacing_t  # type: ignore[return-value]


def _check_drr_size(size: Any) -> None:
    if size is None:
        return
    sizes = [size] if isinstance(size, (int, np.integer)) else list(size) if isinstance(size, (tuple, list)) else []
    if len(sizes) != (1 if isinstance(size, (int, np.integer)) else 2) or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 4 for v in sizes
    ):
        raise DataError(f"drr_size={size!r}: give one size (square) or (rows, cols), integers of at least 4, or None")


def _remove_stale(root: Path, written: set[Path], with_2d: bool) -> None:
    """Drop ``phantom_<n>`` files of an earlier run that this one did not write (only names this module makes)."""
    pattern = re.compile(r"phantom_\d+\.(nii\.gz|png)")
    for folder in ("imagesTr", "labelsTr", "images2d", "masks2d"):
        for path in (root / folder).glob("phantom_*"):
            if pattern.fullmatch(path.name) and path not in written:
                logger.info("removing %s, left by an earlier phantom run", path)
                path.unlink()
    if not with_2d:
        (root / "findings2d.csv").unlink(missing_ok=True)


def _write_text(path: Path, lines: list[str]) -> Path:
    text = "\n".join(lines) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


class _progress:
    """A rich progress bar on stderr for long runs (more than 8 cases); a no-op otherwise."""

    def __init__(self, n: int) -> None:
        self.n, self._bar, self._task = n, None, None

    def __enter__(self):
        if self.n > 8:
            from rich.console import Console
            from rich.progress import Progress

            self._bar = Progress(console=Console(stderr=True), transient=True)
            self._bar.__enter__()
            self._task = self._bar.add_task(f"drawing {self.n} phantoms", total=self.n)
        return self._advance

    def _advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


__all__ = ["LABELS", "CLASSES", "FINDINGS_2D", "PhantomCase", "make_ct_phantom", "write_phantom_dataset", "case_seeds"]
