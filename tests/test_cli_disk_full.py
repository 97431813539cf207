"""A disk that fills up mid-write: torch's zip writer fails with ``RuntimeError: [enforce fail at
inline_container.cc:672] . unexpected pos ...`` (as issue 11 met it; torch passes no errno on), other writers with
``OSError(ENOSPC)``. Either way the previous file stays whole, the temporary file goes, and the CLI
says which file could not be written, in one line, exit 1."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medtransfer.cli import app
from medtransfer.data.phantoms import write_phantom_dataset
from medtransfer.paths import describe_os_error
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



def test_atomic_write_names_the_target_when_the_temporary_file_cannot_be_made(tmp_path, monkeypatch):
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):  # what mkstemp meets in a folder this process cannot write
        if Path(os.fsdecode(path)).parent == tmp_path and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(PermissionError) as err:
        atomic_write(tmp_path / "report.md", lambda tmp: tmp.write_text("x"))
    assert Path(err.value.filename).name.startswith(".report.md.")
    assert err.value.output_path == tmp_path / "report.md"
    assert describe_os_error(err.value) == (f"could not write {tmp_path / 'report.md'}: permission denied; choose a "
                                            "folder you can write to")


def test_atomic_write_keeps_the_name_of_another_file_it_could_not_use(tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(OSError) as err:
        atomic_write(blocker / "seg" / "config.yaml", lambda tmp: tmp.write_text("x"))
    assert getattr(err.value, "output_path", None) is None and err.value.filename == str(blocker / "seg")
    assert describe_os_error(err.value) == (f"{blocker / 'seg'}: {blocker} is a file, not a folder; give a path "
                                            "inside a folder")
