"""Named fine-tuning presets of the five seed systems (spec/seed-systems.md sections 1c, 2c, 3c, 4c, 5c).

A recipe is a partial config (plain dict) merged *under* the user's values: the user wins field by field, except
that a ``loss`` or ``schedule`` section whose ``name`` the user changes replaces the recipe's section whole (the
recipe's Dice smoothing means nothing to a cross-entropy loss, its poly power nothing to a step schedule).

Data settings (intensity, spacing, patch) are left to the weights' input contract (``PretrainedCfg``), and mixed
precision to the hardware, so recipes hold optimiser, schedule, loss and loop settings only -- except a recipe
made for one kind of data: ``genesis_ncc`` fixes the cube size, batch and sampling of nodule candidate cubes
(``medtransfer data candidates``), whatever the start. Deliberate departures from the seed code are noted per recipe.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

from ..errors import MedTransferError

_DICE_SMOOTH_1 = {"smooth": 1.0}  # Models Genesis / BenchmarkTransferLearning: smooth 1 (losses.build_loss kwargs)

# name -> {"common": partial config, task: partial config for that task}. Only the tasks listed are supported.
_RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    # 1c MedicalNet train.py/setting.py: SGD momentum 0.9, wd 1e-3, lr 1e-3, new layers (the head) at 100 x lr,
    # ExponentialLR 0.99 per epoch, CrossEntropy with ignore_index -1, 200 epochs. The seed steps the scheduler
    # before the first epoch (epoch 0 runs at 0.99 x lr); here epoch 0 runs at lr.
    "medicalnet": {
        "common": {
            "optim": {"name": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-3, "head_lr_mult": 100.0},
            "schedule": {"name": "exponential", "gamma": 0.99, "interval": "epoch"},
            "loss": {"name": "ce", "kwargs": {"ignore_index": -1}},
            "train": {"max_epochs": 200},
        },
        "segmentation": {},
        "classification": {},
    },
    # 3c Models Genesis downstream config.py: Adam 1e-3, no freezing, no multipliers; early stopping on the
    # validation loss with the NCC (classification, 10) and NCS (segmentation, 50) patience. Classification uses
    # the zoo's genesis head (GAP -> FC 1024 -> FC n, zoo/genesis.py), so the recipe sets no model field.
    "genesis": {
        "common": {
            "optim": {"name": "adam", "lr": 1e-3, "weight_decay": 0.0},
            "schedule": {"name": "none"},
            "train": {"monitor": "loss"},
        },
        "segmentation": {"loss": {"name": "dice", "kwargs": dict(_DICE_SMOOTH_1)}, "train": {"early_stop_patience": 50}},
        "classification": {"loss": {"name": "bce"}, "train": {"early_stop_patience": 10}},
    },
    # 3c Models Genesis NCC (nodule candidate classification on LUNA16 candidate cubes): Adam 1e-3, batch 24,
    # early stopping on the validation loss with patience 10, input 64x64x32 in (x, y, z) = patch (32, 64, 64) here,
    # BCE on one sigmoid output (3c: GAP, FC 1024, FC n with BCE; n = 1 for nodule vs not). Not from the seed:
    # balanced class sampling (train/samplers.py), since LUNA16 holds ~500 false candidates per nodule;
    # data.sampling: shuffle undoes it.
    "genesis_ncc": {
        "common": {},
        "classification": {
            "model": {"num_classes": 1},
            "data": {"batch_size": 24, "patch_size": [32, 64, 64], "sampling": "balanced"},
            "optim": {"name": "adam", "lr": 1e-3, "weight_decay": 0.0},
            "schedule": {"name": "none"},
            "loss": {"name": "bce"},
            "train": {"monitor": "loss", "early_stop_patience": 10},
        },
    },
    # 4c MIS-FM demo cfg: Adam 1e-3 wd 1e-5, Dice + CE 0.5/0.5, PolynomialLR power 0.8, 6000 iterations,
    # validation every 250, early-stop patience 3000 iterations = 12 validations. PyMIC steps the poly schedule
    # every 24 iterations; here it decays every step over the run (the curves differ by under 0.5% of lr).
    "volf": {
        "common": {},
        "segmentation": {
            "optim": {"name": "adam", "lr": 1e-3, "weight_decay": 1e-5},
            "schedule": {"name": "poly", "power": 0.8, "interval": "step"},
            "loss": {"name": "dice_ce", "kwargs": {"lambda_dice": 0.5, "lambda_ce": 0.5}},
            "train": {"max_epochs": None, "max_steps": 6000, "val_every": 250, "val_interval": "step",
                      "early_stop_patience": 12},
        },
    },
    # 2c VDT. Classification (LIDC malignancy config): Adam 5e-4 wd 1e-4, steps at epochs 30/60/90 (gamma 0.1),
    # 50-iteration constant warm-up (mmcv's default warmup_ratio 0.1), 100 epochs, evaluation every 2 epochs,
    # cross-entropy. Segmentation (LIDC FCN config): Adam 1e-3 wd 1e-4, poly 0.9 per iteration down to 1e-6,
    # 200 epochs; its CombineLoss is not specified, so the task's default loss is used.
    "vdt": {
        "common": {},
        "classification": {
            "optim": {"name": "adam", "lr": 5e-4, "weight_decay": 1e-4},
            "schedule": {"name": "multistep", "milestones": [30, 60, 90], "gamma": 0.1, "interval": "epoch",
                         "warmup_steps": 50, "warmup": "constant", "warmup_start_factor": 0.1},
            "loss": {"name": "ce"},
            "train": {"max_epochs": 100, "val_every": 2},
        },
        "segmentation": {
            "optim": {"name": "adam", "lr": 1e-3, "weight_decay": 1e-4},
            "schedule": {"name": "poly", "power": 0.9, "interval": "step", "min_lr": 1e-6},
            "train": {"max_epochs": 200},
        },
    },
    # 5c BenchmarkTransferLearning. Classification: Adam 2e-4 no wd, BCE, ReduceLROnPlateau on the validation loss
    # (factor 0.5, patience 5, threshold 1e-4), early stop after 10 epochs without a lower loss, at most 1000
    # epochs. Segmentation: Adam 1e-3, cosine over T = 200 epochs, soft Dice smooth 1, early stop patience 20.
    "benchmark2d": {
        "common": {"train": {"monitor": "loss"}},
        "classification": {
            "optim": {"name": "adam", "lr": 2e-4, "weight_decay": 0.0},
            "schedule": {"name": "plateau", "factor": 0.5, "patience": 5, "threshold": 1e-4},
            "loss": {"name": "bce"},
            "train": {"max_epochs": 1000, "early_stop_patience": 10},
        },
        "segmentation": {
            "optim": {"name": "adam", "lr": 1e-3, "weight_decay": 0.0},
            "schedule": {"name": "cosine", "horizon": 200, "interval": "epoch"},
            "loss": {"name": "dice", "kwargs": dict(_DICE_SMOOTH_1)},
            "train": {"max_epochs": 200, "early_stop_patience": 20},
        },
    },
    # MP3D configs/deeplesion (mmdet 2x schedule): SGD 0.02 momentum 0.9 wd 1e-4, linear warm-up over 500
    # iterations from 1/3, lr x 0.1 at epochs 16 and 22 of 24, gradient clip 35; RPN anchors scale 4, ratios
    # 0.5/1/2 on strides 4..64. Here the anchors go to the RetinaNet (MP3D is a Faster R-CNN), scale x stride.
    "mp3d": {
        "common": {},
        "detection": {
            "model": {"detector": {"anchor_scale": 4.0, "anchor_ratios": [0.5, 1.0, 2.0]}},
            "optim": {"name": "sgd", "lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4},
            "schedule": {"name": "multistep", "milestones": [16, 22], "gamma": 0.1, "interval": "epoch",
                         "warmup_steps": 500, "warmup": "linear", "warmup_start_factor": 1 / 3},
            "train": {"max_epochs": 24, "grad_clip": 35.0},
        },
    },
    # MONAI's LUNA16 RetinaNet (Project-MONAI/model-zoo models/lung_nodule_ct_detection/configs/train.json):
    # anchor shapes (6,8,4), (8,6,5), (10,10,6) doubled per level, ATSS 4 candidates, hard-negative sampler 64 per
    # image / 0.3 positive / pool 20 / min 16, BCE classification (the detector's default) + smooth-L1 boxes, box
    # selection score 0.02, NMS 0.22, 300 per image; SGD 0.01 momentum 0.9 wd 3e-5, StepLR 150 epochs x 0.1, 300
    # epochs, validation every 10 epochs. Departures: no Nesterov momentum (OptimConfig has none) and no 10-epoch
    # warm-up (warm-up counts optimiser steps here; set schedule.warmup_steps to 10 epochs' worth).
    "monai_luna": {
        "common": {},
        "detection": {
            "model": {"detector": {"anchor_shapes": [[6, 8, 4], [8, 6, 5], [10, 10, 6]], "cls_loss": "bce",
                                   "atss_candidates": 4, "score_thresh": 0.02, "nms_thresh": 0.22,
                                   "detections_per_image": 300,
                                   "hard_negative": {"batch_size_per_image": 64, "positive_fraction": 0.3,
                                                     "pool_size": 20, "min_neg": 16}}},
            "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 3e-5},
            "schedule": {"name": "step", "step_size": 150, "gamma": 0.1, "interval": "epoch"},
            "train": {"max_epochs": 300, "val_every": 10},
        },
    },
}

# Sections whose parameters only make sense for the recipe's own choice of ``name``.
_NAMED_SECTIONS = ("loss", "schedule")


def list_recipes() -> list[str]:
    return sorted(_RECIPES)


def recipe_tasks(name: str) -> tuple[str, ...]:
    return tuple(k for k in _entry(name) if k != "common")


def _entry(name: str) -> dict[str, dict[str, Any]]:
    if name not in _RECIPES:
        raise MedTransferError(f"recipe: unknown recipe {name!r}; choose one of {', '.join(list_recipes())}")
    return _RECIPES[name]


def recipe(name: str, task: str) -> dict[str, Any]:
    """The partial config of recipe ``name`` for ``task`` (a fresh copy)."""
    entry = _entry(name)
    if task not in entry or task == "common":
        raise MedTransferError(
            f"recipe: {name!r} has no {task} recipe; it covers {', '.join(recipe_tasks(name))}"
        )
    return merge(copy.deepcopy(entry["common"]), copy.deepcopy(entry[task]))


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, recursively for mappings; values of ``over`` win."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_recipe(data: Mapping[str, Any]) -> dict[str, Any]:
    """The user's config dict with its recipe (``data["recipe"]``) merged under it; unchanged without one."""
    name = data.get("recipe")
    if name is None:
        return dict(data)
    if not isinstance(name, str):
        raise MedTransferError(f"recipe: expected a recipe name, got {name!r}")
    model = data.get("model") or {}
    task = model.get("task", "segmentation") if isinstance(model, Mapping) else "segmentation"
    base = recipe(name, task)
    for section in _NAMED_SECTIONS:
        user = data.get(section)
        if isinstance(user, Mapping) and "name" in user and section in base:
            if user["name"] != base[section].get("name"):
                del base[section]
    return merge(base, data)

