"""``medtransfer benchmark``: a grid of initialisations x tasks x label fractions x trials, run and stored.

Every cell of the grid is one fine-tune (:func:`medtransfer.train.finetune.run_finetune`) followed by an evaluation
of its best checkpoint on the task's held-out test split. The grid folder holds:

* ``store.sqlite``: one row per run (:mod:`.store`): cell, seed, status, test metrics, steps, duration, run folder,
  intensity preset, the error of a failed run. A killed grid resumes where it stopped: finished runs are kept, an
  interrupted one (``running``) is run again from the start, failed ones only with ``--retry-failed``.
* ``grid.yaml``: the resolved config; its hash is stored and a store never mixes two grids.
* ``pretrain/<init>/``: initialisations made by a pretraining method, run once before the first cell that needs
  them (a finished one is reused; its ``checkpoints/`` are removed once ``pretrained.safetensors``, which holds
  its best weights, is written, except under ``keep: all``).
* ``cache/<task>/<pipeline hash>/``: the task's prepared cases, one cache per preprocessing pipeline, shared by
  every run of the grid (``data.cache_root``) and prepared by the first run that needs it, under a file lock.
* ``runs/<task>/<init>/f<fraction>/s<seed>/``: the fine-tune run folders (config, split, metrics.jsonl, evaluation)
  with what ``keep`` leaves of their checkpoints once the run is recorded ``done``: ``best`` (the default)
  ``checkpoints/best.pt`` (weights, step and metric, no optimiser state), ``none`` no weights, ``all`` ``best.pt``
  and ``last.pt``. A run never writes ``last.pt`` before its end inside a grid (``train.save_last: never``, or
  ``end`` under ``keep: all``): an interrupted run is run again from its start, so ``last.pt`` would only cost
  writes; ``best.pt`` is written at each validation that improved.
* ``report.md`` / ``report.html`` (:mod:`.report`).

The config models live in :mod:`.config`, the lease heartbeat and the pretraining lock in :mod:`.leases`; their
names are importable from here too.

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
import sqlite3
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Union

import yaml

from ..errors import MedTransferError
from ..train.recipes import merge
# the config, its cells and the leases live in their own modules; their names stay importable from here
from .config import (  # noqa: F401
    BenchmarkConfig,
    InitConfig,
    NetworkConfig,
    TaskConfig,
    cells,
    grid_hash,
    load_benchmark_config,
    run_id,
)
from .leases import _Heartbeat, _Lock, _owner_dead  # noqa: F401
from .store import HEARTBEAT_SECONDS, LEASE_SECONDS, Claimant

log = logging.getLogger(__name__)


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
        if cfg.keep != "all":  # its product holds the best weights; the checkpoints only served a resume
            apply_keep("none", out)
    return str(product)


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


_KEPT = {"best": "a finished run keeps checkpoints/best.pt, weights only", "none": "a finished run keeps no weights",
         "all": "a finished run keeps best.pt and last.pt with its optimiser state"}


def storage_config(cfg: BenchmarkConfig, cell: dict[str, Any], grid_dir: Path) -> dict[str, Any]:
    """How a cell's run uses the disk, merged under its fine-tune config (a value the config gives wins): the
    task's shared cache root (``data.cache_root``: one prepared cache per dataset and pipeline for the whole grid),
    and ``train.save_last``: ``never`` (a cell interrupted is run again from its start, so ``last.pt`` would only
    be written and removed), ``end`` under ``keep: all``; ``train.save_best: end`` (the best weights are held in
    memory and written once, when the run ends, instead of at every improving validation). None of it changes a
    run's result."""
    return {"data": {"cache_root": str(grid_dir / "cache" / cell["task"])},
            "train": {"save_last": "end" if cfg.keep == "all" else "never", "save_best": "end"}}


def apply_keep(keep: str, run_dir: Union[str, Path, None]) -> None:
    """Thin out a finished run's checkpoints as ``keep`` says; called only once the run is recorded ``done``, so
    that a run killed before that is redone with all its files. ``best``: ``last.pt`` goes; ``none``: ``best.pt``
    too; ``all``: nothing goes."""
    if keep == "all" or run_dir is None:
        return
    ckpt = Path(run_dir) / "checkpoints"
    for name in ("last.pt",) if keep == "best" else ("last.pt", "best.pt"):
        (ckpt / name).unlink(missing_ok=True)
    if keep == "none" and ckpt.is_dir() and not any(ckpt.iterdir()):
        ckpt.rmdir()


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

    ft = merge(storage_config(cfg, cell, grid_dir), finetune_config(cfg, cell, pretrained, grid_dir))
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
        (echo or log.info)(f"keep: {cfg.keep} ({_KEPT[cfg.keep]}; grid.yaml records it); prepared cases shared "
                           f"in {grid_dir / 'cache'}")
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
                        apply_keep(cfg.keep, result.get("run_dir"))
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
