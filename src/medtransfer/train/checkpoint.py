"""Run checkpoints (``last.pt``/``best.pt``) and random-number-generator state, for exact resume.

Everything stored loads with ``torch.load(weights_only=True)``: numpy's generator state is kept as a tensor plus
plain numbers, Python's as lists of ints.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, MedTransferError, UnsafeCheckpointError
from ..weights.io import atomic_write

FORMAT = "medtransfer-run/1"

__all__ = ["FORMAT", "rng_state", "set_rng_state", "unwrap_model", "save_run_checkpoint", "load_run_checkpoint",
           "read_run_checkpoint", "TrainingInterrupted", "check_run_folder", "clear_run", "remove_stale_temps"]


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


def read_run_checkpoint(path: str | Path, *, advice: str = "") -> dict[str, Any]:
    """The one reader of run checkpoints (``last.pt`` for resume, ``best.pt`` for evaluate/predict): loaded with
    ``weights_only=True`` through :mod:`medtransfer.weights.io`; a missing, truncated or unsafe file, or one of
    another format, is a :class:`~medtransfer.errors.CheckpointError` naming the file and ``advice`` (what to do)."""
    from ..weights.io import _torch_load

    path = Path(path)
    tail = f"; {advice}" if advice else ""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint{tail}")
    try:
        state = _torch_load(path)
    except UnsafeCheckpointError:
        raise UnsafeCheckpointError(
            f"{path}: not loaded: the checkpoint holds Python objects that would execute code when unpickled, and "
            f"medtransfer never runs code from a file (no medtransfer run writes such objects){tail}") from None
    except CheckpointError:
        raise CheckpointError(
            f"{path}: the checkpoint is incomplete (cut short by a kill while it was written, or a full disk) and was "
            f"not loaded{tail}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint (format {found!r}){tail}")
    return state


def load_run_checkpoint(path: str | Path) -> dict[str, Any]:
    """``last.pt`` to resume from (:func:`read_run_checkpoint` with the advice for a resume)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no run checkpoint to resume from (the run saved none yet); start the run "
                              "again without --resume, with --overwrite")
    return read_run_checkpoint(path, advice=(
        "resume from an earlier copy of last.pt if you kept one (put it in its place), or start the run again "
        "with --overwrite"))


# ------------------------------------------------------------------------------------------ run folders

# what marks a folder as a run, and what --overwrite removes (a user-named cache folder lives elsewhere and stays)
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "split.json", "run.json", "contract.json", "data.json")
RUN_CONTENT = RUN_MARKERS + ("env.json", "load_report.json", "pretrained.safetensors", "encoder_medicalnet.pth",
                             "tensorboard", "cache", "cache_*", "evaluation", "evaluation-*", "predictions")
# the temporary names of medtransfer.weights.io.atomic_write: ".<name>.<8 mkstemp characters>.tmp"
_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: ``saved_step`` is the step of the last ``last.pt`` written (None: none)."""

    def __init__(self, run_dir: Path, step: int, saved_step: int | None) -> None:
        super().__init__(run_dir, step, saved_step)
        self.run_dir, self.step, self.saved_step = Path(run_dir), step, saved_step

    def message(self, resume_command: str) -> str:
        if self.saved_step is None:
            return (f"interrupted at step {self.step}: nothing was saved yet in {self.run_dir}; start again with "
                    f"--overwrite")
        return (f"interrupted at step {self.step}: {self.run_dir / 'checkpoints' / 'last.pt'} holds step "
                f"{self.saved_step}; resume with: {resume_command}")


def is_run_folder(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in RUN_MARKERS)


def check_run_folder(out: Path, *, resume: bool, overwrite: bool, command: str) -> None:
    """The run-folder rule, checked before anything is written: a new run goes into a new (or empty) folder, or
    over an old run with ``overwrite``; ``resume`` needs a run to continue. ``command``: "finetune" or "pretrain"."""
    if out.exists() and not out.is_dir():
        raise MedTransferError(f"--out {out}: is a file, not a folder; give a folder for the run")
    if resume and overwrite:
        raise MedTransferError("--resume continues a run and --overwrite replaces it; give one of them")
    if resume:
        if not (out / "config.yaml").is_file():
            raise MedTransferError(f"{out}: no config.yaml, so no run to resume; start it without --resume")
        return
    if is_run_folder(out) and not overwrite:
        raise MedTransferError(
            f"{out} holds a run already (config.yaml, checkpoints or metrics.jsonl); nothing was written. Continue "
            f"it with `medtransfer {command} --out {out} --resume`, replace it with --overwrite, or choose another "
            "--out")


def clear_run(out: Path, keep: Path | None = None) -> None:
    """Remove an old run's files (``overwrite``); other files in the folder (the phantoms, anything of the user's)
    and ``keep`` (a cache folder the config names) stay."""
    import shutil

    keep = keep.resolve() if keep is not None else None
    for pattern in RUN_CONTENT:
        for path in out.glob(pattern):
            if keep is not None and path.resolve() == keep:
                continue
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def remove_stale_temps(*folders: Path) -> list[Path]:
    """Delete the temporary files a kill left behind in ``atomic_write`` (only its own ``.<name>.XXXXXXXX.tmp``)."""
    removed = []
    for folder in folders:
        if folder.is_dir():
            for path in folder.iterdir():
                if _TEMP.match(path.name) and path.is_file():
                    path.unlink(missing_ok=True)
                    removed.append(path)
    return removed
