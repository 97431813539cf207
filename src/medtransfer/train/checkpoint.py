"""Run checkpoints (``last.pt``/``best.pt``) and random-number-generator state, for exact resume.

Everything stored loads with ``torch.load(weights_only=True)``: numpy's generator state is kept as a tensor plus
plain numbers, Python's as lists of ints.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import MedTransferError
from ..weights.io import atomic_write

FORMAT = "medtransfer-run/1"

__all__ = ["FORMAT", "rng_state", "set_rng_state", "unwrap_model", "save_run_checkpoint", "load_run_checkpoint"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel/DataParallel (their keys carry a ``module.`` prefix)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_run_checkpoint(path: str | Path, state: Mapping[str, Any]) -> Path:
    """``torch.save`` ``state`` (plus the format tag) atomically: a crash mid-write leaves the old file intact."""
    payload = {**state, "format": FORMAT}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_run_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MedTransferError(f"{path}: no run checkpoint to resume from; start without resume=True")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise MedTransferError(f"{path}: not a {FORMAT} checkpoint (format={getattr(state, 'get', dict().get)('format')!r})")
    return state
