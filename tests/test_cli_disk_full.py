"""A disk that fills up mid-write: torch's zip writer fails with ``RuntimeError: [enforce fail at
inline_container.cc:672] . unexpected pos ...`` (as issue 11 met it; torch passes no errno on), other writers with
``OSError(ENOSPC)``. Either way the previous file stays whole, the temporary file goes, and the CLI
says which file could not be written, in one line, exit 1."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medtransfer.cli import app
from medtransfer.data.phantoms import write_phantom_dataset
from medtransfer.weights.io import atomic_write

TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"


def _full_disk(kind: str, tmp: Path) -> BaseException:
    if kind == "torch":
        return RuntimeError(TORCH_FULL)
    return OSError(errno.ENOSPC, "No space left on device", str(tmp))


@pytest.mark.parametrize("kind", ["torch", "enospc"])
def test_atomic_write_that_fails_midway_keeps_the_old_file_and_removes_the_temporary_one(kind, tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"the previous checkpoint")
    seen = []

    def write_half(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_bytes(b"PK\x03\x04 half a zip")  # the disk fills up after these bytes
        raise _full_disk(kind, tmp)

    with pytest.raises((RuntimeError, OSError)) as err:
        atomic_write(target, write_half)
    assert seen[0].parent == tmp_path and seen[0] != target
    assert err.value.output_path == target  # the CLI names this file, not the temporary one
    assert target.read_bytes() == b"the previous checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("data"), 3, 0, shape=(32, 32, 32), spacing=(5.0,) * 3,
                                 with_2d=False)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(".tmp")}


@pytest.mark.parametrize("kind", ["torch", "enospc"])
def test_finetune_on_a_full_disk_says_which_file_in_one_line_and_keeps_the_earlier_files(kind, tmp_path, phantoms,
                                                                                        monkeypatch):
    run = tmp_path / "run"
    real_save = torch.save
    saves: list[str] = []
    at_failure: dict[str, bytes] = {}

    def save(obj, f, *args, **kwargs):
        # checkpoints of a 2-step run with val_every=1: best, last (step 1), best (step 2: the disk is full), ...
        saves.append(Path(f).name)
        if len(saves) < 3:
            return real_save(obj, f, *args, **kwargs)
        at_failure.update(_files(run))
        Path(f).write_bytes(b"PK\x03\x04 half a zip")
        raise _full_disk(kind, Path(f))

    monkeypatch.setattr(torch, "save", save)
    result = CliRunner().invoke(app, [
        "finetune", "--model", "fmunet", "--data", str(phantoms), "--out", str(run),
        "--set", "model.arch.feature_chns=[4,8,16,32,64]", "--set", "data.patch_size=[32,32,32]",
        "--set", "train.max_steps=2", "--set", "train.val_every=1", "--set", "data.val_fraction=0.34"])

    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    best = run / "checkpoints" / "best.pt"
    why = (f"the disk may be full ({TORCH_FULL})" if kind == "torch" else "no space left on the device")
    assert errors == [f"error: could not write {best}: {why}; free some space (or write to another disk) and run "
                      "again"]
    assert saves[2].startswith(".best.pt.") and saves[2].endswith(".tmp")
    assert {"config.yaml", "split.json", "checkpoints/best.pt", "checkpoints/last.pt"} <= set(at_failure)
    assert _files(run) == at_failure  # every earlier file whole, byte for byte
    assert not list(run.rglob("*.tmp"))
    assert torch.load(best, weights_only=True)["step"] == 1  # the step-1 checkpoint still loads

