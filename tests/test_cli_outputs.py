"""Every command that writes: an output path that is a file, or lies under one, and a read-only folder end in one
`error:` line naming the path (exit 1 or 2), never a traceback, and what was there before is left as it was.

Tests run as root in CI, for whom a 0o555 folder is writable; the read-only folder is therefore simulated (writes
under it fail with EACCES, as they would for a user) and, where the OS enforces it (not root, or root without
CAP_DAC_OVERRIDE: `setpriv --bounding-set -dac_override ...`), also made real with chmod alone."""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
from pathlib import Path

import pytest
import yaml
from typer.main import get_command
from typer.testing import CliRunner

from medtransfer import paths
from medtransfer.cli import app
from medtransfer.data.phantoms import write_phantom_dataset
from medtransfer.errors import OutputPathError

runner = CliRunner()

TINY = ["--set", "model.arch.feature_chns=[4,8,16,32,64]", "--set", "data.patch_size=[32,32,32]"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("data"), 3, 0, shape=(32, 32, 32), spacing=(5.0,) * 3,
                                 with_2d=False)


@pytest.fixture(scope="module")
def run(phantoms, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    result = runner.invoke(app, ["finetune", "--model", "fmunet", "--data", str(phantoms), "--out", str(out), *TINY,
                                 "--set", "train.max_steps=1", "--set", "data.val_fraction=0.34"])
    assert result.exit_code == 0, result.output
    return out


def _grid_config(tmp: Path, phantoms: Path, out: Path) -> Path:
    config = tmp / "grid-config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "fmunet", "arch": {"feature_chns": [4, 8, 16, 32, 64]}},
        "inits": [{"name": "scratch"}], "tasks": [{"name": "seg", "data": str(phantoms)}], "trials": 1,
        "finetune": {"train": {"max_steps": 1}, "data": {"patch_size": [32, 32, 32]}}, "out": str(out)}))
    return config


# command -> its arguments with the output at `out` (an existing file, a path under one, or a read-only folder)
def _args(command: str, out: Path, tmp: Path, phantoms: Path, run: Path) -> list[str]:
    image = str(phantoms / "imagesTr" / "phantom_000.nii.gz")
    luna = tmp / "luna"
    if command == "data candidates" and not luna.exists():
        from medtransfer.data.phantoms_detection import write_detection_phantoms

        write_detection_phantoms(luna, 1, 0, "luna16", false_per_true=1)
    return {
        "zoo convert": ["zoo", "convert", str(run / "checkpoints" / "best.pt"), "-m", "fmunet", "-o", str(out)],
        "data phantoms": ["data", "phantoms", "--out", str(out), "--n", "1", "--size", "16", "--no-2d"],
        "data prepare": ["data", "prepare", str(phantoms), "-o", str(out)],
        "data candidates": ["data", "candidates", str(luna), "--candidates", str(luna / "candidates.csv"), "--out",
                            str(out), "--cube-size", "4,8,8"],
        "data cubes": ["data", "cubes", str(phantoms), "-o", str(out), "--cube-size", "8,8,8", "--border-xy", "2",
                       "--border-z", "2", "--lung-max", "1"],
        "finetune": ["finetune", "--model", "fmunet", "--data", str(phantoms), "--out", str(out), *TINY,
                     "--set", "train.max_steps=1"],
        "pretrain": ["pretrain", "--method", "genesis", "--model", "fmunet", "--data", str(phantoms), "--out", str(out),
                     *TINY, "--set", "train.max_steps=1"],
        "predict": ["predict", str(run), image, "--out", str(out)],
        "evaluate": ["evaluate", str(out)],
        "benchmark": ["benchmark", str(_grid_config(tmp, phantoms, out))],
        "report": ["report", str(out)],
        "demo": ["demo", "--quick", "--out", str(out)],
    }[command]


COMMANDS = ("zoo convert", "data phantoms", "data prepare", "data cubes", "data candidates", "finetune", "pretrain",
            "predict", "evaluate", "benchmark", "report", "demo")
WRITE_INTO_THEIR_ARGUMENT = {"evaluate", "report"}  # RUN_DIR/evaluation, GRID/report.md


def test_the_walk_covers_every_command_that_writes():
    found = set()

    def walk(group, prefix=""):
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                walk(command, f"{prefix}{name} ")
            elif name in WRITE_INTO_THEIR_ARGUMENT or any("--out" in p.opts for p in command.params):
                found.add(prefix + name)

    walk(get_command(app))
    assert found == set(COMMANDS)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(root.rglob("*"))}


def _assert_one_clear_line(result, path: Path) -> str:
    assert isinstance(result.exception, SystemExit), result.exception  # CliRunner keeps any other exception here
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert str(path) in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("command, where", [(c, w) for c in COMMANDS for w in ("file", "under a file")
                                            if (c, w) != ("evaluate", "under a file")])  # evaluate names its run
def test_an_output_that_is_a_file_is_refused_and_left_intact(command, where, tmp_path, phantoms, run):
    existing = tmp_path / "existing"
    existing.write_bytes(b"keep me\n")
    target = None
    if command == "evaluate":  # its output is RUN_DIR/evaluation
        run_copy = tmp_path / "run"
        shutil.copytree(run, run_copy)
        existing = run_copy / "evaluation"
        existing.write_bytes(b"keep me\n")
        target = run_copy
    elif command == "report" and where == "file":
        target = existing
    else:
        target = existing if where == "file" else existing / "inside"
        if command == "zoo convert":  # its output is a file: a folder in the way is the matching case
            target = existing / "w.safetensors" if where == "under a file" else tmp_path / "folder.safetensors"
            if where == "file":
                target.mkdir()
                existing = target
    args = _args(command, target, tmp_path, phantoms, run)
    before = _snapshot(tmp_path)
    result = runner.invoke(app, args)
    _assert_one_clear_line(result, existing)
    assert _snapshot(tmp_path) == before  # nothing written, nothing removed


@pytest.fixture
def read_only(monkeypatch, request):
    """``read_only(folder)``: from now on, writes under ``folder`` fail with EACCES, as for a user without the
    right; the output-path check sees it as not writable. ``how`` "chmod": mode 0o555 and nothing else."""

    def make(folder: Path) -> Path:
        folder = folder.resolve()
        if request.node.callspec.params["how"] == "chmod":
            folder.chmod(0o555)  # the test restores it
            return folder

        def blocked(path) -> bool:
            if isinstance(path, int):
                return False
            p = Path(os.path.abspath(os.fsdecode(path)))
            return p == folder or folder in p.parents

        def deny(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))

        real_open, real_os_open, real_writable = builtins.open, os.open, paths.writable

        def fake_open(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+") and blocked(file):
                deny(file)
            return real_open(file, mode, *args, **kwargs)

        def fake_os_open(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and blocked(path):
                deny(path)
            return real_os_open(path, flags, *args, **kwargs)

        def guard(real):
            def fake(path, *args, **kwargs):
                if blocked(path) or (args and isinstance(args[0], (str, os.PathLike)) and blocked(args[0])):
                    deny(path)
                return real(path, *args, **kwargs)
            return fake

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)
        monkeypatch.setattr(os, "open", fake_os_open)
        for name in ("mkdir", "replace", "rename", "unlink", "remove", "rmdir"):
            monkeypatch.setattr(os, name, guard(getattr(os, name)))
        monkeypatch.setattr(paths, "writable", lambda f: not blocked(f) and real_writable(f))
        return folder

    return make


def _permissions_enforced() -> bool:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o555)
        try:
            return not os.access(folder, os.W_OK)
        finally:
            os.chmod(folder, 0o755)


ENFORCED = _permissions_enforced()


@pytest.mark.parametrize("how", ["simulated", pytest.param("chmod", marks=pytest.mark.skipif(
    not ENFORCED, reason="this process writes into a 0o555 folder (root)"))])
@pytest.mark.parametrize("command", COMMANDS)
def test_a_read_only_folder_is_refused_and_left_intact(command, how, tmp_path, phantoms, run, read_only):
    ro = tmp_path / "ro"
    if command == "evaluate":  # the run folder itself is read-only
        shutil.copytree(run, ro)
    else:
        ro.mkdir()
    (ro / "earlier.txt").write_text("earlier results\n")
    target = ro / "new"
    if command == "evaluate":
        target = ro
    elif command == "report":
        from medtransfer.bench.store import ResultStore

        with ResultStore(ro / "store.sqlite"):
            pass
        target = ro
    elif command == "zoo convert":
        target = ro / "w.safetensors"
    args = _args(command, target, tmp_path, phantoms, run)
    before = _snapshot(ro)
    read_only(ro)
    try:
        result = runner.invoke(app, args)
    finally:
        ro.chmod(0o755)
    line = _assert_one_clear_line(result, ro)
    assert "write" in line, line
    assert _snapshot(ro) == before


# ---------------------------------------------------------------- the rule and the sentences, one by one


def test_check_output_dir_refuses_a_file_a_path_under_one_and_a_folder_that_cannot_be_written(tmp_path, monkeypatch):
    file = tmp_path / "f"
    file.write_text("x")
    with pytest.raises(OutputPathError, match=f"^--out {file} is a file; give a folder"):
        paths.check_output_dir(file)
    with pytest.raises(OutputPathError, match=f"^--out {file}/a/b: {file} is a file, so nothing can be created"):
        paths.check_output_dir(file / "a" / "b")
    assert paths.check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    with pytest.raises(OutputPathError, match=f"^--out {tmp_path} is a folder; give a file name"):
        paths.check_output_file(tmp_path)
    assert paths.check_output_file(file) == file  # an existing file is replaced atomically by the writers

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(OutputPathError, match=f"the folder {tmp_path} is not writable \\(permission denied\\); "
                                              "choose a folder you can write to"):
        paths.check_output_dir(tmp_path / "new", "GRID")

    class ReadOnlyMount:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(os, "access", lambda path, mode: True)  # root: access says yes, the mount says no
    monkeypatch.setattr(os, "statvfs", lambda path: ReadOnlyMount())
    with pytest.raises(OutputPathError, match=f"the folder {tmp_path} is on a read-only file system"):
        paths.check_output_dir(tmp_path / "new")


@pytest.mark.skipif(not ENFORCED, reason="this process writes into a 0o555 folder (root)")
def test_a_real_read_only_folder_is_not_writable(tmp_path):
    tmp_path.chmod(0o555)
    try:
        assert not paths.writable(tmp_path)
    finally:
        tmp_path.chmod(0o755)


def test_os_errors_become_one_sentence_naming_the_path_and_the_fix(tmp_path):
    file = tmp_path / "f"
    file.write_text("x")
    say = paths.describe_os_error
    assert say(OSError(errno.ENOSPC, "No space left on device", "/x/last.pt")) == (
        "could not write /x/last.pt: no space left on the device; free some space (or write to another disk) and run "
        "again")
    assert say(PermissionError(errno.EACCES, "Permission denied", "/x/.a.tmp")) == (
        "could not write /x/.a.tmp: permission denied; choose a folder you can write to")
    named = PermissionError(errno.EACCES, "Permission denied", "/x/.a.tmp")
    named.output_path = Path("/x/a.json")  # set by atomic_write: the user's name, not the temporary file's
    assert say(named).startswith("could not write /x/a.json: permission denied")
    assert say(OSError(errno.EROFS, "Read-only file system", "/x")) == (
        "could not write /x: the file system is read-only; choose a folder you can write to")
    assert say(FileExistsError(errno.EEXIST, "File exists", str(file))) == (
        f"{file} is a file, where a folder is needed; give a folder path")
    assert say(NotADirectoryError(errno.ENOTDIR, "Not a directory", str(file / "a" / "b"))) == (
        f"{file / 'a' / 'b'}: {file} is a file, not a folder; give a path inside a folder")
    assert say(IsADirectoryError(errno.EISDIR, "Is a directory", str(tmp_path))) == (
        f"{tmp_path} is a folder, where a file is needed; give a file name")
    assert say(OSError(errno.ENOSPC, "No space left on device")) == (
        "a file could not be written: no space left on the device; free some space (or write to another disk) and "
        "run again")


def test_write_failures_without_errno_are_recognised_and_read_failures_are_not():
    full = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    full.output_path = Path("/run/checkpoints/last.pt")
    assert paths.describe_write_failure(full) == (
        "could not write /run/checkpoints/last.pt: the disk may be full ([enforce fail at inline_container.cc:672] . "
        "unexpected pos 704 vs 598); free some space (or write to another disk) and run again")
    assert paths.describe_write_failure(RuntimeError("PytorchStreamWriter failed writing file data/3")) is not None
    read = RuntimeError("[enforce fail at inline_container.cc:225] . PytorchStreamReader failed reading zip archive")
    assert paths.describe_write_failure(read) is None
    assert paths.describe_write_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    import sqlite3

    assert paths.describe_write_failure(sqlite3.OperationalError("database or disk is full")) == (
        "could not write a results store: the disk is full (database or disk is full); free some space and run the "
        "same command again (finished runs are kept)")
    assert paths.describe_write_failure(sqlite3.OperationalError("no such table: runs")) is None


@pytest.mark.parametrize("bug", [KeyError("oops"), RuntimeError("shapes cannot be multiplied"), ZeroDivisionError()])
def test_a_bug_keeps_its_exception(bug, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr("medtransfer.data.phantoms.write_phantom_dataset", broken)
    result = runner.invoke(app, ["data", "phantoms", "--out", str(tmp_path / "p")])
    assert result.exception is bug  # not turned into a friendly line: a traceback is what a bug report needs


def test_a_closed_pipe_is_left_to_click(monkeypatch, tmp_path):
    def closed(*args, **kwargs):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr("medtransfer.data.phantoms.write_phantom_dataset", closed)
    result = runner.invoke(app, ["data", "phantoms", "--out", str(tmp_path / "p")])
    assert "error:" not in result.output and result.exit_code == 1  # click's quiet exit for `| head`
