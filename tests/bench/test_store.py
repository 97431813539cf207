"""Results store: schema, idempotent ensure, status transitions, resume, corrupt files, shard merge, shard split."""

from __future__ import annotations

import os
import sqlite3

import pytest

from medtransfer.bench.store import ResultStore, StoreError, shard_of
from medtransfer.errors import MedTransferError


def _cells(inits=("scratch", "genesis"), fractions=(0.25, 1.0), seeds=(0, 1)):
    return [
        {"run_id": f"{i}-phantom_seg-{f}-{s}", "init": i, "task": "phantom_seg", "fraction": f, "seed": s,
         "metric_name": "dice", "higher_is_better": True}
        for i in inits for f in fractions for s in seeds
    ]


def _finish(store: ResultStore, run_id: str, metric: float, shard: str | None = None) -> None:
    store.mark_running(run_id, shard=shard, host="hostA")
    store.mark_done(run_id, metric=metric, metrics={"dice": metric, "loss": 1 - metric}, steps=10, duration=2.5,
                    run_dir=f"runs/{run_id}")


def _without_time(rows):
    return [{k: v for k, v in r.items() if k not in ("updated", "shard")} for r in rows]


def test_schema_created_and_reopened(tmp_path):
    path = tmp_path / "sub" / "results.sqlite"
    with ResultStore(path) as store:
        assert store.rows() == [] and store.counts() == {"pending": 0, "running": 0, "done": 0, "failed": 0}
        store.set_meta("grid_hash", "abc123")
        store.set_meta("config", {"tasks": ["phantom_seg"], "fractions": [0.25, 1.0]})
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    columns = [r[1] for r in conn.execute("PRAGMA table_info(runs)")]
    conn.close()
    assert tables == {"runs", "meta"}
    assert columns[:6] == ["run_id", "init", "task", "fraction", "seed", "status"] and len(columns) == 21
    assert columns[-3:] == ["preset", "token", "lease_until"]  # schema 3
    assert sorted(os.listdir(path.parent)) == ["results.sqlite"]  # rollback journal: no -wal/-shm side files
    with ResultStore(path) as store:
        assert store.get_meta("grid_hash") == "abc123"
        assert store.get_meta("config") == {"tasks": ["phantom_seg"], "fractions": [0.25, 1.0]}
        assert store.get_meta("missing", default=7) == 7
    with pytest.raises(ValueError, match=r"set_meta\('bad'\): value must be JSON-serialisable"):
        ResultStore(path).set_meta("bad", object())


def test_ensure_is_idempotent_and_checks_the_grid(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    assert store.ensure(_cells()) == 8
    _finish(store, "scratch-phantom_seg-1.0-0", 0.8)
    assert store.ensure(_cells()) == 0
    assert store.ensure(_cells(inits=("scratch", "genesis", "volf"))) == 4
    assert store.counts() == {"pending": 11, "running": 0, "done": 1, "failed": 0}
    row = store.row("genesis-phantom_seg-0.25-1")
    assert row == {
        "run_id": "genesis-phantom_seg-0.25-1", "init": "genesis", "task": "phantom_seg", "fraction": 0.25,
        "seed": 1, "status": "pending", "metric_name": "dice", "higher_is_better": True, "metric": None,
        "metrics": {}, "steps": None, "duration": None, "run_dir": None, "error": None, "attempts": 0,
        "shard": None, "host": None, "updated": row["updated"], "preset": None, "token": None, "lease_until": None,
    }
    assert store.row("scratch-phantom_seg-1.0-0")["metric"] == 0.8  # the done row was left as it was
    assert store.row("nope") is None
    changed = dict(_cells()[0], fraction=0.5)
    with pytest.raises(StoreError, match=r"differs between .*'fraction': \(0.25, 0.5\)"):
        store.ensure([changed])
    with pytest.raises(ValueError, match=r"lacks \['metric_name', 'higher_is_better'\]"):
        store.ensure([{"run_id": "x", "init": "a", "task": "t", "fraction": 1.0, "seed": 0}])
    with pytest.raises(ValueError, match=r"fraction 1.5; a label fraction lies in \(0, 1\]"):
        store.ensure([dict(_cells()[0], run_id="y", fraction=1.5)])
    assert store.counts()["pending"] == 11  # failed ensure calls added nothing


def test_status_transitions(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    store.ensure(_cells())
    rid = "scratch-phantom_seg-0.25-0"
    with pytest.raises(StoreError, match=r"mark_done\('scratch-phantom_seg-0.25-0'\): the run is 'pending'.*"
                                         r"call mark_running first"):
        store.mark_done(rid, metric=0.5, metrics={}, steps=1, duration=1.0, run_dir="d")
    store.mark_running(rid, shard="1/2", host="gpu1")
    assert (store.row(rid)["status"], store.row(rid)["attempts"], store.row(rid)["shard"]) == ("running", 1, "1/2")
    store.mark_failed(rid, error="CUDA out of memory", duration=3.0, run_dir="runs/a")
    row = store.row(rid)
    assert (row["status"], row["error"], row["duration"], row["run_dir"]) == ("failed", "CUDA out of memory", 3.0,
                                                                             "runs/a")
    store.mark_running(rid, host="gpu2")  # retry: the error belongs to the old attempt
    assert (store.row(rid)["attempts"], store.row(rid)["error"], store.row(rid)["host"]) == (2, None, "gpu2")
    with pytest.raises(ValueError, match="metric is nan; .* mark_failed"):
        store.mark_done(rid, metric=float("nan"), metrics={}, steps=1, duration=1.0, run_dir="d")
    store.mark_done(rid, metric=0.75, metrics={"dice": 0.75, "hd95": 4}, steps=120, duration=9.5, run_dir="runs/b")
    row = store.row(rid)
    assert (row["status"], row["metric"], row["metrics"], row["steps"], row["duration"], row["run_dir"],
            row["attempts"]) == ("done", 0.75, {"dice": 0.75, "hd95": 4.0}, 120, 9.5, "runs/b", 2)
    with pytest.raises(StoreError, match="the run is 'done'.*a done run is never repeated"):
        store.mark_running(rid)
    with pytest.raises(StoreError, match=r"mark_running\('ghost'\): no such run .* ensure\(\) first"):
        store.mark_running("ghost")
    assert [r["run_id"] for r in store.rows(status="done")] == [rid]
    assert len(store.rows(status=("pending", "done"))) == 8
    with pytest.raises(ValueError, match=r"unknown status \['finished'\]"):
        store.rows(status="finished")
    assert [r["run_id"] for r in store.rows()] == sorted(c["run_id"] for c in _cells())


def test_todo_semantics(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    cells = _cells(inits=("scratch",), fractions=(1.0,), seeds=(0, 1, 2, 3))
    ids = [c["run_id"] for c in cells][::-1]  # order given is kept, not sorted
    store.ensure(cells)
    _finish(store, ids[0], 0.9)
    store.mark_running(ids[1])  # a killed process left this one running
    store.mark_running(ids[2])
    store.mark_failed(ids[2], error="boom")
    assert store.todo(ids + ["new-run", ids[3]]) == [ids[1], ids[3], "new-run"]
    assert store.todo(ids, retry_failed=True) == [ids[1], ids[2], ids[3]]
    store.mark_running(ids[1])  # the re-run replaces the incomplete attempt
    assert store.row(ids[1])["attempts"] == 2 and store.counts()["running"] == 1


def test_corrupt_or_foreign_file_is_a_store_error(tmp_path):
    bad = tmp_path / "results.sqlite"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(StoreError, match=r"results.sqlite cannot be read as SQLite .* Move it aside") as info:
        ResultStore(bad)
    assert isinstance(info.value, MedTransferError)
    other = tmp_path / "other.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE patients (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match=r"SQLite file of something else \(tables \['patients'\]\)"):
        ResultStore(other)
    with pytest.raises(StoreError, match="is a folder"):
        ResultStore(tmp_path)


def test_merge_of_shards_equals_one_store(tmp_path):
    cells = _cells()
    ids = [c["run_id"] for c in cells]
    full = ResultStore(tmp_path / "full.sqlite")
    full.set_meta("grid_hash", "h1")
    full.ensure(cells)
    for k, rid in enumerate(sorted(ids)):
        _finish(full, rid, k / 10)
    merged = ResultStore(tmp_path / "merged.sqlite")
    for i in (1, 2, 3):
        with ResultStore(tmp_path / f"shard{i}.sqlite") as shard:
            shard.set_meta("grid_hash", "h1")
            shard.ensure(cells)  # every shard knows the whole grid but runs only its part
            for rid in shard_of(ids, f"{i}/3"):
                _finish(shard, rid, sorted(ids).index(rid) / 10, shard=f"{i}/3")
    first = merged.merge_from(tmp_path / "shard1.sqlite")
    assert first == {"added": 8, "updated": 0, "unchanged": 0}
    assert merged.merge_from(tmp_path / "shard2.sqlite") == {"added": 0, "updated": 3, "unchanged": 5}
    with ResultStore(tmp_path / "shard3.sqlite") as shard3:
        assert merged.merge_from(shard3) == {"added": 0, "updated": 2, "unchanged": 6}
    assert merged.counts() == {"pending": 0, "running": 0, "done": 8, "failed": 0}
    assert _without_time(merged.rows()) == _without_time(full.rows())
    assert merged.get_meta("grid_hash") == "h1"  # meta of the shards came along
    assert merged.merge_from(tmp_path / "shard2.sqlite") == {"added": 0, "updated": 0, "unchanged": 8}


def test_merge_rules_and_errors(tmp_path):
    cells = _cells(inits=("scratch",), fractions=(1.0,), seeds=(0, 1, 2, 3, 4))
    a, b = ResultStore(tmp_path / "a.sqlite"), ResultStore(tmp_path / "b.sqlite")
    for store in (a, b):
        store.ensure(cells)
    r0, r1, r2, r3, r4 = (c["run_id"] for c in cells)
    _finish(a, r0, 0.5)  # done here, done there: ours is kept
    _finish(b, r0, 0.9)
    a.mark_running(r1)  # failed here, done there: done wins
    a.mark_failed(r1, error="oom")
    _finish(b, r1, 0.7)
    b.mark_running(r2)  # pending here, failed there: failed wins
    b.mark_failed(r2, error="nan loss")
    _finish(a, r3, 0.3)  # done here, running there: done stays
    b.mark_running(r3)
    for store, attempts in ((a, 1), (b, 2)):  # failed both sides: the later attempt (more attempts) wins
        for k in range(attempts):
            store.mark_running(r4)
            store.mark_failed(r4, error=f"{store.path.stem} try {k + 1}")
    assert a.merge_from(b) == {"added": 0, "updated": 3, "unchanged": 2}
    assert [(r["status"], r["metric"], r["error"]) for r in a.rows()] == [
        ("done", 0.5, None), ("done", 0.7, None), ("failed", None, "nan loss"), ("done", 0.3, None),
        ("failed", None, "b try 2")]
    assert b.merge_from(a) == {"added": 0, "updated": 1, "unchanged": 4}  # keeps its done r0, takes a's done r3
    assert [r["metric"] for r in b.rows()] == [0.9, 0.7, None, 0.3, None]
    a.set_meta("grid_hash", "aaa")
    b.set_meta("grid_hash", "bbb")
    with pytest.raises(StoreError, match=r"cannot merge .*b.sqlite into .*a.sqlite: .*different grids"):
        a.merge_from(b)
    with pytest.raises(StoreError, match=r"merge_from\('.*missing.sqlite'\): no such store file"):
        a.merge_from(tmp_path / "missing.sqlite")
    assert not (tmp_path / "missing.sqlite").exists()


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_shard_of_partitions(n):
    ids = [f"run{k:02d}" for k in (7, 3, 11, 0, 5, 9, 1, 2, 10, 4, 8, 6)]
    parts = [shard_of(ids, f"{i}/{n}") for i in range(1, n + 1)]
    assert sorted(sum(parts, [])) == sorted(ids)  # disjoint and complete
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts[0][0] == "run00" and parts == [shard_of(ids[::-1], f"{i}/{n}") for i in range(1, n + 1)]


def test_shard_of_bad_strings():
    assert shard_of(["c", "a", "b", "d"], "2/2") == ["b", "d"]
    for bad in ("0/3", "4/3", "1/0", "a/b", "2", "1-2", ""):
        with pytest.raises(ValueError, match=r"expected the form 'i/n' with 1 <= i <= n"):
            shard_of(["a"], bad)


def test_two_objects_on_one_file_interleave(tmp_path):
    path = tmp_path / "r.sqlite"
    one, two = ResultStore(path), ResultStore(path)
    cells = _cells()
    assert one.ensure(cells[:5]) == 5
    assert two.ensure(cells) == 3
    ids = [c["run_id"] for c in cells]
    for k, rid in enumerate(ids):
        writer, other = (one, two) if k % 2 else (two, one)
        writer.mark_running(rid, host=f"w{k % 2}")
        assert other.row(rid)["status"] == "running"  # each change is visible once committed
        if k == 3:
            other.mark_failed(rid, error="x")
        else:
            other.mark_done(rid, metric=k / 8, metrics={}, steps=k, duration=1.0, run_dir="d")
    one.set_meta("grid_hash", "g")
    assert two.get_meta("grid_hash") == "g"
    assert one.counts() == two.counts() == {"pending": 0, "running": 0, "done": 7, "failed": 1}
    assert one.rows() == two.rows()
    one.close()
    with pytest.raises(StoreError, match="is closed"):
        one.rows()
