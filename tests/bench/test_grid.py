"""The benchmark grid: cells, resume after a kill, shards that merge to the full grid, failed runs and retries.

The fine-tune of a cell is replaced by a deterministic stand-in here (a real one runs in test_demo.py), so these
tests exercise the bookkeeping exactly and fast."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medtransfer.bench import grid
from medtransfer.bench.store import ResultStore, StoreError
from medtransfer.cli import app
from medtransfer.errors import MedTransferError

CONFIG = {
    "name": "tiny",
    "inits": [{"name": "scratch"}, {"name": "weights_a", "weights": True}, {"name": "other"}],
    "tasks": [{"name": "seg", "task": "segmentation"}],
    "fractions": [0.5, 1.0],
    "trials": 3,
}


def _fake_metric(run_id: str) -> float:
    return int(hashlib.sha256(run_id.encode()).hexdigest()[:6], 16) / 16**6


@pytest.fixture
def fake_cells(monkeypatch):
    calls: list[str] = []

    def run_cell(cfg, cell, pretrained, grid_dir, progress=False):
        calls.append(cell["run_id"])
        value = _fake_metric(cell["run_id"]) + (0.3 if cell["init"] == "weights_a" else 0.0)
        return {"metric": value, "metrics": {"dice_mean": value}, "steps": 7, "run_dir": str(grid_dir / cell["run_id"])}

    monkeypatch.setattr(grid, "run_cell", run_cell)
    return calls


def _done(path: Path) -> dict[str, tuple]:
    with ResultStore(path) as store:
        return {r["run_id"]: (r["status"], r["metric"], r["steps"]) for r in store.rows()}


def test_cells_cover_the_grid_trial_major():
    cfg = grid.load_benchmark_config(CONFIG)
    cells = grid.cells(cfg)
    assert len(cells) == 3 * 1 * 2 * 3
    assert len({c["run_id"] for c in cells}) == 18
    assert cells[0]["run_id"] == "seg/scratch/f0.5/s0" and cells[-1]["run_id"] == "seg/other/f1/s2"
    assert [c["seed"] for c in cells[:6]] == [0] * 6  # every init of trial 0 first
    assert cells[0]["metric_name"] == "dice_mean" and cells[0]["higher_is_better"] is True


def test_finetune_config_shares_the_split_of_a_trial(tmp_path):
    cfg = grid.load_benchmark_config({**CONFIG, "finetune": {"train": {"max_steps": 5}, "optim": {"lr": 0.1}},
                                      "tasks": [{"name": "seg", "finetune": {"optim": {"lr": 0.2}}}]})
    cell = {"run_id": "seg/scratch/f0.5/s2", "init": "scratch", "task": "seg", "fraction": 0.5, "seed": 2}
    ft = grid.finetune_config(cfg, cell, False, tmp_path)
    assert ft["train"] == {"max_steps": 5, "seed": 2} and ft["optim"] == {"lr": 0.2}
    assert ft["data"]["label_fraction"] == 0.5 and ft["data"]["test_fraction"] == 0.25
    assert ft["out"] == str(tmp_path / "runs" / "seg" / "scratch" / "f0.5" / "s2")
    other = grid.finetune_config(cfg, {**cell, "init": "other"}, "w.safetensors", tmp_path)
    assert other["train"]["seed"] == ft["train"]["seed"] and other["model"]["pretrained"] == "w.safetensors"


@pytest.mark.parametrize("change, message", [
    ({"baseline": "nope"}, "baseline 'nope' is not among the inits"),
    ({"fractions": [0, 1]}, "label fractions must be in (0, 1]"),
    ({"inits": [{"name": "a"}, {"name": "a"}], "baseline": "a"}, "names must be unique"),
    ({"inits": [{"name": "a b"}], "baseline": "a b"}, "letters, digits"),
    ({"trials": 0}, "trials: Input should be greater than 0"),
    ({"inits": [{"name": "scratch", "weights": "x", "pretrain": {"method": "genesis"}}]}, "not both"),
])
def test_invalid_configs(change, message):
    with pytest.raises(MedTransferError) as err:
        grid.load_benchmark_config({**CONFIG, **change})
    assert message in str(err.value)


def test_killed_grid_resumes_to_the_same_store(tmp_path, fake_cells, monkeypatch):
    full = grid.run_benchmark(CONFIG, out=tmp_path / "full", progress=False)
    expected = _done(full / "store.sqlite")
    assert all(v[0] == "done" for v in expected.values()) and len(expected) == 18

    real = grid.run_cell
    count = {"n": 0}

    def dies_on_the_fifth(*args, **kwargs):
        count["n"] += 1
        if count["n"] == 5:
            raise KeyboardInterrupt  # the process is killed in the middle of a run
        return real(*args, **kwargs)

    monkeypatch.setattr(grid, "run_cell", dies_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        grid.run_benchmark(CONFIG, out=tmp_path / "killed", progress=False)
    partial = _done(tmp_path / "killed" / "store.sqlite")
    assert sorted(v[0] for v in partial.values()).count("done") == 4
    assert sum(v[0] == "running" for v in partial.values()) == 1
    monkeypatch.setattr(grid, "run_cell", real)
    fake_cells.clear()
    grid.run_benchmark(CONFIG, out=tmp_path / "killed", progress=False)
    assert _done(tmp_path / "killed" / "store.sqlite") == expected
    assert len(fake_cells) == 14  # the 4 finished runs are not repeated; the interrupted one is redone
    with ResultStore(tmp_path / "killed" / "store.sqlite") as store:
        attempts = sorted(r["attempts"] for r in store.rows())
    assert attempts == [1] * 17 + [2]


def test_union_of_shards_equals_the_full_grid(tmp_path, fake_cells):
    full = _done(grid.run_benchmark(CONFIG, out=tmp_path / "full", progress=False) / "store.sqlite")
    shard_ids = []
    for i in (1, 2, 3):
        grid.run_benchmark(CONFIG, out=tmp_path / "sharded", shard=f"{i}/3", progress=False)
        rows = _done(tmp_path / "sharded" / f"store-{i}of3.sqlite")
        shard_ids.append(set(rows))
    assert not (shard_ids[0] & shard_ids[1]) and set().union(*shard_ids) == set(full)
    result = CliRunner().invoke(app, ["report", str(tmp_path / "sharded"),
                                      *sum((["--merge", str(tmp_path / "sharded" / f"store-{i}of3.sqlite")]
                                            for i in (1, 2, 3)), [])])
    assert result.exit_code == 0, result.output
    assert _done(tmp_path / "sharded" / "store.sqlite") == full
    assert (tmp_path / "sharded" / "report.html").is_file() and "weights_a" in result.output


def test_failed_runs_are_recorded_and_retried_on_request(tmp_path, fake_cells, monkeypatch):
    real = grid.run_cell

    def fails_for_other(cfg, cell, *args, **kwargs):
        if cell["init"] == "other":
            raise ValueError(f"broken checkpoint for {cell['run_id']}")
        return real(cfg, cell, *args, **kwargs)

    monkeypatch.setattr(grid, "run_cell", fails_for_other)
    out = grid.run_benchmark(CONFIG, out=tmp_path / "g", progress=False)
    with ResultStore(out / "store.sqlite") as store:
        failed = store.rows(status="failed")
        assert store.counts()["done"] == 12 and len(failed) == 6
    assert failed[0]["error"] == f"ValueError: broken checkpoint for {failed[0]['run_id']}"
    fake_cells.clear()
    grid.run_benchmark(CONFIG, out=out, progress=False)
    assert fake_cells == []  # failed runs stay failed unless asked
    monkeypatch.setattr(grid, "run_cell", real)
    grid.run_benchmark(CONFIG, out=out, progress=False, retry_failed=True)
    assert len(fake_cells) == 6 and all(v[0] == "done" for v in _done(out / "store.sqlite").values())


def test_a_store_never_mixes_two_grids_but_trials_extend_one(tmp_path, fake_cells):
    grid.run_benchmark(CONFIG, out=tmp_path / "g", progress=False)
    before = (tmp_path / "g" / "grid.yaml").read_text()
    with pytest.raises(StoreError, match="another grid config"):
        grid.run_benchmark({**CONFIG, "test_fraction": 0.3}, out=tmp_path / "g", progress=False)
    assert (tmp_path / "g" / "grid.yaml").read_text() == before  # a refused config leaves the folder as it was
    fake_cells.clear()
    grid.run_benchmark({**CONFIG, "trials": 4}, out=tmp_path / "g", progress=False)
    assert sorted(fake_cells) == sorted(c["run_id"] for c in grid.cells(grid.load_benchmark_config(CONFIG | {"trials": 4}))
                                        if c["seed"] == 3)


def test_pretraining_inits_run_once_are_reused_and_redone_when_changed(tmp_path, fake_cells, monkeypatch):
    import medtransfer.pretext.runner as runner

    calls = []

    def fake_pretrain(cfg, *, resume=False, progress=True, **kw):
        calls.append((cfg.method, cfg.train.max_steps, resume))
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        if cfg.train.max_steps == 13:
            raise MedTransferError("pretraining data is broken")
        (out / "pretrained.safetensors").write_bytes(b"weights")
        return out

    monkeypatch.setattr(runner, "run_pretrain", fake_pretrain)
    pool = tmp_path / "pool"
    pool.mkdir()
    cfg = {**CONFIG, "inits": [{"name": "scratch"}, {"name": "gen", "pretrain": {
        "method": "genesis", "data": {"paths": [str(pool)]}, "train": {"max_steps": 5}}}]}
    out = grid.run_benchmark(cfg, out=tmp_path / "g", progress=False)
    assert calls == [("genesis", 5, False)]  # once for the 6 cells of the init
    assert (out / "pretrain" / "gen" / "pretrained.safetensors").is_file()
    calls.clear()
    grid.run_benchmark(cfg, out=tmp_path / "g2", progress=False)
    changed = {**cfg, "inits": [cfg["inits"][0], {**cfg["inits"][1], "pretrain": {
        **cfg["inits"][1]["pretrain"], "train": {"max_steps": 13}}}]}
    (tmp_path / "g2" / "store.sqlite").unlink()
    calls.clear()
    grid.run_benchmark(changed, out=tmp_path / "g2", progress=False)
    assert calls == [("genesis", 13, False)]  # not the stale product of max_steps 5; its failure is not retried 6x
    assert not (tmp_path / "g2" / "pretrain" / "gen" / "pretrained.safetensors").exists()
    with ResultStore(tmp_path / "g2" / "store.sqlite") as store:
        failed = store.rows(status="failed")
    assert len(failed) == 6 and all("pretraining data is broken" in r["error"] for r in failed)
    bad = {**cfg, "inits": [cfg["inits"][0], {"name": "gen", "pretrain": {"method": "genesys"}}]}
    with pytest.raises(MedTransferError, match="init 'gen': its pretrain config is invalid"):
        grid.run_benchmark(bad, out=tmp_path / "g3", progress=False)


def test_cli_benchmark_reports_and_bad_config(tmp_path, fake_cells):
    import yaml

    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "out": str(tmp_path / "cli")}))
    result = CliRunner().invoke(app, ["benchmark", str(path)])
    assert result.exit_code == 0, result.output
    assert "weights_a" in result.output and (tmp_path / "cli" / "report.md").is_file()
    bad = CliRunner().invoke(app, ["benchmark", str(path), "--set", "trialz=2"])
    assert bad.exit_code == 2 and "did you mean 'trials'" in bad.output
    wrong = CliRunner().invoke(app, ["report", str(tmp_path / "cli"), "--baseline", "nonsense"])
    assert wrong.exit_code == 2 and "not an initialisation of this grid" in wrong.output
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no store.sqlite" in missing.output


def test_missing_dataset_or_weights_fail_before_any_run(tmp_path, fake_cells):
    bad = {**CONFIG, "tasks": [{"name": "seg", "data": str(tmp_path / "nope")}],
           "inits": [{"name": "scratch"}, {"name": "w", "weights": str(tmp_path / "w.pth")}]}
    with pytest.raises(MedTransferError) as err:
        grid.run_benchmark(bad, out=tmp_path / "g", progress=False)
    assert "task 'seg': dataset" in str(err.value) and "init 'w': weight file" in str(err.value)
    assert fake_cells == [] and not (tmp_path / "g" / "store.sqlite").exists()


def test_cli_exits_1_when_runs_failed(tmp_path, fake_cells, monkeypatch):
    import yaml

    def fails(cfg, cell, *args, **kwargs):
        raise ValueError("out of memory")

    monkeypatch.setattr(grid, "run_cell", fails)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "trials": 1, "fractions": [1.0], "out": str(tmp_path / "g")}))
    result = CliRunner().invoke(app, ["benchmark", str(path)])
    assert result.exit_code == 1 and "3 run(s) failed" in result.output and "--retry-failed" in result.output
