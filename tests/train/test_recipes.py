"""Recipes of the seed systems resolve to valid configs, and the user's values win field by field."""

from __future__ import annotations

import pytest

from medtransfer.errors import MedTransferError
from medtransfer.train.config import FinetuneConfig, load_config, resolve
from medtransfer.train.recipes import list_recipes, recipe, recipe_tasks

SUPPORTED = [(name, task) for name in list_recipes() for task in recipe_tasks(name)]


def _cfg(name: str, task: str, **sections) -> FinetuneConfig:
    model = {"name": "genesis_unet3d" if name == "genesis" else "medicalnet_resnet10", "task": task, "num_classes": 2}
    return resolve({"model": model, "recipe": name, **sections})


def test_recipe_names_and_tasks():
    assert list_recipes() == ["benchmark2d", "genesis", "genesis_ncc", "medicalnet", "monai_luna", "mp3d", "vdt", "volf"]
    assert recipe_tasks("volf") == ("segmentation",)
    assert recipe_tasks("mp3d") == recipe_tasks("monai_luna") == ("detection",)
    assert len(SUPPORTED) == 12


@pytest.mark.parametrize("name, task", SUPPORTED)
def test_every_recipe_resolves(name, task):
    cfg = _cfg(name, task)
    assert isinstance(cfg, FinetuneConfig) and cfg.recipe == name and cfg.model.task == task


def test_recipe_values_from_the_spec():
    mn = _cfg("medicalnet", "segmentation")
    assert (mn.optim.name, mn.optim.lr, mn.optim.momentum, mn.optim.weight_decay, mn.optim.head_lr_mult) == (
        "sgd", 1e-3, 0.9, 1e-3, 100.0)
    assert (mn.schedule.name, mn.schedule.gamma, mn.schedule.interval, mn.loss.name) == (
        "exponential", 0.99, "epoch", "ce")
    assert mn.loss.kwargs == {"ignore_index": -1}
    gs, gc = _cfg("genesis", "segmentation"), _cfg("genesis", "classification")
    assert (gs.optim.name, gs.optim.lr, gs.loss.name, gs.loss.kwargs) == (
        "adam", 1e-3, "dice", {"smooth": 1.0})
    assert gc.loss.name == "bce" and gc.train.early_stop_patience == 10
    vf = _cfg("volf", "segmentation")
    assert (vf.optim.lr, vf.optim.weight_decay, vf.schedule.name, vf.schedule.power) == (1e-3, 1e-5, "poly", 0.8)
    assert vf.loss.name == "dice_ce" and vf.loss.kwargs == {"lambda_dice": 0.5, "lambda_ce": 0.5}
    assert (vf.train.max_steps, vf.train.max_epochs, vf.train.val_every, vf.train.val_interval) == (
        6000, None, 250, "step")
    vc = _cfg("vdt", "classification")
    assert (vc.optim.lr, vc.optim.weight_decay, vc.loss.name) == (5e-4, 1e-4, "ce")
    assert (vc.schedule.name, vc.schedule.milestones, vc.schedule.gamma, vc.schedule.warmup_steps) == (
        "multistep", (30, 60, 90), 0.1, 50)
    bc, bs = _cfg("benchmark2d", "classification"), _cfg("benchmark2d", "segmentation")
    assert (bc.optim.lr, bc.optim.weight_decay, bc.loss.name) == (2e-4, 0.0, "bce")
    assert (bc.schedule.name, bc.schedule.factor, bc.schedule.patience) == ("plateau", 0.5, 5)
    assert (bc.train.early_stop_patience, bc.train.monitor) == (10, "loss")
    assert (bs.optim.lr, bs.schedule.name, bs.schedule.horizon, bs.loss.name) == (1e-3, "cosine", 200, "dice")


def test_user_values_win_field_by_field():
    cfg = _cfg("medicalnet", "segmentation", optim={"lr": 0.01}, schedule={"gamma": 0.95}, train={"max_epochs": 3})
    assert cfg.optim.lr == 0.01
    assert (cfg.optim.name, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.head_lr_mult) == (
        "sgd", 0.9, 1e-3, 100.0)  # the rest of the section stays the recipe's
    assert (cfg.schedule.name, cfg.schedule.gamma) == ("exponential", 0.95)
    assert cfg.train.max_epochs == 3


def test_changing_a_loss_or_schedule_name_drops_the_recipe_section():
    cfg = _cfg("genesis", "segmentation", loss={"name": "dice_ce"})
    assert cfg.loss.name == "dice_ce" and cfg.loss.kwargs == {}  # Dice smoothing does not follow
    cfg = _cfg("medicalnet", "segmentation", loss={"kwargs": {"label_smoothing": 0.1}})
    assert cfg.loss.kwargs == {"ignore_index": -1, "label_smoothing": 0.1}  # same loss: merged key by key
    cfg = _cfg("volf", "segmentation", schedule={"name": "step"})
    assert cfg.schedule.name == "step" and cfg.schedule.power == 0.9 and cfg.schedule.interval == "epoch"


def test_recipe_errors():
    with pytest.raises(MedTransferError, match="recipe: unknown recipe 'medicalnett'; choose one of benchmark2d"):
        recipe("medicalnett", "segmentation")
    with pytest.raises(MedTransferError, match="'volf' has no classification recipe; it covers segmentation"):
        load_config({"model": {"name": "medicalnet_resnet10", "task": "classification"}, "recipe": "volf"})
    with pytest.raises(MedTransferError, match="optim.lr: Input should be greater than 0"):
        _cfg("medicalnet", "segmentation", optim={"lr": 0})


def test_recipe_losses_build():
    from medtransfer.train.losses import build_loss

    for name, task in SUPPORTED:
        cfg = _cfg(name, task)
        if cfg.loss.name != "auto":
            build_loss(cfg.loss.name, task=task, num_classes=2, **cfg.loss.kwargs)


def test_recipe_returns_a_copy():
    first = recipe("medicalnet", "segmentation")
    first["optim"]["lr"] = 5.0
    assert recipe("medicalnet", "segmentation")["optim"]["lr"] == 1e-3


def test_transfer_controls_are_config_fields():
    probe = _cfg("medicalnet", "classification", train={"freeze_encoder_steps": -1})
    assert probe.train.freeze_encoder_steps == -1
    staged = _cfg("genesis", "segmentation", train={"freeze_encoder_steps": 100}, optim={"encoder_lr_mult": 0.1})
    assert staged.train.freeze_encoder_steps == 100 and staged.optim.encoder_lr_mult == 0.1
