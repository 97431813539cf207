"""Pretrain resume and run folders (issue 11): the folder alone resumes, a changed config is refused before anything
is written (the same comparison as finetune), a new run never writes into an old one without --overwrite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medtransfer.cli import app
from medtransfer.data.phantoms import write_phantom_dataset
from medtransfer.pretext.runner import run_pretrain

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantoms") / "ds"
    write_phantom_dataset(root, 4, 0, shape=(16, 32, 32), spacing=(5.0, 5.0, 5.0))
    return root


def _args(out: Path, data: Path, *extra: str) -> list[str]:
    return ["pretrain", "--method", "genesis", "--data", str(data), "--out", str(out), "--recipe", "none",
            "--set", "data.patch_size=[16,32,32]", "--set", "data.batch_size=2", "--set", "data.val_batches=1",
            "--set", "data.val_fraction=0.25", "--set", "train.max_steps=1", "--set", "train.max_epochs=null",
            "--set", "train.val_interval=step", "--set", "train.val_every=1", *extra]


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_resume_from_the_folder_refuses_changes_and_guards_the_folder(tmp_path, phantoms):
    run = tmp_path / "run"
    result = CliRunner().invoke(app, _args(run, phantoms))
    assert result.exit_code == 0, result.output
    # the folder alone resumes (today: "method: Field required")
    result = CliRunner().invoke(app, ["pretrain", "--out", str(run), "--resume", "--set", "train.max_steps=2"])
    assert result.exit_code == 0, result.output
    assert _steps(run) == [1, 2] and "max_steps: 2" in (run / "config.yaml").read_text()
    before = _snapshot(run)
    for change, text in ((["--set", "optim.lr=0.5"], "optim.lr: 0.001 in the run, 0.5 now"),
                         (["--method", "volf"], "method: 'genesis' in the run, 'volf' now")):
        result = CliRunner().invoke(app, ["pretrain", "--out", str(run), "--resume", *change])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert text in " ".join(result.output.split())
        assert _snapshot(run) == before
    # a new run into it: refused, nothing written; --overwrite replaces it
    result = CliRunner().invoke(app, _args(run, phantoms))
    assert result.exit_code == 2 and f"{run} holds a run already" in " ".join(result.output.split())
    assert _snapshot(run) == before
    result = CliRunner().invoke(app, _args(run, phantoms, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert _steps(run) == [1] and (run / "pretrained.safetensors").is_file()
    assert run_pretrain(run, resume=True, overrides=("train.max_steps=2",), progress=False) == run
    assert _steps(run) == [1, 2]
