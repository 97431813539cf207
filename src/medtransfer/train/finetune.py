"""One fine-tuning run end to end: data check, split, input contract, cache, model, loop; then evaluate and predict.

Run folder (``cfg.out``): ``config.yaml`` (resolved config), ``env.json`` (versions, device, seed, command line),
``split.json``, ``contract.json`` (preset, spacing and patch size the run used, where each came from, the data's
modality and the loaded weights' contract), ``run.json`` (what
:func:`evaluate`/:func:`predict` need: task, classes, patch size, divisor, preprocessing pipeline, cache folder),
``load_report.json`` (when weights were loaded), and what ``loop.fit`` writes (``checkpoints/``, ``metrics.jsonl``).

Defaults chosen here:

* no ``data.path``: for detection :data:`DETECTION_PHANTOM_DEFAULTS` (LUNA16 layout, in
  ``<out>/phantoms_detection``); else :data:`PHANTOM_DEFAULTS` (8 embedded phantoms of 32^3 voxels at 5 mm, seed 0, i.e. the 64^3 at
  2.5 mm thorax of ``data/phantoms.py`` at half resolution) are written to ``<out>/phantoms``;
* preprocessed cases go to ``data.cache_dir``, else ``<data.cache_root>/<pipeline hash>`` (shared by runs, prepared
  under a file lock), else ``<out>/cache``;
* intensity preset (:func:`resolve_contract`): ``data.preset``; else the contract of the weights actually loaded
  (``PretrainedCfg.preset``, else :data:`CONTRACT_PRESETS` by checkpoint format) when their modality matches the
  data's (a mismatch is a loud warning and a line in ``contract.json``); else the modality default of
  :mod:`medtransfer.data.modality`: ``genesis_ct`` for 3D CT, ``mri_zscore`` for 3D MRI, ``zscore`` for 2D images
  and for an unknown modality (warned). A run from scratch, or from a file without a contract, never takes the
  published weights' contract (a file named like a published one takes that one's, said so). ``contract.json``
  records each value's source and the data's modality;
* patch size and spacing: the config's, else the loaded weights' contract, else :data:`DEFAULT_PATCH` per spatial
  dims and the native spacing;
* loss ``auto``: ``dice_ce`` for segmentation (MIS-FM's 0.5/0.5 Dice + CE), ``ce`` for single-label and ``bce`` for
  multi-label classification;
* segmentation validation during training uses fixed patches (epoch 0 draws of a seeded :class:`PatchDataset`);
  :func:`evaluate` (:mod:`.apply`) scores whole cases, in one pass when the volume fits the memory budget, else
  by sliding windows, on the original label grid by default.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import DataError, MedTransferError
from .config import FinetuneConfig, dump_config, load_config
from .contract import (  # noqa: F401  (re-exported: the run's contract, see .contract)
    CONTRACT_PRESETS,
    DEFAULT_PATCH,
    _pretrained_value,
    _published_by_name,
    _user_or_recipe,
    announce_contract,
    check_weights,
    initial_weights,
    resolve_contract,
    weights_contract,
)

log = logging.getLogger(__name__)

PHANTOM_DEFAULTS = {"n": 8, "seed": 0, "shape": (32, 32, 32), "spacing": (5.0, 5.0, 5.0)}
DETECTION_PHANTOM_DEFAULTS = {"n": 6, "seed": 0}  # data/phantoms_detection.py: 32x48x48 voxels at 2.5x2x2 mm

# network stride per model family (the input must be a multiple): genesis UNet3D has three 2x2x2 max-pools;
# resnet50_2d's segmentation decoder needs H, W divisible by its output stride 32 (zoo/resnet2d.py OUTPUT_STRIDE).
DIVISORS: dict[str, int] = {"genesis_unet3d": 8, "resnet50_2d": 32}
DEFAULT_DIVISOR = 16  # a multiple of every 3-4 level encoder's stride used in the zoo


# ------------------------------------------------------------------------------------------------ helpers


def _write_json(path: Path, data: Any) -> Path:
    from ..weights.io import atomic_write

    text = json.dumps(data, indent=2, default=str) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_env(out: Path, env: dict[str, Any], resume: bool) -> None:
    """``env.json``: the first process's environment; each resume appends its own under ``resumes``."""
    path = out / "env.json"
    if resume and path.is_file():
        first = json.loads(path.read_text())
        first.setdefault("resumes", []).append(env)
        env = first
    _write_json(path, {**env, "resume": resume} if not resume else env)


def model_divisor(model: torch.nn.Module, dims: int) -> tuple[int, ...]:
    div = getattr(model, "size_divisor", None)
    if div is not None:
        return tuple(int(d) for d in div) if not isinstance(div, int) else (div,) * dims
    return (DIVISORS.get(getattr(model, "model_name", ""), DEFAULT_DIVISOR),) * dims


def _dataset(cfg: FinetuneConfig, out: Path):
    from ..data.phantoms import write_phantom_dataset

    path = cfg.data.path
    if path is None and cfg.model.task == "detection":
        from ..data.phantoms_detection import write_detection_phantoms

        p = DETECTION_PHANTOM_DEFAULTS
        root = out / "phantoms_detection"
        if not (root / "annotations.csv").is_file():
            write_detection_phantoms(root, p["n"], p["seed"], "luna16")
        log.warning("data.path unset: %d LUNA16-layout detection phantoms (seed %d) in %s", p["n"], p["seed"], root)
        return checked_dataset(root, "luna16", {"task": "detection", **(cfg.data.options or {})}), root
    if path is None:
        p = PHANTOM_DEFAULTS
        root = out / "phantoms"
        if not (root / "dataset.json").is_file():
            write_phantom_dataset(root, p["n"], p["seed"], shape=p["shape"], spacing=p["spacing"], with_2d=False)
        path = root if cfg.model.task == "segmentation" else root / "classification.csv"
    return checked_dataset(path, cfg.data.format, cfg.data.options), Path(path)


SPLIT_SOURCES = {"deeplesion": "DL_info.csv column Train_Val_Test",
                 "monai_detection": "the datalist's training/validation/test lists"}


def _draw_split(cfg: FinetuneConfig, dataset, seed: int, targets, *, announce: bool = True):
    """The dataset's own split when it has one (``description["split"]`` naming a val or test part), ``data.split``
    is ``auto`` and no ``data.fold`` is asked for; else the hash-ordered split of data/splits.py. Either way
    ``data.label_fraction`` subsets the training part; which one was taken is said on the console and in
    ``split.json`` (``method``: ``dataset`` with its ``source``)."""
    from ..data.splits import dataset_split, make_split

    ids = [c.case_id for c in dataset.cases]
    parts = dataset.description.get("split") or {}
    own = bool(parts) and set(parts.values()) != {"train"}
    if own and cfg.data.split == "auto" and cfg.data.fold is None:
        source = SPLIT_SOURCES.get(dataset.format, f"the {dataset.format} dataset's description")
        split = dataset_split(parts, ids, fraction=cfg.data.label_fraction, seed=seed, targets=targets,
                              source=source)
        if announce:
            log.warning("split: the dataset's own (%s): %d train, %d val, %d test cases; data.val_fraction and "
                        "data.test_fraction unused (data.split: random draws one instead)", source,
                        len(split.train), len(split.val), len(split.test))
        return split
    if own and announce:
        why = "data.split is random" if cfg.data.split == "random" else f"data.fold is {cfg.data.fold}"
        log.warning("split: the dataset has its own split, not used (%s); drawn from data.val_fraction and "
                    "data.test_fraction", why)
    return make_split(ids, val=cfg.data.val_fraction, test=cfg.data.test_fraction,
                      k=5 if cfg.data.fold is not None else None, fold=cfg.data.fold,
                      fraction=cfg.data.label_fraction, seed=seed, targets=targets)


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


def _num_classes(cfg: FinetuneConfig, dataset, cache=None) -> tuple[int, bool]:
    """Classes of the head: model.num_classes, else the declared label set, else (segmentation lists without one)
    the largest label value in the prepared cache + 1, said in a warning; a label the head cannot hold is refused
    here rather than inside the loss."""
    targets = [c.target for c in dataset.cases]
    multilabel = any(isinstance(t, (list, tuple)) for t in targets)
    if cfg.model.task == "detection":  # box classes: the declared ones, else those the boxes use
        declared = max(dataset.labels) if dataset.labels else max(
            [max(c.box_labels or (1,)) for c in dataset.cases] + [1])
        if cfg.model.num_classes is not None and cfg.model.num_classes < declared:
            raise MedTransferError(f"model.num_classes is {cfg.model.num_classes} but the boxes of {dataset.root} "
                                   f"use classes up to {declared}; set model.num_classes to {declared} (or unset it)")
        return cfg.model.num_classes or declared, False
    top = cache.label_max() if cache is not None and cfg.model.task == "segmentation" else None
    if cfg.model.num_classes is not None:
        if top is not None and top >= cfg.model.num_classes:
            raise MedTransferError(f"model.num_classes is {cfg.model.num_classes} but the labels of {dataset.root} go "
                                   f"up to {top}; set model.num_classes to {top + 1} (or leave it unset)")
        return cfg.model.num_classes, multilabel
    if cfg.model.task == "segmentation":
        if dataset.labels or top is None:
            return (max(dataset.labels) + 1 if dataset.labels else 2), False
        log.warning("num_classes %d: taken from the label values (0..%d) of %s, which declares no label set; set "
                    "model.num_classes to override", max(top + 1, 2), top, dataset.root)
        return max(top + 1, 2), False
    if multilabel:
        return len(next(t for t in targets if isinstance(t, (list, tuple)))), True
    return max(len(dataset.labels), max(int(t) for t in targets if t is not None) + 1), False


def _loss_name(cfg: FinetuneConfig, multilabel: bool) -> str:
    if cfg.loss.name != "auto":
        return cfg.loss.name
    if cfg.model.task == "segmentation":
        return "dice_ce"
    return "bce" if multilabel else "ce"


def _cache_dir(cfg: FinetuneConfig, out: Path, pipeline) -> Path:
    """``data.cache_dir``; else ``<data.cache_root>/<hash of the pipeline>``, so that runs sharing a root share a
    cache only when they prepare alike (two intensity presets never overwrite each other); else ``<out>/cache``."""
    import hashlib

    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    if cfg.data.cache_root:
        text = json.dumps(pipeline.to_dict(), sort_keys=True)
        return Path(cfg.data.cache_root) / hashlib.sha256(text.encode()).hexdigest()[:12]
    return out / "cache"


@contextlib.contextmanager
def _exclusive(lock: Path):
    """Hold an exclusive ``flock`` on ``lock`` (created if absent); the kernel drops it when the process dies, so a
    killed run never blocks the next one. Without ``fcntl`` (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _train_sampler(n: int, seed: int, classes: Optional[list] = None, where: str = ""):
    """The loop's epoch-seeded sampler: the order derives from (seed, epoch) only (interface of loop.py);
    with ``classes`` (``data.sampling: balanced``) an epoch draws every class equally (train/samplers.py)."""
    from .loop import EpochShuffleSampler

    if classes is None:
        return EpochShuffleSampler(n, seed=seed)
    from .samplers import balanced_sampler

    sampler = balanced_sampler(classes, seed, where)
    log.warning("data.sampling balanced: each epoch draws %d training cases, %s per class; training class counts "
                "%s (the minority drawn again, the majority subsampled)", n, f"{n / len(sampler.members):g}",
                {c: len(m) for c, m in sampler.members.items()})
    return sampler


def detection_channels(cfg: FinetuneConfig, cache, case_id: str, dims: int) -> int:
    """Input channels of a detector: the prepared images' (a 2.5D case is K slices as channels), said when it
    differs from ``model.in_channels``'s default; a contradicting explicit value is refused."""
    image, _, _ = cache.load(case_id)
    channels = int(image.shape[0]) if image.ndim == dims + 1 else 1
    if channels != cfg.model.in_channels:
        if "in_channels" in cfg.model.model_fields_set:
            raise MedTransferError(f"model.in_channels is {cfg.model.in_channels} but the prepared images have "
                                   f"{channels} channel(s) (case {case_id}); leave in_channels unset")
        log.warning("model.in_channels %d: taken from the prepared images (case %s has %d channels)",
                    channels, case_id, channels)
    return channels


def build_detection(run: dict[str, Any], cfg: FinetuneConfig, pretrained: Any):
    """``(model, loss, postprocess)`` of a detection run (train/detector.py)."""
    from .detector import build_detector

    return build_detector(cfg.model.name, spatial_dims=run["spatial_dims"], in_channels=run["in_channels"],
                          num_classes=run["num_classes"], pretrained=pretrained, detector=run["detector"])


def _build_model(run: dict[str, Any], cfg: FinetuneConfig, pretrained: Any):
    from ..zoo.builder import create_model

    # the options the first build read from its weight file (nnU-Net plans, a MedicalNet shortcut), so that a run
    # rebuilt without that file (evaluate, predict) has the same network; the config's own options win
    recorded = {k: tuple(v) if isinstance(v, list) else v for k, v in run.get("arch_kwargs", {}).items()}  # JSON
    arch = {**recorded, **cfg.model.arch}
    return create_model(cfg.model.name, task=cfg.model.task, num_classes=run["num_classes"],
                        in_channels=cfg.model.in_channels, pretrained=pretrained,
                        adapt_stem=cfg.model.adapt_stem, skip=cfg.model.skip, **arch)


# --------------------------------------------------------------------------------------------------- fit


def resume_source(cfg: Any) -> Any:
    """A run folder given as the config: its ``config.yaml``, with ``out`` set to the folder."""
    if isinstance(cfg, (str, Path)) and Path(cfg).is_dir():
        from .config import read_yaml

        path = Path(cfg)
        if not (path / "config.yaml").is_file():
            raise MedTransferError(f"{path}: no config.yaml, so no run to resume; start it without --resume")
        return {**read_yaml(path / "config.yaml"), "out": str(path)}
    return cfg


def resumed_config(cfg: FinetuneConfig, out: Path) -> tuple[FinetuneConfig, bool]:
    """The config a resume of ``out`` runs with: ``cfg`` after :func:`check_resume_config` against the run's
    ``config.yaml``; True when it changed an allowed value (the caller records it)."""
    from .config import check_resume_config

    saved = load_config(out / "config.yaml")
    changes = check_resume_config(saved, cfg, out)
    for key, old, new in changes:
        log.warning("resume: %s %r -> %r (config.yaml records the new value)", key, old, new)
    return cfg.model_copy(update={"out": out}), bool(changes)


def run_finetune(cfg: FinetuneConfig | str | Path | dict, *, resume: bool = False, overwrite: bool = False,
                 progress: bool = True) -> Path:
    """Fine-tune as ``cfg`` says; returns the run folder (see the module docstring for its content).

    Nothing is written before the config, the weights, the data and the run folder are checked: a new run needs a
    new or empty ``out`` (``overwrite`` clears an old run there first); ``resume`` continues the run in ``out``
    from ``checkpoints/last.pt`` with the run's saved config (``cfg`` may be the run folder itself; values that
    differ from the saved ones are refused except :data:`~medtransfer.train.config.RESUME_MAY_CHANGE`), and reads
    its ``split.json`` and ``contract.json`` instead of writing them again."""
    from .. import provenance
    from ..data.cache import PreparedCache
    from ..data.preprocess import build_pipeline
    from ..data.splits import Split
    from .checkpoint import check_run_folder, clear_run, load_run_checkpoint
    from .losses import build_loss
    from .metrics import build_metrics, metric_for
    from .optim import build_optimizer, build_scheduler
    from .torchdata import BoxPatchDataset, CaseDataset, PatchDataset, make_loader, max_boxes

    from ..data.modality import dataset_modality

    cfg = load_config(resume_source(cfg) if resume else cfg)
    out = Path(cfg.out)
    from .distributed import barrier, init_distributed

    rank, world = init_distributed()
    main = rank == 0
    if main:  # under torchrun the other ranks may start after rank 0 has begun writing the run
        check_run_folder(out, resume=resume, overwrite=overwrite, command="finetune")
    changed = False
    if resume:
        cfg, changed = resumed_config(cfg, out)
        load_run_checkpoint(out / "checkpoints" / "last.pt")  # a missing, cut or unsafe last.pt fails here
    seed = cfg.train.seed
    task = cfg.model.task
    if task == "features":
        raise MedTransferError("model.task: 'features' has no training target; use segmentation, classification "
                               "or detection")
    check_weights(cfg)  # before the data check, the phantoms and the cache: nothing is written for a wrong file
    out.mkdir(parents=True, exist_ok=True)

    # Under torchrun, rank 0 writes the phantoms, checks the data and fills the cache while the others wait; they
    # then read what it wrote (their own prepare finds nothing to do). Only rank 0 writes the run's files.
    if world > 1 and not main:
        barrier()
    dataset, data_path = _dataset(cfg, out)
    if task != dataset.task:
        raise MedTransferError(f"model.task is {task!r} but the dataset at {data_path} is a {dataset.task} dataset")
    if resume:  # the run's contract as it was resolved when it started
        contract = json.loads((out / "contract.json").read_text())
    else:
        contract = resolve_contract(cfg, dataset.spatial_dims, dataset_modality(dataset, cfg.data.modality))
    if main:
        announce_contract(contract)

    targets = None
    if task == "classification":
        targets = {c.case_id: c.target for c in dataset.cases}
    if task == "detection" and cfg.loss.name != "auto":
        raise MedTransferError(f"loss.name {cfg.loss.name!r}: a detector has its own loss (focal or BCE "
                               "classification + smooth-L1 boxes); choose it with model.detector.cls_loss")
    if resume:  # the split of a run is written once: the resumed steps train on the cases the first ones did
        split = Split.load(out / "split.json")
    else:
        split = _draw_split(cfg, dataset, seed, targets, announce=main)
    pipeline = build_pipeline(preset=contract["preset"], spacing=contract["spacing"])
    cache_dir = _cache_dir(cfg, out, pipeline)
    if main and overwrite:
        shared = cfg.data.cache_dir or cfg.data.cache_root
        clear_run(out, keep=Path(shared) if shared else None)

    cache = PreparedCache(cache_dir)
    with _exclusive(cache_dir / ".prepare.lock"):  # runs sharing a cache (a grid's processes) prepare it in turn
        cache.prepare(dataset, pipeline, workers=max(1, cfg.data.workers), progress=progress and main)
    if world > 1 and main:
        barrier()

    num_classes, multilabel = _num_classes(cfg, dataset, cache)
    run = {"task": task, "num_classes": num_classes, "multilabel": multilabel, "patch_size": contract["patch_size"],
           "spatial_dims": dataset.spatial_dims, "pipeline": pipeline.to_dict(), "cache": str(cache_dir),
           "data_path": str(data_path), "data_format": cfg.data.format}
    torch.manual_seed(seed)
    if task == "detection":
        run["in_channels"] = detection_channels(cfg, cache, split.train[0], dataset.spatial_dims)
        run["detector"] = dict(cfg.model.detector)
        run["protocol"] = "luna16" if dataset.spatial_dims == 3 else "deeplesion"
        model, det_loss, postprocess = build_detection(run, cfg, _pretrained_value(cfg))
        run["divisor"] = list(model.size_divisible)
        run["n_max"] = max_boxes(cache, [c.case_id for c in dataset.cases])
        if main:
            log.warning("detector: %s", model.describe())
    else:
        model = _build_model(run, cfg, _pretrained_value(cfg))
        run["arch_kwargs"] = dict(model.arch_kwargs)
        run["divisor"] = list(model_divisor(model, dataset.spatial_dims))
    patch = tuple(contract["patch_size"])
    if task == "segmentation" and any(p % d for p, d in zip(patch, run["divisor"])):
        raise MedTransferError(f"data.patch_size {list(patch)} must be a multiple of {run['divisor']} on every axis "
                               f"for {cfg.model.name} segmentation (its network stride)")
    if main:  # everything checked (only the phantoms and the cache were written): the run's files from here on
        if not resume or changed:
            dump_config(cfg, out / "config.yaml")
        if not resume:
            contract["split"] = {"method": split.method, **({"source": split.params["source"]}
                                                           if split.method == "dataset" else {})}
            _write_json(out / "contract.json", contract)
            split.save(out / "split.json")
            _write_json(out / "run.json", run)
            if model.load_report is not None:
                _write_json(out / "load_report.json", model.load_report.to_dict())

    if task == "detection":
        train_ds = BoxPatchDataset(cache, split.train, patch, n_max=run["n_max"], seed=seed)
        val_ds = BoxPatchDataset(cache, split.val, patch, n_max=run["n_max"], seed=seed + 1) if split.val else None
    elif task == "segmentation":
        train_ds = PatchDataset(cache, split.train, patch, seed=seed)
        val_ds = PatchDataset(cache, split.val, patch, seed=seed + 1) if split.val else None
    else:
        train_ds = CaseDataset(cache, split.train, patch)
        val_ds = CaseDataset(cache, split.val, patch) if split.val else None
    # a remainder batch of one sample breaks BatchNorm in training where the features are 1x1 (a 32x32 2D patch
    # through resnet50_2d, 'Expected more than 1 value per channel'), so only such a remainder is dropped.
    lone = len(train_ds) > cfg.data.batch_size and len(train_ds) % cfg.data.batch_size == 1
    balanced = [targets[c] for c in split.train] if cfg.data.sampling == "balanced" else None
    train_loader = make_loader(train_ds, batch_size=cfg.data.batch_size,
                               sampler=_train_sampler(len(train_ds), seed, balanced, str(data_path)),
                               workers=cfg.data.workers, drop_last=lone)
    val_loader = make_loader(val_ds, batch_size=cfg.data.batch_size, workers=cfg.data.workers) if val_ds else None

    if task == "detection":
        from .detection_metrics import DetectionMetrics

        loss_fn = det_loss
        metrics = DetectionMetrics(postprocess, num_classes=num_classes, protocol=run["protocol"])
        monitor = ("loss", "min") if cfg.train.monitor == "loss" else ("cpm", "max")
    else:
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
        write_env(out, {**provenance.versions(), "device": str(device), "seed": seed, "world_size": world,
                        "command": sys.argv}, resume)

    loop.fit(model, train_loader, val_loader, loss_fn=loss_fn, metrics=metrics, optimizer=optimizer,
             schedule=schedule, cfg=cfg.train, run_dir=out, monitor=monitor, device=device, resume=resume,
             progress=progress)
    return out


# ------------------------------------------------------------------------------------- evaluate, predict

# moved to .apply; re-exported so that `from medtransfer.train.finetune import evaluate, predict` keeps working
from .apply import _case_logits, _load_run, evaluate, predict  # noqa: E402,F401
