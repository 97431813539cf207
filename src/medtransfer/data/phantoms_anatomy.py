"""Drawing the phantom's anatomy: signed-distance-like fields on coordinate grids, painted with partial volume.

The geometry, label and HU conventions are those of :mod:`medtransfer.data.phantoms`, whose docstring describes
the anatomy; this module only draws it. ``draw_anatomy(rng, shape, spacing)`` returns ``(hu, label, findings,
thorax)`` before blur and noise.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import ndimage



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


def draw_anatomy(rng: np.random.Generator, shape, spacing) -> tuple[np.ndarray, np.ndarray, dict[str, Any], np.ndarray]:
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
