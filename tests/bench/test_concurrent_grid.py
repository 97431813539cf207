"""Several ``medtransfer benchmark`` processes on one unsharded grid share its runs (issue 11).

Real processes on one store, started together, with the cell replaced by uneven sleeps (tests/bench/_grid_worker.py):
every run is executed exactly once, every process exits 0, and the store equals the one a single process writes."""

from __future__ import annotations

import os
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


def _run_workers(tmp: Path, n: int) -> tuple[list[int], list[str], list[tuple[str, str]], list[dict]]:
    """Start ``n`` workers on one grid together; their exit codes, outputs, (run id, pid) executions, store rows."""
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "grid.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    log, go, grid_dir = tmp / "executed.log", tmp / "go", tmp / "grid"
    env = {**os.environ, "PYTHONPATH": str(Path(medtransfer.__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(config), str(grid_dir), str(log),
                               str(tmp / f"ready{i}"), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for i in range(n)]
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
