"""Reading and writing weight files safely.

Reading never executes code from the file: torch files are opened with ``weights_only=True``, safetensors files
hold only tensors, and plain pickles (the BYOL haiku release) go through a restricted unpickler. Writing is atomic:
a temporary file in the same folder, then a rename, so an interrupted write never leaves a half file behind.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..errors import CheckpointError, UnsafeCheckpointError

SAFETENSORS_META_KEY = "medtransfer"


@dataclass
class RawCheckpoint:
    """What was read from disk, before any conversion."""

    path: Path
    obj: Any
    container: str  # "torch-zip", "torch-legacy", "safetensors" or "pickle"
    metadata: dict[str, Any] = field(default_factory=dict)


def _numpy_safe_globals() -> list:
    # Checkpoints written by older training scripts hold numpy scalars (PyMIC's best Dice, for example). These
    # rebuild plain numbers and arrays and run no other code, so they are admitted alongside tensors.
    allowed: list = [np.dtype, np.ndarray]
    for mod_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            mod = __import__(mod_name, fromlist=["scalar", "_reconstruct"])
            allowed += [mod.scalar, mod._reconstruct]
            break
        except (ImportError, AttributeError):
            continue
    allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return allowed


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with path.open("rb") as f:
        head = f.read(9)
    # safetensors: 8-byte little-endian header length, then a JSON object.
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def read_checkpoint(path: str | os.PathLike) -> RawCheckpoint:
    """Read a weight file without executing anything in it; clear errors for missing, corrupt or unsafe files."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; pass the weight file inside it")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (an interrupted download or copy?); fetch it again")
    if _is_safetensors(path):
        return _read_safetensors(path)
    if zipfile.is_zipfile(path):
        return RawCheckpoint(path, _torch_load(path), "torch-zip")
    with path.open("rb") as f:
        magic = f.read(2)
    if magic == b"PK":
        raise CheckpointError(
            f"{path}: the file is corrupt or truncated (a zip archive without its directory, as a torch file cut "
            "short by an interrupted download or copy); download or copy it again"
        )
    if magic[:1] == b"\x80":
        # A pickle protocol header: either a legacy (pre-1.6) torch file or a plain pickle.
        if _is_torch_legacy(path):
            return RawCheckpoint(path, _torch_load(path), "torch-legacy")
        from .safe_pickle import restricted_load

        return RawCheckpoint(path, restricted_load(path), "pickle")
    if magic[:1] == b"\x89" and path.suffix in {".h5", ".hdf5"} or magic == b"\x89H":
        raise CheckpointError(
            f"{path}: this is a Keras/HDF5 file. Models Genesis' Keras weights use a different network "
            "(UpSampling3D, other layer names) and do not map onto the PyTorch UNet3D; use Genesis_Chest_CT.pt."
        )
    raise CheckpointError(
        f"{path}: not a PyTorch, safetensors or pickle weight file (it starts with bytes {magic!r}); "
        "the file may be corrupt or of another kind"
    )


_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _is_torch_legacy(path: Path) -> bool:
    """Legacy torch files begin with a pickled magic integer; reading it runs no code (no globals admitted)."""

    class _NoGlobals(pickle.Unpickler):
        def find_class(self, module: str, name: str):  # pragma: no cover - only reached by non-torch files
            raise pickle.UnpicklingError("globals are not read here")

    try:
        with path.open("rb") as f:
            return _NoGlobals(f).load() == _TORCH_LEGACY_MAGIC
    except Exception:
        return False


def _torch_load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if "Unsupported global" in msg or "GLOBAL" in msg or "not an allowed global" in msg:
            what = _unsupported_global(msg)
            raise UnsafeCheckpointError(
                f"{path}: refused. Loading this file would need the Python object {what}, which can run arbitrary "
                "code; medtransfer never executes code from weight files. If you trust the file, re-save only its "
                "tensors where it was made: torch.save(model.state_dict(), 'clean.pth'), or "
                "safetensors.torch.save_file(state_dict, 'clean.safetensors')."
            ) from None
        detail = next((ln for ln in msg.splitlines() if "Unsupported" in ln), "unreadable pickle")
        raise CheckpointError(f"{path}: the file is corrupt or truncated ({detail.strip()})") from None
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(
            f"{path}: the file is corrupt or truncated ({first}); download or copy it again"
        ) from None
    except (EOFError, ValueError, OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"{path}: the file is corrupt or truncated ({type(exc).__name__}: {exc}); download or copy it again"
        ) from None


def _unsupported_global(msg: str) -> str:
    for line in msg.splitlines():
        if "GLOBAL" in line or "Unsupported global" in line:
            for token in line.replace(",", " ").split():
                if "." in token and not token.endswith("."):
                    return token.strip("`'\"")
    return "(an arbitrary global)"


def _read_safetensors(path: Path) -> RawCheckpoint:
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: the safetensors file is corrupt or truncated ({exc})") from None
    metadata: dict[str, Any] = {}
    if SAFETENSORS_META_KEY in meta:
        try:
            metadata = json.loads(meta[SAFETENSORS_META_KEY])
        except json.JSONDecodeError:
            raise CheckpointError(f"{path}: its medtransfer metadata is not valid JSON") from None
    if metadata:
        from .sources3d import NormalisedWeights

        return RawCheckpoint(path, NormalisedWeights(tensors, metadata), "safetensors", metadata)
    return RawCheckpoint(path, tensors, "safetensors", metadata)


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc``); else set and restored at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``; on any failure the old ``path`` is untouched and the
    temporary file is removed.

    An ``OSError`` about the temporary file (or about no file) or a ``RuntimeError`` (torch's zip writer on a full
    disk) leaves with ``output_path`` set to ``path``, so the CLI names the file the user asked for rather than the
    temporary one. The file gets the mode any other tool
    would give it: 0666 minus the umask (0644 under the usual 022)."""
    path = Path(path)
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        write(tmp_path)
        # mkstemp (and writers that replace the file, such as safetensors) leave it 0600 whatever the umask
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    except BaseException as exc:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)
        # an OSError about another file (a folder above that could not be made) keeps its own name
        named = getattr(exc, "filename", None)
        temporary = named is not None and Path(os.fsdecode(named)).parent == path.parent and \
            Path(os.fsdecode(named)).name.startswith(f".{path.name}.")
        if isinstance(exc, (OSError, RuntimeError)) and getattr(exc, "output_path", None) is None and \
                (named is None or temporary):
            exc.output_path = path  # type: ignore[attr-defined]
        raise
    return path


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, Any]
) -> Path:
    """Write ``state_dict`` as safetensors with ``metadata`` (JSON) in the header, atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    header = {SAFETENSORS_META_KEY: json.dumps(metadata, default=str, sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
