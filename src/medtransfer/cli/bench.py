"""``medtransfer benchmark | report``: run a grid of fine-tunes and write its report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ..bench.store import LEASE_SECONDS
from . import _fail

bench_app = typer.Typer()


@bench_app.command()
def benchmark(
    config: Path = typer.Argument(..., help="Benchmark YAML: model, inits, tasks, fractions, trials, finetune."),
    out: Optional[Path] = typer.Option(None, "--out", help="Grid folder (default: the config's out)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="Run part i of n ('i/n'), e.g. a SLURM array task."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Run failed cells again."),
    overrides: list[str] = typer.Option([], "--set", help="key=value override, e.g. trials=5 (repeatable)."),
    no_report: bool = typer.Option(False, "--no-report", help="Do not write report.md/html at the end."),
    lease: float = typer.Option(LEASE_SECONDS, "--lease", metavar="SECONDS",
                                help="How long a run stays claimed without renewal (renewed every "
                                     "min(30, lease/5) s); another process sharing the store takes over a run "
                                     "of a dead one after this."),
) -> None:
    """Run (or resume) a grid of initialisations x tasks x label fractions x trials; results go to
    store.sqlite in the grid folder, one fine-tune + test evaluation per cell, then the report.

    On disk: one prepared cache per task and intensity pipeline (cache/<task>/<hash>) shared by all runs; a
    finished run keeps what the config's keep says (best: checkpoints/best.pt, weights only, the default; none: no
    weights, so evaluate/predict cannot be run on it later; all: everything, incl. last.pt), e.g. --set keep=none.
    Inside a grid runs write no last.pt while they train (keep: all writes it once at the end): a killed grid
    redoes its unfinished run from the start, with the same seed and split."""
    from ..bench.grid import load_benchmark_config, run_benchmark

    try:
        cfg = load_benchmark_config(config, overrides)
        tty = sys.stderr.isatty()
        grid = run_benchmark(cfg, out=out, shard=shard, retry_failed=retry_failed, progress=tty,
                             echo=None if tty else typer.echo, lease=lease)
        if not no_report and shard is None:
            _report(grid, [], baseline=cfg.baseline)
        _exit_on_failures(grid / (f"store-{shard.replace('/', 'of')}.sqlite" if shard else "store.sqlite"))
    except ValueError as exc:
        _fail(exc)


@bench_app.command()
def report(
    grid: Path = typer.Argument(..., help="A benchmark grid folder (holds store.sqlite)."),
    merge: list[Path] = typer.Option([], "--merge", help="Shard stores to merge into the grid's store first."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Initialisation compared against."),
) -> None:
    """Rebuild report.md and report.html (table, p-values, charts, learning curves) from the store."""
    try:
        _report(grid, merge, baseline=baseline)
    except ValueError as exc:
        _fail(exc)


def _exit_on_failures(store_path: Path) -> None:
    """Exit 1 (for CI and SLURM) when the store holds failed runs; say how to see and retry them."""
    from ..bench.store import ResultStore

    with ResultStore(store_path) as store:
        failed = store.rows(status="failed")
    if failed:
        typer.echo(f"{len(failed)} run(s) failed, e.g. {failed[0]['run_id']}: {failed[0]['error'].splitlines()[-1]}\n"
                   "their errors are in the report; run again with --retry-failed after fixing the cause", err=True)
        raise typer.Exit(1)


def _report(grid: Path, merge: list[Path], *, baseline: Optional[str]) -> None:
    from ..bench.report import format_table, results_table, write_report
    from ..bench.store import ResultStore
    from ..errors import MedTransferError
    from ..paths import check_output_dir

    check_output_dir(grid, "GRID")  # report.md/html go there
    path = grid / "store.sqlite"
    if not path.is_file() and not merge:
        raise MedTransferError(f"{grid}: no store.sqlite here; run `medtransfer benchmark CONFIG --out {grid}` first")
    with ResultStore(path) as store:
        for other in merge:
            counts = store.merge_from(other)
            typer.echo(f"merged {other}: {counts}")
        rows = store.rows()
        cfg = store.get_meta("config") or {}
    base = baseline or cfg.get("baseline", "scratch")
    inits = sorted({r["init"] for r in rows})
    if rows and base not in inits:
        raise MedTransferError(f"--baseline {base!r} is not an initialisation of this grid; choose one of {inits}")
    md, html = write_report(grid, rows, baseline=base, title=f"medtransfer {cfg.get('name', 'benchmark')}",
                            meta={"config": cfg.get("name")})
    typer.echo(format_table(results_table(rows, baseline=base)))
    typer.echo(f"report: {md}\n        {html}")
