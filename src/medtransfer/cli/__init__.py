"""The `medtransfer` command line: the one package that speaks to the terminal.

This module holds the app, its root command group (the shared error reporting: :class:`_Commands`, :func:`_fail`),
the consoles and ``--version``/``--verbose``; each command group lives in its own module (``zoo``, ``data``,
``train``: finetune/evaluate/predict, ``pretrain``, ``bench``: benchmark/report, ``demo``). Each command parses its
options, imports lazily and calls one library function, leaving a :class:`~medtransfer.errors.MedTransferError` to
:class:`_Commands`; a command catches only what the root group would not report (a ``ValueError`` such as pydantic's
validation of a config, an exit code of its own). No library module imports this package (tests/test_layering.py
checks it)."""

from __future__ import annotations

import errno
import logging
import sys

import typer
from rich.console import Console
from typer.core import TyperGroup

class _Commands(TyperGroup):
    """The root command group: whatever command runs, an error of the OS (a full disk, a read-only folder, a file
    where a folder is needed), of torch's checkpoint writer or of SQLite on a full disk ends as one line and exit 1,
    a medtransfer error not caught by its command as one line and exit 2. Any other exception is a bug and keeps its
    traceback.

    Sitting in ``invoke`` (not ``main``) it also holds under ``typer.testing.CliRunner().invoke(app, ...)``."""

    def invoke(self, ctx):
        from ..errors import MedTransferError
        from ..paths import describe_os_error, describe_write_failure

        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort):
            raise
        except MedTransferError as exc:  # before OSError: WeightsNotFoundError is both
            _fail(exc)
        except OSError as exc:
            if exc.errno == errno.EPIPE:  # click's own handling of a closed pipe (`| head`)
                raise
            _fail(describe_os_error(exc), code=1)
        except Exception as exc:  # torch's and SQLite's write failures carry no errno
            message = describe_write_failure(exc)
            if message is None:
                raise
            _fail(message, code=1)


app = typer.Typer(
    cls=_Commands,
    name="medtransfer",
    help="Transfer learning for 3D (and 2D) medical image analysis: a model zoo that loads every published "
    "checkpoint of MedicalNet, VDT, Models Genesis, MIS-FM and BenchmarkTransferLearning with a load report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

console = Console()
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"medtransfer {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress and load reports in detail."),
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _fail(exc: Exception | str, code: int = 2) -> None:
    """Print one ``error:`` line and exit: 2 for a refused input (the default), 1 for a failure of the OS."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=code)


def _register_commands() -> None:
    # the modules import _fail and the consoles from here, so they come after them; the order is the one --help lists
    from .bench import bench_app
    from .data import data_app
    from .demo import demo_app
    from .pretrain import pretrain_app
    from .train import train_app
    from .zoo import zoo_app

    for commands in (pretrain_app, train_app, bench_app, demo_app):
        app.add_typer(commands)  # no name: its commands sit at the top level
    app.add_typer(zoo_app, name="zoo")
    app.add_typer(data_app, name="data")


_register_commands()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover
        err_console.print("interrupted")
        sys.exit(130)
