"""Parse a dataset description (MSD, nnU-Net raw, list and CSV files, folders, LUNA16, 2D lists) into a `Dataset`.

Only the description is read, never voxels, and listed files are not checked here: parsing must be instant even for
a 100k-line list, and problems with the files themselves (missing, unreadable, mismatched) are the checker's job,
which reports all of them at once instead of stopping at the first. A `DataError` is raised here only when the
description itself cannot be understood; it names the file (and line) and the fix.

Case ids are the image file names without extension; when two *different* files share a name (``a/img.nii.gz``,
``b/img.nii.gz``) every id of that dataset becomes its relative path joined by ``_`` (``a_img``). The same file
listed twice keeps one id twice: duplicates are kept and recorded in ``description["duplicate_case_ids"]`` for the
checker, never dropped silently.

Modules: `common` (extensions, case ids, path resolution, reading JSON and text lists), `volumes` (MSD, nnU-Net,
LUNA16, plain folder; `write_dataset_json`), `lists` (MedicalNet list, CSV, 2D image list, 2D image/mask folders),
`detection` (LUNA16 nodules and candidates, DeepLesion, MONAI detection datalists, boxes from masks).
This one detects the layout, checks the options and dispatches to the layout's parser.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from ...errors import DataError
from ..types import Case, Dataset
from .common import IMAGE_EXTENSIONS_2D, IMAGE_EXTENSIONS_3D, Loader, read_json
from .lists import (
    CHESTXRAY14_LABELS,
    load_csv,
    load_image_list_2d,
    load_image_mask_2d,
    load_medicalnet_list,
    sniff_list,
)
from .detection import (
    BOXES_FROM,
    boxes_from_masks,
    case_reader,
    is_monai_datalist,
    load_deeplesion,
    load_monai_datalist,
)
from .volumes import folder_entries, load_folder, load_luna16, load_msd, load_nnunet, write_dataset_json

__all__ = [
    "BOXES_FROM", "CHESTXRAY14_LABELS", "IMAGE_EXTENSIONS_2D", "IMAGE_EXTENSIONS_3D", "LAYOUTS", "case_reader",
    "detect_format", "duplicate_case_ids", "load_dataset", "write_dataset_json",
]  # fmt: skip

logger = logging.getLogger(__name__)

LAYOUTS = """supported layouts (format=...):
  msd              folder with dataset.json holding 'modality', 'labels', 'training' (Medical Segmentation Decathlon)
  nnunet           folder with dataset.json holding 'channel_names', 'labels', 'file_ending', and imagesTr/, labelsTr/
  medicalnet_list  .txt file, one 'image label' (or 'image') per line, relative to root= (default: the file's folder)
  csv              .csv file with a header: image,label (segmentation), image,class or image,<finding>,... (classification)
  folder           folder of image files or DICOM series folders (unlabelled, for pretraining)
  luna16           folder with subset*/ folders of .mhd files, optional annotations.csv and candidates.csv
                   (task='detection': the nodules as boxes)
  deeplesion       folder with DL_info.csv and Images_png/<series>/<slice>.png (2.5D detection, slices=9)
  monai_detection  MONAI detection datalist .json (or a folder's dataset.json) with 'training'/'validation' items
                   {"image", "box": [[cx, cy, cz, w, h, d], ...] (world mm), "label": [0, ...]}
  image_list_2d    .txt file, 'image.png 0 1 0 ...' (ChestX-ray14) or 'name.png,label' (Shenzhen) per line
  image_mask_2d    folder with images/ and masks/ holding same-named files (mask_suffix= for DRIVE-style names)
segmentation layouts also take boxes_from='labels' (connected components per class) or 'instances' (each mask
value one object) to become detection datasets (this reads every mask)"""


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
    if fmt != "monai_detection" and (fmt in _FILE_FORMATS) != path.is_file():
        wanted = "a list file" if fmt in _FILE_FORMATS else "a folder"
        raise DataError(f"{path}: format '{fmt}' reads {wanted}; fix the path or the format\n{LAYOUTS}")
    if fmt in ("msd", "nnunet") and not (path / "dataset.json").is_file():
        raise DataError(f"{path}: no dataset.json; fix: add it (format '{fmt}' is described by it)")
    accepted = (*accepted, "boxes_from") if fmt in _SEGMENTATION_FORMATS else accepted
    unknown = sorted(set(options) - set(accepted) - {"name"})
    if unknown:
        raise DataError(
            f"{path}: unknown option(s) {', '.join(unknown)} for format '{fmt}'; "
            f"accepted: {', '.join(sorted({'name', *accepted}))}"
        )
    dataset = loader(path, {k: v for k, v in options.items() if k != "boxes_from"})
    if options.get("boxes_from"):
        dataset = boxes_from_masks(dataset, str(options["boxes_from"]))
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
            desc = read_json(path / "dataset.json")
            if is_monai_datalist(desc):
                return "monai_detection"
            if "channel_names" in desc or "file_ending" in desc:
                return "nnunet"
            if "modality" in desc or "training" in desc:
                return "msd"
            raise DataError(
                f"{path / 'dataset.json'}: neither MSD ('modality', 'training') nor nnU-Net v2 ('channel_names', "
                f"'file_ending') keys; found {sorted(desc)}; fix: add the keys of one of them\n{LAYOUTS}"
            )
        if (path / "DL_info.csv").is_file():
            return "deeplesion"
        if any(p.is_dir() for p in path.glob("subset*")):
            return "luna16"
        if (path / "images").is_dir() and (path / "masks").is_dir():
            return "image_mask_2d"
        if (path / "imagesTr").is_dir():
            raise DataError(f"{path}: has imagesTr/ but no dataset.json; fix: add the MSD or nnU-Net dataset.json, "
                            "or pass format='folder' to use every image as unlabelled")  # fmt: skip
        if not folder_entries(path):
            raise DataError(f"{path}: no image files and no known layout found\n{LAYOUTS}")
        return "folder"
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix == ".json" and is_monai_datalist(read_json(path)):
        return "monai_detection"
    if suffix in (".txt", ".lst", ".list"):
        return sniff_list(path)
    raise DataError(f"{path}: not a recognised dataset description\n{LAYOUTS}")


def duplicate_case_ids(cases: Sequence[Case]) -> list[str]:
    """Case ids that occur more than once, sorted (the checker reports them; splits refuse them)."""
    return sorted(cid for cid, n in Counter(c.case_id for c in cases).items() if n > 1)


_FILE_FORMATS = {"medicalnet_list", "csv", "image_list_2d"}
_SEGMENTATION_FORMATS = {"msd", "nnunet", "medicalnet_list", "csv", "image_mask_2d"}
_LOADERS: dict[str, tuple[Loader, tuple[str, ...]]] = {
    "msd": (load_msd, ()),
    "nnunet": (load_nnunet, ()),
    "medicalnet_list": (load_medicalnet_list, ("root",)),
    "csv": (load_csv, ("root", "task", "image_column", "label_columns")),
    "folder": (load_folder, ()),
    "luna16": (load_luna16, ("annotations", "candidates", "task")),
    "deeplesion": (load_deeplesion, ("info", "images", "slices")),
    "monai_detection": (load_monai_datalist, ("root", "label_names")),
    "image_list_2d": (load_image_list_2d, ("root", "label_names")),
    "image_mask_2d": (load_image_mask_2d, ("images", "masks", "mask_suffix", "image_suffix")),
}
