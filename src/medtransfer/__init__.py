"""medtransfer: transfer learning for 3D (and 2D) medical image analysis.

The public face::

    import medtransfer as mt
    mt.list_models("medicalnet_*")
    model = mt.create_model("medicalnet_resnet50", task="segmentation", num_classes=3, pretrained="resnet_50.pth")
    print(model.load_report)
    report = mt.load_checkpoint(model, "other.pth", min_coverage=1.0)

Names are imported lazily (PEP 562) so that ``medtransfer --help`` does not pay for importing torch. The command
line, :mod:`medtransfer.cli` (one module per command group), sits on top: no library module imports it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "list_models": "medtransfer.zoo.registry",
    "get_entry": "medtransfer.zoo.registry",
    "create_model": "medtransfer.zoo.builder",
    "load_checkpoint": "medtransfer.zoo.builder",
    "LoadReport": "medtransfer.weights.adapt",
    "PretrainedCfg": "medtransfer.zoo.pretrained",
    "MedTransferError": "medtransfer.errors",
    "CheckpointError": "medtransfer.errors",
    "CheckpointMismatchError": "medtransfer.errors",
    "UnsafeCheckpointError": "medtransfer.errors",
    "UnknownModelError": "medtransfer.errors",
    "WeightsNotFoundError": "medtransfer.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'medtransfer' has no attribute '{name}'")


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from .errors import (
        CheckpointError,
        CheckpointMismatchError,
        MedTransferError,
        UnknownModelError,
        UnsafeCheckpointError,
        WeightsNotFoundError,
    )
    from .weights.adapt import LoadReport
    from .zoo.builder import create_model, load_checkpoint
    from .zoo.pretrained import PretrainedCfg
    from .zoo.registry import get_entry, list_models
