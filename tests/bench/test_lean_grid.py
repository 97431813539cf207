"""Lean benchmark grids (issue 12): one prepared cache per (dataset, pipeline) shared by every run of a grid and
prepared once (counted), ``keep: best | none | all``, ``last.pt`` never written inside a grid, and a grid killed in
the middle of a fine-tune that resumes to exactly the store of an uninterrupted one.

The grids here are real: 6 phantoms of 16^3 voxels, genesis_unet3d on 16^3 patches, 2 optimiser steps per run."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from medtransfer.bench import grid
from medtransfer.bench.store import ResultStore
from medtransfer.data.cache import PreparedCache
from medtransfer.data.phantoms import write_phantom_dataset
from medtransfer.errors import MedTransferError
from medtransfer.train import loop
from medtransfer.train.finetune import evaluate, predict

torch.set_num_threads(1)

N_CASES = 6


def _config(data: Path, keep: str = "best") -> dict:
    return {
        "name": "lean",
        "model": {"name": "genesis_unet3d"},
        "inits": [{"name": "scratch"}, {"name": "fast", "finetune": {"optim": {"lr": 0.01}}},
                  {"name": "zs", "finetune": {"data": {"preset": "zscore"}}}],  # another pipeline: its own cache
        "tasks": [{"name": "seg", "data": str(data), "task": "segmentation"}],
        "trials": 2,
        "keep": keep,
        "finetune": {"data": {"patch_size": [16, 16, 16], "batch_size": 2, "val_fraction": 0.2},
                     "train": {"max_steps": 2, "max_epochs": None, "val_interval": "step", "val_every": 1}},
    }


def _rows(path: Path) -> dict[str, tuple]:
    with ResultStore(path) as store:
        return {r["run_id"]: (r["status"], r["metric"], r["metrics"], r["steps"], r["preset"]) for r in store.rows()}


class _Counting:
    """Counts, per cache folder, the cases each ``PreparedCache.prepare`` prepared (``redone``)."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.calls: list[Path] = []
        self.redone: Counter = Counter()
        real = PreparedCache.prepare

        def prepare(cache, *args, **kwargs):
            out = real(cache, *args, **kwargs)
            self.calls.append(Path(cache.root))
            self.redone[Path(cache.root)] += cache.redone
            return out

        mp.setattr(PreparedCache, "prepare", prepare)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("data"), N_CASES, 0, shape=(16, 16, 16),
                                 spacing=(10.0, 10.0, 10.0), with_2d=False)


@pytest.fixture(scope="module")
def full(tmp_path_factory, data):
    """An uninterrupted grid (3 inits x 2 trials), with the prepares and the checkpoint writes counted."""
    out = tmp_path_factory.mktemp("full") / "grid"
    writes: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        counting = _Counting(mp)
        real = loop.save_run_checkpoint
        mp.setattr(loop, "save_run_checkpoint", lambda path, state: (writes.append(Path(path).name),
                                                                     real(path, state))[1])
        grid.run_benchmark(_config(data), out=out, progress=False)
    return out, counting, writes


def test_the_grid_prepares_each_case_once_per_pipeline(full):
    out, counting, _ = full
    roots = sorted({p.parent for p in counting.calls})
    assert roots == [out / "cache" / "seg"]
    assert len(counting.calls) == 6  # every run asks, and finds the cache ready after the first of its pipeline
    assert sorted(counting.redone.values()) == [N_CASES, N_CASES]  # genesis_ct (scratch, fast) and zscore (zs)
    runs = sorted((out / "runs").glob("seg/*/f1/s*"))
    assert len(runs) == 6 and not any((r / "cache").exists() for r in runs)
    caches = {r.parts[-3]: json.loads((r / "run.json").read_text())["cache"] for r in runs}
    assert caches["scratch"] == caches["fast"] != caches["zs"]
    assert all(Path(c).parent == out / "cache" / "seg" for c in caches.values())
    assert (Path(caches["zs"]) / ".prepare.lock").is_file()


def test_keep_best_leaves_weights_only_and_no_last_pt(full, data, tmp_path):
    out, _, writes = full
    # save_last: never and save_best: end inside a grid: one write per run, its best weights at its end
    assert writes == ["best.pt"] * 6
    run = out / "runs" / "seg" / "fast" / "f1" / "s1"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["best.pt"]
    state = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert set(state) == {"model", "step", "epoch", "metric", "monitor", "format"}
    assert (run / "evaluation-test" / "summary.json").is_file()
    # evaluate and predict read the run's cache and best.pt later on
    assert (evaluate(run, split="val", overwrite=True) / "summary.json").is_file()
    image = next((data / "imagesTr").iterdir())
    (written,) = predict(run, [image], tmp_path / "pred")
    assert written.is_file()
    text = (out / "grid.yaml").read_text()
    assert "keep: best" in text


def test_a_run_thinned_by_keep_none_says_so_when_evaluated(full, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(full[0] / "runs" / "seg" / "fast" / "f1" / "s0", run)
    grid.apply_keep("none", run)
    assert not (run / "checkpoints").exists()
    with pytest.raises(MedTransferError, match="keeps no weights .*keep: none"):
        evaluate(run, split="val")


def test_a_killed_grid_with_keep_best_resumes_to_the_same_store(full, data, tmp_path, monkeypatch):
    expected = _rows(full[0] / "store.sqlite")
    assert len(expected) == 6 and {v[0] for v in expected.values()} == {"done"}
    counting = _Counting(monkeypatch)
    real_step = loop._Run.optimizer_step
    steps = {"n": 0}

    def killed_in_the_fourth_run(self, micro):  # runs 1-3 take 2 steps each; the 4th dies after its first step
        steps["n"] += 1
        if steps["n"] == 8:
            raise KeyboardInterrupt
        return real_step(self, micro)

    monkeypatch.setattr(loop._Run, "optimizer_step", killed_in_the_fourth_run)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        grid.run_benchmark(_config(data), out=out, progress=False)
    partial = _rows(out / "store.sqlite")
    assert Counter(v[0] for v in partial.values()) == {"done": 3, "running": 1, "pending": 2}
    killed = next(r for r, v in partial.items() if v[0] == "running")
    assert killed == "seg/scratch/f1/s1"
    # a killed run keeps its folder; its best weights were only in memory (save_best: end), the redo writes them
    assert (out / "runs" / killed / "config.yaml").is_file()
    assert not (out / "runs" / killed / "checkpoints" / "best.pt").exists()

    monkeypatch.setattr(loop._Run, "optimizer_step", real_step)
    grid.run_benchmark(_config(data), out=out, progress=False)
    assert _rows(out / "store.sqlite") == expected
    assert sorted(counting.redone.values()) == [N_CASES, N_CASES]  # the resumed grid prepared nothing again
    with ResultStore(out / "store.sqlite") as store:
        assert store.row(killed)["attempts"] == 2
    for run in (out / "runs").glob("seg/*/f1/s*"):
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["best.pt"], run


class _FakeRun:
    """A stand-in for a cell's fine-tune that leaves both checkpoints, and dies in the middle of the third run."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, cfg, cell, pretrained, grid_dir, progress=False):
        self.n += 1
        run = Path(grid_dir) / "runs" / cell["run_id"]
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
        for name in ("last.pt", "best.pt"):
            (run / "checkpoints" / name).write_bytes(b"w")
        if self.n == 3:
            raise KeyboardInterrupt
        return {"metric": 0.5, "metrics": {"dice_mean": 0.5}, "steps": 2, "run_dir": str(run)}


@pytest.mark.parametrize("keep, left", [("best", ["best.pt"]), ("none", None), ("all", ["best.pt", "last.pt"])])
def test_keep_thins_a_run_only_once_it_is_recorded_done(tmp_path, monkeypatch, keep, left):
    monkeypatch.setattr(grid, "run_cell", _FakeRun())
    config = {"name": "k", "inits": [{"name": "a"}, {"name": "b"}], "baseline": "a", "keep": keep,
              "tasks": [{"name": "seg"}], "trials": 2}
    with pytest.raises(KeyboardInterrupt):
        grid.run_benchmark(config, out=tmp_path, progress=False)
    runs = tmp_path / "runs" / "seg"
    killed = runs / "a" / "f1" / "s1" / "checkpoints"
    assert sorted(p.name for p in killed.iterdir()) == ["best.pt", "last.pt"]  # not recorded: left as it was
    for done in (runs / "a" / "f1" / "s0", runs / "b" / "f1" / "s0"):
        ckpt = done / "checkpoints"
        assert (sorted(p.name for p in ckpt.iterdir()) if ckpt.exists() else None) == left


def test_keep_is_validated_and_does_not_change_the_grid_hash():
    base = {"inits": [{"name": "scratch"}], "tasks": [{"name": "seg"}]}
    hashes = {grid.grid_hash(grid.load_benchmark_config({**base, "keep": k})) for k in ("best", "none", "all")}
    assert len(hashes) == 1 and grid.load_benchmark_config(base).keep == "best"
    with pytest.raises(Exception) as err:
        grid.load_benchmark_config({**base, "keep": "last"})
    assert "keep" in str(err.value) and "'best', 'none' or 'all'" in str(err.value)


def test_storage_values_sit_under_the_configs_own(tmp_path):
    cfg = grid.load_benchmark_config({"inits": [{"name": "scratch"}], "tasks": [{"name": "seg"}], "keep": "all"})
    cell = grid.cells(cfg)[0]
    assert grid.storage_config(cfg, cell, tmp_path) == {"data": {"cache_root": str(tmp_path / "cache" / "seg")},
                                                        "train": {"save_last": "end", "save_best": "end"}}
    assert grid.storage_config(cfg.model_copy(update={"keep": "best"}), cell, tmp_path)["train"] == {
        "save_last": "never", "save_best": "end"}


@pytest.mark.parametrize("keep, left", [("best", []), ("all", ["best.pt", "last.pt"])])
def test_a_finished_pretraining_keeps_its_product_and_drops_its_checkpoints(tmp_path, monkeypatch, keep, left):
    import medtransfer.pretext.runner as runner

    def fake_pretrain(cfg, **kw):
        out = Path(cfg.out)
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        for name in ("last.pt", "best.pt", "pretrained.safetensors"):
            (out / ("" if name.endswith("safetensors") else "checkpoints") / name).write_bytes(b"w")
        return out

    monkeypatch.setattr(runner, "run_pretrain", fake_pretrain)
    monkeypatch.setattr(grid, "run_cell", lambda cfg, cell, pretrained, grid_dir, progress=False: {
        "metric": 0.5, "metrics": {"dice_mean": 0.5}, "steps": 2, "run_dir": None})
    (tmp_path / "pool").mkdir()
    config = {"inits": [{"name": "scratch"}, {"name": "gen", "pretrain": {"method": "genesis", "data": {
        "paths": [str(tmp_path / "pool")]}}}], "tasks": [{"name": "seg"}], "trials": 1, "keep": keep}
    out = grid.run_benchmark(config, out=tmp_path / "g", progress=False)
    product = out / "pretrain" / "gen"
    assert (product / "pretrained.safetensors").is_file()
    ckpt = product / "checkpoints"
    assert (sorted(p.name for p in ckpt.iterdir()) if ckpt.exists() else []) == left


def test_the_grid_says_what_it_keeps_and_where_the_cache_is(tmp_path, monkeypatch):
    monkeypatch.setattr(grid, "run_cell", lambda cfg, cell, pretrained, grid_dir, progress=False: {
        "metric": 0.5, "metrics": {"dice_mean": 0.5}, "steps": 2, "run_dir": None})
    lines: list[str] = []
    grid.run_benchmark({"inits": [{"name": "scratch"}], "tasks": [{"name": "seg"}], "trials": 1}, out=tmp_path,
                       progress=False, echo=lines.append)
    assert lines[0] == (f"keep: best (a finished run keeps checkpoints/best.pt, weights only; grid.yaml records it); "
                        f"prepared cases shared in {tmp_path / 'cache'}")


def test_the_prepare_lock_lets_one_holder_in_at_a_time(tmp_path):
    import threading
    import time

    from medtransfer.train.finetune import _exclusive

    lock, order, inside = tmp_path / "cache" / ".prepare.lock", [], threading.Event()

    def first():
        with _exclusive(lock):
            order.append("first in")
            inside.set()
            time.sleep(0.3)
            order.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    inside.wait()
    with _exclusive(lock):  # another open file description: flock makes it wait for the first holder
        order.append("second in")
    thread.join()
    assert order == ["first in", "first out", "second in"]


def test_a_run_with_a_cache_root_resumes_on_its_shared_cache(tmp_path, data, monkeypatch):
    from medtransfer.train.finetune import run_finetune

    cfg = {"model": {"name": "genesis_unet3d"}, "out": str(tmp_path / "run"),
           "data": {"path": str(data), "patch_size": [16, 16, 16], "cache_root": str(tmp_path / "shared")},
           "train": {"max_steps": 1, "max_epochs": None}}
    run = run_finetune(cfg, progress=False)
    cache = Path(json.loads((run / "run.json").read_text())["cache"])
    assert cache.parent == tmp_path / "shared" and len(cache.name) == 12 and not (run / "cache").exists()
    counting = _Counting(monkeypatch)
    run_finetune({**cfg, "train": {"max_steps": 2, "max_epochs": None}}, resume=True, progress=False)
    assert counting.calls == [cache] and counting.redone[cache] == 0
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()][-1] == 2
