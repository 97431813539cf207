"""Embedded synthetic chest CT: the default dataset every command can run on, with no download.

Why: the demo, the tests and the benchmarks need CT-like volumes with per-voxel labels, case-level classes and
radiographs on a fresh machine. Each case is drawn from its seed alone (``np.random.default_rng(seed)``), so the
same seed gives byte-identical arrays and a dataset of ``n`` cases is reproducible from ``(seed, n)``.

Geometry. Arrays are ``[z, y, x]`` (see ``types.py``) in the canonical orientation of ``io.py``: z runs toward the
head (superior), y toward the back (posterior), x toward the patient's left; direction is the identity and the
volume is centred on the world origin. Anatomy is laid out in fractions of the field of view (``shape * spacing``)
and small structures (vessels, ribs, nodules) in fractions of the thorax size, so any grid holds a whole chest with
the same proportions; a 64^3 grid at 2.5 mm is a small thorax 16 cm across.

Drawing (:mod:`.phantoms_anatomy`). Every structure is a smooth signed-distance-like field (ellipsoids, tapered capsules, periodic ribs and
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
from .phantoms_anatomy import draw_anatomy
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
    hu, label, findings, thorax = draw_anatomy(rng, shape_t, spacing_t)

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
    labels: Sequence[int] | None = None,
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

    ``labels`` (ids of :data:`LABELS`, e.g. ``(1, 2, 3, 4)`` for the organs only) keeps those structures, renumbered
    1..k in the order given, and paints every other one background, as ribs and airways already are; the images do
    not change. ``None`` keeps all seven labels.
    """
    from .datasets import write_dataset_json
    from .io import write_image

    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise DataError(f"n={n!r}: the number of phantom cases must be a positive integer")
    shape_t, spacing_t = _check_geometry(shape, spacing)
    _check_drr_size(drr_size)
    names, lut = _label_subset(labels)
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
            if lut is not None:
                case.label = lut[case.label]
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
        **({} if labels is None else {"labels_kept": [int(i) for i in labels]}),
    }  # fmt: skip
    write_dataset_json(
        root, "phantoms", names, {0: "CT"}, training,
        description="Synthetic chest CT phantoms in HU (medtransfer); target = malignant lung nodule",
        reference="generated by medtransfer.data.phantoms (no patient data)", licence="Apache-2.0 (medtransfer)",
        release="1.0",
        medtransfer=generator,
    )  # fmt: skip
    logger.info("wrote %d phantom cases to %s", n, root)
    return root


# ---------------------------------------------------------------- anatomy


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


def _label_subset(labels: Sequence[int] | None) -> tuple[dict[int, str], np.ndarray | None]:
    """The dataset's label names and the lookup table from :data:`LABELS` ids to kept ids (None: keep all)."""
    if labels is None:
        return LABELS, None
    kept = list(labels)
    if not kept or len(set(kept)) != len(kept) or any(not isinstance(i, (int, np.integer)) or isinstance(i, bool)
                                                      or i not in LABELS or i == 0 for i in kept):
        raise DataError(f"labels={labels!r}: give distinct foreground ids of {dict(list(LABELS.items())[1:])}, "
                        "e.g. (1, 2, 3, 4) for the organs")
    lut = np.zeros(max(LABELS) + 1, dtype=np.uint8)
    for new, old in enumerate(kept, start=1):
        lut[old] = new
    return {0: LABELS[0], **{new: LABELS[old] for new, old in enumerate(kept, start=1)}}, lut


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
