"""Published weight files and the input contract each one carries.

A :class:`PretrainedCfg` says where a published file comes from, which architecture and arguments it needs, and what
input it expects (modality, intensity window and normalisation, spacing, channels, patch size). Fine-tuning code reads
this instead of guessing. The library downloads only when asked: ``pretrained=True`` looks in the weights cache and,
when the file is missing, tells the user where to get it and where to put it; ``download=True`` (or
``medtransfer zoo fetch``) fetches it from its official address when that is a direct link (:func:`fetch_pretrained`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import WeightsNotFoundError

log = logging.getLogger(__name__)


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
    # sha256 of the published file, or the prefix its name carries (torchvision's), that a download must match;
    # None: not recorded (a download is installed unverified and the hash it computed is printed)
    sha256: str | None = None
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


def cached_file(cfg: PretrainedCfg, *, download: bool = False) -> Path:
    """Path of ``cfg``'s file in the cache. When it is absent: with ``download``, :func:`fetch_pretrained` fetches
    it; without, a clear error with the download address and the path to put the file at."""
    path = weights_home() / cfg.file_name
    if path.is_file():
        return path
    if download:
        return fetch_pretrained(cfg).path
    from ..weights.fetch import manual_host

    page = manual_host(cfg.url)
    if page is None:
        how = f"Run `medtransfer zoo fetch {cfg.full_name}` (or pass download=True), or get"
    else:
        how = f"The address is {page}, so only a person can download it: get"
    raise WeightsNotFoundError(
        f"pretrained weights for '{cfg.full_name}' are not in the cache: expected the file\n"
        f"  {path}\n"
        f"medtransfer never downloads unless asked. {how} '{cfg.file_name}' from\n"
        f"  {cfg.url}\n"
        f"and put it at the path above (set MEDTRANSFER_HOME to use another cache folder), "
        f"or pass pretrained='path/to/{cfg.file_name}'."
    )


def manual_steps(cfg: PretrainedCfg, page: str) -> str:
    """What a person does to install ``cfg``'s file from a web page (``page``: its kind, from
    :func:`medtransfer.weights.fetch.manual_host`)."""
    path = weights_home() / cfg.file_name
    notes = f"\n  note: {cfg.notes}" if cfg.notes else ""
    return (f"'{cfg.full_name}' is published on {page}, which medtransfer cannot download from; nothing was "
            f"written. By hand:\n"
            f"  1. open {cfg.url} in a browser and download '{cfg.file_name}'\n"
            f"  2. put it at {path} (the folder: mkdir -p {path.parent})\n"
            f"  3. check it with `medtransfer zoo inspect {path}`"
            + (f" and its sha256 against {cfg.sha256}" if cfg.sha256 else "") + notes)


def fetch_pretrained(cfg: PretrainedCfg, *, progress: bool = True, echo=None):
    """Download ``cfg``'s file into the weights cache from its official address; returns the
    :class:`~medtransfer.weights.fetch.Fetched` record (``.path``, ``.sha256``, ``.verified``, ...).

    A direct link only (GitHub releases, Zenodo, Hugging Face ``resolve/`` and other file servers); for a page
    (Google Drive, Baidu, ...) :class:`~medtransfer.weights.fetch.ManualDownloadError` holds the manual steps and
    nothing is written. The sha256 is checked when ``cfg.sha256`` records it; when it does not, a WARNING gives the
    hash computed. See :func:`medtransfer.weights.fetch.fetch_file` for resuming, proxies and progress."""
    from ..weights.fetch import ManualDownloadError, fetch_file, manual_host

    if not cfg.url:
        raise WeightsNotFoundError(f"'{cfg.full_name}' has no download address; pass pretrained='path/to/file'")
    page = manual_host(cfg.url)
    if page is not None:
        raise ManualDownloadError(manual_steps(cfg, page))
    log.info("fetching %s from %s", cfg.full_name, cfg.url)
    done = fetch_file(cfg.url, weights_home() / cfg.file_name, sha256=cfg.sha256, progress=progress, echo=echo)
    if not done.verified:
        log.warning("%s: sha256 not recorded in its PretrainedCfg, so the file is unverified; computed %s (compare "
                    "it with the publisher's, if they give one)", done.path, done.sha256)
    return done
