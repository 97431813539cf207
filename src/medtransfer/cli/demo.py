"""``medtransfer demo``: the main job on the embedded phantoms, end to end."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from . import _fail

demo_app = typer.Typer()


@demo_app.command()
def demo(
    quick: bool = typer.Option(False, "--quick", help="A one-minute smoke version (fewer steps and runs)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder (default runs/demo or runs/demo-quick)."),
) -> None:
    """The main job on the embedded phantoms: pretrain (Models Genesis, Volume Fusion, Med3D-style), benchmark
    against scratch at two label fractions x three trials, print the table and write the report."""
    from ..bench.demo import run_demo
    from ..paths import check_output_dir
    from .bench import _exit_on_failures

    target = out or Path("runs/demo-quick" if quick else "runs/demo")
    try:
        check_output_dir(target, "--out")
        run_demo(target, quick=quick, progress=sys.stderr.isatty(), echo=typer.echo)
        _exit_on_failures(target / "store.sqlite")
    except ValueError as exc:
        _fail(exc)
