"""What the format readers of :mod:`medtransfer.data.io` share: the extensions that name a format, the SimpleITK
<-> :class:`Image` conversion, ITK reading with errors that name the file, and ITK's messages routed to the log.

Every image-I/O module logs under ``medtransfer.data.io`` (one channel: ``--verbose`` and tests follow that name).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..errors import DataError
from .types import Image

logger = logging.getLogger("medtransfer.data.io")


class _ITKMessagesToLogging(sitk.LoggerBase):
    """ITK's own output window prints to stderr (e.g. "Non uniform sampling or missing slices detected" for every
    uneven DICOM series), in the middle of a CLI's report; its messages go to this module's log instead, warnings at
    INFO, the rest at DEBUG (``--verbose`` shows them). What matters to a user is reported by medtransfer itself."""

    def _log(self, level: int, text: str) -> None:
        text = re.sub(r"^.*?\(0x[0-9a-fA-F]+\):\s*", "", " ".join(str(text).split()))  # drop source file/address
        logger.log(level, "ITK: %s", text)

    def DisplayText(self, t):  # noqa: N802 - ITK's method names
        self._log(logging.DEBUG, t)

    def DisplayGenericOutputText(self, t):  # noqa: N802
        self._log(logging.DEBUG, t)

    def DisplayDebugText(self, t):  # noqa: N802
        self._log(logging.DEBUG, t)

    def DisplayWarningText(self, t):  # noqa: N802
        self._log(logging.INFO, t)

    def DisplayErrorText(self, t):  # noqa: N802 - errors also surface as exceptions, turned into DataError here
        self._log(logging.DEBUG, t)


_ITK_LOGGER = _ITKMessagesToLogging()
# ITK's previous output window comes back at exit, so nothing calls into Python while the interpreter shuts down
atexit.register(_ITK_LOGGER.SetAsGlobalITKLogger().SetAsGlobalITKLogger)


READ_EXTENSIONS: dict[str, str] = {
    ".nii": "nifti", ".nii.gz": "nifti", ".mha": "metaimage", ".mhd": "metaimage", ".nrrd": "nrrd", ".nhdr": "nrrd",
    ".dcm": "dicom", ".dicom": "dicom", ".ima": "dicom", ".npy": "npy", ".npz": "npz",
    ".png": "raster", ".jpg": "raster", ".jpeg": "raster", ".bmp": "raster",
}  # fmt: skip


_TRUNCATED = "the file is truncated or corrupt ({why}); re-export it or copy it again"


def _supported(exts) -> str:
    return ", ".join(exts) + ", or a folder holding one DICOM series"


def extension(path: str | os.PathLike) -> str:
    """The lower-case extension that decides the format (``.nii.gz`` counts as one)."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def _geometry(itk) -> dict[str, Any]:
    """Spacing/origin/direction in array order from a SimpleITK image or a reader that has read the header."""
    n = itk.GetDimension()
    d = min(n, 3)  # a 4th ITK axis (MSD stores modalities that way) is the channel axis, not space
    direction = np.asarray(itk.GetDirection(), float).reshape(n, n)[:d, :d]
    return {
        "spacing": tuple(float(s) for s in itk.GetSpacing()[:d][::-1]),
        "origin": tuple(float(o) for o in itk.GetOrigin()[:d][::-1]),
        "direction": direction.T[::-1, ::-1].copy(),
    }


def image_from_sitk(img: sitk.Image, path: Path | None = None) -> Image:
    """Convert a SimpleITK image; vector pixels and a 4th (time/modality) axis become channels in front."""
    arr = sitk.GetArrayFromImage(img)
    if img.GetNumberOfComponentsPerPixel() > 1:
        if img.GetDimension() == 4:
            raise DataError(f"{path}: 4D images with vector pixels are not supported; store one channel per file.")
        arr = np.moveaxis(arr, -1, 0)
    return Image(array=arr, path=path, **_geometry(img))


def _sitk_geometry(img: sitk.Image, image: Image) -> sitk.Image:
    d = image.spatial_dims
    direction = np.eye(img.GetDimension())
    direction[:d, :d] = np.asarray(image.direction, float)[::-1, ::-1].T
    img.SetSpacing([float(s) for s in image.spacing[::-1]] + [1.0] * (img.GetDimension() - d))
    img.SetOrigin([float(o) for o in image.origin[::-1]] + [0.0] * (img.GetDimension() - d))
    img.SetDirection(direction.ravel().tolist())
    return img


def image_to_sitk(image: Image) -> sitk.Image:
    """Inverse of :func:`image_from_sitk`: channels of a 3D image become a 4th axis, of a 2D image vector pixels."""
    arr = image.array
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    if arr.ndim == image.spatial_dims:
        img = sitk.GetImageFromArray(arr)
    elif arr.ndim == image.spatial_dims + 1 and image.spatial_dims == 3:
        img = sitk.JoinSeries([sitk.GetImageFromArray(np.ascontiguousarray(c)) for c in arr])
    elif arr.ndim == image.spatial_dims + 1 and image.spatial_dims == 2:
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(arr, 0, -1)), isVector=True)
    else:
        raise DataError(f"array of shape {arr.shape} does not fit {image.spatial_dims} spatial dimensions")
    return _sitk_geometry(img, image)


def _sitk_header(path: Path, what: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise DataError(f"{path}: cannot be read as {what} ({_itk_reason(err)}); check the file is a valid {what} "
                        "file, or re-export it.") from err  # fmt: skip
    return reader


def _sitk_read(path: Path, what: str) -> sitk.Image:
    """Read with ITK; a header that reads but voxels that do not means truncated data."""
    reader = _sitk_header(path, what)
    try:
        return reader.Execute()
    except RuntimeError as err:
        raise DataError(f"{path}: {_TRUNCATED.format(why=_itk_reason(err))}.") from err


def _itk_reason(err: Exception) -> str:
    """The informative line of an ITK exception, without object addresses and source locations."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    line = next((ln for ln in lines if "ERROR" in ln or "Description" in ln), lines[-1] if lines else "")
    if "Unable to determine ImageIO reader" in line:
        return "no reader recognises its header"
    return re.sub(r"^(sitk::ERROR:|ITK ERROR:|Description:)\s*(\w+\(0x[0-9a-f]+\):\s*)?", "", line)
