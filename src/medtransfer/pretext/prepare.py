"""What every pretraining method's setup shares: the phantom fallback, checked datasets, the split, the prepared
cache with the method's default preset, patch-size checks, loaders and the network."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import DataError, MedTransferError
from .config import PretrainConfig

log = logging.getLogger(__name__)

DEFAULT_PRESET = {"genesis": "genesis_ct", "volf": "volf_ct", "med3d": "medicalnet_mri", "vdt": None}
CT_WINDOWS = ("genesis_ct", "volf_ct")  # method defaults that only make sense on HU
DEFAULT_PATCH = {"genesis": (32, 64, 64), "volf": (64, 128, 128), "med3d": (64, 64, 64), "vdt": (224, 224)}
PHANTOMS = {"n": 8, "seed": 0, "shape": (32, 48, 48), "spacing": (5.0, 5.0, 5.0)}


def _phantoms(out: Path, with_2d: bool = False) -> Path:
    from ..data.phantoms import write_phantom_dataset

    root = out / "phantoms"
    marker = root / ("findings2d.csv" if with_2d else "dataset.json")
    if not marker.is_file():
        p = PHANTOMS
        write_phantom_dataset(root, p["n"], p["seed"], shape=p["shape"], spacing=p["spacing"], with_2d=with_2d)
    return root


def _load_checked(path: Path, cfg: PretrainConfig, *, labelled: bool):
    from ..train.finetune import checked_dataset

    dataset = checked_dataset(path, cfg.data.format, cfg.data.options)
    if labelled and dataset.task == "segmentation" and any(c.label is None for c in dataset.cases):
        missing = [c.case_id for c in dataset.cases if c.label is None][:5]
        raise DataError(f"{path}: method {cfg.method} needs a label map for every case; none for {missing}")
    return dataset


def _split(ids: list[str], cfg: PretrainConfig) -> tuple[list[str], list[str]]:
    from ..data.splits import make_split

    if cfg.data.val_fraction == 0 or len(ids) < 2:
        return list(ids), []
    split = make_split(ids, val=cfg.data.val_fraction, seed=cfg.train.seed)
    if not split.val:  # a tiny dataset: keep one case aside
        return split.train[:-1], split.train[-1:]
    return split.train, split.val


def _prepared(path: Path, cfg: PretrainConfig, out: Path, progress: bool, *, labelled: bool, name: str = "cache"):
    from ..data.cache import PreparedCache
    from ..data.modality import dataset_modality
    from ..data.preprocess import build_pipeline

    dataset = _load_checked(path, cfg, labelled=labelled)
    if dataset.spatial_dims != 3:
        raise DataError(f"{path}: method {cfg.method} pretrains 3D networks on 3D volumes; this dataset is "
                        f"{dataset.spatial_dims}D (use method vdt for 2D images)")
    modality = dataset_modality(dataset)
    preset = cfg.data.preset or DEFAULT_PRESET[cfg.method]
    if cfg.data.preset is None and modality.value == "MRI" and preset in CT_WINDOWS:
        # an HU window on MRI keeps a sliver of the intensities; these methods need a bounded range, not a z-score
        log.warning("%s: the data is MRI (%s) but method %s's default preset %r is a CT window; using 'percentile' "
                    "(0.5-99.5 percentiles to [0, 1]) instead. Set data.preset to choose", path, modality.source,
                    cfg.method, preset)
        preset = "percentile"
    pipeline = build_pipeline(preset=preset, spacing=cfg.data.spacing)
    root = (Path(cfg.data.cache_dir) / name) if cfg.data.cache_dir else out / name
    cache = PreparedCache(root)
    cache.prepare(dataset, pipeline, workers=max(1, cfg.data.workers), progress=progress)
    train, val = _split([c.case_id for c in dataset.cases], cfg)
    info = {"path": str(path), "format": dataset.format, "name": dataset.name, "cases": len(dataset.cases),
            "train": train, "val": val, "preset": preset, "spacing": list(cfg.data.spacing or []) or None,
            "modality": str(modality), "modality_source": modality.source,
            "pipeline": pipeline.to_dict(), "labels": {str(k): v for k, v in dataset.labels.items()}}
    return dataset, cache, train, val, info


def _patch(cfg: PretrainConfig) -> tuple[int, ...]:
    patch = tuple(cfg.data.patch_size or DEFAULT_PATCH[cfg.method])
    dims = 2 if cfg.method == "vdt" else 3
    if len(patch) != dims:
        raise MedTransferError(f"data.patch_size: method {cfg.method} needs {dims} values, got {list(patch)}")
    return patch


def _loader(dataset, cfg: PretrainConfig, *, shuffle: bool = True, seed: int = 0):
    from ..train.distributed import EpochShuffleSampler
    from ..train.torchdata import make_loader

    # training only: a lone last sample breaks BatchNorm; validation keeps every case
    lone = shuffle and len(dataset) > cfg.data.batch_size and len(dataset) % cfg.data.batch_size == 1
    sampler = EpochShuffleSampler(len(dataset), seed=seed) if shuffle else None
    return make_loader(dataset, batch_size=cfg.data.batch_size, sampler=sampler, workers=cfg.data.workers,
                       drop_last=lone)


def _check_divisible(model, patch: tuple[int, ...], name: str) -> None:
    from ..train.finetune import model_divisor

    div = model_divisor(model, len(patch))
    if any(p % d for p, d in zip(patch, div)):
        raise MedTransferError(f"data.patch_size {list(patch)} must be a multiple of {list(div)} on every axis for "
                               f"{name} (its network stride)")


def _model(cfg: PretrainConfig, **kwargs):
    from ..zoo.builder import create_model

    return create_model(cfg.model.name, pretrained=cfg.model.pretrained or False, **cfg.model.arch, **kwargs)
