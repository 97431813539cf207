"""``medtransfer benchmark``: a grid of initialisations x tasks x label fractions x trials, run and stored.

Every cell of the grid is one fine-tune (:func:`medtransfer.train.finetune.run_finetune`) followed by an evaluation
of its best checkpoint on the task's held-out test split. The grid folder holds:

* ``store.sqlite``: one row per run (:mod:`.store`): cell, seed, status, test metrics, steps, duration, run folder,
  the error of a failed run. A killed grid resumes where it stopped: finished runs are kept, an interrupted one
  (``running``) is run again from the start, failed ones only with ``--retry-failed``.
* ``grid.yaml``: the resolved config; its hash is stored and a store never mixes two grids.
* ``pretrain/<init>/``: initialisations made by a pretraining method, run once before the first cell that needs
  them (a finished one is reused).
* ``runs/<task>/<init>/f<fraction>/s<seed>/``: the fine-tune run folders (config, split, metrics.jsonl, evaluation).
* ``report.md`` / ``report.html`` (:mod:`.report`).

Design choices that make the comparison fair: every initialisation of a trial sees the same split (the trial seed
seeds the split: test cases held out first, then validation, then the nested label-fraction subsets), so paired
tests apply; one network architecture is shared unless an initialisation names its own.

``--shard i/n`` runs every n-th cell (of the sorted run ids), so machines or a SLURM array share a grid; each writes
its own store (``store-<i>of<n>.sqlite``) and ``medtransfer report DIR --merge ...`` merges them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from ..errors import MedTransferError
from ..train.config import _Section, config_data, format_validation_error
from ..train.recipes import merge

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
    task: Literal["segmentation", "classification"] = "segmentation"
    metric: Optional[str] = None  # None: dice_mean (segmentation), accuracy / auc_mean (classification)
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
    """What identifies a grid: everything but where it is written."""
    data = cfg.model_dump(mode="json")
    data.pop("out", None)
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


def _pretrained(cfg: BenchmarkConfig, init: InitConfig, grid_dir: Path, progress: bool) -> Union[bool, str]:
    """The ``model.pretrained`` value of an init, pretraining it first when it is a pretraining init."""
    if init.pretrain is None:
        return init.weights if init.weights not in (None,) else False
    from ..pretext.runner import run_pretrain

    out = grid_dir / "pretrain" / init.name
    product = out / "pretrained.safetensors"
    if product.is_file():
        return str(product)
    net = init.model or cfg.model
    data = merge(init.pretrain, {"model": {"name": net.name, "arch": dict(net.arch)}, "out": str(out)})
    log.info("pretraining init %s (%s) into %s", init.name, data.get("method"), out)
    run_pretrain(data, progress=progress)
    return str(product)


def finetune_config(cfg: BenchmarkConfig, cell: dict[str, Any], pretrained: Union[bool, str],
                    grid_dir: Path) -> dict[str, Any]:
    """The fine-tune config of one cell: grid values, then the task's, then the init's; the cell's own last."""
    task = next(t for t in cfg.tasks if t.name == cell["task"])
    init = next(i for i in cfg.inits if i.name == cell["init"])
    net = init.model or cfg.model
    data = merge(merge(cfg.finetune, task.finetune), init.finetune)
    return merge(data, {
        "model": {"name": net.name, "task": task.task, "pretrained": pretrained, "arch": dict(net.arch)},
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
    """Fine-tune and evaluate one cell; returns metric, metrics, steps, run_dir."""
    import math

    from ..train.finetune import evaluate, run_finetune

    ft = finetune_config(cfg, cell, pretrained, grid_dir)
    run_dir = run_finetune(ft, progress=progress)
    summary = json.loads((evaluate(run_dir, split="test") / "summary.json").read_text())
    metrics = {k: float(v) for k, v in summary["metrics"].items() if isinstance(v, (int, float)) and math.isfinite(v)}
    name = cell["metric_name"]
    if name not in metrics:
        raise MedTransferError(f"metric {name!r} is not among the test metrics of {run_dir} "
                               f"({', '.join(sorted(metrics)) or 'none finite'})")
    return {"metric": metrics[name], "metrics": metrics, "steps": _last_step(run_dir),
            "run_dir": str(Path(run_dir).resolve())}


def check_inputs(cfg: BenchmarkConfig) -> None:
    """Fail before the first run when a task's dataset or an init's weight file does not exist (otherwise every
    cell using it would fail, one after another)."""
    problems = [f"task {t.name!r}: dataset {t.data} does not exist" for t in cfg.tasks
                if t.data is not None and not Path(t.data).exists()]
    problems += [f"init {i.name!r}: weight file {i.weights} does not exist" for i in cfg.inits
                 if isinstance(i.weights, str) and i.weights.lower() not in ("true", "false")
                 and not Path(i.weights).expanduser().exists()]
    if problems:
        raise MedTransferError("the grid cannot start:\n  " + "\n  ".join(problems) + "\nfix the paths in the config")


def run_benchmark(cfg: BenchmarkConfig | str | Path | dict, *, out: Optional[Path] = None, shard: Optional[str] = None,
                  retry_failed: bool = False, progress: bool = True,
                  on_result: Optional[Callable[[dict[str, Any]], None]] = None, overrides=(),
                  echo: Optional[Callable[[str], None]] = None) -> Path:
    """Run (or resume) the grid; returns the grid folder. Failed cells are recorded and the grid goes on.

    ``progress``: a live bar (for a terminal); ``echo``: called with one line per finished run and per pretraining
    (for logs and pipes, where a bar cannot redraw)."""
    from ..weights.io import atomic_write
    from .store import ResultStore, StoreError, shard_of

    cfg = load_benchmark_config(cfg, overrides)
    check_inputs(cfg)
    grid_dir = Path(out or cfg.out)
    grid_dir.mkdir(parents=True, exist_ok=True)
    all_cells = cells(cfg)
    ids = [c["run_id"] for c in all_cells]
    mine = shard_of(ids, shard) if shard else ids
    store_name = f"store-{shard.replace('/', 'of')}.sqlite" if shard else "store.sqlite"
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    atomic_write(grid_dir / "grid.yaml", lambda tmp: tmp.write_text(text))
    host = socket.gethostname()
    with ResultStore(grid_dir / store_name) as store:
        known = store.get_meta("grid_hash")
        if known is not None and known != grid_hash(cfg):
            raise StoreError(f"{store.path} holds results of another grid config (hash {known}, this one "
                             f"{grid_hash(cfg)}); use another --out, or delete the store to start over")
        store.set_meta("grid_hash", grid_hash(cfg))
        store.set_meta("config", cfg.model_dump(mode="json"))
        wanted = set(mine)
        store.ensure(c for c in all_cells if c["run_id"] in wanted)
        todo = store.todo(mine, retry_failed=retry_failed)
        by_id = {c["run_id"]: c for c in all_cells}
        inits = {i.name: i for i in cfg.inits}
        weights: dict[str, Union[bool, str]] = {}
        bar = _Bar(progress, len(todo), len(mine) - len(todo), echo)
        try:
            for rid in todo:
                cell = by_id[rid]
                store.mark_running(rid, shard=shard, host=host)
                t0 = time.perf_counter()
                try:
                    if cell["init"] not in weights:
                        if inits[cell["init"]].pretrain is not None and echo is not None:
                            echo(f"pretraining {cell['init']} ({inits[cell['init']].pretrain.get('method')}) ...")
                        weights[cell["init"]] = _pretrained(cfg, inits[cell["init"]], grid_dir, progress)
                    result = run_cell(cfg, cell, weights[cell["init"]], grid_dir)
                except (KeyboardInterrupt, SystemExit):
                    raise  # the row stays "running": the next run of the grid redoes it
                except Exception as exc:  # noqa: BLE001 - one failed cell must not stop the grid
                    detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                    store.mark_failed(rid, error=detail, duration=time.perf_counter() - t0)
                    log.warning("run %s failed: %s", rid, detail)
                    bar.advance(f"{rid}: FAILED ({detail.splitlines()[0][:80]})")
                    continue
                store.mark_done(rid, duration=time.perf_counter() - t0, **result)
                if on_result is not None:
                    on_result({**cell, **result})
                bar.advance(f"{rid}: {cell['metric_name']} {result['metric']:.4f}")
        finally:
            bar.close()
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
