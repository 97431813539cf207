"""``medtransfer benchmark``: a grid of initialisations x tasks x label fractions x trials, run and stored.

Every cell of the grid is one fine-tune (:func:`medtransfer.train.finetune.run_finetune`) followed by an evaluation
of its best checkpoint on the task's held-out test split. The grid folder holds:

* ``store.sqlite``: one row per run (:mod:`.store`): cell, seed, status, test metrics, steps, duration, run folder,
  intensity preset, the error of a failed run. A killed grid resumes where it stopped: finished runs are kept, an
  interrupted one (``running``) is run again from the start, failed ones only with ``--retry-failed``.
* ``grid.yaml``: the resolved config; its hash is stored and a store never mixes two grids.
* ``pretrain/<init>/``: initialisations made by a pretraining method, run once before the first cell that needs
  them (a finished one is reused).
* ``runs/<task>/<init>/f<fraction>/s<seed>/``: the fine-tune run folders (config, split, metrics.jsonl, evaluation).
* ``report.md`` / ``report.html`` (:mod:`.report`).

Design choices that make the comparison fair: every initialisation of a trial sees the same split (the trial seed
seeds the split: test cases held out first, then validation, then the nested label-fraction subsets), so paired
tests apply; one network architecture is shared unless an initialisation names its own.

Several processes may also share one store (on one machine, or on several over a shared file system): each claims
the next free run in one transaction and holds it by a lease it renews while the run goes on (:mod:`.store`), so
every run is run once and a dead process's run is taken over once its lease expires.

``--shard i/n`` runs every n-th cell (of the sorted run ids), so machines or a SLURM array share a grid; each writes
its own store (``store-<i>of<n>.sqlite``) and ``medtransfer report DIR --merge ...`` merges them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sqlite3
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from ..errors import MedTransferError
from ..train.config import _Section, config_data, format_validation_error
from ..train.recipes import merge
from .store import HEARTBEAT_SECONDS, LEASE_SECONDS, Claimant, _alive_here

log = logging.getLogger(__name__)


class NetworkConfig(_Section):
    name: str = "genesis_unet3d"
    arch: dict[str, Any] = Field(default_factory=dict)


class InitConfig(_Section):
    """One initialisation: ``scratch`` (no weights), a weight file or ``true`` (the model's published weights), or a
    pretraining run (a ``medtransfer pretrain`` config without model/out: method, data, options, optim, train...)."""

    name: str
    weights: Union[bool, str, None] = None
    pretrain: Optional[dict[str, Any]] = None
    model: Optional[NetworkConfig] = None  # None: the grid's model
    finetune: dict[str, Any] = Field(default_factory=dict)  # extra fine-tune values for this init (e.g. optim.lr)

    @model_validator(mode="after")
    def _one_source(self) -> InitConfig:
        if self.weights not in (None, False) and self.pretrain is not None:
            raise ValueError(f"init {self.name!r}: give weights or pretrain, not both")
        return self


class TaskConfig(_Section):
    """A target task: a labelled dataset (None: the embedded phantoms), its task type and the primary metric."""

    name: str
    data: Optional[Path] = None
    format: str = "auto"
    task: Literal["segmentation", "classification", "multilabel", "detection"] = "segmentation"
    # None: dice_mean (segmentation), accuracy (classification), auc_mean (multilabel), cpm (detection)
    metric: Optional[str] = None
    higher_is_better: bool = True
    finetune: dict[str, Any] = Field(default_factory=dict)  # fine-tune values for this task


class BenchmarkConfig(_Section):
    name: str = "benchmark"
    model: NetworkConfig = Field(default_factory=NetworkConfig)
    inits: list[InitConfig]
    tasks: list[TaskConfig]
    fractions: list[float] = Field(default_factory=lambda: [1.0])
    trials: int = Field(3, gt=0)  # seeds 0..trials-1
    baseline: str = "scratch"
    test_fraction: float = Field(0.25, gt=0, lt=1)
    finetune: dict[str, Any] = Field(default_factory=dict)  # fine-tune values for every run (train.max_steps...)
    out: Path = Path("runs/benchmark")

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if not value or any(not 0 < f <= 1 for f in value):
            raise ValueError(f"label fractions must be in (0, 1], got {value}")
        return sorted(set(value))

    @model_validator(mode="after")
    def _names(self) -> BenchmarkConfig:
        for what, names in (("inits", [i.name for i in self.inits]), ("tasks", [t.name for t in self.tasks])):
            if not names:
                raise ValueError(f"{what}: at least one is needed")
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{what}: names must be unique, repeated: {dup}")
            bad = [n for n in names if not n.replace("_", "").replace("-", "").isalnum()]
            if bad:
                raise ValueError(f"{what}: names may hold letters, digits, '_' and '-' only: {bad}")
        if self.baseline not in [i.name for i in self.inits]:
            raise ValueError(f"baseline {self.baseline!r} is not among the inits {[i.name for i in self.inits]}")
        return self


def load_benchmark_config(source: str | Path | dict | BenchmarkConfig, overrides=()) -> BenchmarkConfig:
    """A YAML file or a mapping plus ``key=value`` overrides -> a validated config; errors name the field."""
    if isinstance(source, BenchmarkConfig) and not overrides:
        return source
    data = config_data(source, BenchmarkConfig, overrides)
    try:
        return BenchmarkConfig.model_validate(data)
    except ValidationError as exc:
        raise MedTransferError(format_validation_error(exc, BenchmarkConfig)) from None


def grid_hash(cfg: BenchmarkConfig) -> str:
    """What identifies a grid: everything that changes what a cell's run means. Not where it is written, and not
    ``trials`` or ``fractions``: adding seeds or fractions extends the same grid (the store checks that every
    existing cell keeps its fields)."""
    data = cfg.model_dump(mode="json")
    for key in ("out", "trials", "fractions"):
        data.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def run_id(task: str, init: str, fraction: float, seed: int) -> str:
    return f"{task}/{init}/f{fraction:g}/s{seed}"


def cells(cfg: BenchmarkConfig) -> list[dict[str, Any]]:
    """Every run of the grid, trial-major (early results cover every initialisation) with the store's cell fields."""
    from ..train.metrics import metric_for

    out = []
    for seed in range(cfg.trials):
        for fraction in cfg.fractions:
            for task in cfg.tasks:
                metric = task.metric or metric_for(task.task)[0]
                for init in cfg.inits:
                    out.append({"run_id": run_id(task.name, init.name, fraction, seed), "init": init.name,
                                "task": task.name, "fraction": fraction, "seed": seed, "metric_name": metric,
                                "higher_is_better": task.higher_is_better})
    return out


# ------------------------------------------------------------------------------------------------------ running


def pretrain_config(cfg: BenchmarkConfig, init: InitConfig, grid_dir: Path) -> dict[str, Any]:
    """The ``medtransfer pretrain`` config of a pretraining init: its values plus the grid's network and folder."""
    net = init.model or cfg.model
    return merge(init.pretrain or {}, {"model": {"name": net.name, "arch": dict(net.arch)},
                                       "out": str(grid_dir / "pretrain" / init.name)})


def _pretrained(cfg: BenchmarkConfig, init: InitConfig, grid_dir: Path, progress: bool,
                echo: Optional[Callable[[str], None]] = None) -> Union[bool, str]:
    """The ``model.pretrained`` value of an init, pretraining it first when it is a pretraining init.

    A finished pretraining is reused only when its config is unchanged (``pretrain.json`` records its hash); an
    interrupted one resumes from its ``last.pt``. Shards of one grid share ``pretrain/<init>/``: the first takes a
    lock file and pretrains, the others wait for its product."""
    if init.pretrain is None:
        return init.weights if init.weights is not None else False
    from ..pretext.config import load_pretrain_config
    from ..pretext.runner import run_pretrain
    from ..weights.io import atomic_write

    data = pretrain_config(cfg, init, grid_dir)
    resolved = load_pretrain_config(data)
    key = hashlib.sha256(json.dumps(resolved.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]
    out = Path(data["out"])
    product, marker, lock = out / "pretrained.safetensors", out / "pretrain.json", out / ".pretrain.lock"

    def recorded() -> Optional[str]:
        try:
            return json.loads(marker.read_text()).get("hash")
        except (OSError, ValueError):
            return None

    with _Lock(lock, wait_for=lambda: product.is_file() and recorded() == key):
        if product.is_file() and recorded() == key:
            return str(product)
        resume = recorded() == key and (out / "checkpoints" / "last.pt").is_file()
        if not resume and out.exists():
            product.unlink(missing_ok=True)  # another config's product must never pass for this one
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(marker, lambda tmp: tmp.write_text(json.dumps({"hash": key, "done": False}) + "\n"))
        if echo is not None:
            echo(f"pretraining {init.name} ({resolved.method}){' (resuming)' if resume else ''} into {out}")
        run_pretrain(resolved, progress=progress, resume=resume, overwrite=not resume)  # the grid owns the folder
        atomic_write(marker, lambda tmp: tmp.write_text(json.dumps({"hash": key, "done": True}) + "\n"))
    return str(product)


class _Lock:
    """An exclusive lock file (``O_EXCL``) naming its owner; another process waits until ``wait_for()`` holds or
    the lock goes away. A lock left by a dead process on this host is taken over."""

    def __init__(self, path: Path, wait_for: Callable[[], bool], poll: float = 5.0) -> None:
        self.path, self.wait_for, self.poll, self.held = path, wait_for, poll, False

    def __enter__(self) -> _Lock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{socket.gethostname()}:{os.getpid()}"
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self.wait_for():
                    return self
                if _owner_dead(self.path):
                    self.path.unlink(missing_ok=True)
                    continue
                time.sleep(self.poll)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            return self

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)


def _owner_dead(path: Path) -> bool:
    """True when the lock's owner is a process of this host that no longer runs."""
    try:
        return _alive_here(path.read_text()) is False
    except OSError:
        return False


def finetune_config(cfg: BenchmarkConfig, cell: dict[str, Any], pretrained: Union[bool, str],
                    grid_dir: Path) -> dict[str, Any]:
    """The fine-tune config of one cell: grid values, then the task's, then the init's; the cell's own last."""
    task = next(t for t in cfg.tasks if t.name == cell["task"])
    init = next(i for i in cfg.inits if i.name == cell["init"])
    net = init.model or cfg.model
    data = merge(merge(cfg.finetune, task.finetune), init.finetune)
    return merge(data, {
        "model": {"name": net.name,
                  "task": task.task if task.task in ("segmentation", "detection") else "classification",
                  "pretrained": pretrained, "arch": dict(net.arch)},
        "data": {"path": str(task.data) if task.data else None, "format": task.format,
                 "label_fraction": cell["fraction"], "test_fraction": cfg.test_fraction},
        "train": {"seed": cell["seed"]},
        "out": str(grid_dir / "runs" / cell["task"] / cell["init"] / f"f{cell['fraction']:g}" / f"s{cell['seed']}"),
    })


def _last_step(run_dir: Path) -> Optional[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return int(json.loads(lines[-1])["step"]) if lines else None


def run_cell(cfg: BenchmarkConfig, cell: dict[str, Any], pretrained: Union[bool, str], grid_dir: Path,
             progress: bool = False) -> dict[str, Any]:
    """Fine-tune and evaluate one cell; returns metric, metrics, steps, run_dir and the run's intensity preset (from
    its ``contract.json``, so the report shows when the inits of a task were preprocessed differently)."""
    import math

    from ..train.finetune import evaluate, run_finetune

    ft = finetune_config(cfg, cell, pretrained, grid_dir)
    run_dir = run_finetune(ft, progress=progress, overwrite=True)  # a cell redone replaces its own earlier try
    summary = json.loads((evaluate(run_dir, split="test") / "summary.json").read_text())
    metrics = {k: float(v) for k, v in summary["metrics"].items() if isinstance(v, (int, float)) and math.isfinite(v)}
    name = cell["metric_name"]
    if name not in metrics:
        raise MedTransferError(f"metric {name!r} is not among the test metrics of {run_dir} "
                               f"({', '.join(sorted(metrics)) or 'none finite'})")
    preset = json.loads((Path(run_dir) / "contract.json").read_text()).get("preset")
    return {"metric": metrics[name], "metrics": metrics, "steps": _last_step(run_dir),
            "run_dir": str(Path(run_dir).resolve()), "preset": preset}


def check_inputs(cfg: BenchmarkConfig) -> None:
    """Fail before the first run when a task's dataset or an init's weight file does not exist (otherwise every
    cell using it would fail, one after another)."""
    problems = [f"task {t.name!r}: dataset {t.data} does not exist" for t in cfg.tasks
                if t.data is not None and not Path(t.data).exists()]
    problems += [f"init {i.name!r}: weight file {i.weights} does not exist" for i in cfg.inits
                 if isinstance(i.weights, str) and i.weights.lower() not in ("true", "false")
                 and not Path(i.weights).expanduser().exists()]
    from ..pretext.config import load_pretrain_config

    for init in cfg.inits:
        if init.pretrain is None:
            continue
        try:
            resolved = load_pretrain_config(pretrain_config(cfg, init, Path("_")))
        except MedTransferError as exc:
            problems.append(f"init {init.name!r}: its pretrain config is invalid: {exc}")
            continue
        problems += [f"init {init.name!r}: pretraining data {p} does not exist" for p in resolved.data.paths
                     if not Path(p).exists()]
    if problems:
        raise MedTransferError("the grid cannot start:\n  " + "\n  ".join(problems) + "\nfix the config")


def run_benchmark(cfg: BenchmarkConfig | str | Path | dict, *, out: Optional[Path] = None, shard: Optional[str] = None,
                  retry_failed: bool = False, progress: bool = True,
                  on_result: Optional[Callable[[dict[str, Any]], None]] = None, overrides=(),
                  echo: Optional[Callable[[str], None]] = None, lease: float = LEASE_SECONDS,
                  heartbeat: Optional[float] = None) -> Path:
    """Run (or resume) the grid; returns the grid folder. Failed cells are recorded and the grid goes on.

    Several processes may run one grid (and one store) at once: each claims the next free run from the store
    (:meth:`.store.ResultStore.claim_next`), so every run is run once, and skips what the others finished or hold.
    A claim is a lease of ``lease`` seconds, renewed every ``heartbeat`` seconds (default: the smaller of
    :data:`.store.HEARTBEAT_SECONDS` and a fifth of the lease) by a thread while the run goes on.

    ``progress``: a live bar (for a terminal); ``echo``: called with one line per finished run and per pretraining
    (for logs and pipes, where a bar cannot redraw); with ``echo`` and no bar, each fine-tune and pretraining also
    prints the training loop's plain progress lines on stderr."""
    from ..paths import check_output_dir
    from ..weights.io import atomic_write
    from .store import LeaseLost, ResultStore, StoreError, shard_of

    claimant = Claimant(lease=lease)
    if heartbeat is None:
        heartbeat = min(HEARTBEAT_SECONDS, lease / 5)
    if not 0 < heartbeat < lease:
        raise ValueError(f"heartbeat {heartbeat!r} s and lease {lease!r} s: the lease must outlast several "
                         f"heartbeats, e.g. lease {LEASE_SECONDS:g} and heartbeat {HEARTBEAT_SECONDS:g}")
    cfg = load_benchmark_config(cfg, overrides)
    check_inputs(cfg)
    grid_dir = check_output_dir(Path(out or cfg.out), "grid folder (out)")  # before the first run writes anything
    grid_dir.mkdir(parents=True, exist_ok=True)
    all_cells = cells(cfg)
    ids = [c["run_id"] for c in all_cells]
    mine = shard_of(ids, shard) if shard else ids
    store_name = f"store-{shard.replace('/', 'of')}.sqlite" if shard else "store.sqlite"
    with ResultStore(grid_dir / store_name) as store:
        known = store.get_meta("grid_hash")
        if known is not None and known != grid_hash(cfg):
            raise StoreError(f"{store.path} holds results of another grid config (hash {known}, this one "
                             f"{grid_hash(cfg)}); only trials and fractions may change between runs of one grid. "
                             "Use another --out for the new config")
        text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
        atomic_write(grid_dir / "grid.yaml", lambda tmp: tmp.write_text(text))
        store.set_meta("grid_hash", grid_hash(cfg))
        store.set_meta("config", cfg.model_dump(mode="json"))
        wanted = set(mine)
        store.ensure(c for c in all_cells if c["run_id"] in wanted)
        todo = store.todo(mine, retry_failed=retry_failed)  # for the bar: other processes may take some of them
        # Each failure is retried once per invocation, and not again when another process has retried it since.
        retry = {r["run_id"]: r["attempts"] for r in store.rows(status="failed")} if retry_failed else None
        by_id = {c["run_id"]: c for c in all_cells}
        inits = {i.name: i for i in cfg.inits}
        weights: dict[str, Union[bool, str]] = {}
        broken: dict[str, str] = {}  # init -> why its pretraining failed (not retried within this invocation)
        bar = _Bar(progress, len(todo), len(mine) - len(todo), echo)
        lines = echo is not None and not progress  # a log: the training loop's plain progress lines go there too
        tried: set[str] = set()
        beat = _Heartbeat(store.path, claimant, heartbeat)
        held: Optional[str] = None  # the run this process has claimed and not yet recorded
        try:
            while True:
                rid = store.claim_next([r for r in todo if r not in tried], claimant, retry=retry, shard=shard)
                if rid is None:
                    break
                tried.add(rid)
                held = rid
                beat.hold(rid)
                cell = by_id[rid]
                t0 = time.perf_counter()
                try:
                    name = cell["init"]
                    if name in broken:
                        raise MedTransferError(f"the pretraining of init {name!r} failed: {broken[name]}")
                    if name not in weights:
                        try:
                            weights[name] = _pretrained(cfg, inits[name], grid_dir, progress or lines, echo)
                        except Exception as exc:  # noqa: BLE001 - recorded on every cell of the init
                            broken[name] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                            raise
                    result = run_cell(cfg, cell, weights[name], grid_dir, progress=lines)
                except (KeyboardInterrupt, SystemExit):
                    raise  # the row stays "running", its lease released below: the next run of the grid redoes it
                except Exception as exc:  # noqa: BLE001 - one failed cell must not stop the grid
                    detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                    log.warning("run %s failed: %s", rid, detail)
                    result, text = None, f"{rid}: FAILED ({detail.splitlines()[0][:80]})"
                else:
                    text = f"{rid}: {cell['metric_name']} {result['metric']:.4f}"
                beat.hold(None)
                try:
                    if result is None:
                        store.mark_failed(rid, error=detail, duration=time.perf_counter() - t0, claimant=claimant)
                    else:
                        store.mark_done(rid, duration=time.perf_counter() - t0, claimant=claimant, **result)
                        if on_result is not None:
                            on_result({**cell, **result})
                except LeaseLost as lost:  # this process stalled past its lease; the other attempt's result counts
                    log.warning("%s", lost)
                    text = f"{rid}: result dropped, the run was taken over by another process"
                held = None
                bar.advance(text)
        finally:
            beat.stop()  # before the release: a late renewal must not lease the released row again
            if held is not None:
                try:
                    store.release(held, claimant)
                except (sqlite3.Error, MedTransferError) as exc:  # the lease then expires on its own
                    log.warning("could not release the lease on run %s: %s", held, exc)
            bar.close()
        others = [r for r in todo if r not in tried]
        if others:
            status = {r["run_id"]: r["status"] for r in store.rows()}
            finished = sum(status.get(r) in ("done", "failed") for r in others)
            busy = [r for r in others if status.get(r) == "running"]
            (echo or log.info)(f"{finished} run(s) were run by other processes sharing {store.path}"
                               + (f"; {len(busy)} still being run by them, e.g. {busy[0]}" if busy else ""))
    return grid_dir


class _Heartbeat:
    """Renews the lease of the run this process holds, every ``every`` seconds, from a daemon thread with its own
    store connection (SQLite connections stay in their thread). A process that dies stops renewing, so its lease
    expires and another process may take the run over."""

    def __init__(self, path: Path, claimant: Claimant, every: float) -> None:
        self.path, self.claimant, self.every = path, claimant, every
        self.held: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="medtransfer-lease", daemon=True)
        self._thread.start()

    def hold(self, run_id: Optional[str]) -> None:
        self.held = run_id

    def _run(self) -> None:
        from .store import ResultStore

        store: Optional[ResultStore] = None
        try:
            while not self._stop.wait(self.every):
                rid = self.held
                if rid is None:
                    continue
                try:
                    store = store or ResultStore(self.path)
                    if not store.renew(rid, self.claimant):
                        log.warning("the lease on run %s could not be renewed: another process took it over", rid)
                        self.held = None
                except (sqlite3.Error, MedTransferError) as exc:  # a busy or flaky file system: try next beat
                    log.warning("renewing the lease on run %s failed (%s); retrying in %g s", rid, exc, self.every)
        finally:
            if store is not None:
                store.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class _Bar:
    """A rich progress bar over the grid's runs, with the last result as its description."""

    def __init__(self, enabled: bool, total: int, done_before: int,
                 echo: Optional[Callable[[str], None]] = None) -> None:
        self.progress, self.echo, self.total, self.count = None, echo, total, 0
        if enabled and total:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("[bold]benchmark"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("{task.description}"), transient=False)
            self.progress.start()
            self.task = self.progress.add_task(f"{done_before} done before", total=total)

    def advance(self, text: str) -> None:
        self.count += 1
        if self.progress is not None:
            self.progress.update(self.task, advance=1, description=text)
        elif self.echo is not None:
            self.echo(f"[{self.count}/{self.total}] {text}")
        else:
            log.info(text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
