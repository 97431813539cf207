"""NIfTI: the two ITK pitfalls. ITK reads a cut-off ``.nii``/``.nii.gz`` without complaint (missing voxels come back
as zeros), so sizes are checked against the header (for gzip from the stream trailer, without decompressing); it
turns NaN/Inf into 0, so floating-point voxels are read with nibabel; and it writes sform/qform codes as 1, so the
codes read are written back in place.
"""

from __future__ import annotations

import gzip
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import DataError
from .io_common import _TRUNCATED, _geometry, _sitk_header, _sitk_read, image_from_sitk, logger
from .types import Image


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
