"""resnet3d_{18..152}: plain strided 3D ResNets in the inflated torchvision key layout.

Parity is checked against reference networks written here from the torchvision ResNet layer lists (the 2D
torchvision ResNet with every kernel 3D, and torchvision's video ``r3d_18`` with its ``stem.0``/``conv1.0`` names),
not against our own trunk.
"""

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import medtransfer as mt
from medtransfer.cli import app
from medtransfer.zoo.tools import inspect_checkpoint


# -- reference networks, written from the torchvision layer lists ---------------------------------------------------
class RefBasic(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride, video):
        super().__init__()
        conv_a = nn.Conv3d(cin, planes, 3, stride, 1, bias=False)
        conv_b = nn.Conv3d(planes, planes, 3, 1, 1, bias=False)
        if video:  # torchvision.models.video: each conv in a Sequential with its BN (and ReLU)
            self.conv1 = nn.Sequential(conv_a, nn.BatchNorm3d(planes), nn.ReLU())
            self.conv2 = nn.Sequential(conv_b, nn.BatchNorm3d(planes))
        else:
            self.conv1, self.bn1, self.conv2, self.bn2 = conv_a, nn.BatchNorm3d(planes), conv_b, nn.BatchNorm3d(planes)
        self.video = video
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv3d(cin, planes, 1, stride, bias=False), nn.BatchNorm3d(planes))

    def forward(self, x):
        if self.video:
            y = self.conv2(self.conv1(x))
        else:
            y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class RefBottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride, video=False):
        super().__init__()
        out = planes * 4
        self.conv1, self.bn1 = nn.Conv3d(cin, planes, 1, bias=False), nn.BatchNorm3d(planes)
        self.conv2, self.bn2 = nn.Conv3d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm3d(planes)
        self.conv3, self.bn3 = nn.Conv3d(planes, out, 1, bias=False), nn.BatchNorm3d(out)
        self.downsample = None
        if stride != 1 or cin != out:
            self.downsample = nn.Sequential(nn.Conv3d(cin, out, 1, stride, bias=False), nn.BatchNorm3d(out))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class RefResNet3d(nn.Module):
    """Inflated torchvision ResNet (``video=False``: conv1/bn1/maxpool) or torchvision's VideoResNet r3d
    (``video=True``: stem (3,7,7) stride (1,2,2), no max-pool)."""

    def __init__(self, block, layers, in_ch=1, stem_depth=7, classes=5, video=False):
        super().__init__()
        if video:
            self.stem = nn.Sequential(
                nn.Conv3d(in_ch, 64, (3, 7, 7), (1, 2, 2), (1, 3, 3), bias=False), nn.BatchNorm3d(64), nn.ReLU()
            )
        else:
            self.conv1 = nn.Conv3d(in_ch, 64, (stem_depth, 7, 7), 2, (stem_depth // 2, 3, 3), bias=False)
            self.bn1 = nn.BatchNorm3d(64)
            self.maxpool = nn.MaxPool3d(3, 2, 1)
        self.video = video
        cin = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers), start=1):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, 2 if (j == 0 and i > 1) else 1, video))
                cin = planes * block.expansion
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.fc = nn.Linear(cin, classes)

    def features(self, x):
        x = self.stem(x) if self.video else self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x):
        return self.fc(nn.functional.adaptive_avg_pool3d(self.features(x), 1).flatten(1))


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k.endswith("running_var"):
                v.copy_(torch.rand(v.shape, generator=g) + 0.5)
            elif k.endswith(("running_mean", "bias")) or (k.endswith("weight") and v.ndim == 1):
                v.copy_(torch.randn(v.shape, generator=g) * 0.1 + (1.0 if k.endswith("weight") else 0.0))
            elif v.is_floating_point():
                v.copy_(torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5)
    return model.eval()


# -- parity -----------------------------------------------------------------------------------------------------------
def test_resnet3d_18_matches_the_inflated_torchvision_reference(tmp_path):
    ref = _randomise(RefResNet3d(RefBasic, (2, 2, 2, 2)))
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": ref.state_dict(), "meta": {"epoch": 1}}, path)
    model = mt.create_model("resnet3d_18", task="classification", pretrained=path).eval()
    report = model.load_report
    assert report.source == "plain" and report.coverage == 1.0
    assert report.missing == [] and report.unexpected == [] and report.adapted == [] and report.mismatched == []
    assert report.notes[-1] == (
        "networks of this depth the file fits, best first (encoder coverage): medicalnet_resnet18 100.0%, "
        "resnet3d_18 100.0%, vdt_resnet18_3d 100.0%; `medtransfer zoo inspect FILE` ranks every model"
    )
    assert model.fc.out_features == 5 and model.arch_kwargs == {"stem_depth": 7, "shortcut": "B"}
    x = torch.randn(2, 1, 32, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), ref.features(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)


def test_torchvision_video_r3d_18_layout_is_renamed_and_matches(tmp_path):
    ref = _randomise(RefResNet3d(RefBasic, (2, 2, 2, 2), in_ch=3, classes=4, video=True), seed=2)
    path = tmp_path / "r3d_18.pth"
    torch.save(ref.state_dict(), path)
    model = mt.create_model("resnet3d_18", task="classification", in_channels=3, pretrained=path,
                            stem_stride=(1, 2, 2), pool_stride=None).eval()
    report = model.load_report
    assert report.source == "torchvision_video" and report.coverage == 1.0
    assert report.unexpected == [] and report.missing == [] and report.adapted == []
    assert model.conv1.weight.shape == (64, 3, 3, 7, 7)
    torch.testing.assert_close(model.bn1.running_var, ref.stem[1].running_var, rtol=0, atol=0)
    x = torch.randn(1, 3, 16, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)


# -- structure --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "depth, params, entries",
    [(18, 33_160_000, 120), (34, 63_469_632, 216), (50, 46_155_072, 318), (101, 85_201_216, 624),
     (152, 117_359_936, 930)],
)
def test_keys_and_parameters_equal_medicalnet_with_shortcut_b(depth, params, entries):
    # the reason a plain file cannot tell the two apart: strides and dilations hold no tensors
    with torch.device("meta"):
        ours = mt.create_model(f"resnet3d_{depth}", task="features")
        med = mt.create_model(f"medicalnet_resnet{depth}", task="features", shortcut="B")
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in med.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == params and len(shapes) == entries
    assert shapes["conv1.weight"] == (64, 1, 7, 7, 7)


def test_strides_of_the_stem_pool_and_stages():
    x = torch.randn(1, 1, 32, 64, 64)
    with torch.no_grad():
        iso = mt.create_model("resnet3d_18", task="features").eval().forward_pyramid(x)
        flat = mt.create_model("resnet3d_18", task="features", depth_stride=False).eval().forward_pyramid(x)
        r3d = mt.create_model("resnet3d_18", task="features", stem_depth=3, stem_stride=(1, 2, 2),
                              pool_stride=None).eval().forward_pyramid(x)
    assert [tuple(f.shape[2:]) for f in iso] == [(16, 32, 32), (8, 16, 16), (4, 8, 8), (2, 4, 4), (1, 2, 2)]
    assert [tuple(f.shape[2:]) for f in flat] == [(16, 32, 32), (8, 16, 16), (8, 8, 8), (8, 4, 4), (8, 2, 2)]
    assert [tuple(f.shape[2:]) for f in r3d] == [(32, 32, 32), (32, 32, 32), (16, 16, 16), (8, 8, 8), (4, 4, 4)]


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="stem_depth must be an odd positive integer"):
        mt.create_model("resnet3d_18", stem_depth=4)
    with pytest.raises(ValueError, match=r"stem_stride must be a positive integer or 3 of them \(D, H, W\), got \(1, 2\)"):
        mt.create_model("resnet3d_18", stem_stride=(1, 2))
    with pytest.raises(TypeError, match="model 'resnet3d_18' has no option dilation; its options: decoder"):
        mt.create_model("resnet3d_18", dilation=2)


def test_segmentation_decoder_trains():
    model = mt.create_model("resnet3d_18", task="segmentation", num_classes=3).train()
    out = model(torch.randn(2, 1, 32, 64, 64))
    assert out.shape == (2, 3, 32, 64, 64)
    out.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# -- the file: a {state_dict, meta} torchvision-style ResNet-152, 3x7x7 three-channel stem, bf16 --------------
@pytest.fixture(scope="module")
def r152_file(tmp_path_factory):
    with torch.device("meta"):
        ref = RefResNet3d(RefBottleneck, (3, 8, 36, 3), in_ch=3, stem_depth=3, classes=400)
    g = torch.Generator().manual_seed(7)
    sd = {}
    for k, v in ref.state_dict().items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(100)
        elif k.endswith("running_var"):
            sd[k] = (torch.rand(v.shape, generator=g) + 0.5).to(torch.bfloat16)
        else:
            sd[k] = (torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("r152") / "resnet152_3d_ct.pth"
    torch.save({"state_dict": sd, "meta": {"arch": "resnet152", "epoch": 100}}, path)
    return path, sd


def test_the_r152_bf16_file_loads_into_resnet3d_152_with_full_coverage_and_an_honest_report(r152_file):
    path, sd = r152_file
    model = mt.create_model("resnet3d_152", task="features", in_channels=1, pretrained=path, adapt_stem="average")
    report = model.load_report
    assert report.source == "plain"
    assert report.coverage == 1.0 and report.encoder_loaded == report.encoder_total == 930 - 155
    assert report.missing == [] and report.mismatched == [] and report.skipped == []
    assert report.unexpected == ["fc.weight", "fc.bias"]  # the Kinetics-style classifier; task features has none
    assert report.adapted == [
        ("conv1.weight", "input channels 3->1 (average); file [64, 3, 3, 7, 7] -> model [64, 1, 3, 7, 7]")
    ]
    assert report.cast == {"bfloat16->float32": 930 - 155}
    assert model.arch_kwargs["stem_depth"] == 3 and model.conv1.weight.shape == (64, 1, 3, 7, 7)
    assert torch.equal(model.conv1.weight.detach(), sd["conv1.weight"].float().mean(dim=1, keepdim=True))
    assert torch.equal(model.layer3[35].conv2.weight.detach(),
                       sd["layer3.35.conv2.weight"].float())
    notes = "\n".join(report.notes)
    assert "conv1.weight [64, 3, 3, 7, 7] sets stem_depth=3" in notes
    assert "cannot tell its training architecture: strided stages (resnet3d_*), MedicalNet's dilated" in notes
    assert "carries no input contract (modality, intensity window and normalisation, spacing" in notes
    # MedicalNet's ResNet-152 needs a depth rule for this 3x7x7 stem, so only ours fits as asked
    assert "networks of this depth the file fits, best first (encoder coverage): resnet3d_152 100.0% (adapted);" in notes
    text = str(report)
    assert "dtype cast       | 775 tensors bfloat16->float32" in text and "input channels 3->1 (average)" in text


def test_inspect_ranks_the_strided_network_above_medicalnets_for_the_r152_file(r152_file):
    path, _ = r152_file
    info = inspect_checkpoint(path)
    assert info.source == "plain" and len(info.unknowable) == 2
    assert info.fits[0].model == "resnet3d_152" and info.fits[0].ok and info.fits[0].coverage == 1.0
    med = next(f for f in info.fits if f.model == "medicalnet_resnet152")
    assert not med.ok and "conv1.weight [64, 3, 3, 7, 7] vs [64, 1, 7, 7, 7]" in med.reason
    adapted = inspect_checkpoint(path, adapt_stem="center_pad+average")
    order = [f.model for f in adapted.fits if f.ok]
    assert order[:2] == ["resnet3d_152", "medicalnet_resnet152"]
    assert adapted.fits[0].reshaped == 1 and adapted.fits[1].reshaped == 2  # channels; channels and depth


def test_cli_inspect_says_what_a_plain_file_cannot_tell(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": mt.create_model("resnet3d_18", task="features").state_dict(), "meta": {}}, path)
    runner = CliRunner()
    result = runner.invoke(app, ["zoo", "inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["source"] == "plain" and data["cannot_tell"][0].startswith("training architecture")
    # same tensors, so a tie the file cannot break: every candidate is listed with full coverage
    top = {f["model"]: f["coverage"] for f in data["fits"][:3]}
    assert top == {"medicalnet_resnet18": 1.0, "resnet3d_18": 1.0, "vdt_resnet18_3d": 1.0}
    result = runner.invoke(app, ["zoo", "inspect", str(path), "--skip", "nothing.*"])
    assert result.exit_code == 2 and "skip pattern(s) 'nothing.*' match no tensor of the file" in result.output
