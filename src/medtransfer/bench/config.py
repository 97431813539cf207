"""The benchmark grid's config (``grid.yaml``) and what it names: the cells of the grid, their run ids, and the hash
that tells one grid from another (:mod:`.grid` runs them)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import Field, ValidationError, field_validator, model_validator

from ..errors import MedTransferError
from ..train.config import _Section, config_data, format_validation_error

__all__ = ["NetworkConfig", "InitConfig", "TaskConfig", "BenchmarkConfig", "load_benchmark_config", "grid_hash",
           "run_id", "cells"]


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
    # what a finished run keeps (after its test evaluation is recorded): best (checkpoints/best.pt, weights only),
    # none (no weights), all (best.pt and last.pt with optimiser state, written once at the run's end)
    keep: Literal["best", "none", "all"] = "best"

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
    existing cell keeps its fields), and not ``keep``, which changes only what is left on disk."""
    data = cfg.model_dump(mode="json")
    for key in ("out", "trials", "fractions", "keep"):
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
