"""Published weight files and the input contract each one carries.

A :class:`PretrainedCfg` says where a published file comes from, which architecture and arguments it needs, and what
input it expects (modality, intensity window and normalisation, spacing, channels, patch size). Fine-tuning code reads
this instead of guessing. The library never downloads: ``pretrained=True`` looks in the weights cache and, when the
file is missing, tells the user where to get it and where to put it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import WeightsNotFoundError


@dataclass(frozen=True)
class PretrainedCfg:
    """One published weight file.

    ``tag`` distinguishes several files for one architecture (``medicalnet_resnet10.23dataset``); the first cfg
    registered for a model is its default.
    """

    model: str
    tag: str
    file_name: str
    url: str
    source: str  # checkpoint format, one of weights.sources.SOURCE_NAMES
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None  # classes of the head stored in the file, None when it holds no head
    modality: str = "CT"
    in_channels: int = 1
    intensity: str = ""  # window and normalisation, in words
    preset: str | None = None  # medtransfer intensity preset (data.preprocess.PRESETS) that reproduces it, if one does
    spacing: tuple[float, ...] | None = None  # mm, in (D, H, W) order, None when unknown
    patch_size: tuple[int, ...] | None = None  # voxels in array order (D, H, W) / (H, W), as medtransfer feeds them
    pretraining: str = ""  # what the weights were trained on and how
    license: str = ""
    citation: str = ""
    notes: str = ""

    @property
    def full_name(self) -> str:
        return f"{self.model}.{self.tag}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PretrainedCfg:
        """The inverse of :meth:`to_dict` (JSON lists back to tuples; unknown keys are ignored)."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("spacing", "patch_size"):
            if known.get(key) is not None:
                known[key] = tuple(known[key])
        return cls(**known)


def weights_home() -> Path:
    """The weights cache: ``$MEDTRANSFER_HOME/weights``, default ``~/.cache/medtransfer/weights``.

    Read at call time, never at import, so tests and users can point it elsewhere.
    """
    home = os.environ.get("MEDTRANSFER_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "medtransfer"
    return base / "weights"


def cached_file(cfg: PretrainedCfg) -> Path:
    """Path of ``cfg``'s file in the cache; a clear error with the download address when it is absent."""
    path = weights_home() / cfg.file_name
    if path.is_file():
        return path
    raise WeightsNotFoundError(
        f"pretrained weights for '{cfg.full_name}' are not in the cache: expected the file\n"
        f"  {path}\n"
        f"medtransfer never downloads. Get '{cfg.file_name}' from\n"
        f"  {cfg.url}\n"
        f"and put it at the path above (set MEDTRANSFER_HOME to use another cache folder), "
        f"or pass pretrained='path/to/{cfg.file_name}'."
    )
