"""One ``medtransfer benchmark`` process of tests/bench/test_concurrent_grid.py, with a cheap stand-in for the cell.

``python _grid_worker.py CONFIG.yaml GRID_DIR LOG READY GO [cli args...]``: replaces ``grid.run_cell`` by a sleep
whose length depends on the run id (so processes drift apart and meet on every kind of row), appends each run id it
executes to LOG, announces itself by creating READY, waits for GO (so all workers start claiming together), then runs
the real CLI: ``medtransfer benchmark CONFIG.yaml --out GRID_DIR --no-report`` and exits with its status.
With ``MT_HANG_ON=<run id>`` in the environment, that run creates LOG.hang and then hangs (to be killed).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path


def fake_metric(run_id: str) -> float:
    return int(hashlib.sha256(run_id.encode()).hexdigest()[:6], 16) / 16**6


def main(argv: list[str]) -> int:
    config, grid_dir, log, ready, go, *extra = argv
    from medtransfer.bench import grid
    from medtransfer.cli import app

    def run_cell(cfg, cell, pretrained, grid_dir, progress=False):
        rid = cell["run_id"]
        if rid == os.environ.get("MT_HANG_ON"):
            Path(log + ".hang").touch()
            time.sleep(600)
        time.sleep(0.02 + 0.06 * (int(hashlib.sha256(rid.encode()).hexdigest()[:2], 16) % 5))  # 0.02 .. 0.26 s
        with open(log, "a") as f:  # one short O_APPEND write per run: lines of several processes never mix
            f.write(f"{rid} {os.getpid()}\n")
        value = fake_metric(rid)
        return {"metric": value, "metrics": {"dice_mean": value}, "steps": 7,
                "run_dir": f"runs/{rid}", "preset": "zscore"}  # relative: equal across grid folders

    grid.run_cell = run_cell
    Path(ready).touch()
    deadline = time.monotonic() + 120
    while not Path(go).exists():
        if time.monotonic() > deadline:
            return 3
        time.sleep(0.01)
    try:
        app(["benchmark", config, "--out", grid_dir, "--no-report", *extra], prog_name="medtransfer")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
