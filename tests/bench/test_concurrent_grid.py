"""Several ``medtransfer benchmark`` processes on one unsharded grid share its runs (issue 11).

Real processes on one store, started together, with the cell replaced by uneven sleeps (tests/bench/_grid_worker.py):
every run is executed exactly once, every process exits 0, and the store equals the one a single process writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

import medtransfer
from medtransfer.bench.store import ResultStore

WORKER = Path(__file__).with_name("_grid_worker.py")
CONFIG = {
    "name": "shared",
    "inits": [{"name": "scratch"}, {"name": "weights_a", "weights": True}, {"name": "other"}],
    "tasks": [{"name": "seg", "task": "segmentation"}],
    "fractions": [0.5, 1.0],
    "trials": 2,
}
# Time or ownership of an attempt, which differ between any two executions of one grid.
_VOLATILE = ("updated", "duration", "host", "token", "lease_until")


def _start(tmp: Path, n: int, **env: str) -> list[subprocess.Popen]:
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "grid.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    env = {**os.environ, "PYTHONPATH": str(Path(medtransfer.__file__).resolve().parents[1]), **env}
    (tmp / "go").unlink(missing_ok=True)
    for i in range(n):
        (tmp / f"ready{i}").unlink(missing_ok=True)
    return [subprocess.Popen([sys.executable, str(WORKER), str(config), str(tmp / "grid"), str(tmp / "executed.log"),
                              str(tmp / f"ready{i}"), str(tmp / "go")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            for i in range(n)]


def _run_workers(tmp: Path, n: int) -> tuple[list[int], list[str], list[tuple[str, str]], list[dict]]:
    """Start ``n`` workers on one grid together; their exit codes, outputs, (run id, pid) executions, store rows."""
    procs = _start(tmp, n)
    log, go, grid_dir = tmp / "executed.log", tmp / "go", tmp / "grid"
    deadline = time.monotonic() + 120
    while not all((tmp / f"ready{i}").exists() for i in range(n)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            [p.communicate()[0] for p in procs if p.poll() is not None]
        time.sleep(0.02)
    go.touch()  # every worker has imported everything: they start claiming within milliseconds of each other
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    executed = [tuple(line.split()) for line in log.read_text().splitlines()]
    with ResultStore(grid_dir / "store.sqlite") as store:
        rows = store.rows()
    return [p.returncode for p in procs], outputs, executed, rows


def _results(rows: list[dict]) -> dict[str, dict]:
    return {r["run_id"]: {k: v for k, v in r.items() if k not in _VOLATILE} for r in rows}


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, dict]:
    codes, outputs, executed, rows = _run_workers(tmp_path_factory.mktemp("single"), 1)
    assert codes == [0], outputs
    assert len(executed) == 12 and len({rid for rid, _ in executed}) == 12
    assert {r["status"] for r in rows} == {"done"} and {r["attempts"] for r in rows} == {1}
    return _results(rows)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_n_processes_on_one_grid_run_every_run_once(tmp_path, single, n):
    codes, outputs, executed, rows = _run_workers(tmp_path, n)
    assert codes == [0] * n, outputs
    runs = Counter(rid for rid, _ in executed)
    assert sorted(runs) == sorted(single) and set(runs.values()) == {1}, runs  # every run, each exactly once
    assert len({pid for _, pid in executed}) >= 2, "one worker ran everything: the test exercised no sharing"
    assert {r["status"] for r in rows} == {"done"} and {r["attempts"] for r in rows} == {1}
    assert _results(rows) == single
    assert {r["lease_until"] for r in rows} == {None}  # a finished run holds no lease
    reported = [out.count(": dice_mean ") for out in outputs]  # one console line per run a process finished
    assert sum(reported) == 12, outputs
    assert all("run by other processes sharing" in out for out, k in zip(outputs, reported) if k < 12), outputs


def test_a_killed_worker_frees_its_run_at_once_for_the_next_one_on_this_host(tmp_path, single):
    hang = "seg/other/f0.5/s1"
    (victim,) = _start(tmp_path, 1, MT_HANG_ON=hang)
    deadline = time.monotonic() + 120
    while not (tmp_path / "ready0").exists():
        assert time.monotonic() < deadline and victim.poll() is None
        time.sleep(0.02)
    (tmp_path / "go").touch()
    while not (tmp_path / "executed.log.hang").exists():
        assert time.monotonic() < deadline and victim.poll() is None, victim.communicate()[0]
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)  # no cleanup: the row stays running with a fresh 300 s lease
    victim.wait()
    with ResultStore(tmp_path / "grid" / "store.sqlite") as store:
        row = store.row(hang)
    assert row["status"] == "running" and row["lease_until"] > time.time() + 200
    t0 = time.monotonic()
    codes, outputs, executed, rows = _run_workers(tmp_path, 1)
    assert codes == [0], outputs
    assert time.monotonic() - t0 < 120  # far less than the lease: the dead local pid freed the row
    assert (hang, str(victim.pid)) not in executed and any(rid == hang for rid, _ in executed)  # redone
    assert Counter(rid for rid, _ in executed) == Counter(dict.fromkeys(single, 1))  # the rest: not repeated
    by_id = {r["run_id"]: r for r in rows}
    assert by_id[hang]["attempts"] == 2 and {r["attempts"] for r in rows if r["run_id"] != hang} == {1}
    assert _results(rows) == {k: dict(v, attempts=2) if k == hang else v for k, v in single.items()}
