"""Read and write medical images with their geometry, in the formats users actually have.

Formats read: NIfTI (``.nii``, ``.nii.gz``), MetaImage (``.mha``, ``.mhd`` + ``.raw``/``.zraw``), NRRD (``.nrrd``,
``.nhdr``), a DICOM series (a folder; the series with most slices wins), a single DICOM file (2D or 3D), NumPy
(``.npy`` array only; ``.npz`` with ``image`` and optional ``spacing``/``origin``/``direction``) and 2D PNG/JPEG/BMP
(grayscale -> ``(H, W)``, colour -> ``(3, H, W)``, spacing 1). Everything but NumPy goes through SimpleITK, so the
LPS conversion of NIfTI's RAS affine, DICOM slice sorting and MetaImage/NRRD headers are ITK's well-tested ones.

Geometry convention and canonical orientation: see :mod:`medtransfer.data.orientation` (its functions are
re-exported here). In short, arrays are ``[z, y, x]`` with spacing/origin/direction in that order (LPS), and
``read_image(..., reorient=True)``, the default, permutes and flips whole axes (no interpolation) until ``direction``
is as close to the identity as possible, recording the original geometry in ``image.meta["original"]``;
``write_image(pred, path, like=image)`` uses that record to write a prediction made in canonical space back in the
input's original orientation and geometry.

Two ITK NIfTI pitfalls are handled (in :mod:`.io_nifti`): it reads a cut-off ``.nii``/``.nii.gz`` without complaint (missing voxels
come back as zeros), so sizes are checked against the header (for gzip from the stream trailer, without
decompressing); and it turns NaN/Inf into 0, so floating-point NIfTI voxels are read with nibabel instead.

This module holds the entry points (reading, headers, writing, output names) and MetaImage/NRRD/raster; the
format families with logic of their own live beside it: :mod:`.io_nifti`, :mod:`.io_dicom`, :mod:`.io_numpy`, and
what they share (extensions, the SimpleITK conversion, ITK's log) in :mod:`.io_common`. Every name this module
offered before the split is still importable from it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from ..errors import DataError
from ..weights.io import atomic_write
from .io_common import (  # noqa: F401 - extension, image_from_sitk, image_to_sitk: re-exported, public API
    READ_EXTENSIONS,
    _itk_reason,
    _sitk_read,
    _supported,
    extension,
    image_from_sitk,
    image_to_sitk,
)
from .io_dicom import _read_dicom_file, _read_dicom_folder, find_dicom_series  # noqa: F401 - find_dicom_series
from .io_nifti import _read_nifti, _write_nifti_with_codes, check_nifti_complete
from .io_numpy import _NPZ_GEOMETRY, _numpy_header, _read_npy, _read_npz, _save_numpy
from .orientation import _original, canonical_axes, reorient_to_canonical, undo_reorientation  # noqa: F401
from .orientation import voxel_to_world  # noqa: F401 - re-exported: part of this module's public API
from .types import Image

logger = logging.getLogger(__name__)



WRITE_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".npy", ".npz", ".png", ".jpg", ".jpeg", ".bmp")


def image_stem(path: str | os.PathLike) -> str:
    """The name without its image extension, only when it is one :func:`read_image` knows: ``sub-01.ses-1.nii.gz``
    -> ``sub-01.ses-1``, ``scan.mha`` -> ``scan``; a DICOM folder or a file without a known extension keeps its whole
    name (``IM0001``, ``case.v2``)."""
    name = Path(path).name
    ext = extension(name)
    return name[: -len(ext)] if ext in READ_EXTENSIONS and len(name) > len(ext) else name


# Output formats for predictions: NIfTI by default; "same" keeps the input's type where it can be written.
OUTPUT_FORMATS = {"nii.gz": ".nii.gz", "nii": ".nii", "nrrd": ".nrrd", "mha": ".mha", "same": None}
_WRITE_INSTEAD = {".nhdr": ".nrrd"}  # a readable type written as its nearest writable one under "same"


def output_extension(source: str | os.PathLike, fmt: str = "nii.gz") -> str:
    """The extension a prediction for ``source`` is written with: ``fmt`` (a key of :data:`OUTPUT_FORMATS`), or
    for ``"same"`` the source's own type; a type medtransfer cannot write (DICOM) falls back to ``.nii.gz``."""
    if fmt.lstrip(".").lower() not in OUTPUT_FORMATS:
        raise DataError(f"unknown output format '{fmt}'; choose one of {', '.join(OUTPUT_FORMATS)}.")
    ext = OUTPUT_FORMATS[fmt.lstrip(".").lower()]
    if ext is not None:
        return ext
    src = extension(source) if not Path(source).is_dir() else ""
    src = _WRITE_INSTEAD.get(src, src)
    if src in WRITE_EXTENSIONS:
        return src
    logger.info("%s: its type cannot be written; its output is NIfTI (.nii.gz)", source)
    return ".nii.gz"


def plan_output_paths(inputs, out_dir: str | os.PathLike, fmt: str = "nii.gz", *, suffix: str = "") -> list[Path]:
    """One output path per input, ``out_dir / (image_stem + suffix + extension)`` in input order, refusing before
    anything is written when two inputs would land on one file (``a/scan.nrrd`` and ``b/scan.nrrd``; ``x.nii.gz``
    and ``x.mha``; names differing only in case, which collide on macOS and Windows) or an output would replace an
    input. The :class:`DataError` names every clash and the fix."""
    out_dir = Path(out_dir)
    inputs = [Path(p) for p in inputs]
    outputs = [out_dir / f"{image_stem(p)}{suffix}{output_extension(p, fmt)}" for p in inputs]
    first: dict[str, Path] = {}
    clashes = []
    for source, target in zip(inputs, outputs):
        key = target.name.casefold()
        if key in first:
            same = first[key].resolve() == source.resolve()
            clashes.append(f"{first[key]} {'is given twice' if same else f'and {source} would both be written to'}"
                           f"{'' if same else f' {target}'}")
        else:
            first[key] = source
    resolved = {p.resolve() for p in inputs}
    clashes += [f"the output {t} would replace the input {s}" for s, t in zip(inputs, outputs) if t.resolve() in resolved]
    if clashes:
        raise DataError("output names clash, nothing was written: " + "; ".join(clashes) + ". Rename the inputs so "
                        "their names differ, or predict them into separate --out folders (in one folder a file "
                        "without its image extension must be unique).")
    return outputs


# --- reading --------------------------------------------------------------------------------------------------------


def _read_metaimage(path: Path) -> Image:
    if extension(path) == ".mhd":
        for line in path.read_text(errors="replace").splitlines():
            key, _, value = line.partition("=")
            data = value.strip()
            if key.strip() == "ElementDataFile" and data not in ("LOCAL", "LIST") and "%" not in data:
                if not (path.parent / data).exists():
                    raise DataError(f"{path}: its voxel data file {data} (ElementDataFile) is missing; copy it next "
                                    "to the .mhd header.")  # fmt: skip
    return image_from_sitk(_sitk_read(path, "MetaImage"), path)


def _read_nrrd(path: Path) -> Image:
    return image_from_sitk(_sitk_read(path, "NRRD"), path)


def axis_codes(direction: np.ndarray) -> tuple[str, bool]:
    """ITK/DICOM-style orientation letters of a ``direction`` (array order, as in :class:`Image`) and whether it is
    oblique. One letter per axis in x, y, z order, naming the world direction the axis points to (``LPS``: x towards
    patient Left, y Posterior, z Superior, ITK's identity; a NIfTI with an identity RAS affine reads as ``RAS``).
    Oblique: some axis is more than about 0.8 degrees off its nearest world axis."""
    m = np.asarray(direction, float)[::-1, ::-1]  # row i: ITK axis i (x, y, z) in world (L, P, S) order
    letters = ""
    for row in m:
        w = int(np.argmax(np.abs(row)))
        letters += ("LPS"[w] if row[w] > 0 else "RAI"[w])
    return letters, bool(np.min(np.max(np.abs(m), axis=1)) < 0.9999)


def _read_raster(path: Path) -> Image:
    """2D PNG/JPEG/BMP via ITK, or Pillow when ITK cannot (e.g. palette PNGs it does not expand)."""
    try:
        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(img)
        arr = np.moveaxis(arr, -1, 0) if img.GetNumberOfComponentsPerPixel() > 1 else arr
    except RuntimeError as err:
        arr = _read_raster_pillow(path, err)
    if arr.ndim == 3 and arr.shape[0] in (2, 4):  # drop the alpha channel
        arr = arr[:-1] if arr.shape[0] == 4 else arr[0]
    if arr.ndim == 3 and extension(path) == ".bmp" and (arr == arr[:1]).all():
        arr = arr[0]  # ITK expands grayscale (palette) BMPs to RGB
    if arr.ndim != 2 and not (arr.ndim == 3 and arr.shape[0] == 3):
        raise DataError(f"{path}: {arr.shape} is neither a grayscale nor an RGB 2D image.")
    return Image(np.ascontiguousarray(arr), (1.0, 1.0), (0.0, 0.0), np.eye(2), path)


def _read_raster_pillow(path: Path, itk_error: Exception) -> np.ndarray:
    why = (f"{path}: cannot be read as a {extension(path)[1:].upper()} image: the file is corrupt or not of that "
           "type; re-export it")  # fmt: skip
    try:
        from PIL import Image as PILImage
    except ImportError:
        raise DataError(f"{why} ({_itk_reason(itk_error)}).") from itk_error
    try:
        with PILImage.open(path) as pil:
            pil = pil.convert("RGB") if pil.mode in ("P", "CMYK", "YCbCr") else pil
            arr = np.asarray(pil)
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for damaged files
        raise DataError(f"{why} ({err}).") from err
    return np.moveaxis(arr, -1, 0) if arr.ndim == 3 else arr


_READERS: dict[str, Callable[[Path], Image]] = {
    "nifti": _read_nifti, "metaimage": _read_metaimage, "nrrd": _read_nrrd, "dicom": _read_dicom_file,
    "npy": _read_npy, "npz": _read_npz, "raster": _read_raster,
}  # fmt: skip


def _format_of(path: Path) -> str:
    ext = extension(path)
    if ext in READ_EXTENSIONS:
        return READ_EXTENSIONS[ext]
    if path.is_file():
        with open(path, "rb") as f:  # DICOM files often have no extension; the preamble gives them away
            if f.read(132)[128:132] == b"DICM":
                return "dicom"
    raise DataError(f"{path}: unknown image format '{ext or path.name}'; supported: {_supported(READ_EXTENSIONS)}.")


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: image not found (looked in {path.resolve().parent}); check the path and that the "
                        "dataset description lists the right file name.")  # fmt: skip


def read_image(path: str | os.PathLike, *, reorient: bool = True) -> Image:
    """Read an image file or DICOM folder with its geometry; canonical orientation unless ``reorient=False``.

    ``meta["format"]`` names the format and ``meta["original"]`` the orientation it was stored in (for
    :func:`write_image`'s ``like=``). NaN/Inf voxels are returned as they are: the dataset checker reports them."""
    path = Path(path)
    _check_exists(path)
    if path.is_dir():
        fmt, image = "dicom_series", _read_dicom_folder(path)
    else:
        fmt = _format_of(path)
        image = _READERS[fmt](path)
    image.meta["format"] = fmt
    if reorient:
        return reorient_to_canonical(image)
    image.meta["original"] = _original(image, range(image.spatial_dims), [False] * image.spatial_dims)
    return image


def read_header(
    path: str | os.PathLike, *, reorient: bool = True
) -> tuple[tuple[int, ...], tuple[float, ...], np.dtype, int]:
    """``(spatial_shape, spacing, dtype, channels)`` as :func:`read_image` would return them, reading only the
    header for NIfTI, MetaImage, NRRD and NumPy (other formats are read in full). NIfTI truncation is checked too."""
    path = Path(path)
    _check_exists(path)
    fmt = None if path.is_dir() else _format_of(path)
    if fmt in ("nifti", "metaimage", "nrrd"):
        if fmt == "nifti":
            check_nifti_complete(path)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as err:
            raise DataError(f"{path}: header cannot be read ({_itk_reason(err)}); re-export the file.") from err
        n = reader.GetDimension()
        d = min(n, 3)
        size, spacing = reader.GetSize()[:d][::-1], reader.GetSpacing()[:d][::-1]
        direction = np.asarray(reader.GetDirection(), float).reshape(n, n)[:d, :d].T[::-1, ::-1]
        dtype = sitk.GetArrayViewFromImage(sitk.Image([1] * 2, reader.GetPixelID(), 1)).dtype
        channels = reader.GetSize()[3] if n == 4 else reader.GetNumberOfComponents()
    elif fmt in ("npy", "npz"):
        shape, dtype, geometry = _numpy_header(path)
        d = len(geometry["spacing"]) if "spacing" in geometry else 3 if len(shape) == 4 else len(shape)
        size, channels = shape[len(shape) - d :], (shape[0] if len(shape) > d else 1)
        spacing = tuple(geometry.get("spacing", np.ones(d)))
        direction = np.asarray(geometry.get("direction", np.eye(d)), float).reshape(d, d)
    else:
        image = read_image(path, reorient=reorient)
        return image.spatial_shape, tuple(image.spacing), image.array.dtype, image.channels
    if reorient:
        perm, _ = canonical_axes(direction)
        size, spacing = [size[p] for p in perm], [spacing[p] for p in perm]
    return tuple(int(s) for s in size), tuple(float(s) for s in spacing), np.dtype(dtype), int(channels)


# --- writing --------------------------------------------------------------------------------------------------------


def write_image(image: Image, path: str | os.PathLike, *, like: Image | None = None, compress: bool = True) -> Path:
    """Write ``image`` atomically, the format chosen by extension (:data:`WRITE_EXTENSIONS`); integer (label)
    arrays keep their dtype. With ``like`` (the image it was predicted from), the array is first brought back to
    the orientation and geometry ``like`` had on disk, so it overlays the original scan in any viewer. A NIfTI
    output keeps the sform/qform codes of ``like`` (else of ``image``) when it was read from NIfTI: a scan in MNI
    space (``sform_code`` 4) gives a label map in MNI space, where ITK alone would write 1 (scanner) for both."""
    path = Path(path)
    ext = extension(path)
    if ext not in WRITE_EXTENSIONS:
        raise DataError(f"{path}: cannot write '{ext or path.name}'; choose one of {', '.join(WRITE_EXTENSIONS)}.")
    if like is not None:
        image = undo_reorientation(image, like)
    if ext == ".npy":
        return atomic_write(path, lambda tmp: _save_numpy(tmp, np.save, image.array))
    if ext == ".npz":
        arrays = {"image": image.array, **{k: np.asarray(getattr(image, k), float) for k in _NPZ_GEOMETRY}}
        save = np.savez_compressed if compress else np.savez
        return atomic_write(path, lambda tmp: _save_numpy(tmp, save, **arrays))
    if ext in (".png", ".jpg", ".jpeg", ".bmp"):
        image = _raster_ready(image, path)
    codes = (like if like is not None else image).meta.get("nifti_codes") if ext in (".nii", ".nii.gz") else None
    img = image_to_sitk(image)
    try:
        if ext == ".mhd":  # header + data file: both get their final names inside a private temp folder first
            return _write_metaimage_pair(img, path, compress)
        if codes:
            return atomic_write(path, lambda tmp: _write_nifti_with_codes(img, tmp, ext, codes, compress))
        return atomic_write(path, lambda tmp: _sitk_write_as(img, tmp, ext, compress))
    except RuntimeError as err:
        raise DataError(f"{path}: cannot be written ({_itk_reason(err)}); for PNG/JPEG use uint8/uint16 pixels, for "
                        "other formats check the folder is writable.") from err  # fmt: skip


def _sitk_write_as(img: sitk.Image, tmp: Path, ext: str, compress: bool) -> None:
    """ITK picks the writer (and gzip for .nii.gz) by extension, so write a sibling that has the real one."""
    side = tmp.with_name(tmp.name + ext)
    try:
        sitk.WriteImage(img, str(side), compress)
        os.replace(side, tmp)
    finally:
        side.unlink(missing_ok=True)


def _write_metaimage_pair(img: sitk.Image, path: Path, compress: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        sitk.WriteImage(img, str(staging / path.name), compress)
        for part in staging.iterdir():
            if part.name != path.name:
                os.replace(part, path.parent / part.name)
        return atomic_write(path, lambda tmp: os.replace(staging / path.name, tmp))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _raster_ready(image: Image, path: Path) -> Image:
    arr = image.array
    if image.spatial_dims != 2 or image.channels not in (1, 3):
        raise DataError(f"{path}: PNG/JPEG/BMP hold 2D grayscale or RGB images, not shape {arr.shape}; use .nii.gz.")
    if arr.dtype in (np.uint8, np.uint16) or arr.dtype == bool:
        return image
    if np.issubdtype(arr.dtype, np.integer) and arr.size and arr.min() >= 0 and arr.max() <= 65535:
        dtype = np.uint8 if arr.max() <= 255 else np.uint16
        return Image(arr.astype(dtype), image.spacing, image.origin, image.direction, image.path, image.meta)
    raise DataError(f"{path}: PNG/JPEG/BMP store 8- or 16-bit unsigned integers, the array is {arr.dtype}; scale "
                    "and cast it (e.g. to uint8) first, or write .nii.gz to keep the values.")  # fmt: skip
