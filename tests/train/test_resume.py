"""Resuming a fine-tune (issue 11): from the folder alone, changes refused before anything is written, metrics.jsonl
exact after a kill, temporary files of a kill removed, Ctrl-C's one line, and clear words for a cut or unsafe
checkpoint in resume, evaluate and predict."""

from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from medtransfer.cli import app
from medtransfer.data.phantoms import write_phantom_dataset
from medtransfer.errors import CheckpointError, MedTransferError, UnsafeCheckpointError
from medtransfer.train import loop
from medtransfer.train.finetune import evaluate, predict, run_finetune

torch.set_num_threads(1)

_spec = importlib.util.spec_from_file_location("_ddp_worker", Path(__file__).with_name("_ddp_worker.py"))
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

RUN_FILES = ("config.yaml", "run.json", "contract.json", "env.json", "split.json", "metrics.jsonl",
             "checkpoints/last.pt", "checkpoints/best.pt")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("data"), 4, 0, shape=(32, 32, 32), spacing=(5.0, 5.0, 5.0))


def _args(out: Path, data: Path, steps: int = 2) -> list[str]:
    return ["finetune", "--model", "genesis_unet3d", "--data", str(data), "--out", str(out),
            "--set", "data.patch_size=[16,16,16]", "--set", "data.val_fraction=0.5", "--set", f"train.max_steps={steps}",
            "--set", "train.max_epochs=null", "--set", "train.val_interval=step", "--set", "train.val_every=1"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, phantoms):
    """A CLI run of 2 steps, validated at each."""
    out = tmp_path_factory.mktemp("runs") / "run"
    result = CliRunner().invoke(app, _args(out, phantoms))
    assert result.exit_code == 0, result.output
    return out


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _copy(run: Path, to: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, to))


def test_resume_from_the_folder_alone_continues_the_run(tmp_path, finished, phantoms):
    run = _copy(finished, tmp_path / "run")
    # today: "model: Field required"; the folder's config.yaml is enough, a longer run may be asked for
    result = CliRunner().invoke(app, ["finetune", "--out", str(run), "--resume", "--set", "train.max_steps=3"])
    assert result.exit_code == 0, result.output
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 3
    assert "max_steps: 3" in (run / "config.yaml").read_text()  # the value in use is the one recorded
    env = json.loads((run / "env.json").read_text())
    assert env["resume"] is False and len(env["resumes"]) == 1  # the first process's environment, then the resume
    # flags that only repeat the saved values are fine; the library takes the folder too
    result = CliRunner().invoke(app, ["finetune", "--out", str(run), "--resume", "--model", "genesis_unet3d",
                                      "--data", str(phantoms), "--set", "train.max_steps=4"])
    assert result.exit_code == 0, result.output
    assert run_finetune(run, resume=True, progress=False) == run
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 4


@pytest.mark.parametrize("change, field, old, new", [
    (["--model", "fmunet"], "model.name", "'genesis_unet3d'", "'fmunet'"),
    (["--set", "optim.lr=0.5"], "optim.lr", "0.001", "0.5"),
    (["--seed", "3"], "train.seed", "0", "3"),
])
def test_resume_refuses_a_change_it_cannot_honour_before_writing(tmp_path, finished, change, field, old, new):
    run = _copy(finished, tmp_path / "run")
    before = _snapshot(run)
    result = CliRunner().invoke(app, ["finetune", "--out", str(run), "--resume", *change])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert f"{field}: {old} in the run, {new} now" in " ".join(result.output.split())
    assert _snapshot(run) == before  # config.yaml, run.json, contract.json, env.json, cache: all untouched
    assert evaluate(run) == run / "evaluation"  # and the run still evaluates


def test_a_length_change_under_a_whole_run_cosine_schedule_is_refused(tmp_path, phantoms):
    out = tmp_path / "run"
    args = _args(out, phantoms) + ["--set", "schedule.name=cosine", "--set", "schedule.interval=step"]
    assert CliRunner().invoke(app, args).exit_code == 0
    result = CliRunner().invoke(app, ["finetune", "--out", str(out), "--resume", "--set", "train.max_steps=4"])
    assert result.exit_code == 2 and "train.max_steps: 2 in the run, 4 now" in " ".join(result.output.split())


class _Kill(BaseException):
    """A SIGKILL stand-in: nothing catches it, no cleanup code runs for it in the loop."""


def _strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("time", "data_wait")} for r in records]


def _records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_metrics_end_exactly_as_an_uninterrupted_run_after_a_kill_before_last_pt(tmp_path, monkeypatch):
    common = dict(max_epochs=None, val_every=2, val_interval="step", optim="adam", lr=0.01)
    model, train, val, kwargs = worker.make_run(2, max_steps=8, **common)
    loop.fit(model, train, val, run_dir=tmp_path / "straight", **kwargs)

    real = loop.save_run_checkpoint

    def killed_at_step_4(path, state):
        if Path(path).name == "last.pt" and state["step"] == 4:
            (Path(path).parent / ".last.pt.k1ll3d_x.tmp").write_bytes(b"\0" * 1000)  # what a kill mid-write leaves
            raise _Kill
        return real(path, state)

    monkeypatch.setattr(loop, "save_run_checkpoint", killed_at_step_4)
    model, train, val, kwargs = worker.make_run(2, max_steps=8, **common)
    with pytest.raises(_Kill):
        loop.fit(model, train, val, run_dir=tmp_path / "cut", **kwargs)
    cut = tmp_path / "cut"
    assert [r["step"] for r in _records(cut / "metrics.jsonl")] == [2, 4]  # the record came before the checkpoint
    with (cut / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "ep')  # and a kill mid-append leaves half a line
    monkeypatch.setattr(loop, "save_run_checkpoint", real)
    model, train, val, kwargs = worker.make_run(2, max_steps=8, **common)
    loop.fit(model, train, val, run_dir=cut, resume=True, **kwargs)
    assert [r["step"] for r in _records(cut / "metrics.jsonl")] == [2, 4, 6, 8]  # today [2, 4, 4, 6, 8]
    assert _strip(_records(cut / "metrics.jsonl")) == _strip(_records(tmp_path / "straight" / "metrics.jsonl"))
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["best.pt", "last.pt"]  # the temp is gone


def test_a_new_run_removes_temporary_files_of_atomic_write_only(tmp_path):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    ours = [ckpt / ".last.pt.a1b2c3d4.tmp", tmp_path / ".metrics.jsonl.zz_9y8x7.tmp"]
    theirs = [ckpt / "notes.tmp", ckpt / ".last.pt.tmp", tmp_path / "keep.txt"]
    for p in ours + theirs:
        p.write_text("x")
    model, train, val, kwargs = worker.make_run(2, max_steps=1, max_epochs=None)
    loop.fit(model, train, val, run_dir=tmp_path, **kwargs)
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)


def test_ctrl_c_says_what_was_saved_and_how_to_resume(tmp_path, phantoms, monkeypatch):
    out = tmp_path / "run"
    real = loop._Progress.after_step

    def interrupt_at_2(self, step, *args):
        if step == 2:
            raise KeyboardInterrupt
        return real(self, step, *args)

    monkeypatch.setattr(loop._Progress, "after_step", interrupt_at_2)
    result = CliRunner().invoke(app, _args(out, phantoms, steps=3))
    assert result.exit_code == 130
    assert result.output.strip().splitlines()[-1] == (
        f"interrupted at step 2: {out / 'checkpoints' / 'last.pt'} holds step 1; "
        f"resume with: medtransfer finetune --out {out} --resume")
    assert "Traceback" not in result.output and "Aborted" not in result.output
    monkeypatch.setattr(loop._Progress, "after_step", real)
    result = CliRunner().invoke(app, ["finetune", "--out", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    # before any checkpoint: nothing saved, say so
    from medtransfer.train.checkpoint import TrainingInterrupted

    monkeypatch.setattr(loop._Progress, "after_step", lambda self, step, *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(TrainingInterrupted) as info:
        run_finetune(tmp_path / "run" / "config.yaml", overwrite=True, progress=False)
    assert info.value.saved_step is None and "nothing was saved yet" in info.value.message("x")


class _Code:
    def __reduce__(self):
        return (print, ("this ran",))


def _plant_code(path: Path) -> None:
    torch.save({"model": {}, "format": "medtransfer-run/1", "payload": _Code()}, path)


def test_cut_and_unsafe_checkpoints_are_named_in_resume_evaluate_and_predict(tmp_path, finished, capsys):
    run = _copy(finished, tmp_path / "run")
    scan = tmp_path / "scan.nii.gz"
    image = sitk.GetImageFromArray(np.zeros((16, 16, 16), np.int16))
    image.SetSpacing((5.0, 5.0, 5.0))
    sitk.WriteImage(image, str(scan))
    for name in ("last.pt", "best.pt"):
        path = run / "checkpoints" / name
        good = path.read_bytes()
        path.write_bytes(good[: len(good) // 2])  # a kill mid-write of a plain copy, or a full disk
        calls = ([lambda: run_finetune(run, resume=True, progress=False)] if name == "last.pt"
                 else [lambda: evaluate(run, overwrite=True), lambda: predict(run, [scan], tmp_path / "p")])
        for call in calls:
            with pytest.raises(CheckpointError, match=rf"{name}: the checkpoint is incomplete \(cut short by a kill "
                                                      r"while it was written, or a full disk\) and was not loaded; "):
                call()
        _plant_code(path)
        for call in calls:
            with pytest.raises(UnsafeCheckpointError, match=rf"{name}: not loaded: the checkpoint holds Python "
                                                            "objects that would execute code"):
                call()
        assert "this ran" not in capsys.readouterr().out
        path.write_bytes(good)
    result = CliRunner().invoke(app, ["evaluate", str(run)])
    assert result.exit_code == 0, result.output
    (run / "checkpoints" / "best.pt").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    result = CliRunner().invoke(app, ["evaluate", str(run), "--overwrite"])
    assert result.exit_code == 2 and "best.pt: the checkpoint is incomplete" in result.output
    assert "copy it over best.pt" in " ".join(result.output.split()) and "Traceback" not in result.output
