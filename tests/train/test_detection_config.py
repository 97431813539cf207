"""Detection in the config: task, model.detector, and the mp3d / monai_luna recipes."""

import pytest

from medtransfer.errors import MedTransferError
from medtransfer.train.config import load_config
from medtransfer.train.recipes import recipe


def _cfg(**extra):
    return {"model": {"name": "medicalnet_resnet10", "task": "detection"}, "out": "/tmp/unused", **extra}


def test_mp3d_recipe_has_the_published_settings():
    cfg = load_config(_cfg(recipe="mp3d"))
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.02, 0.9, 1e-4)
    s = cfg.schedule
    assert (s.name, s.milestones, s.gamma, s.interval) == ("multistep", (16, 22), 0.1, "epoch")
    assert (s.warmup_steps, s.warmup, s.warmup_start_factor) == (500, "linear", pytest.approx(1 / 3))
    assert (cfg.train.max_epochs, cfg.train.grad_clip) == (24, 35.0)
    assert cfg.model.detector == {"anchor_scale": 4.0, "anchor_ratios": [0.5, 1.0, 2.0]}


def test_monai_luna_recipe_and_user_values_win():
    cfg = load_config(_cfg(recipe="monai_luna", optim={"lr": 0.005},
                           model={"name": "medicalnet_resnet10", "task": "detection",
                                  "detector": {"nms_thresh": 0.3}}))
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("sgd", 0.005, 3e-5)
    assert (cfg.schedule.name, cfg.schedule.step_size, cfg.train.max_epochs, cfg.train.val_every) == ("step", 150,
                                                                                                    300, 10)
    d = cfg.model.detector
    assert d["nms_thresh"] == 0.3 and d["score_thresh"] == 0.02 and d["cls_loss"] == "bce"
    assert d["anchor_shapes"] == [[6, 8, 4], [8, 6, 5], [10, 10, 6]]
    assert d["hard_negative"] == {"batch_size_per_image": 64, "positive_fraction": 0.3, "pool_size": 20, "min_neg": 16}


def test_detection_recipes_refuse_other_tasks_and_detector_needs_detection():
    with pytest.raises(MedTransferError, match="no segmentation recipe"):
        recipe("mp3d", "segmentation")
    with pytest.raises((MedTransferError, ValueError), match="applies to task 'detection' only"):
        load_config({"model": {"name": "medicalnet_resnet10", "detector": {"fpn_channels": 8}}, "out": "/tmp/x"})


def test_benchmark_grid_takes_detection_tasks(tmp_path):
    from medtransfer.bench.grid import cells, finetune_config, load_benchmark_config
    from medtransfer.train.config import FinetuneConfig

    cfg = load_benchmark_config({
        "model": {"name": "medicalnet_resnet10"}, "inits": [{"name": "scratch"}],
        "tasks": [{"name": "luna", "data": str(tmp_path), "format": "luna16", "task": "detection",
                   "finetune": {"data": {"options": {"task": "detection"}}}}],
        "fractions": [1.0], "trials": 1, "out": str(tmp_path / "grid")})
    cell = cells(cfg)[0]
    assert cell["metric_name"] == "cpm" and cell["higher_is_better"] is True
    ft = finetune_config(cfg, cell, False, tmp_path / "grid")
    assert ft["model"]["task"] == "detection" and ft["data"]["options"] == {"task": "detection"}
    FinetuneConfig.model_validate(ft)  # a valid fine-tune config
