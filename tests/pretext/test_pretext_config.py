"""Pretraining configs: recipes merged under user values, validation errors naming the field."""

from __future__ import annotations

import pytest

from medtransfer.errors import MedTransferError
from medtransfer.pretext.config import DEFAULT_MODEL, load_pretrain_config


def test_published_genesis_recipe_and_user_values_win():
    cfg = load_pretrain_config({"method": "genesis"}, ["optim.lr=0.5"])
    assert cfg.model.name == "genesis_unet3d"
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.5, 0.9, 0.0)
    assert (cfg.schedule.name, cfg.schedule.step_size, cfg.schedule.gamma) == ("step", 40, 0.5)
    assert cfg.train.early_stop_patience == 50 and cfg.train.monitor == "loss"
    assert cfg.data.batch_size == 6


def test_modern_genesis_recipe_and_none():
    modern = load_pretrain_config({"method": "genesis", "recipe": "modern"})
    assert modern.optim.name == "adamw" and modern.schedule.name == "cosine"
    plain = load_pretrain_config({"method": "genesis", "recipe": "none"})
    assert plain.optim.name == "adam" and plain.optim.lr == 1e-3 and plain.schedule.name == "none"


@pytest.mark.parametrize("method", ["genesis", "volf", "med3d", "vdt"])
def test_every_method_has_a_default_model_and_valid_recipe(method):
    cfg = load_pretrain_config({"method": method})
    assert cfg.model.name == DEFAULT_MODEL[method] and cfg.recipe == "published"


def test_volf_published_values():
    cfg = load_pretrain_config({"method": "volf"})
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("adam", 1e-3, 1e-5)
    assert (cfg.schedule.interval, cfg.schedule.step_size, cfg.train.max_steps) == ("step", 20_000, 80_000)


@pytest.mark.parametrize("data, overrides, message", [
    ({"method": "nope"}, [], "method: Input should be 'genesis', 'volf', 'med3d' or 'vdt'"),
    ({"method": "volf", "recipe": "modern"}, [], "recipe 'modern' exists for method genesis only"),
    ({"method": "genesis", "data": {"paths": ["a", "b"]}}, [], "takes one dataset"),
    ({"method": "genesis"}, ["data.pathz=x"], "unknown key 'pathz' (did you mean 'paths'?)"),
    ({"method": "genesis"}, ["data.batch_size=0"], "data.batch_size: Input should be greater than 0"),
    ({"method": "genesis"}, ["data.patch_size=[0,4,4]"], "patch_size values must be > 0"),
    ({"method": "genesis"}, ["data.preset=hu"], "unknown intensity preset 'hu'"),
    ({"method": "genesis", "model": {"name": "resnet999"}}, [], "model.name"),
    ({"method": "genesis"}, ["optim.lr"], "expected key=value"),
])
def test_invalid_configs_name_the_field(data, overrides, message):
    with pytest.raises(MedTransferError) as err:
        load_pretrain_config(data, overrides)
    assert message in str(err.value)


def test_med3d_takes_several_datasets():
    cfg = load_pretrain_config({"method": "med3d", "data": {"paths": ["a", "b", "c"]}})
    assert [str(p) for p in cfg.data.paths] == ["a", "b", "c"]
