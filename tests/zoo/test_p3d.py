"""P3D-63 (MP3D): parity with an independent reference of the official backbone, MP3D's checkpoint layouts, errors.

``_Reference`` below is our own rewrite of the structure of ``mmdet/models/backbones/p3d.py`` (class ``P3D``,
depth 63) in urmagicsmine/MP3D: the global block counter ``n_s``, the ``stride_p`` rules of the block and of
``_make_layer``, ``ST_A``/``ST_B``/``ST_C``, the depth pools re-assigned onto each stage output and
``center_cropping``. mmcv's ``build_norm_layer`` is replaced by the module it builds (GroupNorm(32) / BatchNorm3d).
It is deliberately written apart from ``medtransfer.zoo.p3d`` so that the two can disagree.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import medtransfer as mt
from medtransfer.errors import CheckpointMismatchError
from medtransfer.train.finetune import model_divisor
from medtransfer.weights.export import export_official
from medtransfer.weights.sources import convert
from medtransfer.zoo.tools import describe_model, inspect_checkpoint


def _gn(c: int) -> nn.Module:
    return nn.GroupNorm(32, c)


class _RefBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, n_s=0, depth_3d=16, ST_struc=("A", "B", "C"),
                 norm=_gn):
        super().__init__()
        self.downsample = downsample
        stride_p = stride
        if downsample is not None:
            stride_p = (1, 2, 2)
        assert n_s < depth_3d  # four stages of 63: every block is a 3D one
        if n_s == 0:
            stride_p = 1
        self.conv1 = nn.Conv3d(inplanes, planes, kernel_size=1, bias=False, stride=stride_p)
        self.norm_1 = norm(planes)
        self.id = n_s
        self.ST = list(ST_struc)[self.id % len(ST_struc)]
        self.conv2 = nn.Conv3d(planes, planes, kernel_size=(1, 3, 3), stride=1, padding=(0, 1, 1), bias=False)
        self.norm_2 = norm(planes)
        self.conv3 = nn.Conv3d(planes, planes, kernel_size=(3, 1, 1), stride=1, padding=(1, 0, 0), bias=False)
        self.norm_3 = norm(planes)
        self.conv4 = nn.Conv3d(planes, planes * 4, kernel_size=1, bias=False)
        self.norm_4 = norm(planes * 4)
        self.relu = nn.ReLU(inplace=True)

    def ST_A(self, x):
        x = self.relu(self.norm_2(self.conv2(x)))
        return self.relu(self.norm_3(self.conv3(x)))

    def ST_B(self, x):
        tmp_x = self.relu(self.norm_2(self.conv2(x)))
        x = self.relu(self.norm_3(self.conv3(x)))
        return x + tmp_x

    def ST_C(self, x):
        x = self.relu(self.norm_2(self.conv2(x)))
        tmp_x = self.relu(self.norm_3(self.conv3(x)))
        return x + tmp_x

    def forward(self, x):
        residual = x
        out = self.relu(self.norm_1(self.conv1(x)))
        if self.ST == "A":
            out = self.ST_A(out)
        elif self.ST == "B":
            out = self.ST_B(out)
        elif self.ST == "C":
            out = self.ST_C(out)
        out = self.norm_4(self.conv4(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        return self.relu(out)


class _Reference(nn.Module):
    def __init__(self, norm=_gn, stage_blocks=(3, 4, 6, 3)):
        super().__init__()
        self.norm = norm
        self.inplanes = 64
        self.cnt = 0
        self.depth_3d = sum(stage_blocks)
        self.conv1_custom = nn.Conv3d(1, 64, kernel_size=(1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False)
        self.norm1 = norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.maxpool_2 = nn.MaxPool3d(kernel_size=(3, 1, 1), padding=(1, 0, 0), stride=(2, 1, 1))
        self.maxpool_3 = nn.MaxPool3d(kernel_size=(3, 1, 1), padding=(0, 0, 0), stride=(1, 1, 1))
        self.layer1 = self._make_layer(64, stage_blocks[0])
        self.layer2 = self._make_layer(128, stage_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, stage_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, stage_blocks[3], stride=2)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        stride_p = 1 if self.cnt == 0 else (1, 2, 2)
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(
                nn.Conv3d(self.inplanes, planes * 4, kernel_size=1, stride=stride_p, bias=False), self.norm(planes * 4)
            )
        layers = [_RefBottleneck(self.inplanes, planes, stride, downsample=downsample, n_s=self.cnt,
                                 depth_3d=self.depth_3d, norm=self.norm)]
        self.cnt += 1
        self.inplanes = planes * 4
        for _ in range(1, blocks):
            layers.append(_RefBottleneck(self.inplanes, planes, n_s=self.cnt, depth_3d=self.depth_3d, norm=self.norm))
            self.cnt += 1
        return nn.Sequential(*layers)

    @staticmethod
    def center_cropping(x):
        n, c, d, h, w = x.shape
        return x[:, :, d // 2, :, :].view(n, -1, h, w)

    def forward(self, x):
        x = self.maxpool(self.relu(self.norm1(self.conv1_custom(x))))
        layer1 = self.maxpool_2(self.layer1(x))
        layer2 = self.maxpool_2(self.layer2(layer1))
        layer3 = self.maxpool_3(self.layer3(layer2))
        layer4 = self.layer4(layer3)
        return [self.center_cropping(t) for t in (layer1, layer2, layer3, layer4)]


def _randomised(norm=_gn, seed: int = 0) -> _Reference:
    """A reference with every tensor random, norm affine parameters and BN statistics included."""
    torch.manual_seed(seed)
    ref = _Reference(norm)
    with torch.no_grad():
        for name, t in ref.state_dict().items():
            if name.endswith(".weight") and t.ndim == 1:
                t.uniform_(0.5, 1.5)
            elif name.endswith(".bias") or name.endswith("running_mean"):
                t.uniform_(-0.2, 0.2)
            elif name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
    return ref.eval()


def _bn(c: int) -> nn.Module:
    return nn.BatchNorm3d(c)


@pytest.fixture(scope="module")
def reference() -> _Reference:
    return _randomised()


@pytest.fixture(scope="module")
def x9() -> torch.Tensor:
    return torch.randn(1, 1, 9, 64, 64, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def ref_out(reference, x9) -> list[torch.Tensor]:
    with torch.no_grad():
        return reference(x9)


DETECTOR = {  # a few tensors of each part of MP3D's Faster R-CNN + FPN (configs/deeplesion/p3d.py)
    "neck.lateral_convs.0.conv.weight": (256, 256, 1, 1),
    "neck.fpn_convs.3.conv.bias": (256,),
    "rpn_head.rpn_conv.weight": (256, 256, 3, 3),
    "rpn_head.rpn_cls.weight": (3, 256, 1, 1),
    "roi_head.bbox_head.fc_cls.weight": (2, 1024),
    "roi_head.bbox_head.shared_fcs.0.weight": (1024, 12544),
}


def _mp3d_file(path, sd, *, prefix="backbone.", detector=False, wrapped=True):
    keys = {prefix + k: v for k, v in sd.items()}
    if detector:
        keys.update({prefix.replace("backbone.", "") + k: torch.zeros(s) for k, s in DETECTOR.items()})
    obj = {"meta": {"mmdet_version": "2.25.0", "CLASSES": ("lesion",), "epoch": 24}, "state_dict": keys} if wrapped else keys
    torch.save(obj, path)
    return path


def _count_params(norm_params_per_channel: int = 2) -> int:
    """P3D-63's parameters from its widths: stem (1,7,7) conv + norm, then per bottleneck 1x1x1 reduce, (1,3,3) S,
    (3,1,1) T, 1x1x1 expand, four norms, and a 1x1x1 + norm shortcut on each stage's first block."""
    n = 64 * 7 * 7 + 2 * 64
    cin = 64
    for planes, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for i in range(blocks):
            n += cin * planes + planes * planes * 9 + planes * planes * 3 + planes * planes * 4
            n += norm_params_per_channel * (3 * planes + 4 * planes)
            if i == 0:
                n += cin * planes * 4 + norm_params_per_channel * planes * 4
            cin = planes * 4
    return n


# -- parity -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "prefix, detector, wrapped",
    [("backbone.", False, True), ("backbone.", True, True), ("module.backbone.", True, True), ("module.", False, True),
     ("", False, True), ("", False, False)],
    ids=["backbone", "full-detector", "module-detector", "module", "no-prefix", "bare"],
)
def test_mp3d_layouts_load_key_for_key_and_match_the_reference(tmp_path, reference, x9, ref_out, prefix, detector,
                                                               wrapped):
    path = _mp3d_file(tmp_path / "mp3d.pth", reference.state_dict(), prefix=prefix, detector=detector,
                      wrapped=wrapped)
    model = mt.create_model("p3d63", task="features", pretrained=path).eval()
    report = model.load_report
    assert report.source == "mmdet" and report.coverage == 1.0
    assert report.missing == [] and report.mismatched == [] and report.adapted == []
    assert sorted(report.loaded) == sorted(reference.state_dict())
    if detector:
        assert sorted(report.unexpected) == sorted(DETECTOR)
        assert report.notes == [
            "the file is a full MP3D detector: its 6 tensors of neck, roi_head, rpn_head are not used "
            "(the zoo model is the backbone; detection heads are built separately)"
        ]
    else:
        assert report.unexpected == [] and report.notes == []
    with torch.no_grad():
        out = model.forward_features(x9)
    assert [tuple(o.shape) for o in out] == [(1, 256, 16, 16), (1, 512, 8, 8), (1, 1024, 4, 4), (1, 2048, 2, 2)]
    assert all(torch.equal(a, b) for a, b in zip(out, ref_out))
    assert all(o.abs().sum() > 0 and torch.isfinite(o).all() for o in out)


def test_bn_variant_matches_the_reference_and_is_read_from_the_file(tmp_path, x9):
    reference = _randomised(_bn, seed=1)
    path = _mp3d_file(tmp_path / "mp3d_bn.pth", reference.state_dict())
    model = mt.create_model("p3d63", task="features", pretrained=path).eval()
    assert model.arch_kwargs == {"norm": "bn"} and isinstance(model.norm1, nn.BatchNorm3d)
    assert model.load_report.coverage == 1.0 and model.load_report.unexpected == []
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model.forward_features(x9), reference(x9)))


def test_more_slices_follow_the_official_centre_rule_and_slices_as_channels_are_one_volume(tmp_path, reference):
    model = mt.create_model("p3d63", task="features").eval()
    model.load_state_dict(reference.state_dict())
    x = torch.randn(2, 11, 32, 48, generator=torch.Generator().manual_seed(2))  # (N, D, H, W): 11 slices
    with torch.no_grad():
        out, ref = model(x), reference(x.unsqueeze(1))
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
        assert all(torch.equal(a, b) for a, b in zip(out, model(x.unsqueeze(1))))
    assert [tuple(o.shape) for o in out] == [(2, 256, 8, 12), (2, 512, 4, 6), (2, 1024, 2, 3), (2, 2048, 1, 2)]


# -- structure ----------------------------------------------------------------------------------------------------
def test_key_set_block_styles_and_parameter_count(reference):
    model = mt.create_model("p3d63", task="features")
    keys = list(model.state_dict())
    assert keys == list(reference.state_dict())  # same names, same order
    assert len(keys) == 3 + 16 * 12 + 4 * 3 == 207
    n = sum(p.numel() for p in model.parameters())
    assert n == _count_params() == sum(p.numel() for p in reference.parameters()) == 27_281_728
    styles = [b.style for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
    assert "".join(styles) == "ABCABCABCABCABCA"  # cycles over the 16 blocks, not per stage
    assert model.layer2[0].conv1.stride == (1, 2, 2) and model.layer1[0].conv1.stride == (1, 1, 1)
    assert model.layer3[0].downsample[0].stride == (1, 2, 2) and model.layer1[0].downsample[0].stride == (1, 1, 1)
    assert all(isinstance(m, nn.GroupNorm) and m.num_groups == 32 for m in model.modules() if "Norm" in type(m).__name__)
    assert model.stage_channels == (256, 512, 1024, 2048) and model.stage_strides == (4, 8, 16, 32)
    assert model_divisor(model, 3) == (1, 32, 32)  # no depth divisor; H, W as MP3D pads them
    bn = mt.create_model("p3d63", task="features", norm="bn")
    assert len(bn.state_dict()) == 207 + 3 * 69  # running_mean/var and num_batches_tracked for each of 69 norms
    assert sum(p.numel() for p in bn.parameters()) == n


def test_classification_head_and_zoo_listing():
    model = mt.create_model("p3d63", task="classification", num_classes=3)
    out = model(torch.randn(2, 1, 9, 32, 32))
    assert out.shape == (2, 3) and model.fc.in_features == 2048
    out.square().sum().backward()  # trains: every tensor gets a finite gradient
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.conv1_custom.weight.grad.abs().sum() > 0
    info = describe_model("p3d63")
    assert info.family == "MP3D" and info.weights == ["p3d63.coco"]
    assert info.encoder_parameters == 27_281_728 and info.parameters == 27_281_728 + 2048 * 2 + 2
    cfg = mt.get_entry("p3d63").pretrained[0]
    assert cfg.file_name == "mp3d63-d720bda1.pth" and cfg.source == "mmdet" and cfg.patch_size == (9, 512, 512)
    assert "[-1024, 1050]" in cfg.intensity and "58.395" in cfg.intensity


def test_zoo_inspect_finds_p3d63_for_a_detector_file(tmp_path, reference):
    path = _mp3d_file(tmp_path / "det.pth", reference.state_dict(), detector=True)
    info = inspect_checkpoint(path)
    assert info.source == "mmdet"
    best = info.fits[0]
    assert best.model == "p3d63" and best.ok and best.coverage == 1.0
    assert best.file_used == pytest.approx(207 / (207 + len(DETECTOR)))


# -- bad input ----------------------------------------------------------------------------------------------------
def test_too_few_slices_is_a_clear_error_where_the_official_forward_crashes(reference):
    model = mt.create_model("p3d63", task="features")
    x = torch.randn(1, 1, 7, 32, 32)
    with pytest.raises(ValueError, match=r"p3d63 needs at least 9 slices .* got 7 in input shape \(1, 1, 7, 32, 32\)"):
        model(x)
    with pytest.raises(RuntimeError):  # the official network fails inside its depth pool after layer3
        reference(x)
    with pytest.raises(ValueError, match="built for 1 input channel"):
        model(torch.randn(1, 2, 9, 32, 32))
    with pytest.raises(ValueError, match=r"expects \(N, C, D, H, W\) or \(N, D, H, W\)"):
        model(torch.randn(9, 32, 32))


def test_segmentation_is_refused_and_options_are_checked():
    with pytest.raises(ValueError, match="model 'p3d63' does not support task 'segmentation'; it supports "
                                         "classification, features"):
        mt.create_model("p3d63", task="segmentation")
    with pytest.raises(ValueError, match="cannot segment a volume"):
        mt.get_entry("p3d63").fn(task="segmentation", num_classes=2)
    with pytest.raises(ValueError, match="unknown norm 'ln'"):
        mt.create_model("p3d63", task="features", norm="ln")


def test_a_file_of_another_architecture_is_refused(tmp_path, reference):
    torch.manual_seed(0)
    r10 = mt.create_model("medicalnet_resnet10", task="features")
    path = export_official(r10.state_dict(), tmp_path / "resnet_10.pth", "medicalnet")
    with pytest.raises(CheckpointMismatchError, match="no encoder weights of 'p3d63'"):
        mt.create_model("p3d63", task="features", pretrained=path)
    mp3d = _mp3d_file(tmp_path / "mp3d.pth", reference.state_dict())
    with pytest.raises(CheckpointMismatchError, match="no encoder weights of 'vdt_resnet18_3d'"):
        mt.create_model("vdt_resnet18_3d", task="features", pretrained=mp3d)


def test_vdt_mmcv_files_are_not_taken_for_mp3d_ones():
    sd = {"backbone.conv1.weight": torch.zeros(64, 1, 7, 7, 7), "backbone.layer1.0.conv1.weight": torch.zeros(1)}
    assert convert({"meta": {}, "state_dict": sd})[1].name == "mmcv"
    mp3d = {"backbone.conv1_custom.weight": torch.zeros(64, 1, 1, 7, 7), "neck.x": torch.zeros(1)}
    converted, source = convert({"meta": {}, "state_dict": mp3d})
    assert source.name == "mmdet" and sorted(converted) == ["conv1_custom.weight", "neck.x"]
