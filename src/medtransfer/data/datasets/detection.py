"""Detection layouts: LUNA16 nodules and candidates, DeepLesion key slices (2.5D), MONAI's detection datalist JSON,
and boxes derived from the masks of any segmentation dataset.

Boxes on a :class:`~medtransfer.data.types.Case` are world boxes, LPS millimetres, MONAI ``cccwhd`` (``ccwh`` in
2D; :mod:`medtransfer.data.boxes`), labels 1-based. Like every parser, these read descriptions only, except
``boxes_from=``, which must read each mask to find its objects.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ...errors import DataError
from ..types import Case, Dataset, Image
from .common import case_ids, read_json, resolve, spatial_dims_of

logger = logging.getLogger(__package__)

LUNA_CANDIDATE_FILES = ("candidates.csv", "candidates_V2.csv")


# ------------------------------------------------------------------------------------------------------- LUNA16


def luna_detection(dataset: Dataset, root: Path, options: Mapping[str, Any]) -> Dataset:
    """The LUNA16 dataset of :func:`load_luna16` as a detection dataset: each scan's nodules from annotations.csv
    become cubes ``(coordX, coordY, coordZ, d, d, d)`` (class 1, "nodule"); a scan without nodules has no boxes."""
    nodules = dataset.description.get("annotations")
    if nodules is None:
        raise DataError(f"{root}: task='detection' needs annotations.csv (seriesuid,coordX,coordY,coordZ,"
                        "diameter_mm); fix: put it in the folder or pass annotations=<file>")  # fmt: skip
    known = {c.case_id for c in dataset.cases}
    unknown = sorted(set(nodules) - known)
    if unknown:
        logger.warning("%s: %d annotated series have no scan under subset*/ (e.g. %s)", root, len(unknown), unknown[0])
    cases = []
    for case in dataset.cases:
        found = nodules.get(case.case_id, [])
        boxes = tuple((n["coordX"], n["coordY"], n["coordZ"], *(n["diameter_mm"],) * 3) for n in found)
        cases.append(replace(case, boxes=boxes, box_labels=(1,) * len(boxes)))
    desc = {**dataset.description, "annotated_without_scan": unknown}
    return replace(dataset, task="detection", cases=cases, labels={1: "nodule"}, description=desc)


def luna_candidates(path: Path) -> dict[str, list[dict[str, float]]]:
    """``candidates.csv``: seriesuid -> list of {coordX, coordY, coordZ, class} (world mm; class 1 = a nodule)."""
    columns = ("coordX", "coordY", "coordZ", "class")
    out: dict[str, list[dict[str, float]]] = {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not set(("seriesuid",) + columns) <= set(reader.fieldnames or ()):
                raise DataError(f"{path}:1: header {reader.fieldnames} lacks seriesuid,{','.join(columns)}; fix it")
            for row in reader:
                try:
                    item = {c: float(row[c]) for c in columns}
                except (TypeError, ValueError):
                    raise DataError(f"{path}:{reader.line_num}: a coordinate or the class is not a number; "
                                    "fix the row") from None  # fmt: skip
                if item["class"] not in (0.0, 1.0):
                    raise DataError(f"{path}:{reader.line_num}: class {row['class']!r} is not 0 or 1; fix the row")
                item["class"] = int(item["class"])
                out.setdefault(row["seriesuid"], []).append(item)
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror}); fix the path given as candidates=") from None
    return out


# --------------------------------------------------------------------------------------------------- DeepLesion

DEEPLESION_SPLITS = {1: "train", 2: "val", 3: "test"}
_DL_COLUMNS = ("File_name", "Key_slice_index", "Bounding_boxes", "Spacing_mm_px_", "Slice_range", "Train_Val_Test",
               "Possibly_noisy", "Image_size")  # fmt: skip
HU_OFFSET = 32768  # DeepLesion's Images_png hold HU + 32768 as uint16


def _numbers(text: str, n: int, where: str, column: str) -> list[float]:
    try:
        values = [float(t) for t in text.replace(";", ",").split(",") if t.strip()]
    except ValueError:
        values = []
    if len(values) != n or not all(math.isfinite(v) for v in values):
        raise DataError(f"{where}: {column} = {text!r}, expected {n} comma-separated numbers; fix the row")
    return values


def load_deeplesion(root: Path, options: Mapping[str, Any]) -> Dataset:
    """DeepLesion: ``DL_info.csv`` (one row per lesion) and ``Images_png/<patient>_<study>_<series>/<slice>.png``.

    A case is one key slice, id = ``File_name`` without ``.png``, with every lesion marked on it. Its image is the
    key slice PNG; ``description["slices"][case_id]`` lists the ``slices=`` (default 9) PNGs centred on it, the
    series ends repeated where the slice range stops (as MP3D does), which :class:`DeepLesionReader` stacks as
    channels. Boxes: ``Bounding_boxes`` ``x1, y1, x2, y2`` (pixel coordinates with pixel centres at integers, so
    ``+ 0.5`` in medtransfer's voxel boxes) become 2D world boxes on a grid of ``Spacing_mm_px_`` spacing with its
    origin at 0. ``Train_Val_Test`` (1, 2, 3) is kept as the fixed split ``description["split"]`` (train, val,
    test) and ``Possibly_noisy`` as ``description["noisy"]`` (case ids with a noisy lesion); every lesion is class
    1, "lesion" (``Coarse_lesion_type`` is in ``description["lesion_types"]``, -1 where unknown)."""
    path = Path(options["info"]) if options.get("info") else root / "DL_info.csv"
    images = root / options.get("images", "Images_png")
    k = int(options.get("slices", 9))
    if k < 1 or k % 2 == 0:
        raise DataError(f"slices={k}: the number of slices must be odd (the key slice in the middle), e.g. 9")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in _DL_COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise DataError(f"{path}:1: header lacks {', '.join(missing)} (DeepLesion's DL_info.csv columns); "
                                "fix the header")  # fmt: skip
            rows = [(reader.line_num, row) for row in reader]
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror}); fix: put DL_info.csv in the folder or pass "
                        "info=<file>") from None  # fmt: skip
    by_case: dict[str, dict[str, Any]] = {}
    for line, row in rows:
        where = f"{path}:{line}"
        name = row["File_name"].strip()
        series, _, slice_name = name.rpartition("_")
        if not series or not slice_name.lower().endswith(".png") or not slice_name[:-4].isdigit():
            raise DataError(f"{where}: File_name {name!r} is not <patient>_<study>_<series>_<slice>.png; fix it")
        key = int(slice_name[:-4])
        x1, y1, x2, y2 = _numbers(row["Bounding_boxes"], 4, where, "Bounding_boxes")
        sx, sy, sz = _numbers(row["Spacing_mm_px_"], 3, where, "Spacing_mm_px_")
        lo, hi = (int(v) for v in _numbers(row["Slice_range"], 2, where, "Slice_range"))
        width, height = (int(v) for v in _numbers(row["Image_size"], 2, where, "Image_size"))
        split = DEEPLESION_SPLITS.get(int(float(row["Train_Val_Test"] or 0)))
        if split is None:
            raise DataError(f"{where}: Train_Val_Test = {row['Train_Val_Test']!r}, expected 1, 2 or 3; fix the row")
        case_id = name[:-4]
        entry = by_case.setdefault(case_id, {
            "series": series, "key": key, "range": (lo, hi), "spacing": (sy, sx), "slice_mm": sz,
            "shape": (height, width), "split": split, "noisy": False, "pixel_boxes": [], "types": [], "line": line,
        })  # fmt: skip
        entry["pixel_boxes"].append((y1 + 0.5, x1 + 0.5, y2 + 0.5, x2 + 0.5))
        entry["noisy"] |= row["Possibly_noisy"].strip() in ("1", "1.0", "True", "true")
        entry["types"].append(int(float(row.get("Coarse_lesion_type") or -1)))
    cases, slices = [], {}
    for case_id, e in by_case.items():
        folder = images / e["series"]
        lo, hi = e["range"]
        offsets = range(-(k // 2), k // 2 + 1)
        slices[case_id] = [str(folder / f"{min(max(e['key'] + o, lo), hi):03d}.png") for o in offsets]
        grid = _slice_grid(e["shape"], e["spacing"])
        from ..boxes import voxel_to_world

        world = voxel_to_world(np.asarray(e["pixel_boxes"], float), grid)
        cases.append(Case(case_id, (folder / f"{e['key']:03d}.png",), boxes=tuple(map(tuple, world.tolist())),
                          box_labels=(1,) * len(world)))  # fmt: skip
    desc = {
        "source": str(path), "slices": slices, "slice_count": k,
        "split": {cid: e["split"] for cid, e in by_case.items()},
        "noisy": sorted(cid for cid, e in by_case.items() if e["noisy"]),
        "lesion_types": {cid: e["types"] for cid, e in by_case.items()},
        "spacing": {cid: [*e["spacing"], e["slice_mm"]] for cid, e in by_case.items()},
        "rows": {cid: e["line"] for cid, e in by_case.items()},
    }  # fmt: skip
    return Dataset(name=root.name, root=root, format="deeplesion", task="detection", cases=cases,
                   labels={1: "lesion"}, spatial_dims=2, description=desc)  # fmt: skip


def _slice_grid(shape: Sequence[int], spacing: Sequence[float]):
    from ..geometry import Grid

    return Grid(tuple(int(s) for s in shape), tuple(float(s) for s in spacing), (0.0, 0.0), np.eye(2))


@dataclass(frozen=True)
class DeepLesionReader:
    """Reads a DeepLesion key slice as its ``(K, H, W)`` stack of neighbouring slices in HU (PNG value - 32768),
    spacing from DL_info (the PNGs carry none); picklable, so the cache's worker processes can use it."""

    slices: Mapping[str, Sequence[str]]  # key slice path -> the K slice paths
    spacing: Mapping[str, Sequence[float]]  # key slice path -> (row, column) spacing in mm

    @classmethod
    def of(cls, dataset: Dataset) -> DeepLesionReader:
        desc = dataset.description
        by_path = {str(c.images[0]): c.case_id for c in dataset.cases}
        return cls({p: desc["slices"][cid] for p, cid in by_path.items()},
                   {p: desc["spacing"][cid][:2] for p, cid in by_path.items()})  # fmt: skip

    def for_case(self, case: Case) -> DeepLesionReader:
        key = str(case.images[0])
        return DeepLesionReader({key: self.slices[key]}, {key: self.spacing[key]})

    def __call__(self, path: Path) -> Image:
        from ..io import read_image

        key = str(path)
        if key not in self.slices:
            raise DataError(f"{path}: not a key slice of this DeepLesion dataset (DL_info.csv does not list it)")
        planes = []
        for p in self.slices[key]:
            img = read_image(p)
            if img.array.ndim != 2 or img.array.dtype.kind not in "ui":
                raise DataError(f"{p}: {img.array.dtype} {img.array.shape}; a DeepLesion slice is a 16-bit "
                                "grayscale PNG (HU + 32768)")  # fmt: skip
            planes.append(img.array.astype(np.int32) - HU_OFFSET)
        shapes = {a.shape for a in planes}
        if len(shapes) > 1:
            raise DataError(f"{path}: its neighbouring slices have different sizes {sorted(shapes)}")
        array = np.stack(planes).astype(np.float32)
        return Image(array, tuple(float(s) for s in self.spacing[key]), (0.0, 0.0), np.eye(2), Path(path),
                     {"slices": list(self.slices[key])})  # fmt: skip


def case_reader(dataset: Dataset):
    """The reader the cache needs for this dataset's cases, or None for the usual image reader."""
    return DeepLesionReader.of(dataset) if dataset.format == "deeplesion" else None


# ---------------------------------------------------------------------------------------------- MONAI datalist


def is_monai_datalist(desc: Mapping[str, Any]) -> bool:
    """A datalist whose first training or validation item has a "box" key."""
    for key in ("training", "validation"):
        items = desc.get(key)
        if isinstance(items, list) and items:
            return isinstance(items[0], dict) and "box" in items[0]
    return False


def load_monai_datalist(path: Path, options: Mapping[str, Any]) -> Dataset:
    """MONAI's detection datalist: ``{"training": [{"image": path, "box": [[cx, cy, cz, w, h, d], ...], "label":
    [0, ...]}], "validation": [...]}``, boxes in world coordinates (``cccwhd``, LPS as MONAI's LUNA16 datalists,
    whose transforms set ``affine_lps_to_ras=True`` to compare them with the LPS frame of ITK). Paths are relative
    to ``root=`` (MONAI's ``base_dir``), by default the file's folder. MONAI's labels are 0-based class indices;
    here class ``k`` becomes ``k + 1`` (``label_names=``, or a top-level ``"labels": {"0": name}``, names them in
    MONAI's order; else ``class_<k>``). The part an item came from
    is kept as the fixed split ``description["split"]`` (train, val, test)."""
    file = path / "dataset.json" if path.is_dir() else path
    desc = read_json(file)
    root = Path(options["root"]) if options.get("root") else file.parent
    parts = {"training": "train", "validation": "val", "test": "test"}
    rows: list[tuple[str, int, Any]] = []
    for key in parts:
        items = desc.get(key, [])
        if not isinstance(items, list):
            raise DataError(f"{file}: '{key}' must be a list of {{\"image\", \"box\", \"label\"}} items")
        rows += [(key, i, item) for i, item in enumerate(items)]
    if not rows:
        raise DataError(f"{file}: no 'training' or 'validation' items; fix: list the scans with their boxes")
    dims_seen, parsed = set(), []
    top = 0
    for key, i, item in rows:
        where = f"{file}: {key}[{i}]"
        image = item.get("image") if isinstance(item, dict) else None
        paths = [image] if isinstance(image, str) else image
        if not paths or not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise DataError(f"{where} has no 'image' path; fix: write it like "
                            '{"image": "subset0/scan.mhd", "box": [[cx, cy, cz, w, h, d]], "label": [0]}')  # fmt: skip
        boxes, labels = item.get("box", []), item.get("label", [])
        if not isinstance(boxes, list) or not isinstance(labels, list):
            raise DataError(f"{where}: 'box' and 'label' must be lists")
        if len(labels) != len(boxes):
            raise DataError(f"{where}: {len(boxes)} boxes but {len(labels)} labels; fix: one label per box")
        for j, box in enumerate(boxes):
            if not isinstance(box, list) or len(box) not in (4, 6):
                raise DataError(f"{where}: box {j} is {box!r}; a box is [cx, cy, cz, w, h, d] (3D) or "
                                "[cx, cy, w, h] (2D) in world mm")  # fmt: skip
            dims_seen.add(len(box) // 2)
        for j, lab in enumerate(labels):
            if isinstance(lab, bool) or not isinstance(lab, int) or lab < 0:
                raise DataError(f"{where}: label {j} is {lab!r}; MONAI labels are class indices 0, 1, ...")
            top = max(top, lab + 1)
        parsed.append((parts[key], [resolve(root, p) for p in paths],
                       tuple(tuple(float(v) for v in b) for b in boxes), tuple(lab + 1 for lab in labels)))  # fmt: skip
    if len(dims_seen) > 1:
        raise DataError(f"{file}: mixes 2D (4 numbers) and 3D (6 numbers) boxes; fix the boxes")
    declared = desc.get("labels")  # not MONAI's: medtransfer's phantom datalists name their classes this way
    names = list(options.get("label_names") or [])
    if not names and isinstance(declared, dict):
        names = [str(declared[k]) for k in sorted(declared, key=lambda k: int(k))] if all(
            str(k).isdigit() for k in declared) else []
    if names and len(names) < top:
        raise DataError(f"{file}: class {top - 1} occurs but only {len(names)} label_names are given")
    labels_ = {k + 1: (names[k] if names else f"class_{k}") for k in range(max(top, len(names), 1))}
    ids = case_ids([p[0] for _, p, _, _ in parsed], root)
    cases = [Case(cid, tuple(p), boxes=b, box_labels=lab) for cid, (_, p, b, lab) in zip(ids, parsed)]
    dims = dims_seen.pop() if dims_seen else spatial_dims_of([c.images[0] for c in cases])
    return Dataset(name=str(desc.get("name", file.parent.name)), root=root, format="monai_detection",
                   task="detection", cases=cases, labels=labels_, spatial_dims=dims,
                   description={"source": str(file), "split": {c.case_id: s for c, (s, *_) in zip(cases, parsed)},
                                "label_offset": 1})  # fmt: skip


# ----------------------------------------------------------------------------------------------- boxes from masks

BOXES_FROM = ("labels", "instances")


def boxes_from_masks(dataset: Dataset, boxes_from: str, *, reader=None) -> Dataset:
    """``dataset`` (segmentation) as a detection dataset whose boxes come from each case's mask: ``labels`` = the
    connected components of each class (full connectivity), labelled with their class; ``instances`` = each mask
    value one object, class 1. Reads every mask; the mask stays on the case."""
    from ..boxes import boxes_from_mask, voxel_to_world
    from ..geometry import Grid

    if boxes_from not in BOXES_FROM:
        raise DataError(f"boxes_from={boxes_from!r}; use 'labels' (connected components per class) or 'instances' "
                        "(each mask value one object)")  # fmt: skip
    if dataset.task != "segmentation":
        raise DataError(f"{dataset.root}: boxes_from= needs a segmentation dataset with masks, this one is "
                        f"{dataset.task}")  # fmt: skip
    if reader is None:
        from ..io import read_image as reader
    cases = []
    for case in dataset.cases:
        if case.label is None:
            raise DataError(f"case {case.case_id!r}: no mask to take boxes from; fix: add its label or remove it")
        mask = reader(Path(case.label))
        voxel, labels = boxes_from_mask(np.asarray(mask.array).reshape(mask.spatial_shape),
                                        instances=boxes_from == "instances")  # fmt: skip
        world = voxel_to_world(voxel, Grid.of(mask))
        cases.append(replace(case, boxes=tuple(map(tuple, world.tolist())), box_labels=tuple(labels.tolist())))
    if boxes_from == "instances":
        labels_ = {1: "object"}
    else:
        labels_ = {k: v for k, v in dataset.labels.items() if k != 0} or {
            int(v): str(v) for v in sorted({lab for c in cases for lab in c.box_labels})}
    desc = {**dataset.description, "boxes_from": boxes_from}
    return replace(dataset, task="detection", cases=cases, labels=labels_, description=desc)
