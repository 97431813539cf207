"""DICOM: a single file (2D, or a one-slice volume made 2D), a folder's series (the one with most slices wins) and
the check of its slice positions (unequal gaps: voxels where nothing was acquired)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import DataError
from .io_common import READ_EXTENSIONS, _itk_reason, _sitk_read, _supported, image_from_sitk, logger
from .types import Image


def _read_dicom_file(path: Path) -> Image:
    img = _sitk_read(path, "DICOM")
    if img.GetDimension() == 3 and img.GetSize()[2] == 1:  # a radiograph or one slice: a 2D image
        size = list(img.GetSize()[:2]) + [0]
        img = sitk.Extract(img, size, [0, 0, 0], sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOGUESS)
    return image_from_sitk(img, path)


def find_dicom_series(folder: Path) -> list[tuple[str, list[str]]]:
    """Every DICOM series under ``folder`` (searched recursively) as (series id, sorted slice files)."""
    found = []
    for sub in sorted([folder, *(p for p in folder.rglob("*") if p.is_dir())]):
        for sid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(sub)):
            found.append((sid, list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(sub), sid))))
    return found


def _read_dicom_folder(folder: Path) -> Image:
    series = find_dicom_series(folder)
    if not series:
        raise DataError(f"{folder}: no DICOM series found in this folder or below it; point to a folder holding the "
                        f".dcm slices of one scan, or to an image file ({_supported(READ_EXTENSIONS)}).")  # fmt: skip
    sid, files = max(series, key=lambda s: len(s[1]))
    if len(series) > 1:
        logger.info("%s holds %d DICOM series; reading %s (%d slices), the one with most slices",
                    folder, len(series), sid, len(files))  # fmt: skip
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # the slices' own tags, for the slice positions below
    try:
        img = reader.Execute()
    except RuntimeError as err:
        raise DataError(f"{folder}: DICOM series {sid} cannot be read ({_itk_reason(err)}); a slice may be corrupt "
                        "or missing; copy the series again.") from err  # fmt: skip
    image = image_from_sitk(img, folder)
    image.meta["dicom_series"] = sid
    gaps = _slice_gaps(reader, img, len(files))
    if gaps is not None:
        image.meta["dicom_slice_gaps"] = gaps
    return image


def _slice_gaps(reader: sitk.ImageSeriesReader, img: sitk.Image, n: int) -> dict[str, float] | None:
    """Smallest, median and largest distance between consecutive slice positions (ImagePositionPatient along the
    slice normal). ITK stacks the slices at one spacing (first to last position over n - 1), so unequal gaps (a
    missing slice, a variable-thickness protocol) mean voxels sit where they were not acquired."""
    if img.GetDimension() != 3 or n < 3:
        return None
    normal = np.asarray(img.GetDirection(), float).reshape(3, 3)[:, 2]
    try:
        positions = [np.asarray(reader.GetMetaData(i, "0020|0032").split("\\"), float) @ normal for i in range(n)]
    except (RuntimeError, ValueError):  # a slice without a usable position: ITK fell back to its own guess
        return None
    gaps = np.abs(np.diff(np.sort(positions)))
    return {"min": float(gaps.min()), "median": float(np.median(gaps)), "max": float(gaps.max())}
