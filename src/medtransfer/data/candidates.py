"""Nodule candidate classification (NCC): cubes around LUNA16 candidates, as a classification dataset.

Models Genesis' first target task (Zhou et al., MedIA 2021; spec/seed-systems.md 3c) classifies cubes cut around the
candidates of LUNA16's ``candidates.csv`` (``seriesuid, coordX, coordY, coordZ, class``: world LPS mm, class 1 = a
nodule) as nodule or false positive. :func:`extract_candidates` cuts them and writes a folder the classification
pipeline reads as it is (``load_csv``: an ``image`` and a ``class`` column):

``OUT/candidates.csv``
    ``image, case_id, class, seriesuid, coordX, coordY, coordZ, subset``: one row per cube; ``case_id`` is
    ``c<row>`` with the 0-based row of the candidate in the input list, so scores map back to candidates.
``OUT/cubes/<seriesuid>/c<row>.npz``
    the cube (``image``) with its own ``spacing``/``origin``/``direction`` (the cube's grid in the world).
``OUT/ncc.json``
    what was done (cube size, spacing, window, counts), the scans used and, when ``annotations.csv`` is there, the
    nodules of those scans: what :func:`froc_inputs` needs to score candidates per scan.
``OUT/skipped.json``
    every candidate left out and why.

**Cube.** The published input, 64 x 64 x 32 voxels in (x, y, z) = ``(32, 64, 64)`` in medtransfer's ``[z, y, x]``
(:data:`NCC_CUBE`). The candidate's world point is mapped to a continuous index of the scan (any direction, flips,
anisotropic spacing); its nearest voxel (rounded half up, as ITK's ``TransformPhysicalPointToIndex``) becomes cube
voxel ``size // 2`` on every axis, i.e. ``(16, 32, 32)``. Spacing: the published downstream config has no resampling
step (as its pretraining cubes, which use the native spacing), so the default is native; ``spacing=`` resamples
(linear) on a grid centred exactly on the candidate. Where the cube overhangs the scan it is padded with -1000 HU.

**Intensity.** The cubes hold HU clipped to the window [-1000, 1000] as int16 (exact for LUNA16's integer HU at the
native spacing; resampled cubes are rounded to the HU), uncompressed (263 KB a cube of the published size). The
scaling to [0, 1] is the ``genesis_ct`` preset, which a fine-tune of CT data takes by default (the data's minimum is
below -500 HU) and which is the contract of the Models Genesis weights: stored already scaled, the cubes would be
windowed a second time by the run's preset.

**Skips.** A candidate whose ``seriesuid`` has no scan in the folder (LUNA16 is often downloaded a few subsets at a
time), or whose centre lies outside its scan, is a counted skip, listed in ``skipped.json`` and said in a warning;
only a list in which every candidate is skipped is an error (nothing is written).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from ..errors import DataError
from ..weights.io import atomic_write

log = logging.getLogger(__name__)

NCC_CUBE = (32, 64, 64)  # [z, y, x]: Models Genesis NCC input 64x64x32 in (x, y, z)
HU_WINDOW = (-1000.0, 1000.0)  # spec 3c: CT clipped to [-1000, 1000] HU, scaled to [0, 1] (the genesis_ct preset)
MANIFEST = "ncc.json"
TABLE = "candidates.csv"
_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "class")
_TABLE_COLUMNS = ("image", "case_id", "class", "seriesuid", "coordX", "coordY", "coordZ", "subset")


@dataclass(frozen=True)
class Candidate:
    """One row of a ``candidates.csv``-style list; ``xyz`` = (coordX, coordY, coordZ), LPS mm."""

    row: int  # 0-based data row, the key of the cube (case id ``c<row>``)
    seriesuid: str
    xyz: tuple[float, float, float]
    label: int

    @property
    def case_id(self) -> str:
        return f"c{self.row:07d}"


@dataclass
class Extraction:
    """What :func:`extract_candidates` wrote."""

    out: Path
    written: int
    positives: int
    scans: int
    skipped: list[dict[str, Any]] = field(default_factory=list)

    @property
    def skipped_no_scan(self) -> int:
        return sum(1 for s in self.skipped if s["why"] == "no scan")

    @property
    def skipped_outside(self) -> int:
        return sum(1 for s in self.skipped if s["why"] == "outside its scan")


def read_candidates(path: str | Path) -> list[Candidate]:
    """The rows of a ``candidates.csv``-style list (header with at least :data:`_COLUMNS`); errors name the line."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in _COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise DataError(f"{path}:1: header {reader.fieldnames} lacks {', '.join(missing)}; a candidate list "
                                f"needs the columns {','.join(_COLUMNS)} (LUNA16's candidates.csv)")
            out = []
            for row in reader:
                where = f"{path}:{reader.line_num}"
                try:
                    xyz = tuple(float(row[c]) for c in ("coordX", "coordY", "coordZ"))
                    label = float(row["class"])
                except (TypeError, ValueError):
                    raise DataError(f"{where}: a coordinate or the class is not a number; fix the row") from None
                if not all(math.isfinite(v) for v in xyz) or label not in (0.0, 1.0):
                    raise DataError(f"{where}: coordinates must be finite and class 0 or 1, got {xyz} and "
                                    f"{row['class']!r}; fix the row")
                if not row["seriesuid"]:
                    raise DataError(f"{where}: empty seriesuid; fix the row")
                out.append(Candidate(len(out), row["seriesuid"], xyz, int(label)))  # type: ignore[arg-type]
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror}); give the path of candidates.csv") from None
    if not out:
        raise DataError(f"{path}: no candidates below the header; nothing to extract")
    return out


def _world(xyz: Sequence[float]) -> np.ndarray:
    """LUNA16's (x, y, z) as a world point of medtransfer's geometry, whose components follow the array axes
    ([z, y, x], data/io_common.py ``_geometry``)."""
    return np.asarray(xyz, float)[::-1]


def cut_cube(image, xyz: Sequence[float], *, size: Sequence[int] = NCC_CUBE,
             spacing: Optional[Sequence[float]] = None) -> tuple[Optional[np.ndarray], Any]:
    """The cube of ``image`` (a 3D :class:`~medtransfer.data.types.Image` in HU) around the world point ``xyz``
    (LUNA16 order x, y, z): ``(int16 array of shape size, Grid of the cube)``, or ``(None, None)`` when the point
    lies outside the scan. See the module docstring for the centring, spacing and padding rules."""
    from scipy import ndimage

    from .geometry import Grid
    from .sampling import extract_patch

    grid = Grid.of(image)
    size = np.asarray(size, int)
    centre = grid.to_index(_world(xyz))
    shape = np.asarray(grid.shape)
    if np.any(centre < -0.5) or np.any(centre >= shape - 0.5):
        return None, None
    half = size // 2
    lo, hi = HU_WINDOW
    volume = np.asarray(image.array)
    if spacing is None:
        nearest = np.floor(centre + 0.5).astype(int)  # round half up, as ITK does
        start = nearest - half
        cube = extract_patch(volume, start.tolist(), size.tolist(), lo)
        cube_spacing = np.asarray(grid.spacing)
        origin = grid.to_world(start)
    else:
        cube_spacing = np.asarray(spacing, float)
        step = cube_spacing / np.asarray(grid.spacing)
        axes = [centre[a] + (np.arange(size[a]) - half[a]) * step[a] for a in range(3)]
        # only the block the cube samples (padded with the air value past the scan) is copied and interpolated
        first = np.array([int(np.floor(ax.min())) - 1 for ax in axes])
        block = extract_patch(volume, first.tolist(), [int(np.ceil(ax.max())) + 2 - f for ax, f in zip(axes, first)],
                              lo).astype(np.float32)
        coords = np.stack(np.meshgrid(*[ax - f for ax, f in zip(axes, first)], indexing="ij"))
        cube = ndimage.map_coordinates(block, coords, order=1, mode="nearest")
        origin = grid.to_world(centre - half * step)
    cube = np.rint(np.clip(cube, lo, hi)).astype(np.int16)
    cube_grid = Grid(tuple(int(s) for s in size), tuple(float(s) for s in cube_spacing),
                     tuple(float(o) for o in origin), np.asarray(grid.direction, float))
    return cube, cube_grid


def _scans(luna_dir: Path, subsets: Optional[Sequence[str]]) -> dict[str, tuple[Path, str]]:
    """seriesuid -> (``.mhd`` path, subset folder) of ``luna_dir/subset*/**/*.mhd``, as ``load_luna16`` finds them."""
    if not luna_dir.is_dir():
        raise DataError(f"{luna_dir}: no such folder; give the LUNA16 folder holding subset0/, subset1/, ...")
    folders = sorted(p for p in luna_dir.glob("subset*") if p.is_dir())
    if subsets:
        unknown = sorted(set(subsets) - {p.name for p in folders})
        if unknown:
            raise DataError(f"{luna_dir}: no folder {', '.join(unknown)}; it holds "
                            f"{', '.join(p.name for p in folders) or 'no subset* folder'}")
        folders = [p for p in folders if p.name in set(subsets)]
    scans = {mhd.stem: (mhd, folder.name) for folder in folders for mhd in sorted(folder.rglob("*.mhd"))}
    if not scans:
        raise DataError(f"{luna_dir}: no subset*/*.mhd scan found; give the LUNA16 folder holding subset0/, ...")
    return scans


def _nodules(path: Path, uids: Iterable[str]) -> dict[str, list[dict[str, float]]]:
    from .datasets.volumes import _luna_annotations

    every = _luna_annotations(path)
    return {uid: every.get(uid, []) for uid in sorted(uids)}


def check_outputs(out: Path, overwrite: bool) -> None:
    """Refuse an earlier extraction in ``out`` unless ``overwrite``; nothing is written either way."""
    present = [n for n in (TABLE, MANIFEST, "skipped.json", "cubes") if (out / n).exists()]
    if present and not overwrite:
        raise DataError(f"{out} already holds {', '.join(present)} of an extraction; pass --overwrite to replace "
                        "them, or choose another --out folder")


def extract_candidates(luna_dir: str | Path, candidates: str | Path, out: str | Path, *,
                       size: Sequence[int] = NCC_CUBE, spacing: Optional[Sequence[float]] = None,
                       subsets: Optional[Sequence[str]] = None, annotations: Optional[str | Path] = None,
                       overwrite: bool = False, progress: bool = True) -> Extraction:
    """Cut a cube around every candidate of ``candidates`` whose scan is in ``luna_dir`` (only the ``subsets``
    folders, when given) and write the dataset folder of the module docstring into ``out``.

    ``annotations``: LUNA16's ``annotations.csv`` (default: ``luna_dir/annotations.csv`` when it exists); its
    nodules are recorded in ``ncc.json`` for the FROC of ``evaluate``. The list, which scans exist and the outputs
    are checked before anything is written; scans are read one at a time, and a scan that cannot be read stops the
    extraction naming it, before ``candidates.csv`` (written last) exists."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..provenance import versions
    from .io import read_image, write_image
    from .types import Image

    luna_dir, candidates, out = Path(luna_dir), Path(candidates), Path(out)
    size = tuple(int(s) for s in size)
    if len(size) != 3 or min(size) < 1:
        raise DataError(f"cube size {list(size)}: give 3 positive sizes D,H,W (published: 32,64,64)")
    if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
        raise DataError(f"spacing {list(spacing)}: give 3 positive values in mm (D,H,W), or none for native")
    check_outputs(out, overwrite)
    rows = read_candidates(candidates)
    scans = _scans(luna_dir, subsets)
    ann = Path(annotations) if annotations else luna_dir / "annotations.csv"
    if annotations and not ann.is_file():
        raise DataError(f"{ann}: no such file; give LUNA16's annotations.csv (or leave --annotations out)")
    by_scan: dict[str, list[Candidate]] = {}
    skipped = []
    for c in rows:
        if c.seriesuid in scans:
            by_scan.setdefault(c.seriesuid, []).append(c)
        else:
            skipped.append({"row": c.row, "seriesuid": c.seriesuid, "xyz": list(c.xyz), "class": c.label,
                            "why": "no scan"})
    if not by_scan:
        raise DataError(f"none of the {len(rows)} candidates of {candidates} has its scan in {luna_dir}"
                        f"{' (' + ', '.join(subsets) + ')' if subsets else ''}; nothing written: check that the "
                        "seriesuid column names the .mhd files")
    nodules = _nodules(ann, by_scan) if ann.is_file() else None

    if overwrite and (out / "cubes").is_dir():
        shutil.rmtree(out / "cubes")
    table: list[dict[str, Any]] = []
    columns = (TextColumn("candidates {task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[n]} cubes"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task("", total=len(by_scan), n=0)
        for uid, found in by_scan.items():
            path, subset = scans[uid]
            bar.update(task, description=uid[-12:])
            image = read_image(path)
            if image.array.ndim != 3:
                raise DataError(f"{path}: shape {image.array.shape} is not one 3D CT volume; NCC needs 3D scans")
            for c in found:
                cube, grid = cut_cube(image, c.xyz, size=size, spacing=spacing)
                if cube is None:
                    skipped.append({"row": c.row, "seriesuid": uid, "xyz": list(c.xyz), "class": c.label,
                                    "why": "outside its scan"})
                    continue
                rel = Path("cubes") / uid / f"{c.case_id}.npz"
                # uncompressed: 5 ms a cube where zlib took 50 ms (measured), for 1.4x less disk on noisy CT
                write_image(Image(cube, grid.spacing, grid.origin, grid.direction), out / rel, compress=False)
                table.append({"image": rel.as_posix(), "case_id": c.case_id, "class": c.label, "seriesuid": uid,
                              "coordX": c.xyz[0], "coordY": c.xyz[1], "coordZ": c.xyz[2], "subset": subset})
            bar.update(task, advance=1, n=len(table))
    if not table:
        shutil.rmtree(out / "cubes", ignore_errors=True)
        raise DataError(f"every candidate of {candidates} lies outside its scan or has none; nothing written "
                        "(check that the coordinates are LUNA16 world mm, coordX/Y/Z)")

    def write_table(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=_TABLE_COLUMNS)
            writer.writeheader()
            writer.writerows(table)

    skipped.sort(key=lambda s: s["row"])
    positives = sum(r["class"] for r in table)
    manifest = {
        "format": "medtransfer-ncc-1", "luna_dir": str(luna_dir), "candidates": str(candidates),
        "subsets": list(subsets) if subsets else None, "cube_size_zyx": list(size), "axes": "z,y,x",
        "spacing": list(map(float, spacing)) if spacing is not None else "native",
        "values": f"HU clipped to [{HU_WINDOW[0]:g}, {HU_WINDOW[1]:g}], int16, padded with {HU_WINDOW[0]:g}; "
                  "scaled to [0, 1] by the genesis_ct preset of the fine-tune",
        "cubes": len(table), "positives": positives, "skipped": len(skipped),
        "scans": sorted(by_scan), "annotations": str(ann) if nodules is not None else None, "nodules": nodules,
        "versions": versions(),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "skipped.json", lambda tmp: tmp.write_text(json.dumps(skipped, indent=1) + "\n"))
    atomic_write(out / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1) + "\n"))
    atomic_write(out / TABLE, write_table)  # last: a table on disk means a complete extraction
    result = Extraction(out, len(table), positives, len(by_scan), skipped)
    if skipped:
        log.warning("%d of %d candidates skipped (%d without a scan in %s, %d outside their scan); listed in %s",
                    len(skipped), len(rows), result.skipped_no_scan, luna_dir, result.skipped_outside,
                    out / "skipped.json")
    return result


# ------------------------------------------------------------------------------------------ scores back


def read_manifest(data_path: str | Path) -> Optional[dict[str, Any]]:
    """The ``ncc.json`` beside a candidate table (``data_path`` is the table or its folder), else None."""
    data_path = Path(data_path)
    path = (data_path if data_path.is_dir() else data_path.parent) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot be read as JSON ({e}); extract the candidates again") from None
    return manifest if manifest.get("format") == "medtransfer-ncc-1" else None


def read_table(data_path: str | Path) -> dict[str, dict[str, Any]]:
    """case_id -> {seriesuid, xyz, class} of the candidate table at ``data_path`` (the table or its folder)."""
    data_path = Path(data_path)
    path = data_path / TABLE if data_path.is_dir() else data_path
    with path.open(newline="", encoding="utf-8") as f:
        return {r["case_id"]: {"seriesuid": r["seriesuid"], "class": int(r["class"]),
                               "xyz": (float(r["coordX"]), float(r["coordY"]), float(r["coordZ"]))}
                for r in csv.DictReader(f)}


def froc_inputs(scores: Mapping[str, float], table: Mapping[str, Mapping[str, Any]],
                manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of ``train.detection_metrics.froc_points`` for scored candidates.

    ``detections``: ``(seriesuid, score, (x, y, z))`` per scored case; ``lesions``: ``(seriesuid, (x, y, z),
    radius = diameter / 2)`` for every nodule of the scans that have a scored candidate; ``n_scans``: those scans.
    ``complete`` says whether every extracted candidate of those scans was scored (the LUNA16 protocol; a random
    validation split scores only some, so its FROC is an estimate)."""
    nodules = manifest.get("nodules")
    if nodules is None:
        raise DataError("the candidate extraction found no annotations.csv, so there are no nodules to score "
                        "against; extract again with --annotations")
    missing = sorted(set(scores) - set(table))
    if missing:
        raise DataError(f"{len(missing)} scored cases are not in the candidate table (e.g. {missing[0]}); "
                        "evaluate the run on the extraction it was trained on")
    detections = [(table[c]["seriesuid"], float(s), tuple(table[c]["xyz"])) for c, s in scores.items()]
    scans = sorted({d[0] for d in detections})
    lesions = [(uid, (n["coordX"], n["coordY"], n["coordZ"]), n["diameter_mm"] / 2)
               for uid in scans for n in nodules.get(uid, [])]
    in_scans = sum(1 for r in table.values() if r["seriesuid"] in set(scans))
    return {"detections": detections, "lesions": lesions, "n_scans": len(scans), "complete": in_scans == len(scores)}


def write_luna_submission(path: Path, scores: Mapping[str, float], table: Mapping[str, Mapping[str, Any]]) -> Path:
    """``seriesuid,coordX,coordY,coordZ,probability`` (the input of LUNA16's evaluation script); the
    probability is the sigmoid of the score."""
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["seriesuid", "coordX", "coordY", "coordZ", "probability"])
            for case_id, s in scores.items():
                r = table[case_id]
                w.writerow([r["seriesuid"], *r["xyz"], f"{1 / (1 + math.exp(-max(min(s, 700.0), -700.0))):.6g}"])

    return atomic_write(path, write)
