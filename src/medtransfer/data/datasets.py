"""Parse a dataset description (MSD, nnU-Net raw, list and CSV files, folders, LUNA16, 2D lists) into a `Dataset`.

Only the description is read, never voxels, and listed files are not checked here: parsing must be instant even for
a 100k-line list, and problems with the files themselves (missing, unreadable, mismatched) are the checker's job,
which reports all of them at once instead of stopping at the first. A `DataError` is raised here only when the
description itself cannot be understood; it names the file (and line) and the fix.

Case ids are the image file names without extension; when two *different* files share a name (``a/img.nii.gz``,
``b/img.nii.gz``) every id of that dataset becomes its relative path joined by ``_`` (``a_img``). The same file
listed twice keeps one id twice: duplicates are kept and recorded in ``description["duplicate_case_ids"]`` for the
checker, never dropped silently.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import DataError
from .types import Case, Dataset, Task

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS_3D = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".npy", ".npz")
IMAGE_EXTENSIONS_2D = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
_KNOWN_EXTENSIONS = IMAGE_EXTENSIONS_3D + IMAGE_EXTENSIONS_2D + (".dcm",)

LAYOUTS = """supported layouts (format=...):
  msd              folder with dataset.json holding 'modality', 'labels', 'training' (Medical Segmentation Decathlon)
  nnunet           folder with dataset.json holding 'channel_names', 'labels', 'file_ending', and imagesTr/, labelsTr/
  medicalnet_list  .txt file, one 'image label' (or 'image') per line, relative to root= (default: the file's folder)
  csv              .csv file with a header: image,label (segmentation), image,class or image,<finding>,... (classification)
  folder           folder of image files or DICOM series folders (unlabelled, for pretraining)
  luna16           folder with subset*/ folders of .mhd files, optional annotations.csv
  image_list_2d    .txt file, 'image.png 0 1 0 ...' (ChestX-ray14) or 'name.png,label' (Shenzhen) per line
  image_mask_2d    folder with images/ and masks/ holding same-named files (mask_suffix= for DRIVE-style names)"""

# The 14 findings of ChestX-ray14 in the order of the official lists (pass as label_names= to image_list_2d).
CHESTXRAY14_LABELS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)  # fmt: skip

_MULTILABEL_VALUES = {0.0, 1.0, -1.0}  # -1 = "uncertain" (CheXpert); kept as -1 for the loss to decide (U-Ignore...)


def load_dataset(path: str | os.PathLike, *, format: str = "auto", **options: Any) -> Dataset:
    """Parse the dataset at ``path``; ``format="auto"`` detects the layout (see `LAYOUTS`, `detect_format`)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; fix: check the path\n{LAYOUTS}")
    if path.is_file() and path.name == "dataset.json":
        path = path.parent
    fmt = detect_format(path) if format == "auto" else format
    if fmt not in _LOADERS:
        raise DataError(f"unknown dataset format {format!r}; use 'auto' or one of: {', '.join(_LOADERS)}\n{LAYOUTS}")
    loader, accepted = _LOADERS[fmt]
    if (fmt in _FILE_FORMATS) != path.is_file():
        wanted = "a list file" if fmt in _FILE_FORMATS else "a folder"
        raise DataError(f"{path}: format '{fmt}' reads {wanted}; fix the path or the format\n{LAYOUTS}")
    if fmt in ("msd", "nnunet") and not (path / "dataset.json").is_file():
        raise DataError(f"{path}: no dataset.json; fix: add it (format '{fmt}' is described by it)")
    unknown = sorted(set(options) - set(accepted) - {"name"})
    if unknown:
        raise DataError(
            f"{path}: unknown option(s) {', '.join(unknown)} for format '{fmt}'; "
            f"accepted: {', '.join(sorted({'name', *accepted}))}"
        )
    dataset = loader(path, options)
    if options.get("name"):
        dataset.name = str(options["name"])
    dupes = duplicate_case_ids(dataset.cases)
    dataset.description["duplicate_case_ids"] = dupes
    if dupes:
        logger.warning("%s: duplicate case ids %s (kept; `medtransfer data inspect` reports them)", path, dupes[:5])
    return dataset


def detect_format(path: str | os.PathLike) -> str:
    """Name the layout at ``path`` from what it is: a folder's marker files, or a list file's suffix and content."""
    path = Path(path)
    if path.is_dir():
        if (path / "dataset.json").is_file():
            desc = _read_json(path / "dataset.json")
            if "channel_names" in desc or "file_ending" in desc:
                return "nnunet"
            if "modality" in desc or "training" in desc:
                return "msd"
            raise DataError(
                f"{path / 'dataset.json'}: neither MSD ('modality', 'training') nor nnU-Net v2 ('channel_names', "
                f"'file_ending') keys; found {sorted(desc)}; fix: add the keys of one of them\n{LAYOUTS}"
            )
        if any(p.is_dir() for p in path.glob("subset*")):
            return "luna16"
        if (path / "images").is_dir() and (path / "masks").is_dir():
            return "image_mask_2d"
        if (path / "imagesTr").is_dir():
            raise DataError(f"{path}: has imagesTr/ but no dataset.json; fix: add the MSD or nnU-Net dataset.json, "
                            "or pass format='folder' to use every image as unlabelled")  # fmt: skip
        if not _folder_entries(path):
            raise DataError(f"{path}: no image files and no known layout found\n{LAYOUTS}")
        return "folder"
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".txt", ".lst", ".list"):
        return _sniff_list(path)
    raise DataError(f"{path}: not a recognised dataset description\n{LAYOUTS}")


def duplicate_case_ids(cases: Sequence[Case]) -> list[str]:
    """Case ids that occur more than once, sorted (the checker reports them; splits refuse them)."""
    return sorted(cid for cid, n in Counter(c.case_id for c in cases).items() if n > 1)


def write_dataset_json(
    root: str | os.PathLike,
    name: str,
    labels: Mapping[int, str],
    modality: Mapping[int, str] | Sequence[str],
    training: Sequence[tuple[str | os.PathLike, str | os.PathLike | None] | Mapping[str, Any]],
    test: Sequence[str | os.PathLike] = (),
    **extra: Any,
) -> Path:
    """Write ``root/dataset.json`` in MSD layout, atomically; returns its path.

    ``training`` items are ``(image, label)`` pairs or dicts (extra keys, e.g. a case-level ``"target"``, are kept);
    paths may be absolute under ``root`` or relative to it and are written as ``./imagesTr/x.nii.gz``.
    ``extra`` adds top-level keys (``description``, ``reference``, ``licence``...).
    """
    from ..weights.io import atomic_write

    root = Path(root)

    def rel(p: str | os.PathLike) -> str:
        p = Path(p)
        if p.is_absolute():
            try:
                p = p.relative_to(root)
            except ValueError:
                raise DataError(f"{p}: not under the dataset folder {root}; fix: write the files inside it") from None
        return "./" + p.as_posix().removeprefix("./")

    items = []
    for item in training:
        entry = dict(item) if isinstance(item, Mapping) else {"image": item[0], "label": item[1]}
        entry["image"] = rel(entry["image"])
        if entry.get("label") is not None:
            entry["label"] = rel(entry["label"])
        items.append(entry)
    channels = dict(enumerate(modality)) if not isinstance(modality, Mapping) else dict(modality)
    desc = {
        "name": name,
        **extra,
        "tensorImageSize": "4D" if len(channels) > 1 else "3D",
        "modality": {str(k): v for k, v in sorted(channels.items())},
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "numTraining": len(items),
        "numTest": len(test),
        "training": items,
        "test": [rel(t) for t in test],
    }
    text = json.dumps(desc, indent=2) + "\n"
    return atomic_write(root / "dataset.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ---------------------------------------------------------------- helpers


def _strip_ext(name: str) -> str:
    lower = name.lower()
    for ext in _KNOWN_EXTENSIONS:
        if lower.endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def _has_ext(name: str, extensions: Sequence[str]) -> bool:
    return name.lower().endswith(tuple(extensions))


def _case_ids(paths: Sequence[Path], root: Path) -> list[str]:
    """File names without extension, or relative paths joined by '_' when different files share a name."""
    stems = [_strip_ext(p.name) for p in paths]
    owners: dict[str, set[Path]] = {}
    for stem, p in zip(stems, paths):
        owners.setdefault(stem, set()).add(p)
    if all(len(v) == 1 for v in owners.values()):
        return stems
    ids = []
    for p in paths:
        try:
            parts = p.relative_to(root).parts
        except ValueError:
            parts = p.parts[1:]
        ids.append("_".join([*parts[:-1], _strip_ext(parts[-1])]))
    return ids


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg}); fix the syntax there "
            "(a trailing comma, a missing comma or an unquoted key is the usual cause)"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read as UTF-8 text ({e}); fix: check the file") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: the top level must be a JSON object {{...}}, found {type(data).__name__}")
    return data


def _require(desc: Mapping[str, Any], keys: Sequence[str], path: Path, kind: str) -> None:
    missing = [k for k in keys if k not in desc]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(map(repr, missing))} required by the {kind} layout; "
                        f"fix: add them (present: {', '.join(sorted(desc)) or 'none'})")  # fmt: skip


def _int_keyed(value: Any, path: Path, key: str, example: str) -> dict[int, str]:
    """MSD-style ``{"0": "name"}`` mapping; ``channels`` must then be numbered 0..n-1."""
    if not isinstance(value, dict):
        raise DataError(f"{path}: '{key}' must be an object like {example}, found {type(value).__name__}")
    out = {}
    for k, v in value.items():
        try:
            out[int(k)] = str(v)
        except ValueError:
            raise DataError(f"{path}: '{key}' key {k!r} is not an integer; fix: write it like {example}") from None
    return dict(sorted(out.items()))


def _channel_list(value: Any, path: Path, key: str) -> list[str]:
    channels = _int_keyed(value, path, key, '{"0": "CT"}')
    if list(channels) != list(range(len(channels))):
        raise DataError(f"{path}: '{key}' must number channels 0..{len(channels) - 1}, found {list(channels)}")
    return list(channels.values())


def _text_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of non-blank, non-comment lines."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read as UTF-8 text ({e}); fix: check the file") from None
    lines = ((i, line.strip()) for i, line in enumerate(text.splitlines(), start=1))
    return [(i, s) for i, s in lines if s and not s.startswith("#")]


def _split_line(text: str) -> list[str]:
    return [t.strip() for t in text.split(",")] if "," in text else text.split()


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _sniff_list(path: Path) -> str:
    lines = _text_lines(path)
    if not lines:
        return "medicalnet_list"
    tokens = _split_line(lines[0][1])
    if len(tokens) >= 2:
        return "image_list_2d" if all(_is_number(t) for t in tokens[1:]) else "medicalnet_list"
    return "image_list_2d" if _has_ext(tokens[0], IMAGE_EXTENSIONS_2D) else "medicalnet_list"


def _resolve(root: Path, rel: str) -> Path:
    return Path(rel) if os.path.isabs(rel) else root / rel


def _list_root(path: Path, options: Mapping[str, Any]) -> Path:
    return Path(options["root"]) if options.get("root") else path.parent


def _spatial_dims(paths: Sequence[Path]) -> int:
    return 2 if paths and all(_has_ext(p.name, IMAGE_EXTENSIONS_2D + (".dcm",)) for p in paths) else 3


def _multilabel(tokens: Sequence[str], columns: Sequence[str], where: str) -> tuple[float, ...]:
    values = []
    for token, column in zip(tokens, columns):
        value = float(token) if token and _is_number(token) else (0.0 if token == "" else None)
        if value not in _MULTILABEL_VALUES:
            raise DataError(f"{where}: {column} = {token!r} is not 0, 1, -1 (uncertain) or empty (= 0); fix the "
                            "value, or choose the finding columns with label_columns=[...]")  # fmt: skip
        values.append(value)
    return tuple(values)


def _class_index(token: str, where: str) -> int:
    value = float(token) if _is_number(token) else -1.0
    if not math.isfinite(value) or value != int(value) or value < 0:
        raise DataError(f"{where}: class {token!r} is not a non-negative integer; fix the value")
    return int(float(token))


# ---------------------------------------------------------------- layouts


def _load_msd(root: Path, options: Mapping[str, Any]) -> Dataset:
    """MSD: paths relative to the folder. A multi-modal case (BraTS) is one 4D file holding every channel, so
    ``images`` has one path while ``channel_names`` has several. A non-standard per-item ``"target"`` (class index
    or 0/1 vector) is read into `Case.target` (the phantom dataset uses it for its case-level label)."""
    path = root / "dataset.json"
    desc = _read_json(path)
    _require(desc, ("labels", "modality", "training"), path, "MSD")
    labels = _int_keyed(desc["labels"], path, "labels", '{"0": "background", "1": "liver"}')
    channels = _channel_list(desc["modality"], path, "modality")

    def entries(key: str) -> list[tuple[Path, Path | None, Any]]:
        items = desc.get(key, [])
        if not isinstance(items, list):
            raise DataError(f"{path}: '{key}' must be a list, found {type(items).__name__}")
        out = []
        for i, item in enumerate(items):
            item = {"image": item} if isinstance(item, str) else item
            if not isinstance(item, dict) or not isinstance(item.get("image"), str):
                raise DataError(f"{path}: {key}[{i}] has no 'image' path; fix: write it like "
                                '{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}')  # fmt: skip
            label = item.get("label")
            target = item.get("target")
            out.append((_resolve(root, item["image"]), _resolve(root, label) if label else None,
                        tuple(float(t) for t in target) if isinstance(target, list) else target))  # fmt: skip
        return out

    def cases(items: list[tuple[Path, Path | None, Any]]) -> list[Case]:
        ids = _case_ids([im for im, _, _ in items], root)
        return [Case(cid, (im,), lab, tgt) for cid, (im, lab, tgt) in zip(ids, items)]

    training, test = cases(entries("training")), cases(entries("test"))
    return Dataset(name=str(desc.get("name", root.name)), root=root, format="msd", task="segmentation",
                   cases=training, labels=labels, channel_names=channels, test_cases=test,
                   spatial_dims=_spatial_dims([c.images[0] for c in training + test]),
                   description={**desc, "source": str(path)})  # fmt: skip


def _load_nnunet(root: Path, options: Mapping[str, Any]) -> Dataset:
    """nnU-Net v2 raw: ``imagesTr/<case>_<XXXX><ending>`` per channel, ``labelsTr/<case><ending>``; case ids from
    file names. A label file is expected for every training case (the checker reports a missing one)."""
    path = root / "dataset.json"
    desc = _read_json(path)
    _require(desc, ("channel_names", "labels", "file_ending"), path, "nnU-Net v2")
    channels = _channel_list(desc["channel_names"], path, "channel_names")
    labels = _nnunet_labels(desc["labels"], path)
    ending = desc["file_ending"]
    if not isinstance(ending, str) or not ending.startswith("."):
        raise DataError(f"{path}: 'file_ending' must be a string like \".nii.gz\", found {ending!r}")
    training = _nnunet_cases(root / "imagesTr", root / "labelsTr", ending, channels, path)
    test = _nnunet_cases(root / "imagesTs", None, ending, channels, path)
    if isinstance(desc.get("numTraining"), int) and desc["numTraining"] != len(training):
        logger.warning("%s: numTraining is %d but imagesTr holds %d cases", path, desc["numTraining"], len(training))
    return Dataset(name=str(desc.get("name", root.name)), root=root, format="nnunet", task="segmentation",
                   cases=training, labels=labels, channel_names=channels, test_cases=test,
                   spatial_dims=2 if ending.lower() in IMAGE_EXTENSIONS_2D else 3,
                   description={**desc, "source": str(path)})  # fmt: skip


def _nnunet_labels(value: Any, path: Path) -> dict[int, str]:
    if not isinstance(value, dict):
        raise DataError(f"{path}: 'labels' must be an object like {{\"background\": 0, \"liver\": 1}}")
    regions = [name for name, v in value.items() if isinstance(v, (list, tuple))]
    if regions:
        raise DataError(f"{path}: region-based labels ({', '.join(regions)}) are not supported; fix: give each "
                        "label one integer value (e.g. {\"background\": 0, \"edema\": 1, \"tumor\": 2})")  # fmt: skip
    out: dict[int, str] = {}
    for name, v in value.items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise DataError(f"{path}: label {name!r} has value {v!r}; fix: use an integer label value")
        if v in out:
            raise DataError(f"{path}: labels {out[v]!r} and {name!r} share the value {v}; fix: give each its own")
        out[v] = str(name)
    return dict(sorted(out.items()))


def _nnunet_cases(folder: Path, label_folder: Path | None, ending: str, channels: list[str], desc: Path) -> list[Case]:
    if not folder.is_dir():
        return []
    found: dict[str, set[int]] = {}
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or not f.name.endswith(ending):
            continue
        match = re.fullmatch(r"(.+)_(\d{4})", f.name[: -len(ending)])
        if match is None:
            raise DataError(f"{f}: not named <case>_<4-digit channel>{ending}; fix: rename it, e.g. "
                            f"{f.name[: -len(ending)]}_0000{ending} for channel 0 (nnU-Net v2 naming)")  # fmt: skip
        channel = int(match.group(2))
        if channel >= len(channels):
            raise DataError(f"{f}: channel {channel}, but {desc} declares {len(channels)} channel(s) in "
                            "channel_names; fix: add the channel there or remove the file")  # fmt: skip
        found.setdefault(match.group(1), set()).add(channel)
    cases = []
    for case_id, present in sorted(found.items()):
        files = [folder / f"{case_id}_{c:04d}{ending}" for c in range(len(channels))]
        missing = [f"{files[c]} ({channels[c]})" for c in range(len(channels)) if c not in present]
        if missing:
            raise DataError(f"case '{case_id}': missing channel file(s) {', '.join(missing)}; fix: add them, or "
                            f"remove the case's other files from {folder}")  # fmt: skip
        label = label_folder / f"{case_id}{ending}" if label_folder is not None else None
        cases.append(Case(case_id, tuple(files), label))
    return cases


def _load_medicalnet_list(path: Path, options: Mapping[str, Any]) -> Dataset:
    """MedicalNet list: ``image label`` per line (space separated) relative to ``root``; one column = unlabelled."""
    root = _list_root(path, options)
    rows: list[tuple[Path, Path | None]] = []
    for lineno, text in _text_lines(path):
        tokens = text.split()
        if len(tokens) > 2:
            raise DataError(f"{path}:{lineno}: {len(tokens)} columns; expected 'image label' or 'image' separated "
                            "by spaces; fix the line (paths with spaces are not supported: rename the files)")  # fmt: skip
        rows.append((_resolve(root, tokens[0]), _resolve(root, tokens[1]) if len(tokens) == 2 else None))
    ids = _case_ids([im for im, _ in rows], root)
    cases = [Case(cid, (im,), lab) for cid, (im, lab) in zip(ids, rows)]
    task: Task = "segmentation" if any(c.label for c in cases) else "unlabelled"
    return Dataset(name=path.stem, root=root, format="medicalnet_list", task=task, cases=cases,
                   spatial_dims=_spatial_dims([c.images[0] for c in cases]), description={"source": str(path)})  # fmt: skip


_IMAGE_COLUMNS = ("image", "image_path", "img", "path", "filename", "file")
_ID_COLUMNS = ("case_id", "id")
_MASK_COLUMNS = ("label", "mask", "seg", "segmentation")
_CLASS_COLUMNS = ("class", "target", "category")


def _load_csv(path: Path, options: Mapping[str, Any]) -> Dataset:
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
    images = [_resolve(root, row[image_col]) for _, row in rows]
    ids = _case_ids(images, root)
    if id_col is not None:  # an empty id cell falls back to the file name
        ids = [row[id_col] or cid for (_, row), cid in zip(rows, ids)]
    rest = [i for i in range(len(header)) if i not in (image_col, id_col)]
    task, targets, labels_, label_files = _csv_targets(path, header, rows, rest, options)
    cases = [Case(cid, (im,), lab, tgt) for cid, im, lab, tgt in zip(ids, images, label_files, targets)]
    return Dataset(name=path.stem, root=root, format="csv", task=task, cases=cases, labels=labels_,
                   spatial_dims=_spatial_dims(images), description={"source": str(path), "columns": header})  # fmt: skip


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
    looks_like_paths = any(_has_ext(v, _KNOWN_EXTENSIONS) or "/" in v for v in values)
    if mask_col is not None and (task == "segmentation" or (task is None and looks_like_paths)):
        root = _list_root(path, options)
        return "segmentation", none, {}, [_resolve(root, r[mask_col]) if r[mask_col] else None for _, r in rows]
    if task == "segmentation":
        raise DataError(f"{path}:1: task='segmentation' needs a mask column named one of {_MASK_COLUMNS}; "
                        f"header is {header}")  # fmt: skip
    class_col = next((i for i in rest if lower[i] in _CLASS_COLUMNS), mask_col)
    if class_col is not None and task != "multilabel":
        cells = [row[class_col] for _, row in rows]
        if all(_is_number(c) for c in cells if c):
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


def _folder_entries(root: Path) -> list[Path]:
    """Image files and DICOM series folders (a folder holding .dcm files is one case) under ``root``, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        if any(n.lower().endswith(".dcm") for n in filenames):
            found.append(here)
        ok = IMAGE_EXTENSIONS_3D + IMAGE_EXTENSIONS_2D
        found += [here / n for n in sorted(filenames) if not n.startswith(".") and _has_ext(n, ok)]
    return found


def _load_folder(root: Path, options: Mapping[str, Any]) -> Dataset:
    """Every image under ``root`` (recursive) is an unlabelled case; npy/npz count as 3D."""
    paths = _folder_entries(root)
    dims = {2 if _has_ext(p.name, IMAGE_EXTENSIONS_2D) else 3 for p in paths}
    if len(dims) > 1:
        raise DataError(f"{root}: mixes 2D images (.png...) and 3D volumes; fix: keep them in separate folders")
    cases = [Case(cid, (p,)) for cid, p in zip(_case_ids(paths, root), paths)]
    return Dataset(name=root.name, root=root, format="folder", task="unlabelled", cases=cases,
                   spatial_dims=dims.pop() if dims else 3, description={"source": str(root)})  # fmt: skip


def _load_luna16(root: Path, options: Mapping[str, Any]) -> Dataset:
    """LUNA16: ``subset*/**/*.mhd``, case id = seriesuid. Nodules from ``annotations.csv`` (or ``annotations=``) go to
    ``description["annotations"]`` (seriesuid -> list of {coordX, coordY, coordZ, diameter_mm}, world mm);
    ``description["subset"]`` maps each case to its subset (LUNA16's official cross-validation folds)."""
    cases, subset = [], {}
    for folder in sorted(p for p in root.glob("subset*") if p.is_dir()):
        for mhd in sorted(folder.rglob("*.mhd")):
            cases.append(Case(mhd.stem, (mhd,)))
            subset[mhd.stem] = folder.name
    desc: dict[str, Any] = {"source": str(root), "subset": subset}
    ann = Path(options["annotations"]) if options.get("annotations") else root / "annotations.csv"
    if options.get("annotations") or ann.is_file():
        desc["annotations"] = _luna_annotations(ann)
    return Dataset(name=root.name, root=root, format="luna16", task="unlabelled", cases=cases, description=desc)


def _luna_annotations(path: Path) -> dict[str, list[dict[str, float]]]:
    columns = ("coordX", "coordY", "coordZ", "diameter_mm")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not set(("seriesuid",) + columns) <= set(reader.fieldnames or ()):
                raise DataError(f"{path}:1: header {reader.fieldnames} lacks seriesuid,{','.join(columns)}; fix it")
            out: dict[str, list[dict[str, float]]] = {}
            for row in reader:
                try:
                    nodule = {c: float(row[c]) for c in columns}
                except (TypeError, ValueError):
                    raise DataError(f"{path}:{reader.line_num}: a coordinate or diameter is not a number; "
                                    "fix the row") from None  # fmt: skip
                out.setdefault(row["seriesuid"], []).append(nodule)
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror}); fix the path given as annotations=") from None
    return out


def _load_image_list_2d(path: Path, options: Mapping[str, Any]) -> Dataset:
    """2D list: ``image v1 v2 ...`` (ChestX-ray14, multi-label vector) or ``image,label`` (Shenzhen, one class);
    one value per line -> a class index, several -> a 0/1 vector named by ``label_names``."""
    root = _list_root(path, options)
    rows = [(n, _split_line(text)) for n, text in _text_lines(path)]
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
    images = [_resolve(root, t[0]) for _, t in rows]
    cases = [Case(cid, (im,), None, tgt) for cid, im, tgt in zip(_case_ids(images, root), images, targets)]
    return Dataset(name=path.stem, root=root, format="image_list_2d", task="classification" if width else "unlabelled",
                   cases=cases, labels=labels_, spatial_dims=2, description={"source": str(path)})  # fmt: skip


def _load_image_mask_2d(root: Path, options: Mapping[str, Any]) -> Dataset:
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
    masks = {_strip_ext(p.name): p for p in sorted(masks_dir.iterdir()) if _has_ext(p.name, ok)}
    cases, used = [], set()
    for image in sorted(p for p in images_dir.iterdir() if _has_ext(p.name, ok) and not p.name.startswith(".")):
        stem = _strip_ext(image.name)
        case_id = stem.removesuffix(image_suffix) if image_suffix else stem
        key = case_id + mask_suffix
        used.add(key)
        cases.append(Case(case_id, (image,), masks.get(key, masks_dir / (key + image.name[len(stem) :]))))
    unmatched = [str(masks[k]) for k in masks if k not in used]
    return Dataset(name=root.name, root=root, format="image_mask_2d", task="segmentation", cases=cases,
                   spatial_dims=2, description={"source": str(root), "unmatched_masks": unmatched})  # fmt: skip


_FILE_FORMATS = {"medicalnet_list", "csv", "image_list_2d"}
_Loader = Callable[[Path, Mapping[str, Any]], Dataset]
_LOADERS: dict[str, tuple[_Loader, tuple[str, ...]]] = {
    "msd": (_load_msd, ()),
    "nnunet": (_load_nnunet, ()),
    "medicalnet_list": (_load_medicalnet_list, ("root",)),
    "csv": (_load_csv, ("root", "task", "image_column", "label_columns")),
    "folder": (_load_folder, ()),
    "luna16": (_load_luna16, ("annotations",)),
    "image_list_2d": (_load_image_list_2d, ("root", "label_names")),
    "image_mask_2d": (_load_image_mask_2d, ("images", "masks", "mask_suffix", "image_suffix")),
}
