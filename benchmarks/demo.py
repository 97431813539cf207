"""Wall time and peak memory of the main job, ``medtransfer demo`` (target: < 10 minutes, < 4 GB on 2 CPU cores).

    python benchmarks/demo.py            # the full demo into a temporary folder (about 5 minutes on 2 cores)
    python benchmarks/demo.py --quick    # medtransfer demo --quick

Runs the command in a child process and reads its peak resident memory from ``getrusage(RUSAGE_CHILDREN)``;
prints the demo's own output, then the figures, and writes JSON (``benchmarks/results/demo-cpu.json``), atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = parser.parse_args(argv)
    exe = Path(sys.executable).with_name("medtransfer")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(exe), "demo", "--out", str(Path(tmp) / "demo"), *(["--quick"] if args.quick else [])]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: kilobytes
    print(proc.stdout)
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        raise SystemExit(f"the demo failed with exit code {proc.returncode}")
    from medtransfer.provenance import cpu_name, versions

    result = {"command": " ".join(["medtransfer", "demo", *(["--quick"] if args.quick else [])]),
              "wall_minutes": wall / 60, "peak_rss_mb": peak_mb, "targets": {"wall_minutes": 10, "peak_rss_mb": 4096},
              "cpu": cpu_name(), "cpu_count": os.cpu_count(), **versions(), "table": proc.stdout}
    print(f"wall time {wall / 60:.2f} min (target < 10), peak memory {peak_mb:.0f} MB (target < 4096)")
    out = args.out or HERE / "results" / ("demo-quick-cpu.json" if args.quick else "demo-cpu.json")
    from medtransfer.weights.io import atomic_write

    text = json.dumps(result, indent=2) + "\n"
    atomic_write(out, lambda t: t.write_text(text))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
