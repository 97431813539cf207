"""``train.save_last``: checkpoint writes bounded by the validations that improved (issue 12), and the fields of every
``metrics.jsonl`` validation record that the demo's "time to reach scratch's Dice" reads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from medtransfer.train import loop

torch.set_num_threads(1)

_spec = importlib.util.spec_from_file_location("_ddp_worker", Path(__file__).with_name("_ddp_worker.py"))
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

# 8 steps (4 batches of 2 per epoch, 2 epochs), validation every 2 steps: 4 validations
COMMON = dict(max_epochs=None, max_steps=8, val_every=2, val_interval="step", optim="adam", lr=0.01)


def _run(tmp_path: Path, monkeypatch, save_last: str, **train) -> tuple[list[tuple[str, int]], list[dict]]:
    writes: list[tuple[str, int]] = []
    real = loop.save_run_checkpoint

    def counting(path, state):
        writes.append((Path(path).name, int(state["step"])))
        return real(path, state)

    monkeypatch.setattr(loop, "save_run_checkpoint", counting)
    model, loader, val, kwargs = worker.make_run(2, save_last=save_last, **{**COMMON, **train})
    name = "-".join([save_last, *map(str, train.values())])
    loop.fit(model, loader, val, run_dir=tmp_path / name, **kwargs)
    records = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return writes, records


def _improving(records: list[dict]) -> list[int]:
    best, steps = None, []
    for r in records:
        if r["val"] is not None and (best is None or r["val"]["dice_mean"] > best):
            best = r["val"]["dice_mean"]
            steps.append(r["step"])
    return steps


@pytest.mark.parametrize("save_last, extra", [("never", []), ("end", [("last.pt", 8)])])
def test_writes_are_the_improving_validations_plus_the_end(tmp_path, monkeypatch, save_last, extra):
    writes, records = _run(tmp_path, monkeypatch, save_last)
    improving = _improving(records)
    assert len([r for r in records if r["val"] is not None]) == 4 and improving
    assert writes == [("best.pt", s) for s in improving] + extra
    names = sorted(p.name for p in (tmp_path / save_last / "checkpoints").iterdir())
    assert names == (["best.pt"] if save_last == "never" else ["best.pt", "last.pt"])


def test_every_validation_is_the_default_and_writes_last_at_each(tmp_path, monkeypatch):
    writes, records = _run(tmp_path, monkeypatch, "every_validation")
    assert loop.TrainConfig().save_last == "every_validation"
    # after each validation, at each of the 2 epoch ends (steps 4 and 8) and at the run's end
    assert [s for name, s in writes if name == "last.pt"] == [2, 4, 4, 6, 8, 8, 8]
    assert [s for name, s in writes if name == "best.pt"] == _improving(records)


def test_validation_records_carry_step_and_time(tmp_path, monkeypatch):
    _, records = _run(tmp_path, monkeypatch, "never")
    vals = [r for r in records if r["val"] is not None]
    assert [r["step"] for r in vals] == [2, 4, 6, 8]
    times = [r["time"] for r in vals]
    assert all(isinstance(t, float) and t > 0 for t in times) and times == sorted(times)


def test_save_best_end_writes_the_best_weights_once_and_the_same_ones(tmp_path, monkeypatch):
    every, records = _run(tmp_path, monkeypatch, "never")
    every = list(every)  # the second run's counter wraps the first one's, which goes on counting
    once, records_end = _run(tmp_path, monkeypatch, "never", save_best="end")
    improving = _improving(records)
    assert records_end == [dict(r, time=e["time"], data_wait=e["data_wait"]) for r, e in zip(records, records_end)]
    assert len(improving) > 1 and every == [("best.pt", s) for s in improving]
    assert once == [("best.pt", improving[-1])]  # one write, at the end, of the last improvement
    a = torch.load(tmp_path / "never" / "checkpoints" / "best.pt", weights_only=True)
    b = torch.load(tmp_path / "never-end" / "checkpoints" / "best.pt", weights_only=True)
    assert a.keys() == b.keys() and a["step"] == b["step"] and a["metric"] == b["metric"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_save_best_end_needs_a_run_that_is_not_resumed_mid_way():
    with pytest.raises(ValueError, match="save_best: end .* save_last: end or never"):
        loop.TrainConfig(max_steps=2, save_best="end")
    assert loop.TrainConfig(max_steps=2, save_best="end", save_last="end").save_best == "end"
