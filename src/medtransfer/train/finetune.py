"""One fine-tuning run end to end: data check, split, input contract, cache, model, loop; then evaluate and predict.

Run folder (``cfg.out``): ``config.yaml`` (resolved config), ``env.json`` (versions, device, seed, command line),
``split.json``, ``contract.json`` (preset, spacing and patch size the run used, where each came from, the data's
modality and the loaded weights' contract), ``run.json`` (what
:func:`evaluate`/:func:`predict` need: task, classes, patch size, divisor, preprocessing pipeline, cache folder),
``load_report.json`` (when weights were loaded), and what ``loop.fit`` writes (``checkpoints/``, ``metrics.jsonl``).

Defaults chosen here:

* no ``data.path``: :data:`PHANTOM_DEFAULTS` (8 embedded phantoms of 32^3 voxels at 5 mm, seed 0, i.e. the 64^3 at
  2.5 mm thorax of ``data/phantoms.py`` at half resolution) are written to ``<out>/phantoms``;
* preprocessed cases go to ``data.cache_dir`` or ``<out>/cache``;
* intensity preset (:func:`resolve_contract`): ``data.preset``; else the contract of the weights actually loaded
  (``PretrainedCfg.preset``, else :data:`CONTRACT_PRESETS` by checkpoint format) when their modality matches the
  data's (a mismatch is a loud warning and a line in ``contract.json``); else the modality default of
  :mod:`medtransfer.data.modality`: ``genesis_ct`` for 3D CT, ``mri_zscore`` for 3D MRI, ``zscore`` for 2D images
  and for an unknown modality (warned). A run from scratch, or from a file without a contract, never takes the
  published weights' contract. ``contract.json`` records each value's source and the data's modality;
* patch size and spacing: the config's, else the loaded weights' contract, else :data:`DEFAULT_PATCH` per spatial
  dims and the native spacing;
* loss ``auto``: ``dice_ce`` for segmentation (MIS-FM's 0.5/0.5 Dice + CE), ``ce`` for single-label and ``bce`` for
  multi-label classification;
* segmentation validation during training uses fixed patches (epoch 0 draws of a seeded :class:`PatchDataset`);
  :func:`evaluate` scores whole cases with sliding windows.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..errors import DataError, MedTransferError
from .config import FinetuneConfig, dump_config, load_config

log = logging.getLogger(__name__)

PHANTOM_DEFAULTS = {"n": 8, "seed": 0, "shape": (32, 32, 32), "spacing": (5.0, 5.0, 5.0)}
DEFAULT_PATCH = {3: (64, 64, 64), 2: (224, 224)}  # 224^2: the ImageNet input of resnet50_2d's weights

# PretrainedCfg.source (checkpoint format) -> intensity preset of data.preprocess.PRESETS, read from each
# PretrainedCfg.intensity text: genesis "HU clipped to [-1000, 1000], scaled to [0, 1]"; MedicalNet "z-score over
# voxels > 0"; PyMIC (MIS-FM fmunet / pctnet) "per-volume z-score (x - mean) / (std + 1e-5)". mmcv (VDT) and the 2D
# ImageNet/CXR normalisations have no preset: the run falls back to the modality default and says so.
CONTRACT_PRESETS: dict[str, str] = {
    "genesis": "genesis_ct",
    "medicalnet": "medicalnet_mri",
    "pymic": "zscore",
}
# network stride per model family (the input must be a multiple): genesis UNet3D has three 2x2x2 max-pools;
# resnet50_2d's segmentation decoder needs H, W divisible by its output stride 32 (zoo/resnet2d.py OUTPUT_STRIDE).
DIVISORS: dict[str, int] = {"genesis_unet3d": 8, "resnet50_2d": 32}
DEFAULT_DIVISOR = 16  # a multiple of every 3-4 level encoder's stride used in the zoo


# ------------------------------------------------------------------------------------------------ helpers


def _write_json(path: Path, data: Any) -> Path:
    from ..weights.io import atomic_write

    text = json.dumps(data, indent=2, default=str) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def model_divisor(model: torch.nn.Module, dims: int) -> tuple[int, ...]:
    div = getattr(model, "size_divisor", None)
    if div is not None:
        return tuple(int(d) for d in div) if not isinstance(div, int) else (div,) * dims
    return (DIVISORS.get(getattr(model, "model_name", ""), DEFAULT_DIVISOR),) * dims


def weights_contract(model_name: str):
    """The ``PretrainedCfg`` of the model's published weights (the tag named in ``model_name``, else the default);
    it applies to a run only when those weights are loaded (``model.pretrained: true``), see :func:`initial_weights`."""
    from ..zoo.builder import split_name
    from ..zoo.registry import get_entry

    base, tag = split_name(model_name)
    return get_entry(base).pretrained_cfg(tag)


def _pretrained_value(cfg: FinetuneConfig) -> bool | str:
    """``model.pretrained`` as ``create_model`` takes it: True, False or a file path (YAML 'true'/'false' strings
    from the command line read as booleans)."""
    value = cfg.model.pretrained
    if isinstance(value, str) and value.strip().lower() in ("true", "false", ""):
        return value.strip().lower() == "true"
    return value or False


def initial_weights(cfg: FinetuneConfig):
    """(``PretrainedCfg`` or None, label): the input contract of the weights the run loads, read as
    ``create_model`` reads it, and words naming them for the run files.

    ``pretrained: true``: the model's published weights. A file: the ``PretrainedCfg`` stored in it (``medtransfer
    pretrain`` output), else none (a foreign file carries no contract, even a copy of a published file: put that
    in the weights cache and use ``pretrained: true``). From scratch: none, whatever the published weights expect."""
    from ..zoo.builder import file_pretrained_cfg

    pretrained = _pretrained_value(cfg)
    if pretrained is False:
        return None, "no weights (a run from scratch)"
    if pretrained is True:
        pcfg = weights_contract(cfg.model.name)
        if pcfg is None:
            return None, f"{cfg.model.name} has no published weights"
        return pcfg, f"weights {pcfg.full_name} ({pcfg.file_name})"
    pcfg = file_pretrained_cfg(pretrained)
    if pcfg is None:
        return None, f"file {pretrained} (it carries no input contract)"
    return pcfg, f"weights {pcfg.full_name} (the contract stored in {pretrained})"


def check_weights(cfg: FinetuneConfig) -> None:
    """Read the initial weights and check that they fit ``model.name``, before the data is read and anything is
    written: a missing file or one that fits no model fails here, naming the file, not after the cache is filled.

    The model is built on the meta device (no memory, no initialisation) by ``create_model`` itself, so the check
    is the load's own; the real model is built later with the dataset's class count."""
    import warnings

    pretrained = _pretrained_value(cfg)
    if pretrained is False:
        return
    from ..zoo.builder import create_model

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
        create_model(cfg.model.name, task=cfg.model.task, num_classes=cfg.model.num_classes,
                     in_channels=cfg.model.in_channels, pretrained=pretrained, **cfg.model.arch)


def resolve_contract(cfg: FinetuneConfig, spatial_dims: int, modality: Any = None) -> dict[str, Any]:
    """Preset, spacing and patch size of the run, each with where it came from (the rule of docs/training.md,
    "Input contract"): the config's value wins; else the loaded weights' contract (:func:`initial_weights`), the
    preset only when their modality matches the data's; else the defaults (preset by modality,
    :func:`medtransfer.data.modality.choose_preset`; native spacing; :data:`DEFAULT_PATCH`).

    ``modality``: a :class:`~medtransfer.data.modality.Modality` (``dataset_modality``), a name (``"CT"``, ``"MRI"``,
    ``"T2"``...), or None (unknown). A preset set aside or overridden against the weights' is recorded in
    ``mismatches``."""
    from ..data.modality import Modality, channel_modality, choose_preset

    if not isinstance(modality, Modality):
        modality = Modality(channel_modality(modality), f"given to resolve_contract as {modality!r}") if modality \
            else Modality(None, "not given to resolve_contract")
    pcfg, label = initial_weights(cfg)
    contract_preset = (pcfg.preset or CONTRACT_PRESETS.get(pcfg.source)) if pcfg else None
    choice = choose_preset(cfg.data.preset, modality, spatial_dims, weights_preset=contract_preset,
                           weights_modality=pcfg.modality if pcfg else "", weights_label=label)
    sources = {"preset": choice.source}
    if pcfg is not None and contract_preset is None and cfg.data.preset is None:
        sources["preset"] += f"; the {label} name no intensity preset: {pcfg.intensity or 'none stated'}"
    if cfg.data.spacing is not None:
        spacing, sources["spacing"] = cfg.data.spacing, "user config (data.spacing)"
    elif pcfg is not None and pcfg.spacing:
        spacing, sources["spacing"] = pcfg.spacing, label
    else:
        spacing, sources["spacing"] = None, "default (no resampling: each case keeps its spacing)"
    patch = cfg.data.patch_size
    if patch is not None:
        if len(patch) != spatial_dims:
            raise MedTransferError(f"data.patch_size {list(patch)} has {len(patch)} values but the dataset is "
                                   f"{spatial_dims}D; give {spatial_dims} values")
        sources["patch_size"] = "user config (data.patch_size)"
    elif pcfg is not None and pcfg.patch_size and len(pcfg.patch_size) == spatial_dims:
        patch, sources["patch_size"] = pcfg.patch_size, label
    else:
        patch, sources["patch_size"] = DEFAULT_PATCH[spatial_dims], f"default for {spatial_dims}D (DEFAULT_PATCH)"
    return {
        "preset": choice.preset,
        "spacing": list(spacing) if spacing is not None else None,
        "patch_size": [int(p) for p in patch],
        "sources": sources,
        "data_modality": modality.value,
        "data_modality_source": modality.source,
        "initial_weights": label,
        "weights_modality": pcfg.modality if pcfg else None,
        "weights": pcfg.to_dict() if pcfg else None,
        "contract_preset": contract_preset,
        "mismatches": [choice.mismatch] if choice.mismatch else [],
        "warnings": [choice.warning] if choice.warning else [],
    }


def announce_contract(contract: dict[str, Any]) -> None:
    """The console line before training: preset, spacing and patch with their sources; mismatches loudly."""
    src = contract["sources"]
    spacing = "native" if contract["spacing"] is None else "x".join(f"{s:g}" for s in contract["spacing"]) + " mm"
    log.warning("input contract: preset %r (%s); spacing %s (%s); patch %s (%s); data modality %s (%s)",
                contract["preset"], src["preset"], spacing, src["spacing"],
                "x".join(map(str, contract["patch_size"])), src["patch_size"],
                contract["data_modality"] or "unknown", contract["data_modality_source"])
    for msg in contract["mismatches"]:
        log.warning("INPUT CONTRACT MISMATCH: %s", msg)
    for msg in contract["warnings"]:
        log.warning("input contract: %s", msg)


def _dataset(cfg: FinetuneConfig, out: Path):
    from ..data.phantoms import write_phantom_dataset

    path = cfg.data.path
    if path is None:
        p = PHANTOM_DEFAULTS
        root = out / "phantoms"
        if not (root / "dataset.json").is_file():
            write_phantom_dataset(root, p["n"], p["seed"], shape=p["shape"], spacing=p["spacing"], with_2d=False)
        path = root if cfg.model.task == "segmentation" else root / "classification.csv"
    return checked_dataset(path, cfg.data.format, cfg.data.options), Path(path)


def checked_dataset(path: str | Path, format: str = "auto", options: Optional[dict[str, Any]] = None):
    """Parse the dataset at ``path`` and run the dataset check; any problem stops here, before training."""
    from ..data.check import check_dataset
    from ..data.datasets import load_dataset

    dataset = load_dataset(path, format=format, **(options or {}))
    if not dataset.cases:
        raise DataError(f"{path}: the dataset has no cases; nothing was trained")
    report = check_dataset(dataset, workers=1)
    if report.errors:
        lines = "\n".join(f"  {p}" for p in report.errors)
        raise DataError(f"{path}: the dataset check found {len(report.errors)} error(s); nothing was trained:\n{lines}")
    return dataset


def _num_classes(cfg: FinetuneConfig, dataset) -> tuple[int, bool]:
    targets = [c.target for c in dataset.cases]
    multilabel = any(isinstance(t, (list, tuple)) for t in targets)
    if cfg.model.num_classes is not None:
        return cfg.model.num_classes, multilabel
    if cfg.model.task == "segmentation":
        return (max(dataset.labels) + 1 if dataset.labels else 2), False
    if multilabel:
        return len(next(t for t in targets if isinstance(t, (list, tuple)))), True
    return max(len(dataset.labels), max(int(t) for t in targets if t is not None) + 1), False


def _loss_name(cfg: FinetuneConfig, multilabel: bool) -> str:
    if cfg.loss.name != "auto":
        return cfg.loss.name
    if cfg.model.task == "segmentation":
        return "dice_ce"
    return "bce" if multilabel else "ce"


def _train_sampler(n: int, seed: int):
    """The loop's epoch-seeded sampler: the order derives from (seed, epoch) only (interface of loop.py)."""
    from .loop import EpochShuffleSampler

    return EpochShuffleSampler(n, seed=seed)


def _build_model(run: dict[str, Any], cfg: FinetuneConfig, pretrained: Any):
    from ..zoo.builder import create_model

    return create_model(cfg.model.name, task=cfg.model.task, num_classes=run["num_classes"],
                        in_channels=cfg.model.in_channels, pretrained=pretrained, **cfg.model.arch)


# --------------------------------------------------------------------------------------------------- fit


def run_finetune(cfg: FinetuneConfig | str | Path | dict, *, resume: bool = False, progress: bool = True) -> Path:
    """Fine-tune as ``cfg`` says; returns the run folder (see the module docstring for its content)."""
    from .. import provenance
    from ..data.cache import PreparedCache
    from ..data.preprocess import build_pipeline
    from ..data.splits import make_split
    from .losses import build_loss
    from .metrics import build_metrics, metric_for
    from .optim import build_optimizer, build_scheduler
    from .torchdata import CaseDataset, PatchDataset, make_loader

    from ..data.modality import dataset_modality

    cfg = load_config(cfg)
    out = Path(cfg.out)
    seed = cfg.train.seed
    task = cfg.model.task
    if task == "features":
        raise MedTransferError("model.task: 'features' has no training target; use segmentation or classification")
    check_weights(cfg)  # before the data check, the phantoms and the cache: nothing is written for a wrong file
    out.mkdir(parents=True, exist_ok=True)

    # Under torchrun, rank 0 writes the phantoms, checks the data and fills the cache while the others wait; they
    # then read what it wrote (their own prepare finds nothing to do). Only rank 0 writes the run's files.
    from .distributed import barrier, init_distributed

    rank, world = init_distributed()
    main = rank == 0
    if world > 1 and not main:
        barrier()
    dataset, data_path = _dataset(cfg, out)
    if task != dataset.task:
        raise MedTransferError(f"model.task is {task!r} but the dataset at {data_path} is a {dataset.task} dataset")
    contract = resolve_contract(cfg, dataset.spatial_dims, dataset_modality(dataset, cfg.data.modality))
    if main:
        announce_contract(contract)
        _write_json(out / "contract.json", contract)

    targets = None
    if task == "classification":
        targets = {c.case_id: c.target for c in dataset.cases}
    split = make_split([c.case_id for c in dataset.cases], val=cfg.data.val_fraction, test=cfg.data.test_fraction,
                       k=5 if cfg.data.fold is not None else None, fold=cfg.data.fold,
                       fraction=cfg.data.label_fraction, seed=seed, targets=targets)
    if main:
        split.save(out / "split.json")

    pipeline = build_pipeline(preset=contract["preset"], spacing=contract["spacing"])
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else out / "cache"
    cache = PreparedCache(cache_dir)
    cache.prepare(dataset, pipeline, workers=max(1, cfg.data.workers), progress=progress and main)
    if world > 1 and main:
        barrier()

    num_classes, multilabel = _num_classes(cfg, dataset)
    run = {"task": task, "num_classes": num_classes, "multilabel": multilabel, "patch_size": contract["patch_size"],
           "spatial_dims": dataset.spatial_dims, "pipeline": pipeline.to_dict(), "cache": str(cache_dir),
           "data_path": str(data_path), "data_format": cfg.data.format}
    torch.manual_seed(seed)
    model = _build_model(run, cfg, _pretrained_value(cfg))
    if model.load_report is not None and main:
        _write_json(out / "load_report.json", model.load_report.to_dict())
    run["divisor"] = list(model_divisor(model, dataset.spatial_dims))
    patch = tuple(contract["patch_size"])
    if task == "segmentation" and any(p % d for p, d in zip(patch, run["divisor"])):
        raise MedTransferError(f"data.patch_size {list(patch)} must be a multiple of {run['divisor']} on every axis "
                               f"for {cfg.model.name} segmentation (its network stride)")
    if main:
        _write_json(out / "run.json", run)

    if task == "segmentation":
        train_ds = PatchDataset(cache, split.train, patch, seed=seed)
        val_ds = PatchDataset(cache, split.val, patch, seed=seed + 1) if split.val else None
    else:
        train_ds = CaseDataset(cache, split.train, patch)
        val_ds = CaseDataset(cache, split.val, patch) if split.val else None
    # a remainder batch of one sample breaks BatchNorm in training where the features are 1x1 (a 32x32 2D patch
    # through resnet50_2d, 'Expected more than 1 value per channel'), so only such a remainder is dropped.
    lone = len(train_ds) > cfg.data.batch_size and len(train_ds) % cfg.data.batch_size == 1
    train_loader = make_loader(train_ds, batch_size=cfg.data.batch_size, sampler=_train_sampler(len(train_ds), seed),
                               workers=cfg.data.workers, drop_last=lone)
    val_loader = make_loader(val_ds, batch_size=cfg.data.batch_size, workers=cfg.data.workers) if val_ds else None

    loss_fn = build_loss(_loss_name(cfg, multilabel), task=task, num_classes=num_classes, **cfg.loss.kwargs)
    metrics = build_metrics(task, num_classes=num_classes, multilabel=multilabel)
    monitor = ("loss", "min") if cfg.train.monitor == "loss" else metric_for(task, multilabel=multilabel)
    optimizer = build_optimizer(model, cfg.optim)
    steps_per_epoch = max(1, -(-len(train_loader) // cfg.train.accum_steps))
    total = cfg.train.max_steps
    if cfg.train.max_epochs is not None:
        total = min(total or 10**12, cfg.train.max_epochs * steps_per_epoch)
    schedule = build_scheduler(optimizer, cfg.schedule, steps_per_epoch=steps_per_epoch, total_steps=total,
                               mode=monitor[1])

    from . import loop  # imported last: data and config problems surface first

    device = loop._resolve_device(None)  # cuda:LOCAL_RANK under torchrun
    if main:
        dump_config(cfg, out / "config.yaml")
        _write_json(out / "env.json", {**provenance.versions(), "device": str(device), "seed": seed,
                                       "world_size": world, "command": sys.argv, "resume": resume})

    loop.fit(model, train_loader, val_loader, loss_fn=loss_fn, metrics=metrics, optimizer=optimizer,
             schedule=schedule, cfg=cfg.train, run_dir=out, monitor=monitor, device=device, resume=resume,
             progress=progress)
    return out


# ---------------------------------------------------------------------------------------------- evaluate


def _load_run(run_dir: Path):
    run_dir = Path(run_dir)
    for name in ("config.yaml", "run.json"):
        if not (run_dir / name).is_file():
            raise MedTransferError(f"{run_dir}: not a fine-tuning run folder (no {name})")
    cfg = load_config(run_dir / "config.yaml")
    run = json.loads((run_dir / "run.json").read_text())
    ckpt = run_dir / "checkpoints" / "best.pt"
    if not ckpt.is_file():
        ckpt = run_dir / "checkpoints" / "last.pt"
    if not ckpt.is_file():
        raise MedTransferError(f"{run_dir}: no checkpoints/best.pt (or last.pt); the run has not saved a model yet")
    model = _build_model(run, cfg, False)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    model.eval()
    return cfg, run, model


def _case_logits(model, image: np.ndarray, run: dict[str, Any]) -> torch.Tensor:
    from .inference import sliding_window_predict

    arr = np.array(image, dtype=np.float32)  # a copy: a cached case is a read-only memmap
    if arr.ndim == run["spatial_dims"]:
        arr = arr[None]
    x = torch.from_numpy(np.ascontiguousarray(arr))[None]
    return sliding_window_predict(model, x, patch_size=run["patch_size"], divisor=run["divisor"])


def evaluate(run_dir: str | Path, data_path: Optional[str | Path] = None, *, split: str = "val") -> Path:
    """Score the run's best model on whole cases; writes ``evaluation/cases.csv`` and ``evaluation/summary.json``.

    Without ``data_path`` the run's cached cases of ``split`` (``val``, ``test`` or ``all``) are used; with it, that
    dataset is prepared with the run's pipeline and all its cases are scored."""
    from ..data.cache import PreparedCache
    from ..data.datasets import load_dataset
    from ..data.preprocess import Pipeline
    from ..data.splits import Split
    from .metrics import build_metrics
    from .torchdata import centre_fit

    run_dir = Path(run_dir)
    if split not in ("val", "test", "all"):
        raise MedTransferError(f"split: choose val, test or all, got {split!r}")
    cfg, run, model = _load_run(run_dir)
    out = run_dir / "evaluation"
    if data_path is None:
        cache = PreparedCache(run["cache"])
        parts = Split.load(run_dir / "split.json")
        ids = cache.case_ids() if split == "all" else list(getattr(parts, split))
    else:
        dataset = load_dataset(data_path)
        cache = PreparedCache(out / "cache")
        cache.prepare(dataset, Pipeline.from_dict(run["pipeline"]), workers=1, progress=False)
        ids = cache.case_ids()
    if not ids:
        raise MedTransferError(f"split {split!r} of {run_dir} holds no cases; choose another with --split")
    task, k = run["task"], run["num_classes"]
    total = build_metrics(task, num_classes=k, multilabel=run["multilabel"])
    rows = []
    for case_id in ids:
        image, label, meta = cache.load(case_id)
        if task == "segmentation":
            logits = _case_logits(model, image, run)
            target = torch.from_numpy(np.asarray(label, dtype=np.int64).reshape(logits.shape[2:]))[None]
            one = build_metrics(task, num_classes=k)
            one.update(logits, target)
            total.update(logits, target)
            rows.append({"case_id": case_id, **one.compute()})
        else:
            arr = np.asarray(image, dtype=np.float32)
            arr = centre_fit(arr if arr.ndim > run["spatial_dims"] else arr[None], run["patch_size"])
            with torch.no_grad():
                logits = model(torch.from_numpy(np.ascontiguousarray(arr))[None]).float()
            t = meta.get("target")
            target = (torch.tensor([t], dtype=torch.float32) if isinstance(t, list)
                      else torch.tensor([int(t)], dtype=torch.int64))
            total.update(logits, target)
            pred = (logits[0] > 0).int().tolist() if run["multilabel"] else int(logits[0].argmax())
            rows.append({"case_id": case_id, "target": t, "prediction": pred})
    out.mkdir(parents=True, exist_ok=True)
    import csv

    keys = list(dict.fromkeys(k2 for r in rows for k2 in r))
    with (out / "cases.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    summary = {"split": split if data_path is None else "all", "data": str(data_path or run["data_path"]),
               "cases": len(ids), "metrics": total.compute()}
    _write_json(out / "summary.json", summary)
    return out


# ----------------------------------------------------------------------------------------------- predict


def predict(run_dir: str | Path, inputs: Sequence[str | Path], out_dir: str | Path) -> list[Path]:
    """Label maps of ``inputs`` (segmentation runs) written as ``<out_dir>/<name>.nii.gz`` over the input grid."""
    from scipy import ndimage

    from ..data.io import read_image, write_image
    from ..data.preprocess import Pipeline
    from ..data.types import Image
    from .inference import logits_to_labels

    cfg, run, model = _load_run(Path(run_dir))
    if run["task"] != "segmentation":
        raise MedTransferError(f"predict writes label maps; the run at {run_dir} is a {run['task']} run")
    pipeline = Pipeline.from_dict(run["pipeline"])
    out_dir = Path(out_dir)
    written = []
    for path in map(Path, inputs):
        original = read_image(path)
        prepared = pipeline(original)
        labels = logits_to_labels(_case_logits(model, prepared.array, run))[0].cpu().numpy()
        if labels.shape != original.spatial_shape:  # resampled for the model: back to the input grid
            zoom = [o / p for o, p in zip(original.spatial_shape, labels.shape)]
            labels = ndimage.zoom(labels, zoom, order=0, grid_mode=True, mode="nearest")
        pred = Image(array=labels, spacing=tuple(original.spacing), origin=tuple(original.origin),
                     direction=np.array(original.direction, dtype=float, copy=True), meta=dict(original.meta))
        name = path.name.split(".")[0]
        written.append(write_image(pred, out_dir / f"{name}.nii.gz", like=original))
    return written
