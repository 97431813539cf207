"""Each benchmark run's intensity preset: recorded by the grid (from the run's contract.json) in the store, shown per
initialisation in the report, with a note when the inits of one task were preprocessed differently (issue 10).
Stores of schema 1 (no preset column) stay readable."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from medtransfer.bench import grid
from medtransfer.bench.report import format_table, results_table, write_report
from medtransfer.bench.store import ResultStore

CELL = {"task": "seg", "metric_name": "dice_mean", "higher_is_better": True}

_SCHEMA_1 = """
CREATE TABLE runs (run_id TEXT PRIMARY KEY, init TEXT NOT NULL, task TEXT NOT NULL, fraction REAL NOT NULL,
    seed INTEGER NOT NULL, status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    metric_name TEXT NOT NULL, higher_is_better INTEGER NOT NULL, metric REAL, metrics TEXT NOT NULL DEFAULT '{}',
    steps INTEGER, duration REAL, run_dir TEXT, error TEXT, attempts INTEGER NOT NULL DEFAULT 0, shard TEXT,
    host TEXT, updated REAL NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('store_schema', '1');
INSERT INTO runs VALUES ('seg/scratch/f1/s0', 'scratch', 'seg', 1.0, 0, 'done', 'dice_mean', 1, 0.5, '{}', 3, 1.0,
    'r', NULL, 1, NULL, 'h:1', 0.0);
"""


def _rows(presets: dict[str, str | None], seeds=(0, 1)) -> list[dict]:
    return [{**CELL, "run_id": f"{init}-{s}", "init": init, "fraction": 1.0, "seed": s, "status": "done",
             "metric": 0.5 + 0.1 * s + (0.05 if init != "scratch" else 0.0), "preset": preset}
            for init, preset in presets.items() for s in seeds]


def test_a_schema_1_store_is_migrated_and_reads_preset_none(tmp_path):
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(_SCHEMA_1)
    conn.close()
    with ResultStore(path) as store:
        (row,) = store.rows()
        assert row["preset"] is None and row["metric"] == 0.5 and row["status"] == "done"
        assert store.get_meta("store_schema") == 3
        store.ensure([{**CELL, "run_id": "seg/genesis/f1/s0", "init": "genesis", "fraction": 1.0, "seed": 0}])
        store.mark_running("seg/genesis/f1/s0")
        store.mark_done("seg/genesis/f1/s0", metric=0.6, metrics={}, steps=3, duration=1.0, run_dir="g",
                        preset="zscore")
    with ResultStore(path) as store:  # reopening a migrated store changes nothing
        assert {r["init"]: r["preset"] for r in store.rows()} == {"scratch": None, "genesis": "zscore"}
    table = format_table(results_table(store_rows(path)))
    assert "| scratch | 0.500 (n=1) | ≤ 100% | not recorded |" in table
    assert "Note:" not in table  # an unrecorded preset is no evidence of a difference


def store_rows(path: Path) -> list[dict]:
    with ResultStore(path) as store:
        return store.rows()


def test_preset_is_kept_by_done_cleared_by_a_new_attempt_and_merged(tmp_path):
    a, b = ResultStore(tmp_path / "a.sqlite"), ResultStore(tmp_path / "b.sqlite")
    cell = {**CELL, "run_id": "x", "init": "scratch", "fraction": 1.0, "seed": 0}
    for store in (a, b):
        store.ensure([cell])
    b.mark_running("x")
    b.mark_done("x", metric=0.7, metrics={"dice_mean": 0.7}, steps=1, duration=1.0, run_dir="r", preset="genesis_ct")
    assert b.row("x")["preset"] == "genesis_ct"
    a.merge_from(b)
    assert a.row("x")["preset"] == "genesis_ct"
    a.ensure([dict(cell, run_id="y")])
    a.mark_running("y")
    a.mark_failed("y", error="boom")
    assert a.row("y")["preset"] is None


def test_report_shows_the_preset_per_init_and_notes_a_difference(tmp_path):
    entries = results_table(_rows({"scratch": "genesis_ct", "med3d": "zscore"}))
    assert {e["init"]: e["preset"] for e in entries} == {"scratch": "genesis_ct", "med3d": "zscore"}
    table = format_table(entries)
    assert "| init | 100% | label efficiency | preset |" in table
    assert "| scratch | 0.550 ± 0.071 (n=2) | ≤ 100% | genesis_ct |" in table
    assert ("Note: the initialisations of this task were not preprocessed alike (intensity preset: scratch "
            "genesis_ct; med3d zscore)") in table
    same = format_table(results_table(_rows({"scratch": "genesis_ct", "med3d": "genesis_ct"})))
    assert "| med3d | 0.600 ± 0.071 (n=2) | ≤ 100% | genesis_ct |" in same and "Note:" not in same
    # two seeds of one cell with different presets are both named
    mixed = _rows({"scratch": "genesis_ct"}) + [dict(r, preset="zscore" if r["seed"] else "genesis_ct")
                                                 for r in _rows({"med3d": None})]
    assert "| med3d | 0.600 ± 0.071 (n=2) | ≤ 100% | genesis_ct, zscore |" in format_table(results_table(mixed))
    md, _ = write_report(tmp_path, _rows({"scratch": "genesis_ct", "med3d": "zscore"}))
    assert "not preprocessed alike" in md.read_text()


def test_grid_records_each_runs_preset_from_its_contract(tmp_path, monkeypatch):
    from medtransfer.train import finetune

    def fake_finetune(cfg, progress=False, **kw):  # the grid passes overwrite=True for a cell it redoes
        out = Path(cfg["out"])
        out.mkdir(parents=True, exist_ok=True)
        preset = "zscore" if cfg["model"]["pretrained"] is True else "genesis_ct"
        (out / "contract.json").write_text(json.dumps({"preset": preset}))
        return out

    def fake_evaluate(run_dir, split="val"):
        (Path(run_dir) / "evaluation").mkdir(exist_ok=True)
        (Path(run_dir) / "evaluation" / "summary.json").write_text(json.dumps({"metrics": {"dice_mean": 0.5}}))
        return Path(run_dir) / "evaluation"

    monkeypatch.setattr(finetune, "run_finetune", fake_finetune)
    monkeypatch.setattr(finetune, "evaluate", fake_evaluate)
    config = {"name": "presets", "inits": [{"name": "scratch"}, {"name": "published", "weights": True}],
              "tasks": [{"name": "seg", "task": "segmentation"}], "trials": 1}
    out = grid.run_benchmark(config, out=tmp_path / "grid", progress=False)
    rows = store_rows(out / "store.sqlite")
    assert {(r["init"], r["status"], r["preset"]) for r in rows} == {("scratch", "done", "genesis_ct"),
                                                                     ("published", "done", "zscore")}
