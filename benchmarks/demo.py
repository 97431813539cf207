"""Wall time, memory and disk of the main job, ``medtransfer demo`` (target: < 10 minutes, < 4 GB on 2 CPU cores).

    python benchmarks/demo.py            # the full demo into a temporary folder (about 8 minutes on 2 idle cores)
    python benchmarks/demo.py --quick    # medtransfer demo --quick
    python benchmarks/demo.py --update-docs   # the full demo, then rewrite the demo parts of README.md and
                                              # docs/performance.md (between their <!-- demo-... --> markers)
    python benchmarks/demo.py --update-docs --from-json benchmarks/results/demo-cpu.json   # the same, no rerun

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
            "detectable_text": format_detectable(effects), "convergence_text": format_convergence(speed)}


README_MARKERS = ("<!-- demo-output:begin -->", "<!-- demo-output:end -->")
PERFORMANCE_MARKERS = ("<!-- demo-figures:begin -->", "<!-- demo-figures:end -->")


def printed_tables(stdout: str) -> str:
    """The demo's tables and summaries: its output from the first task heading to the report paths."""
    lines = stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("### ")), 0)
    stop = next((i for i, line in enumerate(lines) if line.startswith("report: ")), len(lines))
    return "\n".join(lines[start:stop]).strip() + "\n"


def machine_line(result: dict) -> str:
    load = ", ".join(f"{x:.1f}" for x in result["load_average_after"])
    return (f"{result['cpu']}, {result['cpu_count']} cores, no GPU, torch {result['torch']}, Python {result['python']}, "
            f"{result['date']}; load average after the run {load} (1, 5, 15 min)")


def figures_line(result: dict) -> str:
    return (f"wall time {result['wall_minutes']:.2f} min, peak memory {result['peak_rss_mb']:.0f} MB, "
            f"{result['disk_left_bytes'] / 1e6:.1f} MB left on disk in {result['disk_left_files']} files, "
            f"{result['bytes_written'] / 1e6:.0f} MB written (ru_oublock x 512)")


def _replace_between(path: Path, markers: tuple[str, str], text: str) -> None:
    from medtransfer.weights.io import atomic_write

    old = path.read_text()
    begin, end = old.find(markers[0]), old.find(markers[1])
    if begin < 0 or end < begin:
        raise SystemExit(f"{path}: markers {markers[0]} ... {markers[1]} not found; put them around the demo part")
    new = old[: begin + len(markers[0])] + "\n" + text + old[end:]
    atomic_write(path, lambda t: t.write_text(new))
    print(f"updated {path}")


def update_docs(result: dict, root: Path = HERE.parent) -> None:
    """Rewrite the demo output in README.md and the demo figures in docs/performance.md from one result."""
    _replace_between(root / "README.md", README_MARKERS,
                     f"Printed by `python benchmarks/demo.py` on {machine_line(result)}; {figures_line(result)}. "
                     "Another CPU gives slightly different numbers (floating point).\n\n"
                     f"```\n{printed_tables(result['table'])}```\n")
    figures = (f"| `{result['command']}` | {result['wall_minutes']:.2f} min | {result['peak_rss_mb']:.0f} MB | "
               f"{result['disk_left_bytes'] / 1e6:.1f} MB | {result['bytes_written'] / 1e6:.0f} MB | "
               "< 10 min, < 4 GB, < 150 MB left |")
    _replace_between(root / "docs" / "performance.md", PERFORMANCE_MARKERS,
                     "| command | wall time | peak memory | left on disk | written (ru_oublock × 512) | targets |\n"
                     f"|---|---|---|---|---|---|\n{figures}\n\nMachine: {machine_line(result)}.\n\n"
                     f"Detectable effect (80% power, p < 0.05 after Holm):\n\n```\n"
                     + "".join(f"{line}\n" for line in result["detectable_text"].splitlines() if line.strip())
                     + "```\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    parser.add_argument("--update-docs", action="store_true",
                        help="rewrite the demo parts of README.md and docs/performance.md from this run")
    parser.add_argument("--tmp", type=Path, default=None,
                        help="parent of the temporary demo folder (default: the system's; on tmpfs no bytes are "
                             "counted as written)")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="with --update-docs: take the figures from this earlier result instead of running")
    args = parser.parse_args(argv)
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        update_docs(result)
        return result
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
              "date": time.strftime("%Y-%m-%d"), "detectable_effect": statistics["detectable_effect"],
              "detectable_text": statistics["detectable_text"], "convergence": statistics["convergence"],
              "table": proc.stdout}
    print(f"{figures_line(result)} (targets < 10 min, < 4096 MB, < 150 MB left); {machine_line(result)}")
    out = args.out or HERE / "results" / ("demo-quick-cpu.json" if args.quick else "demo-cpu.json")
    from medtransfer.weights.io import atomic_write

    text = json.dumps(result, indent=2) + "\n"
    atomic_write(out, lambda t: t.write_text(text))
    print(f"wrote {out}")
    if args.update_docs:
        if args.quick:
            raise SystemExit("--update-docs takes the full demo's figures; run it without --quick")
        update_docs(result)
    return result


if __name__ == "__main__":
    main()
