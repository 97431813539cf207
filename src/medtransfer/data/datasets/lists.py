"""Layouts described by a list: the MedicalNet ``image label`` text list, a CSV file (segmentation, one class or
multi-label findings), a 2D image list (ChestX-ray14, Shenzhen), and 2D ``images/`` + ``masks/`` folders.

Every error names the file and, for list files, the line."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from ...errors import DataError
from ..types import Case, Dataset, Task
from .common import (
    IMAGE_EXTENSIONS_2D,
    KNOWN_EXTENSIONS,
    case_ids,
    has_ext,
    is_number,
    resolve,
    spatial_dims_of,
    split_line,
    strip_ext,
    text_lines,
)

# The 14 findings of ChestX-ray14 in the order of the official lists (pass as label_names= to image_list_2d).
CHESTXRAY14_LABELS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)  # fmt: skip

_MULTILABEL_VALUES = {0.0, 1.0, -1.0}  # -1 = "uncertain" (CheXpert); kept as -1 for the loss to decide (U-Ignore...)


def sniff_list(path: Path) -> str:
    """``image_list_2d`` when the first entry has only numbers after the image (or is a lone 2D image), else
    ``medicalnet_list`` (``image label`` paths, or a lone volume)."""
    lines = text_lines(path)
    if not lines:
        return "medicalnet_list"
    tokens = split_line(lines[0][1])
    if len(tokens) >= 2:
        return "image_list_2d" if all(is_number(t) for t in tokens[1:]) else "medicalnet_list"
    return "image_list_2d" if has_ext(tokens[0], IMAGE_EXTENSIONS_2D) else "medicalnet_list"


def _list_root(path: Path, options: Mapping[str, Any]) -> Path:
    """Listed paths are relative to ``root=``, by default to the list file's folder."""
    return Path(options["root"]) if options.get("root") else path.parent


def load_medicalnet_list(path: Path, options: Mapping[str, Any]) -> Dataset:
    """MedicalNet list: ``image label`` per line (space separated) relative to ``root``; one column = unlabelled."""
    root = _list_root(path, options)
    rows: list[tuple[Path, Path | None]] = []
    for lineno, text in text_lines(path):
        tokens = text.split()
        if len(tokens) > 2:
            raise DataError(f"{path}:{lineno}: {len(tokens)} columns; expected 'image label' or 'image' separated "
                            "by spaces; fix the line (paths with spaces are not supported: rename the files)")  # fmt: skip
        rows.append((resolve(root, tokens[0]), resolve(root, tokens[1]) if len(tokens) == 2 else None))
    ids = case_ids([im for im, _ in rows], root)
    cases = [Case(cid, (im,), lab) for cid, (im, lab) in zip(ids, rows)]
    task: Task = "segmentation" if any(c.label for c in cases) else "unlabelled"
    return Dataset(name=path.stem, root=root, format="medicalnet_list", task=task, cases=cases,
                   spatial_dims=spatial_dims_of([c.images[0] for c in cases]),
                   description={"source": str(path)})  # fmt: skip


_IMAGE_COLUMNS = ("image", "image_path", "img", "path", "filename", "file")
_ID_COLUMNS = ("case_id", "id")
_MASK_COLUMNS = ("label", "mask", "seg", "segmentation")
_CLASS_COLUMNS = ("class", "target", "category")


def load_csv(path: Path, options: Mapping[str, Any]) -> Dataset:
    """CSV with a header. The kind comes from the columns (override with ``task=``):
    a ``label``/``mask`` column of image paths -> segmentation; a ``class`` column (or a ``label`` column of
    non-paths) -> one class per case, integers kept, strings mapped to indices in sorted order; otherwise every
    other column (or ``label_columns=``) is a 0/1 finding -> multi-label vector, -1 (CheXpert "uncertain") kept as
    -1, empty cells read as 0 ("not mentioned"). An empty label or class cell leaves that case unlabelled."""
    root = _list_root(path, options)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, [c.strip() for c in row]) for row in reader if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot be read as CSV ({e}); fix: check the file") from None
    if not rows:
        raise DataError(f"{path}: empty, no header row; fix: start with a header such as 'image,label'")
    header, rows = rows[0][1], rows[1:]
    lower = [h.lower() for h in header]

    def column(wanted: Sequence[str]) -> int | None:
        return next((lower.index(w) for w in wanted if w in lower), None)

    image_col = column([options["image_column"].lower()] if options.get("image_column") else _IMAGE_COLUMNS)
    if image_col is None:
        raise DataError(f"{path}:1: no image column in header {header}; fix: name the image path column 'image' "
                        "or pass image_column=...")  # fmt: skip
    id_col = column(_ID_COLUMNS)
    for lineno, row in rows:
        if len(row) != len(header):
            raise DataError(f"{path}:{lineno}: {len(row)} cells but the header has {len(header)}; fix the row")
        if not row[image_col]:
            raise DataError(f"{path}:{lineno}: empty image cell; fix: fill it or remove the row")
    images = [resolve(root, row[image_col]) for _, row in rows]
    ids = case_ids(images, root)
    if id_col is not None:  # an empty id cell falls back to the file name
        ids = [row[id_col] or cid for (_, row), cid in zip(rows, ids)]
    rest = [i for i in range(len(header)) if i not in (image_col, id_col)]
    task, targets, labels_, label_files = _csv_targets(path, header, rows, rest, options)
    cases = [Case(cid, (im,), lab, tgt) for cid, im, lab, tgt in zip(ids, images, label_files, targets)]
    return Dataset(name=path.stem, root=root, format="csv", task=task, cases=cases, labels=labels_,
                   spatial_dims=spatial_dims_of(images),
                   description={"source": str(path), "columns": header})  # fmt: skip


def _csv_targets(path: Path, header: list[str], rows: list[tuple[int, list[str]]], rest: list[int],
                 options: Mapping[str, Any]) -> tuple[Task, list[Any], dict[int, str], list[Path | None]]:  # fmt: skip
    task = options.get("task")
    if task not in (None, "segmentation", "classification", "unlabelled"):
        raise DataError(f"task={task!r}; use 'segmentation', 'classification' or 'unlabelled'")
    lower = [h.lower() for h in header]
    none: list[Any] = [None] * len(rows)
    if options.get("label_columns"):
        wanted = list(options["label_columns"])
        missing = [c for c in wanted if c not in header]
        if missing:
            raise DataError(f"{path}:1: label_columns {missing} not in header {header}; fix the names")
        rest, task = [header.index(c) for c in wanted], "multilabel"
    if task == "unlabelled" or not rest:
        return "unlabelled", none, {}, none
    mask_col = next((i for i in rest if lower[i] in _MASK_COLUMNS), None)
    values = [row[mask_col] for _, row in rows if row[mask_col]] if mask_col is not None else []
    looks_like_paths = any(has_ext(v, KNOWN_EXTENSIONS) or "/" in v for v in values)
    if mask_col is not None and (task == "segmentation" or (task is None and looks_like_paths)):
        root = _list_root(path, options)
        return "segmentation", none, {}, [resolve(root, r[mask_col]) if r[mask_col] else None for _, r in rows]
    if task == "segmentation":
        raise DataError(f"{path}:1: task='segmentation' needs a mask column named one of {_MASK_COLUMNS}; "
                        f"header is {header}")  # fmt: skip
    class_col = next((i for i in rest if lower[i] in _CLASS_COLUMNS), mask_col)
    if class_col is not None and task != "multilabel":
        cells = [row[class_col] for _, row in rows]
        if all(is_number(c) for c in cells if c):
            targets = [_class_index(c, f"{path}:{n}") if c else None for (n, _), c in zip(rows, cells)]
            labels_ = {t: str(t) for t in sorted({t for t in targets if t is not None})}
        else:
            names = sorted({c for c in cells if c})
            labels_ = dict(enumerate(names))
            targets = [names.index(c) if c else None for c in cells]
        return "classification", targets, labels_, none
    names = [header[i] for i in rest]
    targets = [_multilabel([row[i] for i in rest], names, f"{path}:{n}") for n, row in rows]
    return "classification", targets, dict(enumerate(names)), none


def _multilabel(tokens: Sequence[str], columns: Sequence[str], where: str) -> tuple[float, ...]:
    values = []
    for token, column in zip(tokens, columns):
        value = float(token) if token and is_number(token) else (0.0 if token == "" else None)
        if value not in _MULTILABEL_VALUES:
            raise DataError(f"{where}: {column} = {token!r} is not 0, 1, -1 (uncertain) or empty (= 0); fix the "
                            "value, or choose the finding columns with label_columns=[...]")  # fmt: skip
        values.append(value)
    return tuple(values)


def _class_index(token: str, where: str) -> int:
    value = float(token) if is_number(token) else -1.0
    if not math.isfinite(value) or value != int(value) or value < 0:
        raise DataError(f"{where}: class {token!r} is not a non-negative integer; fix the value")
    return int(float(token))


def load_image_list_2d(path: Path, options: Mapping[str, Any]) -> Dataset:
    """2D list: ``image v1 v2 ...`` (ChestX-ray14, multi-label vector) or ``image,label`` (Shenzhen, one class);
    one value per line -> a class index, several -> a 0/1 vector named by ``label_names``."""
    root = _list_root(path, options)
    rows = [(n, split_line(text)) for n, text in text_lines(path)]
    labelled = [(n, len(t) - 1) for n, t in rows if len(t) > 1]
    width = labelled[0][1] if labelled else 0
    for n, w in labelled:
        if w != width:
            raise DataError(f"{path}:{n}: {w} labels, but line {labelled[0][0]} has {width}; fix: every line "
                            "needs the same number of labels")  # fmt: skip
    names = list(options.get("label_names") or [])
    if width == 1:
        targets = [_class_index(t[1], f"{path}:{n}") if len(t) > 1 else None for n, t in rows]
        seen = sorted({t for t in targets if t is not None})
        if names and seen and seen[-1] >= len(names):
            raise DataError(f"{path}: class {seen[-1]} but only {len(names)} label_names; fix label_names")
        labels_ = dict(enumerate(names)) or {t: str(t) for t in seen}
    else:
        if names and len(names) != width:
            raise DataError(f"{path}: {len(names)} label_names for {width} label columns; fix label_names")
        names = names or [f"finding_{i}" for i in range(width)]
        targets = [_multilabel(t[1:], names, f"{path}:{n}") if len(t) > 1 else None for n, t in rows]
        labels_ = dict(enumerate(names))
    images = [resolve(root, t[0]) for _, t in rows]
    cases = [Case(cid, (im,), None, tgt) for cid, im, tgt in zip(case_ids(images, root), images, targets)]
    return Dataset(name=path.stem, root=root, format="image_list_2d", task="classification" if width else "unlabelled",
                   cases=cases, labels=labels_, spatial_dims=2, description={"source": str(path)})  # fmt: skip


def load_image_mask_2d(root: Path, options: Mapping[str, Any]) -> Dataset:
    """``images/`` + ``masks/`` with matching names: the mask of ``<stem><image_suffix>.<ext>`` is
    ``<stem><mask_suffix>.<any ext>`` (DRIVE: image_suffix="_training", mask_suffix="_manual1"). An image without
    a mask gets the expected same-extension path (the checker reports it missing); masks without an image are
    listed in ``description["unmatched_masks"]``."""
    images_dir = root / options.get("images", "images")
    masks_dir = root / options.get("masks", "masks")
    image_suffix, mask_suffix = options.get("image_suffix", ""), options.get("mask_suffix", "")
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise DataError(f"{d}: no such folder; fix: create it or name the folders with images=..., masks=...")
    ok = IMAGE_EXTENSIONS_2D + (".dcm",)
    masks = {strip_ext(p.name): p for p in sorted(masks_dir.iterdir()) if has_ext(p.name, ok)}
    cases, used = [], set()
    for image in sorted(p for p in images_dir.iterdir() if has_ext(p.name, ok) and not p.name.startswith(".")):
        stem = strip_ext(image.name)
        case_id = stem.removesuffix(image_suffix) if image_suffix else stem
        key = case_id + mask_suffix
        used.add(key)
        cases.append(Case(case_id, (image,), masks.get(key, masks_dir / (key + image.name[len(stem) :]))))
    unmatched = [str(masks[k]) for k in masks if k not in used]
    return Dataset(name=root.name, root=root, format="image_mask_2d", task="segmentation", cases=cases,
                   spatial_dims=2, description={"source": str(root), "unmatched_masks": unmatched})  # fmt: skip
