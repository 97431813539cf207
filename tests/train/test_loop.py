"""The training loop on a toy 3D segmentation task: learning, run files, exact resume, early stopping, gradient
accumulation, and DDP (two CPU processes) against one process with the same global batch."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medtransfer.train.distributed import EpochShuffleSampler
from medtransfer.train.loop import FitResult, fit

torch.set_num_threads(1)

_spec = importlib.util.spec_from_file_location("_ddp_worker", Path(__file__).with_name("_ddp_worker.py"))
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)
make_run = worker.make_run


def _eval_loss(model, kwargs) -> float:
    data = worker.ToyData(8)
    with torch.no_grad():
        batch = [data[i] for i in range(len(data))]
        image = torch.stack([b["image"] for b in batch])
        label = torch.stack([b["label"] for b in batch])
        return float(kwargs["loss_fn"](model(image), label))


def test_loss_falls_and_run_files(tmp_path):
    model, loader, val, kwargs = make_run(2, max_epochs=6, lr=0.2)
    before = _eval_loss(model, kwargs)
    result = fit(model, loader, val, run_dir=tmp_path, **kwargs)
    after = _eval_loss(model, kwargs)
    assert after < 0.7 * before, (before, after)
    assert isinstance(result, FitResult)
    assert (result.last_step, result.epochs, result.stopped_early) == (24, 6, False)  # 8 samples / batch 2 * 6
    assert result.best_metric is not None and result.best_metric > 0.5
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert last["format"] == "medtransfer-run/1" and last["step"] == 24 and last["epoch"] == 6
    assert set(last) >= {"model", "optimizer", "schedule", "step", "epoch", "best_metric", "best_step",
                         "bad_validations", "rng"}
    assert not any(k.startswith("module.") for k in last["model"])
    assert all(torch.equal(last["model"][k], v) for k, v in model.state_dict().items())
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert best["step"] == result.best_step and best["metric"] == pytest.approx(result.best_metric)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12, 16, 20, 24]  # one validation per epoch
    assert set(records[0]) >= {"step", "epoch", "lr", "train_loss", "val", "time", "data_wait"}
    assert records[0]["lr"] == {"head": 0.2, "encoder": 0.2} or records[0]["lr"] == {"encoder": 0.2, "head": 0.2}
    assert {"loss", "dice_mean"} <= set(records[0]["val"])
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert 0.0 <= records[0]["data_wait"] <= 1.0


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("interrupt_at", [3, 4])  # mid-epoch and exactly at an epoch boundary
def test_resume_is_bit_identical(tmp_path, interrupt_at):
    common = dict(max_epochs=3, val_every=2, val_interval="step", optim="adam", lr=0.01, dropout=0.3)
    model, loader, val, kwargs = make_run(2, max_steps=10, **common)
    fit(model, loader, val, run_dir=tmp_path / "straight", **kwargs)
    straight = _params(model)

    model, loader, val, kwargs = make_run(2, max_steps=interrupt_at, **common)
    first = fit(model, loader, val, run_dir=tmp_path / "cut", **kwargs)
    assert first.last_step == interrupt_at
    torch.rand(5)  # the interrupted process's generators moved on; resume must restore them
    model, loader, val, kwargs = make_run(2, max_steps=10, seed=0, **common)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # nothing of the fresh model may survive the resume
    result = fit(model, loader, val, run_dir=tmp_path / "cut", resume=True, **kwargs)
    assert result.last_step == 10
    resumed = _params(model)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if json.loads(x)["val"]] == [2, 4, 6, 8, 10]


def test_early_stopping(tmp_path):
    # Watch the val loss in "max" mode while training lowers it: every validation after the first is "worse".
    model, loader, val, kwargs = make_run(2, max_epochs=20, early_stop_patience=2, lr=0.2)
    kwargs["monitor"] = ("loss", "max")
    result = fit(model, loader, val, run_dir=tmp_path, **kwargs)
    assert result.stopped_early
    assert result.epochs == 3 and result.last_step == 12  # best at epoch 1, then 2 worse validations
    assert result.best_step == 4
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert last["bad_validations"] == 2


def test_grad_accumulation_matches_larger_batch(tmp_path):
    # 8 samples: batch 1 x accum 2 -> 4 optimiser steps per epoch, same samples per step as batch 2 (same sampler).
    a_model, a_loader, _, a_kwargs = make_run(1, max_epochs=2, accum_steps=2, lr=0.1)
    res = fit(a_model, a_loader, None, run_dir=tmp_path / "a", **a_kwargs)
    assert res.last_step == 8
    b_model, b_loader, _, b_kwargs = make_run(2, max_epochs=2, lr=0.1)
    fit(b_model, b_loader, None, run_dir=tmp_path / "b", **b_kwargs)
    for (k, a), b in zip(a_model.state_dict().items(), b_model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=k)


def test_frozen_encoder_linear_probe(tmp_path):
    model, loader, val, kwargs = make_run(2, max_epochs=1, freeze_encoder_steps=-1, norm=True)
    enc = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("encoder.")}
    head = model.head.weight.clone()
    fit(model, loader, val, run_dir=tmp_path, **kwargs)
    for k, v in enc.items():  # weights and batch-norm running statistics unchanged
        assert torch.equal(model.state_dict()[k], v), k
    assert not torch.equal(model.head.weight, head)


def test_sampler_order_depends_on_seed_and_epoch_only():
    s = EpochShuffleSampler(6, seed=3)
    s.set_epoch(1)
    first = list(s)
    s.set_epoch(2)
    assert sorted(list(s)) == list(range(6)) and list(s) != first
    s.set_epoch(1)
    assert list(s) == first
    shards = [list(EpochShuffleSampler(5, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    full = list(EpochShuffleSampler(5, seed=3))
    assert shards[0] == [full[0], full[2], full[4]] and shards[1] == [full[1], full[3], full[0]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available in this build")
def test_ddp_matches_single_process_global_batch(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(Path(__file__).with_name("_ddp_worker.py")), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ddp["step"] == 4  # 8 samples / global batch 4 * 2 epochs

    model, loader, val, kwargs = make_run(4, max_epochs=2)
    fit(model, loader, val, run_dir=tmp_path / "single", **kwargs)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ddp["model"][k], v, atol=1e-5, rtol=1e-5, msg=k)


def test_encoder_frozen_for_first_steps_then_trains(tmp_path):
    model, loader, val, kwargs = make_run(2, max_steps=2, freeze_encoder_steps=2)
    enc = model.encoder[0].weight.clone()
    fit(model, loader, val, run_dir=tmp_path / "a", **kwargs)
    assert torch.equal(model.encoder[0].weight, enc)  # steps 0 and 1 frozen
    model, loader, val, kwargs = make_run(2, max_steps=3, freeze_encoder_steps=2)
    fit(model, loader, val, run_dir=tmp_path / "b", **kwargs)
    assert not torch.equal(model.encoder[0].weight, enc)  # step 2 trains the encoder
    assert all(p.requires_grad for p in model.parameters())


class _EpochLoader:
    """A loader of its own making (like MultiDatasetLoader): the loop must call its set_epoch."""

    def __init__(self, loader):
        self.loader, self.epochs = loader, []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def test_loader_set_epoch_and_a_fresh_run_drops_old_checkpoints(tmp_path):
    model, loader, val, kwargs = make_run(2, max_epochs=3, lr=0.2)
    wrapped = _EpochLoader(loader)
    fit(model, wrapped, val, run_dir=tmp_path, **kwargs)
    assert wrapped.epochs == [0, 1, 2]
    assert (tmp_path / "checkpoints" / "best.pt").is_file()
    # the same folder again without validation: the earlier run's best.pt must not survive as this run's
    model, loader, _, kwargs = make_run(2, max_epochs=1, lr=0.2)
    fit(model, loader, None, run_dir=tmp_path, **kwargs)
    assert not (tmp_path / "checkpoints" / "best.pt").exists()
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1


_STEP_LINE = re.compile(r"step (\d+)/24 epoch (\d)/6 loss (\S+) lr 0\.2 (\S+) s/it eta \S+")
# a validation right after a step line: nothing new to say about training, so only the validation and the eta
_VAL_LINE = re.compile(r"step (\d+)/24 epoch (\d)/6 val loss (\S+) dice_mean (\S+) \(best (\S+) at step (\d+)\) "
                       r"eta \S+")


def test_plain_progress_lines_when_stderr_is_not_a_terminal(tmp_path, capsys):
    model, loader, val, kwargs = make_run(2, max_epochs=6, lr=0.2)
    fit(model, loader, val, run_dir=tmp_path, **{**kwargs, "progress": True})
    lines = capsys.readouterr().err.strip().splitlines()
    steps = [_STEP_LINE.fullmatch(line) for line in lines]
    vals = [_VAL_LINE.fullmatch(line) for line in lines]
    assert all(a or b for a, b in zip(steps[:-1], vals[:-1])), lines  # every line but the last is one of the two
    # 24 steps, 10 lines per run -> every 2 steps, plus the first; epochs of 4 steps
    assert [int(m[1]) for m in steps if m] == [1] + list(range(2, 25, 2))
    assert all(int(m[2]) == (int(m[1]) - 1) // 4 + 1 for m in steps if m)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val_lines = [m for m in vals if m]
    assert [int(m[1]) for m in val_lines] == [r["step"] for r in records] == [4, 8, 12, 16, 20, 24]
    for m, r in zip(val_lines, records):
        assert float(m[3]) == pytest.approx(r["val"]["loss"], rel=1e-3)
        assert float(m[4]) == pytest.approx(r["val"]["dice_mean"], rel=1e-3)
    # a line's loss is the mean over its steps: the lines of steps 6 and 8 make up epoch 2's train_loss
    by_step = {int(m[1]): float(m[3]) for m in steps if m}
    assert (by_step[6] + by_step[8]) / 2 == pytest.approx(records[1]["train_loss"], rel=1e-3)
    best = max(records, key=lambda r: r["val"]["dice_mean"])
    done = re.fullmatch(r"done: 24 steps in \S+, best dice_mean (\S+) at step (\d+)", lines[-1])
    assert done and (float(done[1]), int(done[2])) == (pytest.approx(best["val"]["dice_mean"], rel=1e-3), best["step"])


def test_plain_progress_every_interval_and_silent_when_disabled(tmp_path, capsys, monkeypatch):
    from medtransfer.train import progress

    monkeypatch.setattr(progress, "PROGRESS_INTERVAL_S", 0.0)  # every step is "30 s later"
    model, loader, val, kwargs = make_run(2, max_steps=6, max_epochs=None, val_every=3, val_interval="step")
    fit(model, loader, val, run_dir=tmp_path / "a", **{**kwargs, "progress": True})
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split()[1] for line in lines if " loss " in line and " val " not in line] == [
        f"{i}/6" for i in range(1, 7)]
    assert all(" epoch " in line and "/" not in line.split(" epoch ")[1].split()[0] for line in lines[:-1])
    assert sum(" val loss " in line for line in lines) == 2 and lines[-1].startswith("done: 6 steps")
    model, loader, val, kwargs = make_run(2, max_steps=6, max_epochs=None)
    fit(model, loader, val, run_dir=tmp_path / "b", **kwargs)  # progress=False
    assert capsys.readouterr().err == ""
