"""What every dataset layout shares: extensions, case ids, path resolution, and reading a description file
(JSON with line and column in its errors, text lists with line numbers) with a `DataError` that names the fix."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ...errors import DataError
from ..types import Dataset

IMAGE_EXTENSIONS_3D = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".npy", ".npz")
IMAGE_EXTENSIONS_2D = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
KNOWN_EXTENSIONS = IMAGE_EXTENSIONS_3D + IMAGE_EXTENSIONS_2D + (".dcm",)

# A layout's parser: (the dataset's file or folder, the options given to load_dataset) -> Dataset
Loader = Callable[[Path, Mapping[str, Any]], Dataset]


def strip_ext(name: str) -> str:
    """The name without its image extension; ``.nii.gz`` (and the other known ones) count as one."""
    lower = name.lower()
    for ext in KNOWN_EXTENSIONS:
        if lower.endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def has_ext(name: str, extensions: Sequence[str]) -> bool:
    """Case-insensitive: ``SCAN.PNG`` is a PNG."""
    return name.lower().endswith(tuple(extensions))


def case_ids(paths: Sequence[Path], root: Path) -> list[str]:
    """File names without extension, or relative paths joined by '_' when different files share a name."""
    stems = [strip_ext(p.name) for p in paths]
    owners: dict[str, set[Path]] = {}
    for stem, p in zip(stems, paths):
        owners.setdefault(stem, set()).add(p)
    if all(len(v) == 1 for v in owners.values()):
        return stems
    ids = []
    for p in paths:
        try:
            parts = p.relative_to(root).parts
        except ValueError:
            parts = p.parts[1:]
        ids.append("_".join([*parts[:-1], strip_ext(parts[-1])]))
    return ids


def resolve(root: Path, rel: str) -> Path:
    """A listed path: absolute as written, relative ones under ``root``."""
    return Path(rel) if os.path.isabs(rel) else root / rel


def spatial_dims_of(paths: Sequence[Path]) -> int:
    """2 when every listed file is a 2D format (PNG... or a DICOM file), else 3."""
    return 2 if paths and all(has_ext(p.name, IMAGE_EXTENSIONS_2D + (".dcm",)) for p in paths) else 3


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object; a syntax error names line and column, the usual places a hand-edited file breaks."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg}); fix the syntax there "
            "(a trailing comma, a missing comma or an unquoted key is the usual cause)"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read as UTF-8 text ({e}); fix: check the file") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: the top level must be a JSON object {{...}}, found {type(data).__name__}")
    return data


def require_keys(desc: Mapping[str, Any], keys: Sequence[str], path: Path, kind: str) -> None:
    """Name every missing key at once, with the ones present (often a misspelt one)."""
    missing = [k for k in keys if k not in desc]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(map(repr, missing))} required by the {kind} layout; "
                        f"fix: add them (present: {', '.join(sorted(desc)) or 'none'})")  # fmt: skip


def text_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of non-blank, non-comment lines."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read as UTF-8 text ({e}); fix: check the file") from None
    lines = ((i, line.strip()) for i, line in enumerate(text.splitlines(), start=1))
    return [(i, s) for i, s in lines if s and not s.startswith("#")]


def split_line(text: str) -> list[str]:
    """Comma-separated when the line has a comma (Shenzhen lists), else whitespace-separated."""
    return [t.strip() for t in text.split(",")] if "," in text else text.split()


def is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True
