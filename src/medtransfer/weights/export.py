"""Write a state_dict in a seed system's own on-disk layout, so its code base (or ours) can read it back.

Used to hand weights trained here to the original code, and by the tests to prove that every official wrapper
format loads key for key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch

from .io import atomic_write

EXPORT_FORMATS = ("medicalnet", "genesis", "pymic", "mmcv", "torchvision")


def official_layout(state_dict: Mapping[str, torch.Tensor], fmt: str) -> dict:
    """The object the seed system saves, around ``state_dict`` (canonical keys)."""
    sd = dict(state_dict)
    if fmt == "medicalnet":  # nn.DataParallel prefix, as the released resnet_*.pth files
        return {"state_dict": {f"module.{k}": v for k, v in sd.items()}}
    if fmt == "genesis":  # Genesis_Chest_CT.pt
        return {"epoch": 0, "state_dict": {f"module.{k}": v for k, v in sd.items()}, "optimizer_state_dict": {}}
    if fmt == "pymic":  # PyMIC's SegmentationAgent checkpoints
        return {"iteration": 0, "valid_pred": 0.0, "model_state_dict": sd, "optimizer_state_dict": {}}
    if fmt == "mmcv":  # mmcv runner checkpoints of a full mmcls classifier
        out = {}
        for k, v in sd.items():
            out[f"head.{k}" if k.startswith("fc.") else f"backbone.{k}"] = v
        return {"meta": {"mmcv_version": "1.3.0", "CLASSES": None}, "state_dict": out}
    if fmt == "torchvision":  # plain dict, as BenchmarkTransferLearning's unified files
        return sd
    raise ValueError(f"unknown export format '{fmt}'; choose one of {', '.join(EXPORT_FORMATS)}")


def export_official(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, fmt: str) -> Path:
    obj = official_layout(state_dict, fmt)
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
