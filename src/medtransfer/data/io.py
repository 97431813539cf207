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

Two ITK NIfTI pitfalls are handled here: it reads a cut-off ``.nii``/``.nii.gz`` without complaint (missing voxels
come back as zeros), so sizes are checked against the header (for gzip from the stream trailer, without
decompressing); and it turns NaN/Inf into 0, so floating-point NIfTI voxels are read with nibabel instead.
"""

from __future__ import annotations

import atexit
import gzip
import logging
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk

from ..errors import DataError
from ..weights.io import atomic_write
from .orientation import _original, canonical_axes, reorient_to_canonical, undo_reorientation
from .orientation import voxel_to_world  # noqa: F401 - re-exported: part of this module's public API
from .types import Image

logger = logging.getLogger(__name__)


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
WRITE_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".npy", ".npz", ".png", ".jpg", ".jpeg", ".bmp")
_TRUNCATED = "the file is truncated or corrupt ({why}); re-export it or copy it again"


def _supported(exts) -> str:
    return ", ".join(exts) + ", or a folder holding one DICOM series"


def extension(path: str | os.PathLike) -> str:
    """The lower-case extension that decides the format (``.nii.gz`` counts as one)."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


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


# --- SimpleITK <-> Image --------------------------------------------------------------------------------------------


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


# --- reading --------------------------------------------------------------------------------------------------------


def _gzip_size(path: Path) -> int:
    """Decompressed size of a whole gzip file (every member, CRC checked); DataError if the stream is cut short."""
    total = 0
    try:
        with gzip.open(path, "rb") as g:
            while chunk := g.read(1 << 24):
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as err:
        raise DataError(f"{path}: {_TRUNCATED.format(why=f'gzip stream ends early: {err}')}.") from err
    return total


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _nifti_layout(path: Path) -> tuple[int, np.dtype] | None:
    """Bytes the header promises (offset + voxel data) and the on-disk voxel dtype; None when nibabel cannot parse
    the header (ITK may still)."""
    import nibabel as nib

    try:
        proxy = nib.load(str(path)).dataobj  # header only; its offset is the file's (the header object's is reset)
        dtype = np.dtype(proxy.dtype)
        return int(proxy.offset) + int(np.prod(proxy.shape, dtype=np.int64)) * dtype.itemsize, dtype
    except Exception as err:  # noqa: BLE001 - odd headers are left to ITK to accept or reject
        if _is_gzip(path):
            _gzip_size(path)  # a header cut short inside the gzip stream is a truncation, say so
        logger.debug("nibabel cannot parse %s (%s); skipping the size check", path, err)
        return None


def check_nifti_complete(path: str | os.PathLike) -> np.dtype | None:
    """Raise DataError if a NIfTI file holds less data than its header declares; return the on-disk voxel dtype
    (None if only ITK can parse the header). Cheap: for ``.nii.gz`` the gzip trailer stores the uncompressed
    size, so only a mismatch (truncation, or a multi-member file) decompresses the stream."""
    path = Path(path)
    layout = _nifti_layout(path)
    if layout is None:
        return None
    expected, dtype = layout
    with open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            if os.fstat(f.fileno()).st_size < expected:
                raise DataError(f"{path}: {_TRUNCATED.format(why='the voxel data ends early')}.")
            return dtype
        f.seek(-4, os.SEEK_END)
        if int.from_bytes(f.read(4), "little") == expected % 2**32:
            return dtype
    if _gzip_size(path) < expected:
        raise DataError(f"{path}: {_TRUNCATED.format(why='the voxel data ends early')}.")
    return dtype


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


def _read_nifti(path: Path) -> Image:
    """ITK reads it (its qform/sform choice and RAS->LPS conversion), except that its NIfTI reader silently turns
    NaN/Inf into 0, which would hide exactly what the dataset checker must report: floating-point voxels are
    therefore read with nibabel (slower gzip) and only the geometry comes from ITK."""
    import nibabel as nib

    disk_dtype = check_nifti_complete(path)
    if disk_dtype is None or disk_dtype.kind != "f":
        return _with_nifti_codes(_sitk_read(path, "NIfTI"), path)
    reader = _sitk_header(path, "NIfTI")
    size, ncomp = tuple(reader.GetSize()), reader.GetNumberOfComponents()
    data = np.asanyarray(nib.load(str(path), mmap=False).dataobj)
    if data.size != int(np.prod(size)) * ncomp or (reader.GetDimension() == 4 and ncomp > 1):
        return _with_nifti_codes(_sitk_read(path, "NIfTI"), path)  # a layout only ITK understands
    # NIfTI is x-fastest (Fortran order) with vector components slowest; ours is [c, (t,) z, y, x]
    arr = data.reshape(size + (ncomp,), order="F").T
    image = Image(array=np.ascontiguousarray(arr[0] if ncomp == 1 else arr), path=path, **_geometry(reader))
    image.meta["nifti_codes"] = _nifti_codes(reader)
    return image


def _nifti_codes(itk) -> dict[str, int]:
    """The header's sform/qform codes (what the coordinates mean: 1 scanner, 2 aligned, 3 Talairach, 4 MNI...),
    which ITK reads but does not write back (it writes 1 and 1): :func:`write_image` restores them."""
    return {k: int(itk.GetMetaData(k)) for k in ("sform_code", "qform_code") if itk.HasMetaDataKey(k)}


def _with_nifti_codes(img: sitk.Image, path: Path) -> Image:
    image = image_from_sitk(img, path)
    image.meta["nifti_codes"] = _nifti_codes(img)
    return image


def _read_nrrd(path: Path) -> Image:
    return image_from_sitk(_sitk_read(path, "NRRD"), path)


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


def _spatial_dims(arr: np.ndarray, path: Path) -> int:
    if arr.ndim not in (2, 3, 4):
        raise DataError(f"{path}: array of shape {arr.shape} is neither 2D, 3D nor channels + 3D.")
    return 3 if arr.ndim == 4 else arr.ndim


def _numpy_error(path: Path, err: Exception) -> DataError:
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:4] != b"PK\x03\x04" and magic != b"\x93NUMPY":
        return DataError(f"{path}: not a NumPy {extension(path)} file (no NumPy/zip signature); re-save it with "
                         "np.save / np.savez.")  # fmt: skip
    if "pickle" in str(err) or "Object arrays" in str(err):
        return DataError(f"{path}: holds Python objects, which are never unpickled (they could run code); save "
                         "plain numeric arrays.")  # fmt: skip
    return DataError(f"{path}: {_TRUNCATED.format(why=f'NumPy cannot read it: {err}')}.")


def _read_npy(path: Path) -> Image:
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise _numpy_error(path, err) from err
    d = _spatial_dims(arr, path)
    return Image(arr, (1.0,) * d, (0.0,) * d, np.eye(d), path)


_NPZ_GEOMETRY = ("spacing", "origin", "direction")


def _read_npz(path: Path) -> Image:
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise _numpy_error(path, err) from err
    arrays = [k for k in data if k not in _NPZ_GEOMETRY]
    key = "image" if "image" in data else (arrays[0] if len(arrays) == 1 else None)
    if key is None:
        raise DataError(f"{path}: holds arrays {sorted(arrays)}; name the image array 'image' (np.savez(path, "
                        "image=..., spacing=...)) or keep only one array in the file.")  # fmt: skip
    arr = data[key]
    d = len(data["spacing"]) if "spacing" in data else _spatial_dims(arr, path)
    return Image(
        array=arr,
        spacing=tuple(float(s) for s in data.get("spacing", np.ones(d))),
        origin=tuple(float(o) for o in data.get("origin", np.zeros(d))),
        direction=np.asarray(data.get("direction", np.eye(d)), float).reshape(d, d),
        path=path,
    )


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


def _numpy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, dict[str, np.ndarray]]:
    """Shape and dtype from the .npy header (no voxel data read), plus the small geometry arrays of an .npz."""
    try:
        if extension(path) == ".npy":
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            return arr.shape, arr.dtype, {}
        with zipfile.ZipFile(path) as z:
            names = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
            arrays = [n for n in names if n not in _NPZ_GEOMETRY]
            key = "image" if "image" in names else (arrays[0] if len(arrays) == 1 else None)
            if key is None:
                raise DataError(f"{path}: holds arrays {sorted(arrays)}; name the image array 'image'.")
            with z.open(key + ".npy") as f:
                fmt = np.lib.format
                version = fmt.read_magic(f)
                shape, _, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(f)
            geometry = {}
            for name in ("spacing", "direction"):
                if name in names:
                    with z.open(name + ".npy") as f:
                        geometry[name] = np.lib.format.read_array(f)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise _numpy_error(path, err) from err
    return tuple(shape), np.dtype(dtype), geometry


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


def _save_numpy(tmp: Path, save: Callable, *args, **kwargs) -> None:
    with open(tmp, "wb") as f:  # a file object: np.save would otherwise append ".npy" to the temp name
        save(f, *args, **kwargs)


def _sitk_write_as(img: sitk.Image, tmp: Path, ext: str, compress: bool) -> None:
    """ITK picks the writer (and gzip for .nii.gz) by extension, so write a sibling that has the real one."""
    side = tmp.with_name(tmp.name + ext)
    try:
        sitk.WriteImage(img, str(side), compress)
        os.replace(side, tmp)
    finally:
        side.unlink(missing_ok=True)


_QFORM_CODE_OFFSET = 252  # NIfTI-1 header: int16 qform_code at byte 252, int16 sform_code at 254


def _write_nifti_with_codes(img: sitk.Image, tmp: Path, ext: str, codes: dict[str, int], compress: bool) -> None:
    """ITK writes the header (geometry as it always does), then the two code fields are set in place; ``.nii.gz``
    is compressed afterwards."""
    side = tmp.with_name(tmp.name + ".nii")
    try:
        sitk.WriteImage(img, str(side), False)
        with open(side, "r+b") as f:
            head = f.read(_QFORM_CODE_OFFSET + 4)
            order = {348: "<", 348 << 24: ">"}.get(int.from_bytes(head[:4], "little"))
            if order is None:  # NIfTI-2 (ITK's choice for very large images) keeps ITK's codes
                logger.warning("%s: not written as NIfTI-1; its sform/qform codes are ITK's (1, 1), not %s",
                               tmp, codes)
            else:
                old = np.frombuffer(head[_QFORM_CODE_OFFSET:], dtype=f"{order}i2")
                new = np.array([codes.get("qform_code", old[0]), codes.get("sform_code", old[1])], f"{order}i2")
                f.seek(_QFORM_CODE_OFFSET)
                f.write(new.tobytes())
        if ext == ".nii.gz":  # always gzip: readers go by the extension
            with open(side, "rb") as src, open(tmp, "wb") as raw:
                with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6 if compress else 1, mtime=0) as dst:
                    shutil.copyfileobj(src, dst, length=16 << 20)
        else:
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
