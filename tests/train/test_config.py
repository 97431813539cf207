"""Typed configs: defaults, validation messages naming the field, YAML round trip, dotted overrides."""

from __future__ import annotations

import pytest
import yaml

from medtransfer.errors import MedTransferError
from medtransfer.train.config import (
    FinetuneConfig,
    apply_overrides,
    dump_config,
    load_config,
    parse_value,
)

MODEL = {"name": "medicalnet_resnet10", "num_classes": 2}


def _error(data) -> str:
    with pytest.raises(MedTransferError) as info:
        load_config(data)
    return str(info.value)


def test_defaults_and_types():
    cfg = load_config({"model": MODEL})
    assert isinstance(cfg, FinetuneConfig)
    assert cfg.model.task == "segmentation" and cfg.model.pretrained is False
    assert cfg.optim.name == "adam" and cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.9, 0.999)
    assert cfg.data.label_fraction == 1.0 and cfg.data.patch_size is None
    assert cfg.train.freeze_encoder_steps == 0 and cfg.train.amp == "none"
    assert cfg.schedule.name == "none" and cfg.loss.name == "auto"


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"optim": {"lr": 0}}, "optim.lr: Input should be greater than 0 (got 0)"),
        ({"optim": {"lr": -1e-3}}, "optim.lr: Input should be greater than 0"),
        ({"data": {"label_fraction": 1.5}}, "data.label_fraction: Input should be less than or equal to 1"),
        ({"data": {"label_fraction": 0}}, "data.label_fraction: Input should be greater than 0"),
        ({"data": {"val_fraction": 1.0}}, "data.val_fraction: Input should be less than 1"),
        ({"data": {"patch_size": [32, 0, 64]}}, "data.patch_size: patch sizes must be positive integers"),
        ({"data": {"patch_size": [32, 64.5, 64]}}, "data.patch_size.1: Input should be a valid integer"),
        ({"data": {"patch_size": [32, 32, 32, 32]}}, "data.patch_size: patch_size needs 2 (2D) or 3 (3D) values"),
        ({"data": {"patch_size": [32, 32], "spacing": [1, 1, 1]}}, "spacing has 3 axes but patch_size has 2"),
        ({"data": {"preset": "ct_lung"}}, "data.preset: unknown intensity preset 'ct_lung'"),
        ({"optim": {"name": "rmsprop"}}, "optim.name: Input should be 'sgd', 'adam' or 'adamw'"),
        ({"optim": {"betas": [0.9, 1.0]}}, "optim.betas: betas must lie in [0, 1)"),
        ({"train": {"amp": "fp8"}}, "train.amp: Input should be 'none', 'bf16' or 'fp16'"),
        ({"train": {"freeze_encoder_steps": -2}}, "train.freeze_encoder_steps: Input should be greater than or equal to -1"),
        ({"train": {"max_epochs": None}}, "train: set max_epochs or max_steps"),
        ({"loss": {"name": "dicece"}}, "loss.name: unknown loss 'dicece'; choose auto or one of ce, bce, dice"),
        ({"schedule": {"name": "multistep"}}, "schedule: schedule 'multistep' needs milestones"),
        ({"schedule": {"name": "multistep", "milestones": [60, 30]}}, "milestones must be positive and strictly increasing"),
    ],
)
def test_invalid_values_name_the_field(data, expected):
    assert expected in _error({"model": MODEL, **data})


def test_invalid_task_and_model_name():
    assert "model.task: Input should be 'segmentation', 'classification', 'features' or 'detection'" in _error(
        {"model": {**MODEL, "task": "regression"}}
    )
    msg = _error({"model": {"name": "medicalnet_resnt10"}})
    assert "model.name: unknown model 'medicalnet_resnt10'" in msg and "medicalnet_resnet10" in msg
    assert "model.name: Field required" in _error({"model": {}})
    assert "model: Field required" in _error({})


def test_misspelt_key_is_named_with_the_valid_keys():
    msg = _error({"model": MODEL, "optim": {"lrr": 1e-3}})
    assert "optim.lrr: unknown key 'lrr' (did you mean 'lr'?)" in msg
    assert "valid keys under optim: betas, encoder_lr_mult, head_lr_mult, lr, momentum, name, weight_decay" in msg
    msg = _error({"model": MODEL, "trian": {}})
    assert "trian: unknown key 'trian' (did you mean 'train'?); valid keys under the top level" in msg


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: medicalnet_resnet10\ndata:\n  batchsize: 4\n")
    with pytest.raises(MedTransferError, match=r"data.batchsize: unknown key 'batchsize' \(did you mean 'batch_size'\?\)"):
        load_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(MedTransferError, match="not valid YAML"):
        load_config(broken)
    with pytest.raises(MedTransferError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(MedTransferError, match="must be a mapping"):
        load_config(listing)


def test_yaml_reads_exponent_floats(tmp_path):
    # PyYAML (YAML 1.1) would read 1e-3 as the string "1e-3"; inside free-form kwargs that would stay a string.
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: medicalnet_resnet10}\noptim: {lr: 1e-3}\nloss: {name: dice, kwargs: {smooth_nr: 1e-5}}\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 0.001
    assert cfg.loss.kwargs == {"smooth_nr": 1e-05} and isinstance(cfg.loss.kwargs["smooth_nr"], float)


def test_dump_and_reload_round_trip(tmp_path):
    cfg = load_config({"model": MODEL, "recipe": "medicalnet", "data": {"patch_size": [16, 32, 32], "path": "d"}})
    out = dump_config(cfg, tmp_path / "run" / "config.yaml")
    text = out.read_text()
    raw = yaml.safe_load(text)
    assert raw["optim"]["head_lr_mult"] == 100.0 and raw["data"]["patch_size"] == [16, 32, 32]
    assert raw["recipe"] == "medicalnet" and raw["data"]["path"] == "d"
    assert load_config(out) == cfg
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]  # no temp file left behind


def test_parse_value():
    assert parse_value("1e-4") == 1e-4
    assert parse_value("[32,64,64]") == [32, 64, 64]
    assert parse_value("3") == 3 and parse_value("true") is True and parse_value("null") is None
    assert parse_value("adamw") == "adamw"


def test_overrides_parse_lists_and_numbers():
    cfg = load_config({"model": MODEL})
    new = apply_overrides(
        cfg, ["optim.lr=1e-4", "train.max_epochs=3", "data.patch_size=[32,64,64]", "model.arch.shortcut_type=A",
              "model.pretrained=weights/r10.pth", "train.grad_clip=12.5"]
    )
    assert new.optim.lr == 1e-4 and new.train.max_epochs == 3 and new.data.patch_size == (32, 64, 64)
    assert new.model.arch == {"shortcut_type": "A"} and new.model.pretrained == "weights/r10.pth"
    assert new.train.grad_clip == 12.5
    assert cfg.optim.lr == 1e-3  # the original is untouched


def test_override_errors():
    cfg = load_config({"model": MODEL})
    with pytest.raises(MedTransferError) as info:
        apply_overrides(cfg, ["optim.lrr=1"])
    assert "override 'optim.lrr': unknown key 'lrr' (did you mean 'lr'?); valid keys under optim: betas" in str(info.value)
    with pytest.raises(MedTransferError, match="valid keys under the top level: data, inference, loss, model"):
        apply_overrides(cfg, ["optimizer.lr=1"])
    with pytest.raises(MedTransferError, match="expected key=value"):
        apply_overrides(cfg, ["optim.lr"])
    with pytest.raises(MedTransferError, match="optim.lr: Input should be greater than 0"):
        apply_overrides(cfg, ["optim.lr=0"])
    with pytest.raises(MedTransferError, match="optim.lr: Input should be a valid number"):
        apply_overrides(cfg, ["optim.lr=fast"])


def test_overrides_on_a_dict_resolve_the_recipe_after():
    cfg = apply_overrides({"model": MODEL}, ["recipe=medicalnet", "optim.lr=0.01"])
    assert cfg.optim.name == "sgd" and cfg.optim.lr == 0.01 and cfg.optim.head_lr_mult == 100.0
    resolved = load_config({"model": MODEL, "recipe": "medicalnet"})
    with pytest.raises(MedTransferError, match="already merged"):
        apply_overrides(resolved, ["recipe=genesis"])


def test_dataset_layout_options_pass_through_the_config():
    from medtransfer.train.config import load_config

    cfg = load_config({"model": {"name": "resnet50_2d", "task": "segmentation"},
                       "data": {"format": "image_mask_2d", "options": {"images": "images2d", "masks": "masks2d"}},
                       "train": {"max_steps": 2}})
    assert cfg.data.options == {"images": "images2d", "masks": "masks2d"}
