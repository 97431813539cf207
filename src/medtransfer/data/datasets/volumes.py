"""Folder layouts, mostly of 3D volumes: MSD and nnU-Net v2 (described by a dataset.json), LUNA16, and a plain
folder of unlabelled images; plus `write_dataset_json`, which writes the MSD description."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from ...errors import DataError
from ..types import Case, Dataset
from .common import (
    IMAGE_EXTENSIONS_2D,
    IMAGE_EXTENSIONS_3D,
    case_ids,
    has_ext,
    read_json,
    require_keys,
    resolve,
    spatial_dims_of,
)
from .detection import LUNA_CANDIDATE_FILES, luna_candidates, luna_detection

logger = logging.getLogger(__package__)  # the package's name, as before the split


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
    from ...weights.io import atomic_write

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


def load_msd(root: Path, options: Mapping[str, Any]) -> Dataset:
    """MSD: paths relative to the folder. A multi-modal case (BraTS) is one 4D file holding every channel, so
    ``images`` has one path while ``channel_names`` has several. A non-standard per-item ``"target"`` (class index
    or 0/1 vector) is read into `Case.target` (the phantom dataset uses it for its case-level label)."""
    path = root / "dataset.json"
    desc = read_json(path)
    require_keys(desc, ("labels", "modality", "training"), path, "MSD")
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
            out.append((resolve(root, item["image"]), resolve(root, label) if label else None,
                        tuple(float(t) for t in target) if isinstance(target, list) else target))  # fmt: skip
        return out

    def cases(items: list[tuple[Path, Path | None, Any]]) -> list[Case]:
        ids = case_ids([im for im, _, _ in items], root)
        return [Case(cid, (im,), lab, tgt) for cid, (im, lab, tgt) in zip(ids, items)]

    training, test = cases(entries("training")), cases(entries("test"))
    return Dataset(name=str(desc.get("name", root.name)), root=root, format="msd", task="segmentation",
                   cases=training, labels=labels, channel_names=channels, test_cases=test,
                   spatial_dims=spatial_dims_of([c.images[0] for c in training + test]),
                   description={**desc, "source": str(path)})  # fmt: skip


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


def load_nnunet(root: Path, options: Mapping[str, Any]) -> Dataset:
    """nnU-Net v2 raw: ``imagesTr/<case>_<XXXX><ending>`` per channel, ``labelsTr/<case><ending>``; case ids from
    file names. A label file is expected for every training case (the checker reports a missing one)."""
    path = root / "dataset.json"
    desc = read_json(path)
    require_keys(desc, ("channel_names", "labels", "file_ending"), path, "nnU-Net v2")
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


def folder_entries(root: Path) -> list[Path]:
    """Image files and DICOM series folders (a folder holding .dcm files is one case) under ``root``, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        if any(n.lower().endswith(".dcm") for n in filenames):
            found.append(here)
        ok = IMAGE_EXTENSIONS_3D + IMAGE_EXTENSIONS_2D
        found += [here / n for n in sorted(filenames) if not n.startswith(".") and has_ext(n, ok)]
    return found


def load_folder(root: Path, options: Mapping[str, Any]) -> Dataset:
    """Every image under ``root`` (recursive) is an unlabelled case; npy/npz count as 3D."""
    paths = folder_entries(root)
    dims = {2 if has_ext(p.name, IMAGE_EXTENSIONS_2D) else 3 for p in paths}
    if len(dims) > 1:
        raise DataError(f"{root}: mixes 2D images (.png...) and 3D volumes; fix: keep them in separate folders")
    cases = [Case(cid, (p,)) for cid, p in zip(case_ids(paths, root), paths)]
    return Dataset(name=root.name, root=root, format="folder", task="unlabelled", cases=cases,
                   spatial_dims=dims.pop() if dims else 3, description={"source": str(root)})  # fmt: skip


def load_luna16(root: Path, options: Mapping[str, Any]) -> Dataset:
    """LUNA16: ``subset*/**/*.mhd``, case id = seriesuid. Nodules from ``annotations.csv`` (or ``annotations=``) go to
    ``description["annotations"]`` (seriesuid -> list of {coordX, coordY, coordZ, diameter_mm}, world mm);
    ``description["subset"]`` maps each case to its subset (LUNA16's official cross-validation folds); candidates
    from ``candidates.csv`` (or ``candidates_V2.csv``, or ``candidates=``) go to ``description["candidates"]``
    (seriesuid -> list of {coordX, coordY, coordZ, class}). ``task="detection"`` makes the nodules the cases'
    boxes (:func:`medtransfer.data.datasets.detection.luna_detection`); by default the scans are unlabelled."""
    cases, subset = [], {}
    for folder in sorted(p for p in root.glob("subset*") if p.is_dir()):
        for mhd in sorted(folder.rglob("*.mhd")):
            cases.append(Case(mhd.stem, (mhd,)))
            subset[mhd.stem] = folder.name
    desc: dict[str, Any] = {"source": str(root), "subset": subset}
    ann = Path(options["annotations"]) if options.get("annotations") else root / "annotations.csv"
    if options.get("annotations") or ann.is_file():
        desc["annotations"], desc["annotations_file"] = _luna_annotations(ann), str(ann)
    if options.get("candidates"):
        desc["candidates"] = luna_candidates(Path(options["candidates"]))
    else:
        found = next((root / n for n in LUNA_CANDIDATE_FILES if (root / n).is_file()), None)
        if found is not None:
            desc["candidates"] = luna_candidates(found)
    dataset = Dataset(name=root.name, root=root, format="luna16", task="unlabelled", cases=cases, description=desc)
    task = options.get("task", "unlabelled")
    if task not in ("unlabelled", "detection"):
        raise DataError(f"{root}: task={task!r} for LUNA16; use 'detection' (nodule boxes) or 'unlabelled'")
    return luna_detection(dataset, root, options) if task == "detection" else dataset


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
