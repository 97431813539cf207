"""The 2D release formats: each is detected by its signature and converted to torchvision ResNet-50 keys exactly.

Files are synthesised from a ResNet50's own state_dict wrapped the way each release wraps it (MoCo's encoder_q/
encoder_k/queue, SwAV's projection head and prototypes, PyContrast's heads and jigsaw branch, BYOL's haiku tree).
"""

from __future__ import annotations

import collections
import pickle
import re
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from medtransfer.weights.adapt import load_state_dict_with_report
from medtransfer.weights.sources import convert, detect_source
from medtransfer.weights.sources2d import haiku_to_torchvision
from medtransfer.zoo.builder import load_checkpoint
from medtransfer.zoo.resnet2d import ResNet50


def _randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Kaiming-initialised kernels with random BN affines and statistics, so a wrong mapping changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key.endswith("running_var"):
                value.copy_(torch.rand(value.shape, generator=g) + 0.5)
            elif key.endswith("num_batches_tracked"):
                value.fill_(7)
            elif value.ndim == 1:  # BN weight/bias, running_mean, fc bias
                base = 1.0 if key.endswith("weight") else 0.0
                value.copy_(base + 0.1 * torch.randn(value.shape, generator=g))
    return model.eval()


def _assert_same_weights(model: nn.Module, reference: nn.Module) -> None:
    own = model.state_dict()
    for key, value in reference.state_dict().items():
        assert torch.equal(own[key], value), key


@pytest.fixture(scope="module")
def reference() -> ResNet50:
    torch.manual_seed(0)
    return _randomised(ResNet50(task="classification", num_classes=10))


@pytest.fixture(scope="module")
def backbone(reference) -> dict[str, torch.Tensor]:
    """The 318 torchvision keys (no fc)."""
    return {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}


def _prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


def moco_file(backbone, version: int, prefix: str = "module."):
    if version == 1:
        fc = {"fc.weight": torch.zeros(128, 2048), "fc.bias": torch.zeros(128)}
    else:  # v2's MLP projection
        fc = {"fc.0.weight": torch.zeros(2048, 2048), "fc.0.bias": torch.zeros(2048),
              "fc.2.weight": torch.zeros(128, 2048), "fc.2.bias": torch.zeros(128)}
    encoder = {**backbone, **fc}
    sd = {**_prefixed(encoder, f"{prefix}encoder_q."), **_prefixed(encoder, f"{prefix}encoder_k.")}
    sd[f"{prefix}queue"] = torch.zeros(128, 16)
    sd[f"{prefix}queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return {"epoch": 200, "arch": "resnet50", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}


def swav_file(backbone, kind: str):
    heads = {"projection_head.0.weight": torch.zeros(2048, 2048), "projection_head.0.bias": torch.zeros(2048),
             "projection_head.1.weight": torch.ones(2048), "projection_head.3.weight": torch.zeros(128, 2048)}
    if kind == "swav":
        heads["prototypes.weight"] = torch.zeros(3000, 128)
    else:  # DeepCluster-v2 / SeLa-v2 keep several prototype heads
        heads.update({f"prototypes.prototypes{i}.weight": torch.zeros(30, 128) for i in range(3)})
    return _prefixed({**backbone, **heads}, "module.")


def pycontrast_file(backbone, jigsaw: bool):
    model = _prefixed(backbone, "module.encoder.")
    model.update({"module.head.0.weight": torch.zeros(2048, 2048), "module.head.2.weight": torch.zeros(128, 2048)})
    if jigsaw:  # PIRL
        model.update({"module.head_jig.fc1.weight": torch.zeros(128, 2048),
                      "module.head_jig.fc2.weight": torch.zeros(128, 1152)})
    return {"model": model, "contrast": {"memory": torch.zeros(16, 128)},
            "model_ema": _prefixed(backbone, "encoder."), "optimizer": {}, "epoch": 800}


def chestxray_file(backbone, module: bool, classes: int = 14):
    head = {"fc.0.weight": torch.zeros(classes, 2048), "fc.0.bias": torch.zeros(classes)}
    sd = {**backbone, **head}
    return {"epoch": 31, "lossMIN": 0.15, "state_dict": _prefixed(sd, "module.") if module else sd,
            "optimizer": {"state": {}, "param_groups": []}, "scheduler": {"best": 0.15}}


def inat_file(backbone):
    sd = {**backbone, "fc.weight": torch.zeros(100, 2048), "fc.bias": torch.zeros(100)}
    return {"epoch": 90, "arch": "resnet50", "state_dict": sd, "best_acc1": torch.tensor(73.2), "optimizer": {}}


FORMATS = {
    "moco_v1": ("moco", lambda b: moco_file(b, 1)),
    "moco_v2": ("moco", lambda b: moco_file(b, 2)),
    "pcl_single_gpu": ("moco", lambda b: moco_file(b, 2, prefix="")),
    "swav": ("swav", lambda b: swav_file(b, "swav")),
    "deepcluster_v2": ("swav", lambda b: swav_file(b, "deepcluster")),
    "swav_under_state_dict": ("swav", lambda b: {"state_dict": swav_file(b, "swav"), "epoch": 199}),
    "insdis": ("pycontrast", lambda b: pycontrast_file(b, jigsaw=False)),
    "pirl": ("pycontrast", lambda b: pycontrast_file(b, jigsaw=True)),
    "chestxray14": ("chestxray", lambda b: chestxray_file(b, module=False)),
    "chexpert": ("chestxray", lambda b: chestxray_file(b, module=True)),
    "inat2021": ("chestxray", inat_file),
    "btl_unified": ("torchvision", dict),
    "barlowtwins": ("torchvision", dict),
    "dataparallel_plain": ("torchvision", lambda b: _prefixed(b, "module.")),
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_release_format_converts_to_exactly_the_torchvision_keys(name, backbone):
    expected_source, make = FORMATS[name]
    obj = make(backbone)
    assert detect_source(obj).name == expected_source
    sd, source = convert(obj)
    assert source.name == expected_source
    assert set(sd) == set(backbone)
    assert all(sd[k] is backbone[k] or torch.equal(sd[k], backbone[k]) for k in backbone)


def test_torchvision_file_keeps_its_fc(reference):
    sd, source = convert(reference.state_dict())
    assert source.name == "torchvision" and {"fc.weight", "fc.bias"} <= set(sd) and len(sd) == 320


@pytest.mark.parametrize("name", ["moco_v2", "swav", "pirl", "chexpert", "inat2021"])
def test_converted_release_loads_with_full_backbone_coverage(name, backbone, reference):
    sd, source = convert(FORMATS[name][1](backbone))
    model = ResNet50(task="classification", num_classes=3)
    report = load_state_dict_with_report(model, sd, source=source.name, model_name="resnet50_2d")
    assert report.coverage == 1.0 and report.encoder_total == 265  # 318 minus 53 num_batches_tracked
    assert report.missing == ["fc.weight", "fc.bias"] and not report.unexpected and not report.mismatched
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval().forward_features(x), reference.forward_features(x))


def test_moco_file_on_disk_loads_through_auto_detection(tmp_path, backbone, reference):
    path = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save(moco_file(backbone, 2), path)
    model = ResNet50(task="segmentation", num_classes=1)
    report = load_checkpoint(model, path)
    assert report.source == "moco" and report.coverage == 1.0
    assert all(k.startswith("decoder.") for k in report.missing)


def test_smp_unet_checkpoint_loads_whole_into_the_segmentation_model():
    # BenchmarkTransferLearning's segmentation checkpoints: smp Unet keys (encoder., decoder.blocks.,
    # segmentation_head.0.) under a DataParallel prefix.
    segmentation = _randomised(ResNet50(task="segmentation", num_classes=2), seed=1)
    smp = {}
    for key, value in segmentation.state_dict().items():
        if key.startswith("decoder.head."):
            smp["segmentation_head.0." + key[len("decoder.head.") :]] = value
        elif key.startswith("decoder."):
            smp[key] = value
        else:
            smp["encoder." + key] = value
    obj = {"epoch": 12, "lossMIN": 0.2, "state_dict": _prefixed(smp, "module."), "optimizer": {}}
    sd, source = convert(obj)
    assert source.name == "smp_unet" and set(sd) == set(segmentation.state_dict())
    model = ResNet50(task="segmentation", num_classes=2)
    report = load_state_dict_with_report(model, sd, source=source.name, model_name="resnet50_2d")
    assert report.coverage == 1.0 and not report.missing and not report.unexpected and not report.mismatched
    _assert_same_weights(model, segmentation)


def test_3d_checkpoints_are_not_claimed_by_2d_sources(backbone):
    w5 = torch.zeros(64, 1, 7, 7, 7)
    layer1 = torch.zeros(64, 64, 3, 3, 3)
    medicalnet = {"state_dict": {"module.conv1.weight": w5, "module.layer1.0.conv1.weight": layer1}}
    assert detect_source(medicalnet).name == "medicalnet"
    assert detect_source({"conv1.weight": w5, "layer1.0.conv1.weight": w5}).name == "plain"
    moco3d = {"state_dict": {"module.encoder_q.conv1.weight": w5, "module.encoder_q.layer1.0.conv1.weight": w5}}
    assert detect_source(moco3d).name not in {"moco", "swav", "pycontrast", "chestxray", "torchvision", "byol_haiku"}


def test_a_forced_source_that_does_not_fit_says_so(backbone):
    from medtransfer.errors import CheckpointError

    with pytest.raises(CheckpointError, match="layout of a 'moco' checkpoint"):
        convert(dict(backbone), source="moco")


# ----------------------------------------------------------------------------------------------------------------
# BYOL: a haiku parameter tree with the module names of deepmind-research byol/utils/networks.py (ResNet50 ->
# "res_net50", hk.nets.ResNet.BlockGroup/BlockV1 -> block_group_i/block_j with conv_k, batchnorm_k, shortcut_conv,
# shortcut_batchnorm; hk.BatchNorm statistics in mean_ema/var_ema), projector/predictor MLPs and the classifier.


def haiku_module(torch_module: str) -> str:
    if torch_module == "conv1":
        return "res_net50/~/initial_conv"
    if torch_module == "bn1":
        return "res_net50/~/initial_batchnorm"
    stage, block, rest = re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", torch_module).groups()
    leaf = {"downsample.0": "shortcut_conv", "downsample.1": "shortcut_batchnorm"}.get(rest)
    if leaf is None:
        kind, index = re.fullmatch(r"(conv|bn)(\d)", rest).groups()
        leaf = f"{'conv' if kind == 'conv' else 'batchnorm'}_{int(index) - 1}"
    return f"res_net50/~/block_group_{int(stage) - 1}/~/block_{block}/~/{leaf}"


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().copy()


def byol_trees(reference: ResNet50):
    """(params, state) as haiku stores them: sorted module paths, HWIO kernels, (1, 1, 1, C) BN tensors."""
    params, state = {}, {}
    for name, module in reference.named_modules():
        if isinstance(module, nn.Conv2d):
            params[haiku_module(name)] = {"w": _np(module.weight.permute(2, 3, 1, 0))}
        elif isinstance(module, nn.BatchNorm2d):
            hk = haiku_module(name)
            params[hk] = {"scale": _np(module.weight).reshape(1, 1, 1, -1),
                          "offset": _np(module.bias).reshape(1, 1, 1, -1)}
            for ema, stat in (("mean_ema", module.running_mean), ("var_ema", module.running_var)):
                average = _np(stat).reshape(1, 1, 1, -1)
                counter = np.int32(module.num_batches_tracked)
                state[f"{hk}/~/{ema}"] = {"average": average, "counter": counter, "hidden": average.copy()}
    params["classifier"] = {"w": _np(reference.fc.weight.t()), "b": _np(reference.fc.bias)}
    for mlp in ("projector", "predictor"):
        params[f"{mlp}/~/linear"] = {"w": np.zeros((2048, 64), np.float32), "b": np.zeros(64, np.float32)}
        params[f"{mlp}/~/batch_norm"] = {"scale": np.ones(64, np.float32), "offset": np.zeros(64, np.float32)}
        params[f"{mlp}/~/linear_1"] = {"w": np.zeros((64, 32), np.float32)}
        state[f"{mlp}/~/batch_norm/~/mean_ema"] = {"average": np.zeros(64, np.float32), "counter": np.int32(1)}
        state[f"{mlp}/~/batch_norm/~/var_ema"] = {"average": np.ones(64, np.float32), "counter": np.int32(1)}
    return dict(sorted(params.items())), dict(sorted(state.items()))


def spec_order_conversion(params, state, model: nn.Module) -> dict[str, torch.Tensor]:
    """BenchmarkTransferLearning's positional procedure (spec 5a), as a cross-check of the name-based converter."""
    convs = [v for k, v in params.items() if "conv" in k]
    bns = [v for k, v in params.items() if "batchnorm" in k]
    emas = [v for k, v in state.items() if "batchnorm" in k]
    convs.insert(0, convs.pop())
    bns.insert(0, bns.pop())
    emas.insert(0, emas.pop())
    emas.insert(0, emas.pop())
    conv_names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    bn_names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    out = {}
    for i, name in enumerate(conv_names):
        out[f"{name}.weight"] = torch.from_numpy(convs[i]["w"]).permute(3, 2, 0, 1)
    for i, name in enumerate(bn_names):
        out[f"{name}.weight"] = torch.from_numpy(bns[i]["scale"]).reshape(-1)
        out[f"{name}.bias"] = torch.from_numpy(bns[i]["offset"]).reshape(-1)
        out[f"{name}.running_mean"] = torch.from_numpy(emas[2 * i]["average"]).reshape(-1)
        out[f"{name}.running_var"] = torch.from_numpy(emas[2 * i + 1]["average"]).reshape(-1)
    return out


def test_haiku_names_map_to_torchvision_modules():
    assert haiku_to_torchvision("res_net50/~/initial_conv") == ("conv1", "conv")
    assert haiku_to_torchvision("res_net50/~/block_group_1/~/block_0/~/conv_1") == ("layer2.0.conv2", "conv")
    assert haiku_to_torchvision("res_net50/~/block_group_3/~/block_2/~/batchnorm_2") == ("layer4.2.bn3", "batchnorm")
    shortcut = "res_net50/~/block_group_0/~/block_0/~/shortcut_conv"
    assert haiku_to_torchvision(shortcut) == ("layer1.0.downsample.0", "conv")
    assert haiku_to_torchvision("classifier") == ("fc", "linear")
    assert haiku_to_torchvision("projector/~/linear") is None and haiku_to_torchvision("predictor/~/batch_norm") is None


def test_byol_tree_converts_like_the_spec_procedure_and_reproduces_the_network(reference, backbone):
    params, state = byol_trees(reference)
    obj = {"experiment_state": types.SimpleNamespace(online_params=params, online_state=state), "step": 1}
    sd, source = convert(obj)
    assert source.name == "byol_haiku"
    assert set(sd) == set(backbone) | {"fc.weight", "fc.bias"}
    for key, value in spec_order_conversion(params, state, ResNet50(task="features")).items():
        assert torch.equal(sd[key], value), key
    assert int(sd["layer3.4.bn2.num_batches_tracked"]) == 7  # from the EMA counter
    model = ResNet50(task="classification", num_classes=10)
    report = load_state_dict_with_report(model, sd, source=source.name, model_name="resnet50_2d")
    assert report.coverage == 1.0 and not report.missing and not report.unexpected
    _assert_same_weights(model, reference)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.fixture
def haiku_pickle_modules(monkeypatch):
    """Look-alikes of haiku's FlatMapping and dill's namedtuple factory, importable only while writing the file."""
    modules = {}
    for name in ("haiku", "haiku._src", "haiku._src.data_structures", "dill", "dill._dill"):
        modules[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, modules[name])

    class FlatMapping(dict):
        def __reduce__(self):
            return FlatMapping, (dict(self),)

    def _create_namedtuple(name, fields, module):
        return collections.namedtuple(name, fields, module=module)

    FlatMapping.__module__, FlatMapping.__qualname__ = "haiku._src.data_structures", "FlatMapping"
    _create_namedtuple.__module__, _create_namedtuple.__qualname__ = "dill._dill", "_create_namedtuple"
    modules["haiku._src.data_structures"].FlatMapping = FlatMapping
    modules["dill._dill"]._create_namedtuple = _create_namedtuple
    return FlatMapping, _create_namedtuple


def test_byol_pickle_on_disk_loads_through_the_restricted_unpickler(
    tmp_path, reference, haiku_pickle_modules, monkeypatch
):
    FlatMapping, create_namedtuple = haiku_pickle_modules
    params, state = byol_trees(reference)
    fields = ("online_params", "target_params", "online_state", "target_state", "opt_state")
    State = collections.namedtuple("_ByolExperimentState", fields, module="byol.byol_experiment")

    def frozen(tree):
        return FlatMapping({k: FlatMapping(v) for k, v in tree.items()})

    checkpoint = {
        "experiment_state": State(frozen(params), FlatMapping({}), frozen(state), FlatMapping({}), ()),
        "step": 5004,
        "rng": np.array([0, 42], dtype=np.uint32),
    }

    class DillLikePickler(pickle.Pickler):
        def reducer_override(self, value):
            if value is State:
                return create_namedtuple, (State.__name__, State._fields, State.__module__)
            return NotImplemented

    path = tmp_path / "pretrain_res50x1.pkl"
    with path.open("wb") as handle:
        DillLikePickler(handle, protocol=2).dump(checkpoint)
    monkeypatch.undo()  # the reader has neither haiku nor dill

    model = ResNet50(task="classification", num_classes=10)
    report = load_checkpoint(model, path)
    assert report.source == "byol_haiku" and report.coverage == 1.0 and not report.missing
    _assert_same_weights(model, reference)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), reference(x), rtol=1e-5, atol=1e-5)
