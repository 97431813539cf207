"""Detection phantoms: the chest CT phantoms of :mod:`.phantoms` with several nodules of several sizes, their
instance masks and boxes, written as a LUNA16 folder, a MONAI detection datalist or a DeepLesion-like 2.5D folder.

The CT generator itself is unchanged (it draws at most one nodule, so the demo and its tests keep their data); the
extra nodules are painted here on top of its volume: soft-tissue spheres (10-45 HU plus the image's noise, the same
one-voxel partial-volume ramp) inside the lungs, away from the pleura and from each other, with radii drawn from
:data:`NODULE_RADII_MM` so some are only 2-3 voxels across. Objects (instances, numbered from 1 in the order drawn):
the generator's index nodule and liver lesion (connected parts of its lesion label), then the extra nodules.

Layouts (:func:`write_detection_phantoms`):

* ``luna16``: ``subset0/<id>.mhd`` (+ ``.zraw``), ``annotations.csv`` (``seriesuid,coordX,coordY,coordZ,
  diameter_mm``: each lung nodule's box centre and the geometric mean of its box sizes, LPS mm, as LUNA16 gives
  nodules), ``candidates.csv`` (``seriesuid,coordX,coordY,coordZ,class``: one true candidate near each nodule,
  ``false_per_true`` false ones per nodule (at least that many per scan) in the lungs, the body and the
  mediastinum, away from every nodule), ``instances/<id>.nii.gz`` (uint16 instance masks);
* ``datalist``: ``images/<id>.nii.gz``, ``instances/<id>.nii.gz`` and ``dataset.json``, a MONAI detection
  datalist (``training``/``validation``, boxes ``cccwhd`` in world mm from the instance masks; MONAI label 0 =
  lung nodule, 1 = liver lesion);
* ``deeplesion``: ``Images_png/<patient>_01_01/<slice>.png`` (uint16, HU + 32768, slices numbered from 1) and
  ``DL_info.csv`` with one row per lesion on its key slice (the slice through the lesion's centre); patients split
  train / val / test by ``Train_Val_Test``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from ..errors import DataError
from ..weights.io import atomic_write
from .boxes import boxes_from_mask, voxel_to_world
from .geometry import Grid
from .phantoms import case_seeds, make_ct_phantom
from .types import Image

logger = logging.getLogger(__name__)

NODULE_RADII_MM = (2.5, 3.5, 5.0, 7.0)  # 5-14 mm nodules: LUNA16 keeps nodules of at least 3 mm
LESION_LABEL = 6  # the generator's lesion label (lung nodule or liver lesion)
LAYOUTS = ("luna16", "datalist", "deeplesion")


@dataclass
class DetectionPhantom:
    """One CT with its objects: instance mask (0 = none), each instance's class (1 nodule, 2 liver lesion), voxel
    boxes (array order, corner mode) and the world boxes (``cccwhd``)."""

    image: Image
    instances: np.ndarray
    classes: np.ndarray  # (N,) int64, class of instance i + 1
    boxes: np.ndarray  # (N, 6) voxel boxes
    world_boxes: np.ndarray  # (N, 6) cccwhd

    @property
    def grid(self) -> Grid:
        return Grid.of(self.image)


def make_detection_phantom(
    seed: int,
    *,
    shape: Sequence[int] = (32, 48, 48),
    spacing: Sequence[float] = (2.5, 2.0, 2.0),
    extra_nodules: tuple[int, int] = (2, 4),
) -> DetectionPhantom:
    """A CT phantom from ``seed`` with ``extra_nodules`` (inclusive range) more lung nodules and its objects."""
    case = make_ct_phantom(seed, shape=shape, spacing=spacing)
    rng = np.random.default_rng([int(seed), 1])  # its own stream: the CT stays the generator's
    image = case.to_image()
    hu, label = image.array.copy(), case.label.copy()
    spacing_a = np.asarray(case.spacing, float)
    lesions, n_lesions = ndimage.label(label == LESION_LABEL, structure=np.ones((3, 3, 3)))
    instances = lesions.astype(np.uint16)
    lungs = label == 1
    classes = [1 if lungs[ndimage.binary_dilation(lesions == i)].any() else 2 for i in range(1, n_lesions + 1)]
    inside = ndimage.distance_transform_edt(lungs, sampling=spacing_a)
    lo, hi = extra_nodules
    for _ in range(int(rng.integers(lo, hi + 1))):
        r = float(rng.choice(NODULE_RADII_MM))
        apart = ndimage.distance_transform_edt(instances == 0, sampling=spacing_a)
        where = np.argwhere((inside > r + spacing_a.max()) & (apart > r + 3 * spacing_a.max()))
        if not len(where):
            continue
        centre = where[rng.integers(len(where))].astype(float)
        zz, yy, xx = np.indices(hu.shape, dtype=np.float32)
        dist = np.sqrt(((zz - centre[0]) * spacing_a[0]) ** 2 + ((yy - centre[1]) * spacing_a[1]) ** 2
                       + ((xx - centre[2]) * spacing_a[2]) ** 2)  # fmt: skip
        cover = np.clip(0.5 - (dist - r) / spacing_a.min(), 0.0, 1.0)  # a one-voxel partial-volume ramp
        value = rng.uniform(10.0, 45.0) + 12.0 * rng.standard_normal(hu.shape).astype(np.float32)
        hu += (cover * (value - hu)).astype(np.float32)
        inside_sphere = dist < r
        if not inside_sphere.any():  # a sphere smaller than a voxel at this spacing: mark its centre voxel
            inside_sphere[tuple(centre.astype(int))] = True
        label[inside_sphere] = LESION_LABEL
        instances[inside_sphere] = len(classes) + 1
        classes.append(1)
    image = Image(hu, image.spacing, image.origin, image.direction, meta=dict(image.meta))
    boxes, _ = boxes_from_mask(instances, instances=True)
    return DetectionPhantom(image, instances, np.asarray(classes, np.int64), boxes,
                            voxel_to_world(boxes, Grid.of(image)))  # fmt: skip


def write_detection_phantoms(
    root: str | os.PathLike,
    n: int,
    seed: int,
    layout: str = "luna16",
    *,
    shape: Sequence[int] = (32, 48, 48),
    spacing: Sequence[float] = (2.5, 2.0, 2.0),
    extra_nodules: tuple[int, int] = (2, 4),
    false_per_true: int = 10,
) -> Path:
    """Write ``n`` detection phantoms from ``seed`` in ``layout`` (see the module docstring); returns ``root``.
    The description file (annotations.csv, dataset.json, DL_info.csv) is written last, atomically."""
    if layout not in LAYOUTS:
        raise DataError(f"layout={layout!r}; choose one of {', '.join(LAYOUTS)}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise DataError(f"n={n!r}: the number of phantom cases must be a positive integer")
    root = Path(root)
    phantoms = [make_detection_phantom(s, shape=shape, spacing=spacing, extra_nodules=extra_nodules)
                for s in case_seeds(seed, n)]  # fmt: skip
    names = [f"phantom_{i:03d}" for i in range(n)]
    if layout == "luna16":
        _write_luna(root, names, phantoms, np.random.default_rng([int(seed), 2]), false_per_true)
    elif layout == "datalist":
        _write_datalist(root, names, phantoms)
    else:
        _write_deeplesion(root, phantoms)
    logger.info("wrote %d detection phantoms (%s layout) to %s", n, layout, root)
    return root


def _csv_text(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _instance_image(p: DetectionPhantom) -> Image:
    return Image(p.instances, p.image.spacing, p.image.origin, p.image.direction)


def _write_luna(root: Path, names, phantoms, rng: np.random.Generator, false_per_true: int) -> None:
    from .io import write_image

    annotations, candidates = [], []
    for name, p in zip(names, phantoms):
        write_image(p.image, root / "subset0" / f"{name}.mhd")
        write_image(_instance_image(p), root / "instances" / f"{name}.nii.gz")
        nodules = p.world_boxes[p.classes == 1]
        for box in nodules:
            diameter = float(np.prod(box[3:]) ** (1 / 3))
            annotations.append([name, *np.round(box[:3], 4), round(diameter, 4)])
            jitter = rng.normal(0.0, diameter / 8, 3)  # detectors' candidates sit near, not on, the centre
            candidates.append([name, *np.round(box[:3] + jitter, 4), 1])
        body = p.image.array > -500
        lungs = (p.image.array > -950) & (p.image.array < -700)
        far = ndimage.distance_transform_edt(p.instances == 0, sampling=p.image.spacing) > 6.0
        for region in (lungs & far, body & far):
            where = np.argwhere(region)
            count = max(false_per_true * max(len(nodules), 1) // 2, 1)
            if not len(where):
                continue
            picks = where[rng.integers(len(where), size=count)].astype(float)
            world = p.grid.to_world(picks)[:, ::-1]
            candidates += [[name, *np.round(w, 4), 0] for w in world]
    _write_text(root / "candidates.csv", _csv_text(("seriesuid", "coordX", "coordY", "coordZ", "class"), candidates))
    _write_text(root / "annotations.csv",
                _csv_text(("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"), annotations))  # fmt: skip


def _write_datalist(root: Path, names, phantoms) -> None:
    from .io import write_image

    items = []
    for name, p in zip(names, phantoms):
        write_image(p.image, root / "images" / f"{name}.nii.gz")
        write_image(_instance_image(p), root / "instances" / f"{name}.nii.gz")
        items.append({"image": f"images/{name}.nii.gz", "instances": f"instances/{name}.nii.gz",
                      "box": np.round(p.world_boxes, 4).tolist(), "label": (p.classes - 1).tolist()})  # fmt: skip
    n_val = len(items) // 5 if len(items) >= 5 else (1 if len(items) >= 2 else 0)
    desc = {"name": "detection_phantoms", "box_mode": "cccwhd", "coordinates": "world LPS mm",
            "labels": {"0": "nodule", "1": "liver_lesion"},
            "training": items[: len(items) - n_val], "validation": items[len(items) - n_val :]}  # fmt: skip
    _write_text(root / "dataset.json", json.dumps(desc, indent=1) + "\n")


def _write_deeplesion(root: Path, phantoms) -> None:
    from .io import write_image

    rows = []
    n = len(phantoms)
    for i, p in enumerate(phantoms):
        series = f"{i + 1:06d}_01_01"
        hu = np.clip(np.round(p.image.array), -32768, 32767).astype(np.int32) + 32768
        depth = hu.shape[0]
        for z in range(depth):
            write_image(Image(hu[z].astype(np.uint16), p.image.spacing[1:], (0.0, 0.0), np.eye(2)),
                        root / "Images_png" / series / f"{z + 1:03d}.png")  # fmt: skip
        split = 3 if i == n - 1 and n >= 3 else 2 if i == n - 2 and n >= 3 else 1
        sz, sy, sx = p.image.spacing
        for key in sorted({int((b[0] + b[3]) // 2) for b in p.boxes}):  # slices through lesion centres (0-based)
            for j in range(len(p.boxes)):  # every lesion seen on a key slice gets its row there
                plane = p.instances[key] == j + 1
                if not plane.any():
                    continue
                b2, _ = boxes_from_mask(plane, instances=True)
                y0, x0, y1, x1 = b2[0] - 0.5  # DeepLesion's pixel coordinates: pixel centres at integers
                ym, xm = (y0 + y1) / 2, (x0 + x1) / 2
                long_, short = sorted((y1 - y0, x1 - x0), reverse=True)
                rows.append([f"{series}_{key + 1:03d}.png", i + 1, 1, 1, key + 1,
                             f"{x0:.3f}, {ym:.3f}, {x1:.3f}, {ym:.3f}, {xm:.3f}, {y0:.3f}, {xm:.3f}, {y1:.3f}",
                             f"{x0:.3f}, {y0:.3f}, {x1:.3f}, {y1:.3f}", f"{long_:.3f}, {short:.3f}",
                             "0.5, 0.5, 0.5", -1 if split == 1 else 4, 0, f"1, {depth}", f"{sx}, {sy}, {sz}",
                             f"{hu.shape[2]}, {hu.shape[1]}", "-1024, 1050", "M", 60, split])  # fmt: skip
    header = ("File_name", "Patient_index", "Study_index", "Series_ID", "Key_slice_index", "Measurement_coordinates",
              "Bounding_boxes", "Lesion_diameters_Pixel_", "Normalized_lesion_location", "Coarse_lesion_type",
              "Possibly_noisy", "Slice_range", "Spacing_mm_px_", "Image_size", "DICOM_windows", "Patient_gender",
              "Patient_age", "Train_Val_Test")  # DeepLesion's column order  # fmt: skip
    _write_text(root / "DL_info.csv", _csv_text(header, rows))


__all__ = ["DetectionPhantom", "LAYOUTS", "NODULE_RADII_MM", "make_detection_phantom", "write_detection_phantoms"]
