"""Check a dataset before anything trains on it: every problem named with its file and its fix.

A bad case found here costs seconds; found by a training loop it costs hours (or, worse, trains silently on garbage:
labels outside the declared classes, NaN voxels, a label volume of another geometry). ``check_dataset`` reads every
case once (in parallel threads: decompression releases the GIL), summarises the dataset and lists the problems.
Problems of severity ``error`` would break training or make it wrong; ``warning`` ones deserve a look.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import DataError
from .types import Case, Dataset, Image

GEOMETRY_TOL = 1e-3  # relative tolerance on spacing, absolute (mm) on origin, absolute on direction cosines
ANISOTROPY_WARN = 3.0  # largest / smallest spacing above which a warning is given (nnU-Net's threshold too)
SLICE_GAP_TOL = 0.01  # relative spread of DICOM slice gaps (and at least 0.01 mm) tolerated as rounding


@dataclass
class Problem:
    severity: str  # "error" or "warning"
    case_id: str | None
    file: str | None
    message: str
    fix: str

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else (f"case {self.case_id}: " if self.case_id else "")
        return f"{self.severity}: {where}{self.message} -> {self.fix}"


@dataclass
class CaseStats:
    case_id: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    channels: int
    intensity: tuple[float, float, float]  # min, max, mean over finite voxels
    label_counts: dict[int, int] = field(default_factory=dict)
    orientation: str = ""  # axis codes as stored on disk (x, y, z order), e.g. "LPS", "RAS"
    oblique: bool = False
    slice_gaps: dict[str, float] | None = None  # DICOM series: min / median / max distance between slice positions
    boxes: int | None = None  # detection: the case's number of boxes

    @property
    def anisotropy(self) -> float:
        return max(self.spacing) / min(self.spacing) if self.spacing and min(self.spacing) > 0 else 1.0


@dataclass
class DatasetReport:
    dataset: str
    format: str
    task: str
    root: str
    cases: list[CaseStats] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    labels: dict[int, str] = field(default_factory=dict)
    channel_names: list[str] = field(default_factory=list)
    class_balance: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> dict[str, Any]:
        """Shapes, spacings and intensities (min / median / max over cases), voxel counts per label value."""
        out: dict[str, Any] = {"cases": len(self.cases)}
        if not self.cases:
            return out
        dims = Counter(len(c.shape) for c in self.cases)
        common = dims.most_common(1)[0][0]
        if len(dims) > 1:  # shapes of 2D and 3D cases cannot be stacked: summarise the most common kind
            out["spatial_dims"] = {int(k): int(v) for k, v in sorted(dims.items())}
            out["summarised_dims"] = int(common)
        same = [c for c in self.cases if len(c.shape) == common]
        shapes = np.array([c.shape for c in same if c.shape], dtype=float)
        spacings = np.array([c.spacing for c in same if c.spacing], dtype=float)
        if shapes.size:
            out["shape"] = {k: [int(round(v)) for v in getattr(np, k)(shapes, axis=0)] for k in ("min", "median", "max")}
        if spacings.size:
            out["spacing"] = {k: getattr(np, k)(spacings, axis=0).round(4).tolist() for k in ("min", "median", "max")}
            ratios = [c.anisotropy for c in self.cases]
            out["anisotropy"] = {k: round(float(getattr(np, k)(ratios)), 3) for k in ("min", "median", "max")}
        codes = Counter(c.orientation for c in self.cases if c.orientation)
        if codes:
            out["orientation"] = dict(codes.most_common())
            out["oblique_cases"] = sum(c.oblique for c in self.cases)
        lo = min(c.intensity[0] for c in self.cases)
        hi = max(c.intensity[1] for c in self.cases)
        out["intensity"] = {"min": lo, "max": hi, "mean_of_case_means": float(np.mean([c.intensity[2] for c in self.cases]))}
        totals: Counter = Counter()
        present: Counter = Counter()
        for c in self.cases:
            totals.update(c.label_counts)
            present.update({k: 1 for k, v in c.label_counts.items() if v > 0})
        if totals:
            out["label_voxels"] = {int(k): int(v) for k, v in sorted(totals.items())}
            out["label_cases"] = {int(k): int(v) for k, v in sorted(present.items())}
            if self.task == "segmentation":
                declared = bool(self.labels)
                out["num_classes"] = int(max(self.labels if declared else totals)) + 1
                out["num_classes_from"] = "declared labels" if declared else "label values (no label set declared)"
        if self.class_balance:
            out["class_balance"] = dict(self.class_balance)
        counted = [c.boxes for c in self.cases if c.boxes is not None]
        if counted:
            out["boxes"] = {"total": int(sum(counted)), "cases_without_boxes": sum(n == 0 for n in counted),
                            "max_per_case": int(max(counted))}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "format": self.format,
            "task": self.task,
            "root": self.root,
            "ok": self.ok,
            "summary": self.summary(),
            "labels": {int(k): v for k, v in self.labels.items()},
            "channel_names": list(self.channel_names),
            "problems": [asdict(p) for p in self.problems],
        }


# ----------------------------------------------------------------------------------------------------------------


def _read(path: Path) -> Image:
    from .io import read_image

    return read_image(path)


def _close(a: Iterable[float], b: Iterable[float], rel: bool) -> bool:
    a, b = np.asarray(list(a), dtype=float), np.asarray(list(b), dtype=float)
    if a.shape != b.shape:
        return False
    if rel:
        return bool(np.all(np.abs(a - b) <= GEOMETRY_TOL * np.maximum(np.abs(b), 1e-6)))
    return bool(np.all(np.abs(a - b) <= GEOMETRY_TOL * 100))  # 0.1 mm / 0.1 in direction cosines


def _check_case(case: Case, dataset: Dataset) -> tuple[CaseStats | None, list[Problem]]:
    problems: list[Problem] = []

    def add(severity: str, file: Path | None, message: str, fix: str) -> None:
        problems.append(Problem(severity, case.case_id, str(file) if file else None, message, fix))

    missing = [p for p in (*case.images, *( [case.label] if case.label else [])) if not Path(p).exists()]
    for path in missing:
        add("error", path, "file is missing", "restore it or remove the case from the dataset description")
    if missing:
        return None, problems

    slices = dataset.description.get("slices", {}).get(case.case_id, []) if dataset.format == "deeplesion" else []
    gone = sorted({p for p in slices if not Path(p).exists()})
    for path in gone:
        add("error", Path(path), "neighbouring slice of the key slice is missing", "restore it (Images_png/ of the "
            "DeepLesion download) or remove the key slice's rows from DL_info.csv")
    if gone:
        return None, problems

    from .datasets.detection import case_reader

    read = case_reader(dataset) or _read  # DeepLesion: the slice stack, with DL_info's spacing
    images: list[Image] = []
    for path in case.images:
        try:
            images.append(read(Path(path)))
        except DataError as exc:
            add("error", path, f"cannot be read: {exc}", "re-export or copy the file again")
    if len(images) != len(case.images):
        return None, problems

    first = images[0]
    for path, img in zip(case.images[1:], images[1:]):
        if img.spatial_shape != first.spatial_shape:
            add("error", path, f"channel shape {img.spatial_shape} differs from {first.spatial_shape} of "
                f"{case.images[0]}", "resample all channels of a case onto one grid")
    arrays = [img.array.astype(np.float32, copy=False) for img in images]
    finite_all = True
    lo, hi, mean = np.inf, -np.inf, 0.0
    for path, arr in zip(case.images, arrays):
        finite = np.isfinite(arr)
        if not finite.all():
            n_bad = int(arr.size - np.count_nonzero(finite))
            finite_all = False
            add("error", path, f"{n_bad} voxels are NaN or Inf", "fix the export, or replace them (e.g. with the "
                "background value) before training")
        vals = arr[finite] if not finite.all() else arr
        if vals.size:
            lo, hi = min(lo, float(vals.min())), max(hi, float(vals.max()))
            mean += float(vals.mean()) / len(arrays)
    channels = sum(img.channels for img in images)
    if dataset.channel_names and channels != len(dataset.channel_names):
        add("error", case.images[0], f"has {channels} channels, the dataset declares {len(dataset.channel_names)} "
            f"({', '.join(dataset.channel_names)})", "give every case the declared channels")

    counts: dict[int, int] = {}
    if case.label is not None:
        try:
            label = _read(Path(case.label))
        except DataError as exc:
            add("error", case.label, f"cannot be read: {exc}", "re-export or copy the label file again")
            label = None
        if label is not None:
            counts = _check_label(case, dataset, first, label, add)
    if dataset.task == "classification" and case.target is not None and dataset.labels:
        targets = [case.target] if isinstance(case.target, int) else []
        for t in targets:
            if t not in dataset.labels:
                add("error", None, f"class {t} is not one of the declared classes {sorted(dataset.labels)}",
                    "correct the class or declare it")
    if case.boxes is not None or dataset.task == "detection":
        _check_boxes(case, dataset, first, add)
    orientation, oblique = "", False
    if first.spatial_dims == 3:
        from .io import axis_codes

        orientation, oblique = axis_codes(first.meta.get("original", {}).get("direction", first.direction))
    gaps = first.meta.get("dicom_slice_gaps")
    if gaps and gaps["max"] - gaps["min"] > max(0.01, SLICE_GAP_TOL * gaps["median"]):
        add("warning", case.images[0], f"DICOM slice positions are unevenly spaced: gaps from {gaps['min']:.4g} to "
            f"{gaps['max']:.4g} mm (median {gaps['median']:.4g}), but the volume is read at one spacing",
            "a slice may be missing (copy the series again) or the protocol varies the thickness; resample the "
            "series by its slice positions before training")
    stats = CaseStats(
        case_id=case.case_id,
        shape=first.spatial_shape,
        spacing=tuple(float(s) for s in first.spacing),
        channels=channels,
        intensity=(lo if finite_all or np.isfinite(lo) else float("nan"), hi, mean),
        label_counts=counts,
        orientation=orientation,
        oblique=oblique,
        slice_gaps=gaps,
        boxes=len(case.boxes) if case.boxes is not None else None,
    )
    return stats, problems


def _box_source(case: Case, dataset: Dataset) -> Path | str | None:
    """Where a case's boxes are written: the description file, with its row when the reader recorded it."""
    source = dataset.description.get("source")
    row = dataset.description.get("rows", {}).get(case.case_id)
    if dataset.format == "luna16":
        source = dataset.description.get("annotations_file", source)
    return f"{source}:{row}" if source and row else source


def _check_boxes(case: Case, dataset: Dataset, image: Image, add) -> None:
    """Each box: the right number of coordinates, a positive size, inside the image, a declared label."""
    from .boxes import world_to_voxel
    from .geometry import Grid

    where = _box_source(case, dataset)
    where = Path(where) if where else None
    boxes = list(case.boxes or ())
    labels = list(case.box_labels) if case.box_labels is not None else [1] * len(boxes)
    dims = image.spatial_dims
    if len(labels) != len(boxes):
        add("error", where, f"case {case.case_id}: {len(boxes)} boxes but {len(labels)} box labels",
            "give every box one label")
    grid = Grid.of(image)
    for i, box in enumerate(boxes):
        what = f"case {case.case_id}, box {i} {tuple(round(float(v), 3) for v in box)}"
        if len(box) != 2 * dims:
            add("error", where, f"{what}: {len(box)} coordinates, a {dims}D box has {2 * dims} (centre then size, "
                "world mm)", "write the box as cx, cy, cz, w, h, d (2D: cx, cy, w, h)")
            continue
        if not all(np.isfinite(box)) or min(box[dims:]) <= 0:
            add("error", where, f"{what}: zero or negative size", "give the box a positive size along every axis")
            continue
        voxel = world_to_voxel([box], grid)[0]
        lo, hi = voxel[:dims], voxel[dims:]
        shape = np.asarray(grid.shape, float)
        if (hi <= 0).any() or (lo >= shape).any():
            add("error", where, f"{what}: lies outside the image {case.images[0]} (voxels {np.round(lo, 1).tolist()} "
                f"to {np.round(hi, 1).tolist()}, image {list(grid.shape)})", "check the coordinates are world mm "
                "(LPS, as LUNA16 and MONAI write them) of this scan, not voxel indices or RAS")
        elif (lo < -0.5).any() or (hi > shape + 0.5).any():
            add("warning", where, f"{what}: reaches past the image edge (voxels {np.round(lo, 1).tolist()} to "
                f"{np.round(hi, 1).tolist()}, image {list(grid.shape)})", "it is clipped to the image; check it")
    undeclared = sorted({int(v) for v in labels} - set(dataset.labels)) if dataset.labels else []
    if undeclared:
        add("error", where, f"case {case.case_id}: box labels {undeclared} are not declared classes "
            f"{sorted(dataset.labels)}", "declare the classes or correct the labels")


def _check_label(case: Case, dataset: Dataset, image: Image, label: Image, add) -> dict[int, int]:
    arr = label.array
    if label.spatial_shape != image.spatial_shape:
        add("error", case.label, f"label shape {label.spatial_shape} differs from image shape {image.spatial_shape} "
            f"of {case.images[0]}", "resample the label onto the image grid (nearest neighbour) or pair the right files")
        return {}
    if not (_close(label.spacing, image.spacing, rel=True) and _close(label.origin, image.origin, rel=False)
            and _close(np.ravel(label.direction), np.ravel(image.direction), rel=False)):
        add("error", case.label, f"label geometry (spacing {tuple(round(s, 4) for s in label.spacing)}, origin "
            f"{tuple(round(o, 2) for o in label.origin)}) differs from the image's (spacing "
            f"{tuple(round(s, 4) for s in image.spacing)}, origin {tuple(round(o, 2) for o in image.origin)})",
            "the label was saved on another grid: resample it onto the image, or fix its header")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or not np.all(arr == np.round(arr)):
            add("error", case.label, "label holds non-integer values", "labels must be integer class values; "
                "re-export with nearest-neighbour interpolation")
            return {}
    values, counts = np.unique(arr.astype(np.int64, copy=False), return_counts=True)
    found = {int(v): int(c) for v, c in zip(values, counts)}
    if dataset.labels:
        extra = sorted(set(found) - set(dataset.labels))
        if extra:
            add("error", case.label, f"label values {_few(extra)} are outside the declared classes "
                f"{_few(sorted(dataset.labels))}", "declare these classes in the dataset description or fix the label")
    elif min(found, default=0) < 0:
        add("error", case.label, f"label values {_few(sorted(v for v in found if v < 0))} are negative",
            "class indices start at 0 (background); fix the label or declare the label set")
    if set(found) <= {0}:
        add("warning", case.label, "label is empty (background only)", "check the annotation; empty labels teach "
            "the network that nothing is ever present")
    return found


def check_dataset(dataset: Dataset, *, workers: int | None = None, progress: bool = False) -> DatasetReport:
    """Read every case of ``dataset`` once and report what would break or bias training."""
    report = DatasetReport(
        dataset=dataset.name,
        format=dataset.format,
        task=dataset.task,
        root=str(dataset.root),
        labels=dict(dataset.labels),
        channel_names=list(dataset.channel_names),
    )
    if not dataset.cases:
        report.problems.append(Problem("error", None, str(dataset.root), "the dataset has no cases",
                                       "check the path and the dataset description (training list, file names)"))
        return report
    ids = Counter(c.case_id for c in dataset.cases)
    for case_id, n in sorted(ids.items()):
        if n > 1:
            report.problems.append(Problem("error", case_id, None, f"case id '{case_id}' appears {n} times",
                                           "give every case a unique id (file name)"))

    workers = workers or min(8, os.cpu_count() or 1)
    results: list[tuple[CaseStats | None, list[Problem]]]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_check_case, case, dataset) for case in dataset.cases]
        if progress:
            from rich.progress import track

            results = [f.result() for f in track(futures, description=f"checking {len(futures)} cases")]
        else:
            results = [f.result() for f in futures]
    for stats, problems in results:
        if stats is not None:
            report.cases.append(stats)
        report.problems.extend(problems)

    dims = Counter(len(c.shape) for c in report.cases)
    if len(dims) > 1:
        odd = [f"{c.case_id} ({len(c.shape)}D)" for c in report.cases if len(c.shape) != dims.most_common(1)[0][0]]
        report.problems.append(Problem("error", None, None, f"cases mix spatial dimensions {dict(sorted(dims.items()))}"
                                       f" (e.g. {', '.join(odd[:3])})", "keep 2D and 3D images in separate datasets: "
                                       "move the odd files (e.g. .npy or .png beside the scans) out of the folder"))
    aniso = [c for c in report.cases if c.anisotropy > ANISOTROPY_WARN]
    if aniso:
        worst = max(aniso, key=lambda c: c.anisotropy)
        report.problems.append(Problem(
            "warning", None, None, f"{len(aniso)} of {len(report.cases)} cases are anisotropic (largest / smallest "
            f"spacing above {ANISOTROPY_WARN:g}; at most {worst.anisotropy:.3g}, case {worst.case_id} spacing "
            f"{tuple(round(v, 4) for v in worst.spacing)})", "resample to a less anisotropic spacing (`data prepare "
            "--spacing`, data.spacing), or choose a patch that spans a similar distance along each axis"))
    channels = Counter(c.channels for c in report.cases)
    if len(channels) > 1:
        odd = [c.case_id for c in report.cases if c.channels != channels.most_common(1)[0][0]]
        report.problems.append(Problem("error", None, None, f"inconsistent channel counts {dict(channels)} "
                                       f"(e.g. cases {', '.join(odd[:3])})", "give every case the same channels"))
    for series in dataset.description.get("annotated_without_scan", []):
        report.problems.append(Problem(
            "error", series, dataset.description.get("annotations_file"), f"annotations list series {series} but "
            "no scan of it is under subset*/", "copy the scan (<seriesuid>.mhd and its .raw/.zraw) into a subset "
            "folder, or remove its rows from annotations.csv"))
    if dataset.task == "classification":
        report.class_balance = _class_balance(dataset)
        for cls, name in dataset.labels.items():
            if report.class_balance.get(name, 0) == 0:
                report.problems.append(Problem("warning", None, None, f"class {cls} ('{name}') has no example",
                                               "add examples or drop the class"))
    return report


def _few(values: list[int], n: int = 12) -> str:
    """A list short enough for one message line: the first ``n`` values and how many more."""
    return str(values) if len(values) <= n else f"[{', '.join(map(str, values[:n]))}, ... {len(values) - n} more]"


def _class_balance(dataset: Dataset) -> dict[str, int]:
    balance: Counter = Counter()
    for case in dataset.cases:
        t = case.target
        if isinstance(t, int):
            balance[dataset.labels.get(t, str(t))] += 1
        elif isinstance(t, tuple):
            for i, v in enumerate(t):
                if v == 1:
                    balance[dataset.labels.get(i, str(i))] += 1
    return dict(balance)
