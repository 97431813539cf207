"""Wall time, memory and disk of the main job, ``medtransfer demo`` (target: < 10 minutes, < 4 GB on 2 CPU cores).

    python benchmarks/demo.py            # the full demo into a temporary folder (about 8 minutes on 2 idle cores)
    python benchmarks/demo.py --quick    # medtransfer demo --quick

Runs the command in a child process and reports, from ``getrusage(RUSAGE_CHILDREN)`` after it exits: its peak
resident memory (``ru_maxrss``, kilobytes on Linux) and the bytes it wrote to disk (``ru_oublock``, block output
operations, counted by Linux in 512-byte units: writes that reached the block layer, so a tmpfs folder counts 0 and
pages still dirty at exit are left out; ``/proc/<pid>/io`` would say more but cannot be read once the child has
exited). Before the temporary folder is removed it adds up the bytes left in it (apparent file sizes) and reads the
detectable effect and the convergence table from the demo's store and run logs. Prints the demo's own output, then
the figures, and writes JSON (``benchmarks/results/demo-cpu.json``), atomically.
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


def disk_usage(root: Path) -> dict:
    """Files under ``root`` and their apparent size in bytes, in all and per top-level entry."""
    per_entry: dict[str, int] = {}
    files = 0
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            if path.is_symlink():
                continue
            top = path.relative_to(root).parts[0]
            per_entry[top] = per_entry.get(top, 0) + path.stat().st_size
            files += 1
    return {"bytes": sum(per_entry.values()), "files": files, "by_entry": dict(sorted(per_entry.items()))}


def demo_statistics(grid: Path) -> dict:
    """The detectable effects and the convergence table of a finished demo, read from its store and run logs."""
    from medtransfer.bench.report import convergence, detectable_effects, format_convergence, format_detectable, \
        results_table
    from medtransfer.bench.store import ResultStore

    with ResultStore(grid / "store.sqlite") as store:
        rows = store.rows()
    effects = detectable_effects(results_table(rows))
    speed = convergence(rows)
    return {"detectable_effect": effects, "convergence": [{k: v for k, v in e.items() if k != "trials"}
                                                         for e in speed],
            "text": format_detectable(effects) + "\n" + format_convergence(speed)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    parser.add_argument("--tmp", type=Path, default=None,
                        help="parent of the temporary demo folder (default: the system's; on tmpfs no bytes are "
                             "counted as written)")
    args = parser.parse_args(argv)
    exe = Path(sys.executable).with_name("medtransfer")
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        grid = Path(tmp) / "demo"
        cmd = [str(exe), "demo", "--out", str(grid), *(["--quick"] if args.quick else [])]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        print(proc.stdout)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            raise SystemExit(f"the demo failed with exit code {proc.returncode}")
        disk = disk_usage(grid)
        statistics = demo_statistics(grid)
    peak_mb = usage.ru_maxrss / 1024  # Linux: kilobytes
    written = usage.ru_oublock * 512
    from medtransfer.provenance import cpu_name, versions

    result = {"command": " ".join(["medtransfer", "demo", *(["--quick"] if args.quick else [])]),
              "wall_minutes": wall / 60, "peak_rss_mb": peak_mb, "disk_left_bytes": disk["bytes"],
              "disk_left_files": disk["files"], "disk_left_by_entry": disk["by_entry"], "bytes_written": written,
              "bytes_written_source": "getrusage(RUSAGE_CHILDREN).ru_oublock * 512",
              "targets": {"wall_minutes": 10, "peak_rss_mb": 4096, "disk_left_mb": 150},
              "cpu": cpu_name(), "cpu_count": os.cpu_count(), "load_average_after": os.getloadavg(), **versions(),
              "detectable_effect": statistics["detectable_effect"], "convergence": statistics["convergence"],
              "table": proc.stdout}
    print(f"wall time {wall / 60:.2f} min (target < 10), peak memory {peak_mb:.0f} MB (target < 4096), "
          f"left on disk {disk['bytes'] / 1e6:.1f} MB in {disk['files']} files (target < 150 MB), "
          f"written {written / 1e6:.0f} MB (ru_oublock x 512); CPU: {cpu_name()}, {os.cpu_count()} cores")
    out = args.out or HERE / "results" / ("demo-quick-cpu.json" if args.quick else "demo-cpu.json")
    from medtransfer.weights.io import atomic_write

    text = json.dumps(result, indent=2) + "\n"
    atomic_write(out, lambda t: t.write_text(text))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
