"""Detection and conversion of the 3D seed systems' wrapper formats, on synthetic key sets."""

import pytest
import torch

from medtransfer.errors import CheckpointError
from medtransfer.weights.sources import convert, detect_source, strip_prefixes
from medtransfer.weights.sources3d import NormalisedWeights

W5 = torch.zeros(64, 1, 7, 7, 7)


def _resnet_keys():
    return {"conv1.weight": W5, "bn1.weight": torch.ones(64), "layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3, 3)}


def test_strip_prefixes_is_a_prefix_test_and_prefers_the_longest_prefix():
    sd = {"module.encoder_q.conv1.weight": 1, "module.fc.weight": 2, "layer.module.x": 3}
    out = strip_prefixes(sd, ["module.", "module.encoder_q."])
    assert out == {"conv1.weight": 1, "fc.weight": 2, "layer.module.x": 3}


def test_medicalnet_file_with_dataparallel_prefix():
    obj = {"state_dict": {f"module.{k}": v for k, v in _resnet_keys().items()}}
    sd, source = convert(obj)
    assert source.name == "medicalnet" and set(sd) == set(_resnet_keys())


def test_medicalnet_finetuned_file_keeps_conv_seg():
    keys = {**_resnet_keys(), "conv_seg.6.weight": torch.zeros(3, 32, 1, 1, 1)}
    obj = {"ecpoch": 3, "batch_id": 1, "state_dict": {f"module.{k}": v for k, v in keys.items()}, "optimizer": {}}
    sd, source = convert(obj)
    assert source.name == "medicalnet" and "conv_seg.6.weight" in sd


def test_genesis_file():
    keys = {"down_tr64.ops.0.conv1.weight": torch.zeros(32, 1, 3, 3, 3), "out_tr.final_conv.weight": torch.zeros(1, 64, 1, 1, 1)}
    obj = {"epoch": 10, "state_dict": {f"module.{k}": v for k, v in keys.items()}, "optimizer_state_dict": {}}
    sd, source = convert(obj)
    assert source.name == "genesis" and set(sd) == set(keys)


def test_pymic_file():
    obj = {"iteration": 100, "valid_pred": 0.5, "model_state_dict": {"project.weight": torch.zeros(1)}, "optimizer_state_dict": {}}
    sd, source = convert(obj)
    assert source.name == "pymic" and list(sd) == ["project.weight"]


@pytest.mark.parametrize("prefix", ["", "backbone.", "module.backbone."])
def test_mmcv_file_with_or_without_backbone_prefix(prefix):
    keys = {f"{prefix}{k}": v for k, v in _resnet_keys().items()}
    keys["head.fc.weight"] = torch.zeros(1000, 512)
    obj = {"meta": {"mmcv_version": "1.3"}, "state_dict": keys}
    sd, source = convert(obj)
    assert source.name == "mmcv"
    assert set(sd) == set(_resnet_keys()) | {"fc.weight"}


def test_plain_state_dict_and_own_format():
    sd, source = convert({"module.a.weight": torch.zeros(1), "module.b": torch.zeros(1)})
    assert source.name == "plain" and set(sd) == {"a.weight", "b"}
    sd, source = convert(NormalisedWeights({"x": torch.zeros(1)}, {"model": "m"}))
    assert source.name == "medtransfer" and set(sd) == {"x"}


def test_unknown_content_gets_a_clear_error():
    with pytest.raises(CheckpointError, match=r"no known checkpoint format matches .*top-level keys: \['epoch', 'note'\]"):
        detect_source({"epoch": 3, "note": "no tensors"})
    with pytest.raises(CheckpointError, match="holds a list"):
        detect_source([1, 2, 3])


def test_forcing_a_source_that_does_not_fit():
    with pytest.raises(CheckpointError, match="does not have the layout of a 'pymic' checkpoint"):
        convert({"state_dict": {"a": torch.zeros(1)}}, source="pymic")
    with pytest.raises(CheckpointError, match="unknown checkpoint source 'nope'"):
        convert({}, source="nope")
