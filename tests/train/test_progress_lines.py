"""``finetune`` and ``pretrain`` on a stderr that is not a terminal (a log, SLURM) print plain progress lines."""

from __future__ import annotations

import re

import pytest
import torch
from typer.testing import CliRunner

from medtransfer.cli import app
from medtransfer.data.phantoms import write_phantom_dataset

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("data"), 4, 0, shape=(16, 32, 32), spacing=(5.0, 5.0, 5.0))


def _lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith(("step ", "done: "))]


def test_finetune_command_prints_progress_lines(tmp_path, phantoms):
    result = CliRunner().invoke(app, [
        "finetune", "--model", "genesis_unet3d", "--data", str(phantoms), "--out", str(tmp_path / "run"),
        "--set", "train.max_steps=3", "--set", "data.patch_size=[16,16,16]", "--set", "data.batch_size=2",
        "--set", "data.val_fraction=0.5", "--set", "train.val_interval=step", "--set", "train.val_every=3"])
    assert result.exit_code == 0, result.output
    lines = _lines(result)
    assert [line.split()[1] for line in lines[:-1]] == ["1/3", "2/3", "3/3", "3/3"], lines
    assert re.fullmatch(r"step 1/3 epoch 1 loss \S+ lr \S+ \S+ s/it eta \S+", lines[0])
    assert re.fullmatch(r"step 3/3 epoch \d val loss \S+ dice_mean \S+ \(best \S+ at step 3\) eta \S+", lines[3])
    assert re.fullmatch(r"done: 3 steps in \S+, best dice_mean \S+ at step 3", lines[-1])
    assert result.stdout.strip().endswith("run")  # the run folder, alone on stdout


def test_pretrain_command_prints_progress_lines(tmp_path, phantoms):
    result = CliRunner().invoke(app, [
        "pretrain", "--method", "genesis", "--data", str(phantoms), "--out", str(tmp_path / "pre"),
        "--recipe", "none", "--set", "train.max_steps=2", "--set", "train.max_epochs=null",
        "--set", "data.patch_size=[16,32,32]", "--set", "data.val_fraction=0"])
    assert result.exit_code == 0, result.output
    lines = _lines(result)
    assert [line.split()[1] for line in lines[:-1]] == ["1/2", "2/2"], lines
    assert all(re.fullmatch(r"step \d/2 epoch \d+ loss \S+ lr \S+ \S+ s/it eta \S+", line) for line in lines[:-1])
    assert re.fullmatch(r"done: 2 steps in \S+", lines[-1])
