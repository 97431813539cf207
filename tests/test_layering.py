"""The command line sits on top: no module of the library imports ``medtransfer.cli`` (read from the sources with
``ast``, nothing imported), and every command and group of the app answers ``--help``."""

import ast
import pkgutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import medtransfer


def imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Every module name ``source`` (the code of ``module``) imports, anywhere in it, relative imports resolved;
    for ``from X import a`` both ``X`` and ``X.a`` (``a`` may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) == "__import__")):
            found.add(node.args[0].value)
    return found


def _is_cli(name: str) -> bool:
    return name == "medtransfer.cli" or name.startswith("medtransfer.cli.")


def _library_modules():
    for info in pkgutil.walk_packages(medtransfer.__path__, prefix="medtransfer."):
        if not _is_cli(info.name):
            folder = Path(info.module_finder.path)
            leaf = info.name.rpartition(".")[2]
            path = folder / leaf / "__init__.py" if info.ispkg else folder / f"{leaf}.py"
            yield info.name, info.ispkg, path
    yield "medtransfer", True, Path(medtransfer.__file__)


@pytest.mark.parametrize("source, module, is_package", [
    ("from ..cli import _fail", "medtransfer.train.finetune", False),
    ("def f():\n    from .. import cli\n", "medtransfer.bench.grid", False),
    ("from .cli.train import build_config", "medtransfer", True),
    ("from ...cli import app", "medtransfer.data.sub.mod", False),
    ("import medtransfer.cli.zoo", "medtransfer.zoo.tools", False),
    ("from medtransfer import cli", "medtransfer.weights.io", False),
    ("import importlib\nimportlib.import_module('medtransfer.cli')", "medtransfer.paths", False),
])
def test_the_checker_sees_every_way_of_importing_the_cli(source, module, is_package):
    assert any(_is_cli(name) for name in imported_modules(source, module, is_package))


def test_the_checker_resolves_relative_imports_to_their_own_package():
    assert imported_modules("from .config import read_yaml", "medtransfer.train.finetune", False) == {
        "medtransfer.train.config", "medtransfer.train.config.read_yaml"}
    assert imported_modules("from . import io", "medtransfer.weights", True) == {"medtransfer.weights",
                                                                                 "medtransfer.weights.io"}
    assert not any(_is_cli(n) for n in imported_modules("from .client import x", "medtransfer.data.cli_like", False))


def test_no_library_module_imports_the_cli():
    modules = list(_library_modules())
    names = {name for name, _, _ in modules}
    assert {"medtransfer.train.finetune", "medtransfer.bench.grid", "medtransfer.pretext.runner"} <= names
    offenders = {name: sorted(n for n in imported_modules(path.read_text(encoding="utf-8"), name, is_pkg) if _is_cli(n))
                 for name, is_pkg, path in modules}
    assert {name: found for name, found in offenders.items() if found} == {}


def _commands(command, path: tuple[str, ...] = ()):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():  # a group (Typer ships its own click)
        yield from _commands(sub, (*path, name))


def test_every_command_answers_help():
    from medtransfer.cli import app

    tree = dict(_commands(typer.main.get_command(app)))
    assert {("zoo", "list"), ("zoo", "inspect"), ("zoo", "convert"), ("data", "inspect"), ("data", "phantoms"),
            ("data", "cubes"), ("data", "prepare"), ("finetune",), ("evaluate",), ("predict",), ("pretrain",),
            ("benchmark",), ("report",), ("demo",)} <= set(tree)
    for path, command in tree.items():
        result = CliRunner().invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage:" in result.output and " ".join(("medtransfer", *path)) in result.output, (path, result.output)
        if command.help:
            assert command.help.split()[0] in result.output, path
