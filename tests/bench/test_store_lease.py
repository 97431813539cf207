"""Claims and leases of the results store (issue 11): claiming is one transaction, a fresh lease of another process
holds its row, an expired or released one frees it, a dead local owner frees it at once, done rows are never
claimed; schema-2 stores are migrated; the grid renews its lease while a run goes on."""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time

import pytest

from medtransfer.bench import grid
from medtransfer.bench.store import Claimant, LeaseLost, ResultStore, StoreError

HERE = socket.gethostname()
T0 = 1_000_000.0  # a fixed clock for the lease arithmetic


def _cells(n: int = 3) -> list[dict]:
    return [{"run_id": f"r{k}", "init": "scratch", "task": "seg", "fraction": 1.0, "seed": k, "metric_name": "dice",
             "higher_is_better": True} for k in range(n)]


@pytest.fixture
def store(tmp_path):
    with ResultStore(tmp_path / "s.sqlite") as s:
        s.ensure(_cells())
        yield s


def _done(store: ResultStore, run_id: str, claimant: Claimant | None = None) -> None:
    store.mark_done(run_id, metric=0.5, metrics={"dice": 0.5}, steps=3, duration=1.0, run_dir="d",
                    claimant=claimant)


def test_a_fresh_lease_of_another_host_holds_the_row_until_it_expires(store):
    gpu1, gpu2 = Claimant(host="gpu1:4242", lease=300), Claimant(host="gpu2:4242", lease=300)
    assert store.claim("r0", gpu1, now=T0)
    row = store.row("r0")
    assert (row["status"], row["host"], row["token"], row["lease_until"], row["attempts"]) == \
        ("running", "gpu1:4242", gpu1.token, T0 + 300, 1)
    assert not store.claim("r0", gpu2, now=T0 + 299.9)  # fresh: gpu1 may still be running it
    assert store.claim_next(["r0", "r1"], gpu2, now=T0 + 299.9) == "r1"  # the next free run instead
    assert store.renew("r0", gpu1, now=T0 + 200) and store.row("r0")["lease_until"] == T0 + 500
    assert not store.claim("r0", gpu2, now=T0 + 400)  # renewed: still held
    assert store.claim("r0", gpu2, now=T0 + 500)  # expired: gpu1 stopped renewing, so it is gone
    row = store.row("r0")
    assert (row["host"], row["token"], row["lease_until"], row["attempts"]) == ("gpu2:4242", gpu2.token, T0 + 800, 2)
    assert not store.renew("r0", gpu1, now=T0 + 510)  # the old owner learns it lost the run ...
    with pytest.raises(LeaseLost, match=r"mark_done\('r0'\): the run is no longer this process's claim .*gpu2:4242"):
        _done(store, "r0", gpu1)  # ... and cannot record over the new attempt
    assert store.row("r0")["status"] == "running" and store.row("r0")["token"] == gpu2.token
    _done(store, "r0", gpu2)
    row = store.row("r0")
    assert (row["status"], row["lease_until"], row["attempts"]) == ("done", None, 2)


def test_a_finished_row_is_never_claimed_and_failed_ones_only_when_retried(store):
    me = Claimant()
    assert store.claim("r0", me)
    _done(store, "r0", me)
    assert not store.claim("r0", Claimant(), now=time.time() + 10**9)
    assert store.claim_next(["r0"], Claimant(), retry={"r0": 1}) is None
    assert store.claim("r1", me)
    store.mark_failed("r1", error="oom", claimant=me)
    assert store.row("r1")["lease_until"] is None
    assert store.claim_next(["r1"], me) is None  # a failure is not retried unless asked
    assert store.claim_next(["r1"], me, retry={"r1": 0}) is None  # asked for an attempt that is not the last one
    other = Claimant()
    assert store.claim_next(["r1", "r2"], other, retry={"r1": 1}) == "r1"
    store.mark_failed("r1", error="oom again", claimant=other)
    assert store.claim_next(["r1"], me, retry={"r1": 1}) is None  # another process retried it since: not again
    assert store.claim_next(["nope", "r2"], me) == "r2"  # unknown ids are skipped
    with pytest.raises(StoreError, match=r"claim\('nope'\): no such run .* ensure\(\) first"):
        store.claim("nope", me)


def test_release_frees_the_row_at_once_and_a_dead_local_owner_frees_it(store):
    me, elsewhere = Claimant(), Claimant(host="gpu9:1")
    assert store.claim("r0", me, now=T0)
    assert store.release("r0", me) and store.row("r0")["lease_until"] == 0
    assert store.row("r0")["status"] == "running"  # the interrupted attempt stays visible
    assert not store.release("r0", elsewhere)
    assert store.claim("r0", elsewhere, now=T0 + 1)
    dead = Claimant(host=f"{HERE}:999999999")  # no process has this pid
    assert store.claim("r1", dead, now=T0)
    assert store.claim("r1", elsewhere, now=T0 + 1)  # a fresh lease, but its owner on this host is gone
    alive = Claimant(host=f"{HERE}:1")  # pid 1 always runs
    assert store.claim("r2", alive, now=T0)
    assert not store.claim("r2", elsewhere, now=T0 + 1)
    assert not store.claim("r2", Claimant(host=f"{HERE}:{os.getpid()}"), now=T0 + 1)  # another claim of this pid
    assert store.claim("r2", alive, now=T0 + 1)  # its own claim


def test_rows_without_a_lease_follow_the_local_liveness_check(store):
    store.mark_running("r0", host=f"{HERE}:1")  # a live process of this host, no lease (mark_running)
    store.mark_running("r1", host=f"{HERE}:999999999")  # a killed one
    store.mark_running("r2", host="gpu7:12")  # another host: nothing can be told, the attempt is redone
    me = Claimant()
    assert store.claim_next(["r0"], me) is None
    assert store.claim_next(["r0", "r1"], me) == "r1"
    assert store.claim_next(["r0", "r2"], me) == "r2"
    store.mark_running("r0", host=me.host)  # this process's own unleased attempt (an earlier grid call)
    assert store.claim("r0", me)


@pytest.mark.parametrize("rounds", [20])
def test_threads_racing_on_one_row_exactly_one_wins(tmp_path, rounds):
    path = tmp_path / "race.sqlite"
    with ResultStore(path) as s:
        s.ensure(_cells(rounds))
    n = 4
    barrier = threading.Barrier(n)
    wins: dict[str, list[str]] = {f"r{k}": [] for k in range(rounds)}
    errors: list[BaseException] = []

    def racer() -> None:
        try:
            me = Claimant()
            with ResultStore(path) as s:  # one connection per thread, as per process
                for k in range(rounds):
                    barrier.wait()
                    if s.claim(f"r{k}", me):
                        wins[f"r{k}"].append(me.token)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=racer) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert [len(w) for w in wins.values()] == [1] * rounds
    with ResultStore(path) as s:
        assert [(r["attempts"], r["token"]) for r in s.rows()] == [(1, wins[r["run_id"]][0]) for r in s.rows()]


_SCHEMA_2 = """
CREATE TABLE runs (run_id TEXT PRIMARY KEY, init TEXT NOT NULL, task TEXT NOT NULL, fraction REAL NOT NULL,
    seed INTEGER NOT NULL, status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    metric_name TEXT NOT NULL, higher_is_better INTEGER NOT NULL, metric REAL, metrics TEXT NOT NULL DEFAULT '{}',
    steps INTEGER, duration REAL, run_dir TEXT, error TEXT, attempts INTEGER NOT NULL DEFAULT 0, shard TEXT,
    host TEXT, updated REAL NOT NULL, preset TEXT);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('store_schema', '2');
INSERT INTO runs VALUES ('a', 'scratch', 'seg', 1.0, 0, 'done', 'dice', 1, 0.5, '{}', 3, 1.0, 'r', NULL, 1, NULL,
    'h:1', 0.0, 'zscore');
INSERT INTO runs VALUES ('b', 'scratch', 'seg', 1.0, 1, 'running', 'dice', 1, NULL, '{}', NULL, NULL, NULL, NULL, 1,
    NULL, 'gone-host:7', 0.0, NULL);
"""


def test_a_schema_2_store_is_migrated_to_leases(tmp_path):
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(_SCHEMA_2)
    conn.close()
    with ResultStore(path) as s:
        assert s.get_meta("store_schema") == 3
        a, b = s.rows()
        assert (a["status"], a["preset"], a["token"], a["lease_until"]) == ("done", "zscore", None, None)
        me = Claimant()
        assert s.claim_next(["a", "b"], me) == "b"  # the old running row had no lease: it is redone
        assert s.row("b")["attempts"] == 2
    conn = sqlite3.connect(path)
    columns = [r[1] for r in conn.execute("PRAGMA table_info(runs)")]
    conn.close()
    assert columns[-3:] == ["preset", "token", "lease_until"]


def test_bad_leases_are_refused(tmp_path):
    from typer.testing import CliRunner

    from medtransfer.cli import app

    with pytest.raises(ValueError, match="a lease is a positive number of seconds"):
        Claimant(lease=0)
    with pytest.raises(ValueError, match=r"heartbeat 30 s and lease 10 s: the lease must outlast several heartbeats"):
        grid.run_benchmark({}, lease=10, heartbeat=30)
    config = tmp_path / "grid.yaml"
    config.write_text("inits: [{name: scratch}]\ntasks: [{name: seg}]\n")
    result = CliRunner().invoke(app, ["benchmark", str(config), "--out", str(tmp_path / "g"), "--lease", "-5"])
    assert result.exit_code == 2 and "lease -5.0: a lease is a positive number of seconds" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "g").exists()  # refused before anything was written


# -- the grid -------------------------------------------------------------------------------------------------------
CONFIG = {"name": "tiny", "inits": [{"name": "scratch"}, {"name": "other"}],
          "tasks": [{"name": "seg", "task": "segmentation"}], "fractions": [1.0], "trials": 2}


def _fake(calls: list[str], pause: float = 0.0, during=None):
    def run_cell(cfg, cell, pretrained, grid_dir, progress=False):
        calls.append(cell["run_id"])
        if during is not None:
            during(cell["run_id"])
        time.sleep(pause)
        return {"metric": 0.5, "metrics": {"dice_mean": 0.5}, "steps": 1, "run_dir": str(grid_dir / cell["run_id"])}

    return run_cell


def test_the_grid_leaves_a_run_leased_elsewhere_and_takes_it_once_expired(tmp_path, monkeypatch):
    out = tmp_path / "g"
    calls: list[str] = []
    monkeypatch.setattr(grid, "run_cell", _fake(calls))
    with ResultStore(out / "store.sqlite") as s:
        s.ensure(grid.cells(grid.load_benchmark_config(CONFIG)))
        assert s.claim("seg/other/f1/s0", Claimant(host="gpu3:77"))  # another machine is running it
    lines: list[str] = []
    grid.run_benchmark(CONFIG, out=out, progress=False, echo=lines.append)
    assert sorted(calls) == ["seg/other/f1/s1", "seg/scratch/f1/s0", "seg/scratch/f1/s1"]
    assert lines[-1] == (f"0 run(s) were run by other processes sharing {out / 'store.sqlite'}; 1 still being run "
                         "by them, e.g. seg/other/f1/s0")
    with ResultStore(out / "store.sqlite") as s:
        assert s.counts() == {"pending": 0, "running": 1, "done": 3, "failed": 0}
        s._connection.execute("UPDATE runs SET lease_until = ? WHERE run_id = 'seg/other/f1/s0'", (time.time() - 1,))
    calls.clear()
    grid.run_benchmark(CONFIG, out=out, progress=False)  # gpu3 died: its lease ran out
    assert calls == ["seg/other/f1/s0"]
    with ResultStore(out / "store.sqlite") as s:
        row = s.row("seg/other/f1/s0")
    assert (row["status"], row["attempts"], row["host"]) == ("done", 2, f"{HERE}:{os.getpid()}")


def test_the_grid_renews_its_lease_while_a_run_goes_on_and_releases_it_when_interrupted(tmp_path, monkeypatch):
    out = tmp_path / "g"
    seen: list[float] = []

    def watch(run_id):  # from another connection, like another process would
        with ResultStore(out / "store.sqlite") as s:
            for _ in range(8):
                seen.append(s.row(run_id)["lease_until"] - time.time())
                time.sleep(0.15)
        if run_id == "seg/other/f1/s0":
            raise KeyboardInterrupt

    calls: list[str] = []
    monkeypatch.setattr(grid, "run_cell", _fake(calls, during=watch))
    with pytest.raises(KeyboardInterrupt):
        grid.run_benchmark(CONFIG, out=out, progress=False, lease=0.5, heartbeat=0.05)
    assert calls == ["seg/scratch/f1/s0", "seg/other/f1/s0"]
    # 1.2 s per run against a 0.5 s lease: only the heartbeat keeps it in the future
    assert len(seen) == 16 and all(0 < left <= 0.5 for left in seen), seen
    with ResultStore(out / "store.sqlite") as s:
        row = s.row("seg/other/f1/s0")
        assert (row["status"], row["lease_until"]) == ("running", 0)  # released: free for anyone at once
        assert s.row("seg/scratch/f1/s0")["lease_until"] is None
    assert not [t for t in threading.enumerate() if t.name == "medtransfer-lease"]  # the heartbeat stopped
