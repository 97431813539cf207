"""Where a command may write, checked before any work, and the one sentence an OS error on an output becomes.

The rule: an output folder is a folder or a path that can become one (no file at it or above it), inside a folder
this process can write. :func:`check_output_dir` / :func:`check_output_file` refuse anything else before a command
computes or writes anything. What no check can know in advance (the disk filling up mid-run, a folder turned
read-only) the CLI turns into one line with :func:`describe_os_error` / :func:`describe_write_failure`.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Optional

from .errors import OutputPathError


def writable(folder: Path) -> bool:
    """Whether this process may create files in ``folder``.

    ``os.access`` alone is not enough for root, who may write in any folder whatever its mode bits, but not on a
    file system mounted read-only; ``statvfs`` tells that case apart."""
    return not _read_only_mount(folder) and os.access(folder, os.W_OK | os.X_OK)


def _read_only_mount(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")  # pragma: no cover - a relative path whose every part is missing


def _check_can_create_in(folder: Path, path: Path, what: str) -> None:
    """``folder`` (``path`` or its parent) exists as a writable folder, or can be made inside one."""
    base = _nearest_existing(folder)
    if not base.is_dir():
        raise OutputPathError(f"{what} {path}: {base} is a file, so nothing can be created under it; give a path "
                              "inside a folder")
    if not writable(base):
        why = "is on a read-only file system" if _read_only_mount(base) else "is not writable (permission denied)"
        raise OutputPathError(f"{what} {path}: the folder {base} {why}; choose a folder you can write to")


def check_output_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Refuse an output folder that is a file, lies under a file, or cannot be written; create nothing.

    ``what`` names the option or argument in the message (``--out``, ``GRID``...)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{what} {path} is a file; give a folder (a new or an existing one)")
    _check_can_create_in(path, path, what)
    return path


def check_output_file(path: str | os.PathLike, what: str = "--out") -> Path:
    """Refuse an output file that is a folder, lies under a file, or sits in a folder that cannot be written.

    An existing file is accepted: commands that replace files do so atomically."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is a folder; give a file name")
    _check_can_create_in(path.parent, path, what)
    return path


def _file_above(path: Path) -> Optional[Path]:
    """The first part of ``path`` that exists as a file (what makes ENOTDIR), if any."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate if not candidate.is_dir() else None
    return None


def describe_os_error(exc: OSError) -> str:
    """One sentence for an OS error met while a command ran: what failed, at which path, and what to do.

    :func:`medtransfer.weights.io.atomic_write` records the file it was writing as ``exc.output_path``; that name,
    not the temporary file's, is the one the user knows."""
    target = getattr(exc, "output_path", None) or exc.filename or exc.filename2
    code = exc.errno
    if target is None:
        where = "a file could not be written"
        target_path = None
    else:
        target_path = Path(os.fsdecode(target))
        where = f"could not write {target_path}"
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"{where}: no space left on the device; free some space (or write to another disk) and run again"
    if code == errno.EROFS:
        return f"{where}: the file system is read-only; choose a folder you can write to"
    if code in (errno.EACCES, errno.EPERM):
        return f"{where}: permission denied; choose a folder you can write to"
    if target_path is not None and code in (errno.ENOTDIR, errno.EEXIST):
        above = _file_above(target_path)
        if above == target_path:
            return f"{target_path} is a file, where a folder is needed; give a folder path"
        if above is not None:
            return f"{target_path}: {above} is a file, not a folder; give a path inside a folder"
    if target_path is not None and code == errno.EISDIR:
        return f"{target_path} is a folder, where a file is needed; give a file name"
    if target_path is not None and code == errno.ENOENT:
        return f"{target_path}: no such file or folder; check the path"
    reason = exc.strerror or str(exc)
    return f"{where}: {reason}" if target_path is not None else f"{reason}"


# What torch's zip writer says when a write fails (it does not pass errno on): a full disk is the usual cause.
_TORCH_WRITER_MARKS = ("PytorchStreamWriter", "unexpected pos")


def describe_write_failure(exc: BaseException) -> Optional[str]:
    """The sentence for a failed write that does not come as an ``OSError``, or None for any other error: torch's
    ``RuntimeError`` from its checkpoint writer, SQLite's "database or disk is full" (a benchmark store).

    Read errors (``PytorchStreamReader``, also from ``inline_container.cc``) are not write failures."""
    import sqlite3

    if isinstance(exc, sqlite3.OperationalError) and "disk is full" in str(exc):
        return (f"could not write a results store: the disk is full ({exc}); free some space and run the same "
                "command again (finished runs are kept)")
    if not isinstance(exc, RuntimeError):
        return None
    text = str(exc)
    if not (any(mark in text for mark in _TORCH_WRITER_MARKS)
            or ("inline_container" in text and "PytorchStreamReader" not in text)):
        return None
    target = getattr(exc, "output_path", None)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    name = f"could not write {target}" if target is not None else "could not write a checkpoint"
    return f"{name}: the disk may be full ({first}); free some space (or write to another disk) and run again"
