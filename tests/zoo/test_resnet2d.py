"""resnet50_2d: torchvision's ResNet-50 key layout, shapes, counts, task heads and its published-weight table."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medtransfer.weights.sources import get_source
from medtransfer.zoo.registry import get_entry
from medtransfer.zoo.resnet2d import Bottleneck, ResNet50, _infer_from_state_dict

BLOCKS = (3, 4, 6, 3)
BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def torchvision_resnet50_keys() -> list[str]:
    """The 318 state_dict keys of torchvision's resnet50 without fc, spelled out from its module names."""
    keys = ["conv1.weight"] + [f"bn1.{s}" for s in BN_SUFFIXES]
    for stage, blocks in enumerate(BLOCKS, start=1):
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            for i in (1, 2, 3):
                keys.append(f"{prefix}.conv{i}.weight")
                keys += [f"{prefix}.bn{i}.{s}" for s in BN_SUFFIXES]
            if block == 0:
                keys.append(f"{prefix}.downsample.0.weight")
                keys += [f"{prefix}.downsample.1.{s}" for s in BN_SUFFIXES]
    return keys


@pytest.fixture(scope="module")
def meta_models():
    with torch.device("meta"):
        return {
            "features": ResNet50(task="features"),
            "classification": ResNet50(task="classification", num_classes=1000),
            "segmentation": ResNet50(task="segmentation", num_classes=1),
        }


def test_state_dict_is_torchvision_layout_key_for_key(meta_models):
    sd = meta_models["features"].state_dict()
    assert len(sd) == 318
    assert list(sd) == torchvision_resnet50_keys()  # same names and the same order as torchvision
    shapes = {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.conv2.weight": (64, 64, 3, 3),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer2.0.downsample.0.weight": (512, 256, 1, 1),
        "layer3.5.conv3.weight": (1024, 256, 1, 1),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "layer4.2.bn3.running_var": (2048,),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key


def test_parameter_counts_match_torchvision(meta_models):
    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert abs(count(meta_models["features"]) - 23.51e6) / 23.51e6 < 0.005
    assert count(meta_models["features"]) == 23_508_032
    assert count(meta_models["classification"]) == 25_557_032  # torchvision's documented resnet50 size
    cls_keys = set(meta_models["classification"].state_dict())
    assert cls_keys - set(torchvision_resnet50_keys()) == {"fc.weight", "fc.bias"}


def test_v1_5_strides_and_batchnorm_settings(meta_models):
    m = meta_models["features"]
    assert m.conv1.stride == (2, 2) and m.conv1.padding == (3, 3) and m.conv1.bias is None
    assert (m.maxpool.kernel_size, m.maxpool.stride, m.maxpool.padding) == (3, 2, 1)
    for stage, stride in zip((m.layer1, m.layer2, m.layer3, m.layer4), (1, 2, 2, 2)):
        first = stage[0]
        assert first.conv1.stride == (1, 1) and first.conv3.stride == (1, 1)
        assert first.conv2.stride == (stride, stride)  # v1.5: the stride sits on the 3x3 convolution
        assert first.downsample[0].stride == (stride, stride)
        assert all(block.downsample is None for block in stage[1:])
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    assert len(bns) == 53 and all(bn.eps == 1e-5 and bn.momentum == 0.1 for bn in bns)


def test_initialisation_is_torchvision_default():
    torch.manual_seed(0)
    m = ResNet50(task="features")
    w = m.layer4[0].conv2.weight  # fan_out = 512 * 3 * 3
    assert w.std().item() == pytest.approx(math.sqrt(2.0 / (512 * 9)), rel=0.02)
    for block in m.layer1:  # zero_init_residual=False: the last BN of a block starts at 1, not 0
        assert torch.all(block.bn3.weight == 1) and torch.all(block.bn3.bias == 0)


def test_output_shapes_per_task():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    feats = ResNet50(task="features").eval()
    cls = ResNet50(task="classification", num_classes=5).eval()
    seg = ResNet50(task="segmentation", num_classes=2).eval()
    with torch.no_grad():
        assert feats(x).shape == (1, 2048, 2, 2)
        assert torch.equal(feats(x), feats.forward_features(x))
        assert cls(x).shape == (1, 5)
        assert seg(x).shape == (1, 2, 64, 64)
        assert cls.forward_features(x).shape == (1, 2048, 2, 2)
    assert not any(k.startswith(("fc.", "decoder.")) for k in feats.state_dict())
    assert all(k.startswith(ResNet50.encoder_prefixes + ("decoder.",)) for k in seg.state_dict())


def test_classification_is_linear_on_global_average_pool():
    torch.manual_seed(0)
    m = ResNet50(task="classification", num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = m.fc(m.forward_features(x).mean(dim=(2, 3)))
        assert torch.allclose(m(x), expected, atol=1e-6)


def test_forward_pyramid_is_the_smp_encoder_pyramid():
    torch.manual_seed(0)
    m = ResNet50(task="segmentation", num_classes=1).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        pyramid = m.forward_pyramid(x)
        stem = torch.relu(m.bn1(m.conv1(x)))
        assert [tuple(p.shape) for p in pyramid] == [
            (1, 64, 32, 32), (1, 256, 16, 16), (1, 512, 8, 8), (1, 1024, 4, 4), (1, 2048, 2, 2)
        ]
        assert torch.equal(pyramid[0], stem)  # skip taken after ReLU, before the max-pool
        assert torch.equal(pyramid[1], m.layer1(m.maxpool(stem)))
        assert torch.equal(pyramid[-1], m.forward_features(x))
    decoder = m.decoder
    assert [b.conv1[0].in_channels for b in decoder.blocks] == [2048 + 1024, 256 + 512, 128 + 256, 64 + 64, 32]
    assert [b.conv2[0].out_channels for b in decoder.blocks] == [256, 128, 64, 32, 16]
    assert decoder.head.kernel_size == (3, 3) and decoder.head.out_channels == 1


def test_bottleneck_with_silent_residual_branch_passes_the_shortcut():
    torch.manual_seed(0)
    block = Bottleneck(256, 64).eval()  # identity shortcut
    nn.init.zeros_(block.bn3.weight)
    nn.init.zeros_(block.bn3.bias)
    x = torch.randn(1, 256, 8, 8)
    with torch.no_grad():
        assert torch.equal(block(x), torch.relu(x))
    projecting = Bottleneck(64, 64, stride=2).eval()
    nn.init.zeros_(projecting.bn3.weight)
    nn.init.zeros_(projecting.bn3.bias)
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        assert torch.equal(projecting(x), torch.relu(projecting.downsample(x)))
        assert projecting(x).shape == (1, 256, 4, 4)


def test_torchvision_fc_and_backbone_load_strictly():
    torch.manual_seed(0)
    source = ResNet50(task="classification", num_classes=1000)
    target = ResNet50(task="classification", num_classes=1000)
    target.load_state_dict(source.state_dict(), strict=True)
    assert torch.equal(target.fc.weight, source.fc.weight)


def test_ill_arguments_and_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="unknown task 'detection'"):
        ResNet50(task="detection")
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        ResNet50(task="classification", num_classes=0)
    with pytest.raises(ValueError, match="in_channels must be a positive integer"):
        ResNet50(task="features", in_channels=0)
    m = ResNet50(task="segmentation", num_classes=1, in_channels=1)
    with pytest.raises(ValueError, match="built for 1 input channels, got 3"):
        m(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"divisible by 32, got \(50, 64\)"):
        m(torch.zeros(1, 1, 50, 64))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        m.forward_features(torch.zeros(1, 1, 8, 32, 32))


def test_registry_entry_and_infer_kwargs():
    entry = get_entry("resnet50_2d")
    assert entry.family == "BenchmarkTransferLearning"
    assert entry.spatial_dims == 2 and entry.default_in_channels == 3
    assert _infer_from_state_dict({"fc.weight": torch.zeros(1000, 2048)}) == {"head_classes": {"classification": 1000}}
    assert _infer_from_state_dict({"conv1.weight": torch.zeros(64, 3, 7, 7)}) == {}
    model = entry.fn(task="features", num_classes=2, in_channels=1)
    assert model.first_conv_keys == ("conv1.weight",) and model.spatial_dims == 2
    assert model.conv1.in_channels == 1


def test_published_weights_table():
    cfgs = get_entry("resnet50_2d").pretrained
    tags = [c.tag for c in cfgs]
    assert tags == [
        "imagenet_supervised", "moco_v1", "moco_v2", "pcl_v1", "pcl_v2", "swav", "deepcluster_v2", "sela_v2",
        "barlowtwins", "insdis", "pirl", "infomin", "byol", "chestxray14", "chexpert", "imagenet_chestxray14",
        "imagenet_chexpert", "inat2021", "inat2021_mini",
    ]
    for cfg in cfgs:
        get_source(cfg.source)  # every cfg names a registered converter
        assert cfg.url.startswith("https://") and cfg.file_name and cfg.in_channels == 3
        assert cfg.modality in ("natural images", "chest X-ray") and "ImageNet mean" in cfg.intensity
        assert cfg.license and "DART" in cfg.citation and cfg.patch_size == (224, 224)
    by_tag = {c.tag: c for c in cfgs}
    assert by_tag["moco_v2"].url.endswith("/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar")
    assert by_tag["byol"].file_name == "pretrain_res50x1.pkl" and by_tag["byol"].source == "byol_haiku"
    assert by_tag["chexpert"].url == "https://zenodo.org/record/5205234/files/chexpert.pth.tar?download=1"
    assert by_tag["imagenet_supervised"].num_classes == 1000 and by_tag["swav"].num_classes is None
    assert {c.source for c in cfgs} == {"torchvision", "moco", "swav", "pycontrast", "byol_haiku", "chestxray"}
    assert len({c.file_name for c in cfgs}) == len(cfgs)
