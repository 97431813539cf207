"""Every registered model, with tiny inputs: the public API contract and loading of the official wrapper formats."""

from __future__ import annotations

import pytest
import torch

import medtransfer as mt
from medtransfer.errors import CheckpointMismatchError, UnknownModelError, WeightsNotFoundError
from medtransfer.weights.export import export_official

FIXED_NAMES = {
    "medicalnet_resnet10",
    "medicalnet_resnet18",
    "medicalnet_resnet34",
    "medicalnet_resnet50",
    "medicalnet_resnet101",
    "medicalnet_resnet152",
    "medicalnet_resnet200",
    "genesis_unet3d",
    "fmunet",
    "pctnet",
    "vdt_resnet18_3d",
    "resnet50_2d",
}
# Too slow to build three times on 2 CPU cores; their blocks are those of R10/R18/R50, and their keys and parameter
# counts are checked on the meta device (tests/zoo/test_resnet3d.py).
DEEP_VARIANTS = {"medicalnet_resnet34", "medicalnet_resnet101", "medicalnet_resnet152", "medicalnet_resnet200",
                 "resnet3d_34", "resnet3d_101", "resnet3d_152"}
# nnunet without plans is nnU-Net's full-size default (31M parameters, 64^3 at least); tests/zoo/test_nnunet.py
# checks it on small plans instead. swin_unetr (62M parameters) takes up to a minute here; tests/zoo/test_swin_unetr.py
# checks it at small feature sizes.
SLOW_DEFAULTS = {"nnunet", "swin_unetr"}
FORWARD_MODELS = [n for n in mt.list_models() if n not in DEEP_VARIANTS | SLOW_DEFAULTS]
LOADABLE_MODELS = [n for n in FORWARD_MODELS if mt.get_entry(n).pretrained]
# forward_features returns a list of stage maps, not one tensor; tests/zoo/test_p3d.py checks them.
MULTI_STAGE = {"p3d63"}
# Whole networks are compared on their full output, backbones on forward_features (the acceptance protocol).
WHOLE_NETWORKS = {"genesis_unet3d", "fmunet", "pctnet"}


def _input(name: str, batch: int = 1) -> torch.Tensor:
    entry = mt.get_entry(name)
    return torch.randn(batch, entry.default_in_channels, *entry.small_input_size, generator=torch.Generator().manual_seed(3))


def test_every_fixed_name_is_registered():
    assert FIXED_NAMES <= set(mt.list_models())
    assert mt.list_models("medicalnet_*") == sorted(n for n in FIXED_NAMES if n.startswith("medicalnet_"))
    assert mt.list_models("nothing*") == []


@pytest.mark.parametrize("name", [n for n in FORWARD_MODELS if n not in {"medicalnet_resnet50"} | MULTI_STAGE])  # R50: see loading test
def test_output_shapes_for_each_task(name):
    x = _input(name, batch=2)
    for task in mt.get_entry(name).tasks:
        model = mt.create_model(name, task=task, num_classes=3).eval()
        with torch.no_grad():
            out = model(x)
            feats = model.forward_features(x)
        if task == "segmentation":
            assert out.shape == (2, 3, *x.shape[2:]), task
        elif task == "classification":
            assert out.shape == (2, 3), task
        else:
            assert torch.equal(out, feats)
        assert feats.ndim == x.ndim and feats.shape[0] == 2


@pytest.mark.parametrize("name", mt.list_models())
def test_every_model_builds_on_meta_with_encoder_keys(name):
    with torch.device("meta"):
        model = mt.create_model(name, task="features")
    keys = list(model.state_dict())
    encoder = [k for k in keys if k.startswith(model.encoder_prefixes)]
    assert encoder, "encoder_prefixes match no key"
    assert set(model.first_conv_keys) <= set(keys)


def _official_checkpoint(name: str, tmp_path, task: str, num_classes: int):
    """A random-weight model of ``name`` saved in the official on-disk format of its first published file."""
    entry = mt.get_entry(name)
    cfg = entry.pretrained[0]
    torch.manual_seed(11)
    reference = mt.create_model(name, task=task, num_classes=num_classes)
    # Give BatchNorm running statistics non-trivial values so that loading them is visible in eval outputs.
    with torch.no_grad():
        for k, v in reference.state_dict().items():
            if k.endswith("running_mean"):
                v.uniform_(-0.1, 0.1)
            elif k.endswith("running_var"):
                v.uniform_(0.5, 1.5)
    sd = reference.state_dict()
    if name not in WHOLE_NETWORKS:
        sd = {k: v for k, v in sd.items() if k.startswith(reference.encoder_prefixes)}
    fmt = {"medicalnet": "medicalnet", "genesis": "genesis", "pymic": "pymic", "mmcv": "mmcv"}.get(cfg.source, "torchvision")
    path = export_official(sd, tmp_path / cfg.file_name, fmt)
    return reference.eval(), path, cfg


@pytest.mark.parametrize("name", LOADABLE_MODELS)
def test_official_format_loads_with_full_coverage_and_identical_outputs(name, tmp_path):
    whole = name in WHOLE_NETWORKS
    task, classes = ("segmentation", mt.get_entry(name).default_num_classes) if whole else ("classification", 4)
    reference, path, cfg = _official_checkpoint(name, tmp_path, task, classes)
    model = mt.create_model(name, task=task, num_classes=classes if not whole else None, pretrained=path).eval()
    report = model.load_report
    assert report.coverage == 1.0 and report.encoder_mismatched == []
    assert report.source == cfg.source or (cfg.source not in {"medicalnet", "genesis", "pymic", "mmcv"})
    assert report.unexpected == []
    x = _input(name)
    with torch.no_grad():
        if whole:
            torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(model.forward_features(x), reference.forward_features(x), rtol=1e-5, atol=1e-5)


def test_pretrained_true_without_the_file_names_the_address_and_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDTRANSFER_HOME", str(tmp_path / "home"))
    cfg = mt.get_entry("genesis_unet3d").pretrained[0]
    with pytest.raises(WeightsNotFoundError) as info:
        mt.create_model("genesis_unet3d", pretrained=True)
    msg = str(info.value)
    assert cfg.url in msg and str(tmp_path / "home" / "weights" / cfg.file_name) in msg and "never downloads" in msg


def test_pretrained_true_reads_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDTRANSFER_HOME", str(tmp_path))
    reference, path, cfg = _official_checkpoint("medicalnet_resnet10", tmp_path / "weights", "classification", 2)
    model = mt.create_model("medicalnet_resnet10", task="classification", pretrained=True)
    assert model.load_report.coverage == 1.0 and model.pretrained_cfg is cfg


def test_wrong_architecture_is_a_clear_error(tmp_path):
    _, path, _ = _official_checkpoint("medicalnet_resnet10", tmp_path, "features", 2)
    with pytest.raises(CheckpointMismatchError, match="no encoder weights of 'genesis_unet3d'"):
        mt.create_model("genesis_unet3d", pretrained=path)
    with pytest.raises(CheckpointMismatchError, match="other shapes than 'medicalnet_resnet50'"):
        mt.create_model("medicalnet_resnet50", pretrained=path)


def test_a_deeper_variant_is_not_silently_truncated(tmp_path):
    _, path, _ = _official_checkpoint("medicalnet_resnet18", tmp_path, "features", 2)
    with pytest.raises(CheckpointMismatchError, match=r"has 40 encoder tensors that 'medicalnet_resnet10' lacks \(e\.g\. layer1\.1\."):
        mt.create_model("medicalnet_resnet10", pretrained=path)
    # the other way round is a partial load: reported, and an error only when asked for
    model = mt.create_model("medicalnet_resnet34", task="features", pretrained=path)
    assert model.load_report.coverage == pytest.approx(102 / 198, abs=0.02)
    with pytest.raises(CheckpointMismatchError, match="below min_coverage=100.0%"):
        mt.create_model("medicalnet_resnet34", task="features", pretrained=path, min_coverage=1.0)


def test_load_checkpoint_into_an_existing_model(tmp_path):
    reference, path, _ = _official_checkpoint("medicalnet_resnet10", tmp_path, "features", 2)
    model = mt.create_model("medicalnet_resnet10", task="segmentation", num_classes=2)
    report = mt.load_checkpoint(model, path, min_coverage=1.0)
    assert report.coverage == 1.0 and report.source == "medicalnet"
    assert sorted(report.missing) == sorted(k for k in model.state_dict() if k.startswith("conv_seg.") and not k.endswith("num_batches_tracked"))


def test_unknown_names_and_bad_arguments():
    with pytest.raises(UnknownModelError, match="unknown model 'resnet51_2d'"):
        mt.create_model("resnet51_2d")
    with pytest.raises(ValueError, match="task must be one of"):
        mt.create_model("medicalnet_resnet10", task="detection")
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        mt.create_model("medicalnet_resnet10", num_classes=0)
    with pytest.raises(UnknownModelError, match="no published weights tagged 'nope'"):
        mt.create_model("medicalnet_resnet10.nope", pretrained=True)


@pytest.mark.parametrize("mode", ["i3d", "centre"])
def test_a_2d_resnet50_initialises_the_3d_resnet50(tmp_path, mode):
    torch.manual_seed(5)
    source = mt.create_model("resnet50_2d", task="features")
    sd2 = {k: v for k, v in source.state_dict().items()}
    path = export_official(sd2, tmp_path / "moco_like.pth", "torchvision")
    model = mt.create_model("medicalnet_resnet50", task="features", pretrained=path, inflate=mode)
    report = model.load_report
    assert report.coverage == 1.0 and report.unexpected == [] and report.mismatched == []
    adapted = dict(report.adapted)
    assert adapted["conv1.weight"] == f"inflated 2D->3D ({mode}, depth 7); input channels 3->1"
    assert adapted["layer1.0.conv2.weight"] == f"inflated 2D->3D ({mode}, depth 3)"
    sd3 = model.state_dict()
    stem = sd2["conv1.weight"].mean(dim=1, keepdim=True)
    k3 = sd2["layer2.0.conv2.weight"]
    if mode == "centre":
        torch.testing.assert_close(sd3["conv1.weight"][:, :, 3], stem)
        torch.testing.assert_close(sd3["layer2.0.conv2.weight"][:, :, 1], k3)
    else:  # repeated over depth and divided: the depth sum is the 2D kernel
        torch.testing.assert_close(sd3["conv1.weight"].sum(dim=2), stem)
        torch.testing.assert_close(sd3["layer2.0.conv2.weight"].sum(dim=2), k3)
    assert torch.equal(sd3["layer4.2.bn3.running_var"], sd2["layer4.2.bn3.running_var"])


def test_a_checkpoint_head_sets_the_class_count_only_for_its_own_task(tmp_path):
    torch.manual_seed(0)
    imagenet = mt.create_model("resnet50_2d", task="classification", num_classes=1000)
    path = export_official(imagenet.state_dict(), tmp_path / "resnet50.pth", "torchvision")
    clf = mt.create_model("resnet50_2d", task="classification", pretrained=path)
    assert clf.fc.out_features == 1000 and clf.load_report.missing == []
    seg = mt.create_model("resnet50_2d", task="segmentation", pretrained=path)
    assert seg.decoder.head.out_channels == mt.get_entry("resnet50_2d").default_num_classes
    assert seg.load_report.unexpected == ["fc.weight", "fc.bias"]


def test_every_published_file_has_a_known_format_and_a_complete_record():
    from medtransfer.weights.sources import get_source
    from medtransfer.zoo.registry import all_pretrained_cfgs

    cfgs = all_pretrained_cfgs()
    assert len(cfgs) >= 12 + 4 + 18  # MedicalNet 11, VDT 1, Genesis 1, MIS-FM 2, BenchmarkTransferLearning 19
    names = [c.full_name for c in cfgs]
    assert len(names) == len(set(names))
    for cfg in cfgs:
        assert get_source(cfg.source).name == cfg.source
        assert cfg.file_name and cfg.url.startswith("https://"), cfg.full_name
        assert cfg.citation and cfg.license and cfg.modality, cfg.full_name


@pytest.mark.parametrize("name", mt.list_models())
def test_unknown_options_get_one_clear_error(name):
    options = mt.get_entry(name).arch_options
    with pytest.raises(TypeError, match=rf"model '{name}' has no option bogus; its options: "):
        mt.create_model(name, task=mt.get_entry(name).tasks[0], bogus=1)
    assert all(isinstance(o, str) for o in options)


def test_a_file_of_another_family_loads_with_a_note(tmp_path):
    torch.manual_seed(0)
    vdt = mt.create_model("vdt_resnet18_3d", task="features")
    path = export_official(vdt.state_dict(), tmp_path / "vdt.pth", "mmcv")
    model = mt.create_model("medicalnet_resnet18", task="features", pretrained=path)
    assert model.load_report.coverage == 1.0 and model.arch_kwargs["shortcut"] == "B"
    assert model.load_report.notes == [
        "the file is in VDT's 'mmcv' format, not MedicalNet's: its tensors fit by name and shape, but the network "
        "they were trained in may differ in strides, dilations or input contract"
    ]
    assert "note" in str(model.load_report)
    own = mt.create_model("vdt_resnet18_3d", task="features", pretrained=path)
    assert own.load_report.notes == []
