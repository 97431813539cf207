"""MedicalNet and VDT 3D ResNets against the spec (seed-systems.md 1a, 2a, 7): keys, counts, shapes, behaviour."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medtransfer.zoo import resnet3d as r3d
from medtransfer.zoo.heads import upsample_to

torch.set_num_threads(1)

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
BLOCKS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
          152: (3, 8, 36, 3), 200: (3, 24, 36, 3)}  # fmt: skip
SPEC_PARAMS_M = {(10, "B"): 14.36, (18, "A"): 32.99, (34, "A"): 63.30, (50, "B"): 46.16, (101, "B"): 85.20,
                 (152, "B"): 117.36, (200, "B"): 126.56}  # fmt: skip


def expected_keys(depth: int, shortcut: str) -> set[str]:
    """The backbone key set as the spec describes it, written out independently of the implementation."""
    bottleneck = depth >= 50
    convs = (1, 2, 3) if bottleneck else (1, 2)
    keys = {"conv1.weight"} | {f"bn1.{s}" for s in BN}
    for stage, n in enumerate(BLOCKS[depth], start=1):
        for j in range(n):
            for c in convs:
                keys.add(f"layer{stage}.{j}.conv{c}.weight")
                keys |= {f"layer{stage}.{j}.bn{c}.{s}" for s in BN}
        # Shortcut B: every stage's first block for Bottleneck models, layer2-4 for BasicBlock models.
        if shortcut == "B" and (bottleneck or stage > 1):
            keys.add(f"layer{stage}.0.downsample.0.weight")
            keys |= {f"layer{stage}.0.downsample.1.{s}" for s in BN}
    return keys


def meta_model(fn, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return fn(**kwargs)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- MedicalNet: keys and sizes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("depth", "shortcut"), sorted(SPEC_PARAMS_M))
def test_medicalnet_default_backbone_keys_and_params(depth, shortcut):
    model = meta_model(getattr(r3d, f"medicalnet_resnet{depth}"), task="features", num_classes=None)
    assert model.shortcut == shortcut  # A for 18/34, B otherwise
    assert set(model.state_dict()) == expected_keys(depth, shortcut)
    assert n_params(model) == pytest.approx(SPEC_PARAMS_M[(depth, shortcut)] * 1e6, rel=5e-3)
    assert all(model.is_encoder_key(k) for k in model.state_dict())


def test_medicalnet_entry_counts_and_downsample_positions():
    counts = {10: 72, 18: 102, 50: 318}
    r18 = meta_model(r3d.medicalnet_resnet18, task="features", num_classes=None)
    assert not [k for k in r18.state_dict() if "downsample" in k]
    r10 = meta_model(r3d.medicalnet_resnet10, task="features", num_classes=None)
    assert {k.split(".downsample")[0] for k in r10.state_dict() if "downsample" in k} == {
        "layer2.0", "layer3.0", "layer4.0"}  # fmt: skip
    assert tuple(r10.layer3[0].downsample[0].stride) == (1, 1, 1)  # width change only
    r50 = meta_model(r3d.medicalnet_resnet50, task="features", num_classes=None)
    assert {k.split(".downsample")[0] for k in r50.state_dict() if "downsample" in k} == {
        "layer1.0", "layer2.0", "layer3.0", "layer4.0"}  # fmt: skip
    for depth, model in ((10, r10), (18, r18), (50, r50)):
        assert len(model.state_dict()) == counts[depth]


def test_medicalnet_shortcut_override():
    r18b = meta_model(r3d.medicalnet_resnet18, task="features", num_classes=None, shortcut="B")
    assert set(r18b.state_dict()) == expected_keys(18, "B")
    r50a = meta_model(r3d.medicalnet_resnet50, task="features", num_classes=None, shortcut="A")
    assert set(r50a.state_dict()) == expected_keys(50, "A")
    assert isinstance(r50a.layer1[0].downsample, r3d.ZeroPadShortcut)


def test_medicalnet_head_keys():
    seg = meta_model(r3d.medicalnet_resnet50, task="segmentation", num_classes=5)
    head = {k: tuple(v.shape) for k, v in seg.state_dict().items() if k.startswith("conv_seg.")}
    assert head["conv_seg.0.weight"] == (2048, 32, 2, 2, 2)  # ConvTranspose3d: (in, out, k, k, k)
    assert head["conv_seg.0.bias"] == (32,)
    assert head["conv_seg.3.weight"] == (32, 32, 3, 3, 3)
    assert head["conv_seg.6.weight"] == (5, 32, 1, 1, 1)
    assert set(head) == {"conv_seg.0.weight", "conv_seg.0.bias", "conv_seg.3.weight", "conv_seg.6.weight"} | {
        f"conv_seg.{i}.{s}" for i in (1, 4) for s in BN}  # fmt: skip
    assert set(seg.state_dict()) - set(head) == expected_keys(50, "B")

    cls = meta_model(r3d.medicalnet_resnet18, task="classification", num_classes=3)
    assert {k: tuple(v.shape) for k, v in cls.state_dict().items() if not cls.is_encoder_key(k)} == {
        "fc.mlp.0.weight": (3, 512), "fc.mlp.0.bias": (3,)}  # fmt: skip

    unet = meta_model(r3d.medicalnet_resnet10, task="segmentation", num_classes=2, decoder="unet")
    extra = [k for k in unet.state_dict() if not unet.is_encoder_key(k)]
    assert extra and all(k.startswith("decoder.") for k in extra)
    assert unet.first_conv_keys == ("conv1.weight",)


def test_medicalnet_strides_and_dilations():
    r18 = meta_model(r3d.medicalnet_resnet18, task="features", num_classes=None)
    assert tuple(r18.conv1.stride) == (2, 2, 2) and tuple(r18.conv1.padding) == (3, 3, 3) and r18.conv1.bias is None
    assert r18.maxpool.kernel_size == 3 and r18.maxpool.stride == (2, 2, 2) and r18.maxpool.padding == 1
    assert tuple(r18.layer2[0].conv1.stride) == (2, 2, 2)
    for stage, d in ((r18.layer1, 1), (r18.layer2, 1), (r18.layer3, 2), (r18.layer4, 4)):
        for block in stage:  # the first block of layer3/4 already dilates; BasicBlock dilates both convs
            for conv in (block.conv1, block.conv2):
                assert tuple(conv.dilation) == (d,) * 3 and tuple(conv.padding) == (d,) * 3
    assert tuple(r18.layer3[0].conv1.stride) == (1, 1, 1) and tuple(r18.layer4[0].conv1.stride) == (1, 1, 1)

    r50 = meta_model(r3d.medicalnet_resnet50, task="features", num_classes=None)
    assert tuple(r50.layer2[0].conv2.stride) == (2, 2, 2) and tuple(r50.layer2[0].conv1.stride) == (1, 1, 1)
    for block in r50.layer4:
        assert tuple(block.conv2.dilation) == (4, 4, 4) and tuple(block.conv2.padding) == (4, 4, 4)
        assert tuple(block.conv1.dilation) == (1, 1, 1) and tuple(block.conv3.dilation) == (1, 1, 1)
    bns = [m for m in r50.modules() if isinstance(m, nn.BatchNorm3d)]
    assert all(m.eps == 1e-5 and m.momentum == 0.1 for m in bns)


# -- MedicalNet: forward --------------------------------------------------------------------------------------------
def test_medicalnet_tasks_output_shapes():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 16, 32, 32)
    seg = r3d.medicalnet_resnet10(task="segmentation", num_classes=3).eval()
    with torch.no_grad():
        native = seg.forward_native(x)
        out = seg(x)
        pyramid = seg.forward_pyramid(x)
        feats = seg.forward_features(x)
    assert native.shape == (1, 3, 4, 8, 8)  # official conv_seg output: input/4
    assert out.shape == (1, 3, 16, 32, 32)
    assert torch.equal(out, upsample_to(native, (16, 32, 32), mode="trilinear"))
    assert [tuple(f.shape) for f in pyramid] == [
        (1, 64, 8, 16, 16), (1, 64, 4, 8, 8), (1, 128, 2, 4, 4), (1, 256, 2, 4, 4), (1, 512, 2, 4, 4)]  # fmt: skip
    assert torch.equal(pyramid[-1], feats)

    unet = r3d.medicalnet_resnet10(task="segmentation", num_classes=2, decoder="unet").eval()
    cls = r3d.medicalnet_resnet10(task="classification", num_classes=4).eval()
    features = r3d.medicalnet_resnet10(task="features", num_classes=None).eval()
    with torch.no_grad():
        assert unet(x).shape == (1, 2, 16, 32, 32)
        assert cls(x).shape == (1, 4)
        assert torch.equal(features(x), features.forward_features(x))
    assert features(x).shape == (1, 512, 2, 4, 4)
    with pytest.raises(ValueError, match="conv_seg"):
        unet.forward_native(x)


def test_medicalnet_bottleneck_unet_and_odd_sizes():
    x = torch.randn(1, 1, 12, 20, 28)
    model = r3d.medicalnet_resnet50(task="segmentation", num_classes=2, decoder="unet").eval()
    with torch.no_grad():
        pyramid = model.forward_pyramid(x)
        assert model(x).shape == (1, 2, 12, 20, 28)
    assert [f.shape[1] for f in pyramid] == [64, 256, 512, 1024, 2048]


def test_medicalnet_in_channels_and_init():
    model = r3d.medicalnet_resnet10(task="segmentation", num_classes=2, in_channels=2)
    assert model.conv1.weight.shape == (64, 2, 7, 7, 7)
    # Kaiming-normal fan_out: std = sqrt(2 / (out_channels * k^3))
    w = model.layer4[0].conv2.weight
    assert w.std().item() == pytest.approx((2 / (512 * 27)) ** 0.5, rel=0.05)
    assert torch.all(model.bn1.weight == 1) and torch.all(model.bn1.bias == 0)
    with pytest.raises(ValueError, match="2 input channel"):
        model(torch.randn(1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="5-D"):
        model(torch.randn(1, 2, 16, 16))


# -- shortcut A -------------------------------------------------------------------------------------------------------
def test_shortcut_a_subsamples_and_appends_zero_channels():
    x = torch.randn(2, 3, 5, 4, 7, requires_grad=True)
    out = r3d.ZeroPadShortcut(8, (2, 2, 2))(x)
    assert out.shape == (2, 8, 3, 2, 4)
    assert torch.equal(out[:, :3], x[:, :, ::2, ::2, ::2])  # input channels first
    assert torch.all(out[:, 3:] == 0)
    out.sum().backward()
    expected = torch.zeros_like(x)
    expected[:, :, ::2, ::2, ::2] = 1
    assert torch.equal(x.grad, expected)
    assert not list(r3d.ZeroPadShortcut(8, (1, 1, 1)).parameters())


def test_shortcut_a_inside_medicalnet_block():
    model = r3d.medicalnet_resnet18(task="features", num_classes=None).eval()
    block = model.layer2[0]
    with torch.no_grad():
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()  # residual branch now outputs 0: the block is relu(shortcut(x))
        x = torch.randn(1, 64, 5, 6, 6)
        out = block(x)
    assert out.shape == (1, 128, 3, 3, 3)
    assert torch.equal(out[:, :64], torch.relu(x[:, :, ::2, ::2, ::2]))
    assert torch.all(out[:, 64:] == 0)


# -- infer_kwargs ----------------------------------------------------------------------------------------------------
def test_infer_medicalnet_kwargs():
    r18 = meta_model(r3d.medicalnet_resnet18, task="features", num_classes=None).state_dict()
    r10 = meta_model(r3d.medicalnet_resnet10, task="segmentation", num_classes=5).state_dict()
    assert r3d.infer_medicalnet_kwargs(r18) == {"shortcut": "A"}
    assert r3d.infer_medicalnet_kwargs(r10) == {"shortcut": "B", "head_classes": {"segmentation": 5}}
    assert r3d.infer_medicalnet_kwargs({}) == {}
    assert r3d.infer_medicalnet_kwargs({"conv1.weight": torch.zeros(64, 1, 7, 7, 7)}) == {}


def test_infer_vdt_kwargs():
    assert r3d.infer_vdt_kwargs({"fc.weight": torch.zeros(7, 512), "fc.bias": torch.zeros(7)}) == {"head_classes": {"classification": 7}}
    assert r3d.infer_vdt_kwargs({"conv1.weight": torch.zeros(64, 1, 7, 7, 7)}) == {}


# -- VDT --------------------------------------------------------------------------------------------------------------
def test_vdt_keys_and_params():
    model = meta_model(r3d.vdt_resnet18_3d, task="features", num_classes=None)
    sd = model.state_dict()
    assert len(sd) == 120
    assert set(sd) == expected_keys(18, "B")  # downsample exactly at layer2/3/4.0
    assert n_params(model) == pytest.approx(33.16e6, rel=5e-3)
    cls = meta_model(r3d.vdt_resnet18_3d, task="classification", num_classes=10)
    assert {k: tuple(v.shape) for k, v in cls.state_dict().items() if k not in sd} == {
        "fc.weight": (10, 512), "fc.bias": (10,)}  # fmt: skip


def test_vdt_strides():
    model = meta_model(r3d.vdt_resnet18_3d, task="features", num_classes=None)
    assert tuple(model.conv1.stride) == (1, 2, 2) and tuple(model.conv1.padding) == (3, 3, 3)
    assert model.conv1.bias is None
    assert model.maxpool.kernel_size == 3 and model.maxpool.stride == (1, 2, 2) and model.maxpool.padding == 1
    assert tuple(model.layer2[0].conv1.stride) == (1, 2, 2) and tuple(model.layer2[0].downsample[0].stride) == (1, 2, 2)
    iso = meta_model(r3d.vdt_resnet18_3d, task="features", num_classes=None, depth_stride=True)
    assert tuple(iso.conv1.stride) == (2, 2, 2) and tuple(iso.layer3[0].conv1.stride) == (2, 2, 2)
    # The shortcut rule looks at the depth stride only: a stride in layer1 adds a branch only when it is isotropic.
    iso_l1 = meta_model(r3d.vdt_resnet18_3d, task="features", num_classes=None, depth_stride=True, strides=(2, 2, 2, 2))
    assert "layer1.0.downsample.0.weight" in iso_l1.state_dict()
    with pytest.raises(ValueError, match="depth_stride=False"):
        r3d.vdt_resnet18_3d(task="features", num_classes=None, strides=(2, 2, 2, 2))
    short_a = meta_model(r3d.vdt_resnet18_3d, task="features", num_classes=None, shortcut="A")
    assert len(short_a.state_dict()) == 102


def test_vdt_variable_dimension_transform_and_tasks():
    torch.manual_seed(0)
    cls = r3d.vdt_resnet18_3d(task="classification", num_classes=5).eval()
    seg = r3d.vdt_resnet18_3d(task="segmentation", num_classes=2).eval()
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        flat = cls.forward_features(image)
        assert torch.equal(flat, cls.forward_features(image.unsqueeze(1)))
    assert flat.shape == (2, 512, 3, 1, 1)  # depth never strided: 3 colour channels stay 3 slices

    volume = torch.randn(1, 1, 8, 32, 32)
    with torch.no_grad():
        assert cls(image).shape == (2, 5)
        feats = cls.forward_features(volume)
        assert torch.allclose(cls(volume), cls.fc(feats.mean(dim=(2, 3, 4))))
        assert seg(volume).shape == (1, 2, 8, 32, 32)
        assert seg(image).shape == (2, 2, 3, 32, 32)
        pyramid = seg.forward_pyramid(volume)
    assert [tuple(f.shape[2:]) for f in pyramid] == [(8, 16, 16), (8, 8, 8), (8, 4, 4), (8, 2, 2), (8, 1, 1)]

    no_stem = r3d.vdt_resnet18_3d(task="features", num_classes=None, stem_stride=False).eval()
    assert tuple(no_stem.conv1.stride) == (1, 1, 1)
    with torch.no_grad():
        stem, layer1, *_ = no_stem.forward_pyramid(torch.randn(1, 1, 4, 16, 16))
    assert stem.shape[2:] == layer1.shape[2:] == (4, 16, 16)  # no max-pool


# -- registry and published weights ----------------------------------------------------------------------------------
def test_registry_entries_and_pretrained_cfgs():
    from medtransfer.zoo.registry import get_entry

    expected_files = {10: 2, 18: 2, 34: 2, 50: 2, 101: 1, 152: 1, 200: 1}
    for depth, n_files in expected_files.items():
        entry = get_entry(f"medicalnet_resnet{depth}")
        assert entry.family == "MedicalNet" and len(entry.pretrained) == n_files
        default = entry.pretrained_cfg()
        assert default.tag == "3dseg8" and default.file_name == f"resnet_{depth}.pth"
        assert default.source == "medicalnet" and default.url.startswith("https://")
        assert "1904.00625" in default.citation
        for cfg in entry.pretrained:
            assert cfg.arch_kwargs == {"shortcut": "A" if depth in (18, 34) else "B"}
        if n_files == 2:
            assert entry.pretrained_cfg("23dataset").file_name == f"resnet_{depth}_23dataset.pth"
    vdt = get_entry("vdt_resnet18_3d")
    cfg = vdt.pretrained_cfg()
    assert vdt.family == "VDT" and cfg.tag == "imagenet" and cfg.source == "mmcv"
    assert cfg.file_name == "res3d18_imagenet_BN_73.07-5ff2ecb7.pth" and cfg.num_classes is None
    assert "2201.01426" in cfg.citation and cfg.url.startswith("https://")


# -- bad arguments ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fn", "kwargs", "message"),
    [
        (r3d.medicalnet_resnet18, {"shortcut": "C"}, "unknown shortcut 'C'"),
        (r3d.medicalnet_resnet18, {"decoder": "fpn"}, "unknown decoder 'fpn'"),
        (r3d.medicalnet_resnet18, {"task": "detection"}, "unknown task 'detection'"),
        (r3d.medicalnet_resnet18, {"num_classes": 0}, "num_classes >= 1"),
        (r3d.medicalnet_resnet18, {"in_channels": 0}, "in_channels"),
        (r3d.medicalnet_resnet18, {"depth_stride": True}, "unknown argument.*depth_stride"),
        (r3d.vdt_resnet18_3d, {"decoder": "conv_seg"}, "unknown decoder 'conv_seg'"),
        (r3d.vdt_resnet18_3d, {"strides": (1, 2, 2)}, "strides must be 4"),
        (r3d.vdt_resnet18_3d, {"shortcut": "b"}, "unknown shortcut"),
        (r3d.vdt_resnet18_3d, {"dilations": (1, 1, 2, 4)}, "unknown argument.*dilations"),
    ],
)
def test_bad_arguments(fn, kwargs, message):
    with torch.device("meta"), pytest.raises(ValueError, match=message):
        fn(**kwargs)


def test_vdt_image_input_needs_one_channel_model():
    model = meta_model(r3d.vdt_resnet18_3d, task="features", num_classes=None, in_channels=3)
    with pytest.raises(ValueError, match="in_channels=3"):
        model(torch.empty(1, 3, 16, 16, device="meta"))
