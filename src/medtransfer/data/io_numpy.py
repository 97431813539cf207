"""NumPy ``.npy``/``.npz``: reading without unpickling, headers without the voxel data, errors that tell a
non-NumPy file, a pickled one and a truncated one apart."""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DataError
from .io_common import _TRUNCATED, extension
from .types import Image


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


def _save_numpy(tmp: Path, save: Callable, *args, **kwargs) -> None:
    with open(tmp, "wb") as f:  # a file object: np.save would otherwise append ".npy" to the temp name
        save(f, *args, **kwargs)
