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
    """The main job on the embedded phantoms: pretrain (Models Genesis, Volume Fusion), benchmark against scratch on
    an organ segmentation task at 2 labelled cases and at 100% x five trials, print the table, the smallest
    detectable difference and the steps to scratch's final Dice, and write the report with learning curves."""
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
