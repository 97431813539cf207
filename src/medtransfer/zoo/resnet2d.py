"""2D ResNet-50 in torchvision's key layout: the backbone of BenchmarkTransferLearning.

Hosseinzadeh Taher et al., "A Systematic Benchmarking Analysis of Transfer Learning for Medical Image Analysis"
(DART@MICCAI 2021; github.com/MR-HosseinzadehTaher/BenchmarkTransferLearning) compare ~20 published ResNet-50
initialisations (supervised ImageNet, MoCo, PCL, SwAV, DeepCluster-v2, SeLa-v2, Barlow Twins, InsDis, PIRL, InfoMin,
BYOL, iNat2021, and chest X-ray in-domain and domain-adapted models), all normalised to torchvision's ``resnet50``
state_dict. This module builds that network without torchvision, with the same module names, so every one of those
files maps key for key after its converter (:mod:`medtransfer.weights.sources2d`) has run:

- ResNet v1.5 (He et al., CVPR 2016, with the stride on the 3x3 convolution of the bottleneck, as torchvision):
  7x7/2 stem without bias, BN, ReLU, 3x3/2 max-pool with padding 1, stages of [3, 4, 6, 3] bottlenecks, each stage's
  first block carrying ``downsample.{0,1}`` (1x1 conv + BN). BN eps 1e-5, momentum 0.1. Initialisation as
  torchvision's default: Kaiming-normal (fan-out, ReLU) convolutions, BN weight 1 / bias 0, no zero-init of the
  last BN of a block.
- ``classification``: global average pooling and ``fc`` = Linear(2048, n), torchvision's names, so an ``fc.*`` of
  the right shape loads too.
- ``segmentation``: the segmentation_models_pytorch U-Net that BenchmarkTransferLearning fine-tunes (decoder
  channels 256/128/64/32/16, nearest x2 upsampling, [up, skip] concatenation, two 3x3 Conv-BN-ReLU per block, 3x3
  head), over the skips [stem ReLU output, layer1, layer2, layer3] and layer4. It lives under ``decoder.``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from .heads import UNetDecoder
from .pretrained import PretrainedCfg
from .registry import TASKS, ZooModel, register_model

STAGE_BLOCKS = (3, 4, 6, 3)
STAGE_WIDTHS = (64, 128, 256, 512)
EXPANSION = 4
FEATURE_CHANNELS = 2048
# Channels of forward_pyramid's maps: stem (H/2), layer1 (H/4), layer2 (H/8), layer3 (H/16), layer4 (H/32).
PYRAMID_CHANNELS = (64, 256, 512, 1024, 2048)
OUTPUT_STRIDE = 32


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride: v1.5), 1x1 expand, each followed by BN; ReLU after the sum."""

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _make_stage(in_channels: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [Bottleneck(in_channels, width, stride)]
    layers += [Bottleneck(width * EXPANSION, width) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet50(ZooModel):
    """ResNet-50 v1.5 with torchvision's state_dict names, plus a task head (``fc`` or ``decoder``)."""

    spatial_dims = 2
    encoder_prefixes = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")
    first_conv_keys = ("conv1.weight",)

    def __init__(
        self,
        *,
        task: str = "segmentation",
        num_classes: int | None = 2,
        in_channels: int = 3,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
    ):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown task '{task}'; choose one of {', '.join(TASKS)}")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
        if task != "features" and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes must be a positive integer for task '{task}', got {num_classes!r}")
        self.task = task
        self.in_channels = in_channels
        self.num_classes = num_classes if task != "features" else None

        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = 64
        for index, (blocks, width) in enumerate(zip(STAGE_BLOCKS, STAGE_WIDTHS)):
            stride = 1 if index == 0 else 2
            self.add_module(f"layer{index + 1}", _make_stage(channels, width, blocks, stride))
            channels = width * EXPANSION
        self._init_encoder()

        if task == "classification":
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(FEATURE_CHANNELS, num_classes)
        elif task == "segmentation":
            self.decoder = UNetDecoder(
                spatial_dims=2,
                skip_channels=PYRAMID_CHANNELS[:-1],
                deep_channels=PYRAMID_CHANNELS[-1],
                num_classes=num_classes,
                decoder_channels=tuple(decoder_channels),
            )

    def _init_encoder(self) -> None:
        # torchvision's default: the published checkpoints overwrite all of it, scratch training starts from it.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"resnet50_2d expects a (N, C, H, W) batch, got a tensor of shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"resnet50_2d was built for {self.in_channels} input channels, got {x.shape[1]} "
                f"(input shape {tuple(x.shape)})"
            )

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[stem ReLU output (H/2), layer1 (H/4), layer2 (H/8), layer3 (H/16), layer4 (H/32)]."""
        self._check_input(x)
        stem = self.relu(self.bn1(self.conv1(x)))
        c1 = self.layer1(self.maxpool(stem))
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [stem, c1, c2, c3, c4]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """layer4's output, (N, 2048, H/32, W/32) (rounded up): torchvision's backbone before ``avgpool``."""
        self._check_input(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.task == "classification":
            return self.fc(torch.flatten(self.avgpool(self.forward_features(x)), 1))
        if self.task == "features":
            return self.forward_features(x)
        size = tuple(x.shape[2:])
        if x.ndim == 4 and any(s % OUTPUT_STRIDE for s in size):
            # The U-Net doubles the resolution five times, so only multiples of 32 come back at input size
            # (segmentation_models_pytorch raises for the same reason).
            raise ValueError(
                f"segmentation with resnet50_2d needs height and width divisible by {OUTPUT_STRIDE}, got {size}; "
                "pad or resize the image"
            )
        return self.decoder(self.forward_pyramid(x), size)


def _infer_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """A torchvision ``fc`` implies the classifier's class count (1000 for ImageNet), a U-Net head the
    segmentation class count; each applies only to its own task."""
    heads: dict[str, int] = {}
    weight = state_dict.get("fc.weight")
    if isinstance(weight, torch.Tensor) and weight.ndim == 2:
        heads["classification"] = int(weight.shape[0])
    seg = state_dict.get("decoder.head.weight")
    if isinstance(seg, torch.Tensor) and seg.ndim == 4:
        heads["segmentation"] = int(seg.shape[0])
    return {"head_classes": heads} if heads else {}


# ----------------------------------------------------------------------------------------------------------------
# Published weights, as listed by BenchmarkTransferLearning (download_and_prepare_models.py and README model zoo;
# iNat2021 file names from visipedia/newt benchmark/configs.py).

_BTL = (
    "Hosseinzadeh Taher, Haghighi, Feng, Gotway, Liang: A Systematic Benchmarking Analysis of Transfer Learning "
    "for Medical Image Analysis, DART@MICCAI 2021"
)
_IMAGENET_NORM = "RGB scaled to [0, 1], then ImageNet mean (0.485, 0.456, 0.406) / std (0.229, 0.224, 0.225)"
_CXR_NORM = (
    _IMAGENET_NORM + " (BenchmarkTransferLearning's default; its 'chestx-ray' option uses mean 0.5056 / std 0.252)"
)
_NATURAL = "natural images"
_CXR = "chest X-ray"

_HE2016 = "He, Zhang, Ren, Sun: Deep Residual Learning for Image Recognition, CVPR 2016"
_MOCO_V1 = "He, Fan, Wu, Xie, Girshick: Momentum Contrast for Unsupervised Visual Representation Learning, CVPR 2020"
_MOCO_V2 = "Chen, Fan, Girshick, He: Improved Baselines with Momentum Contrastive Learning, arXiv:2003.04297"
_PCL = "Li, Zhou, Xiong, Hoi: Prototypical Contrastive Learning of Unsupervised Representations, ICLR 2021"
_SWAV = (
    "Caron, Misra, Mairal, Goyal, Bojanowski, Joulin: Unsupervised Learning of Visual Features by Contrasting "
    "Cluster Assignments, NeurIPS 2020"
)
_BARLOW = (
    "Zbontar, Jing, Misra, LeCun, Deny: Barlow Twins: Self-Supervised Learning via Redundancy Reduction, ICML 2021"
)
_INSDIS = "Wu, Xiong, Yu, Lin: Unsupervised Feature Learning via Non-Parametric Instance Discrimination, CVPR 2018"
_PIRL = "Misra, van der Maaten: Self-Supervised Learning of Pretext-Invariant Representations, CVPR 2020"
_INFOMIN = (
    "Tian, Sun, Poole, Krishnan, Schmid, Isola: What Makes for Good Views for Contrastive Learning?, NeurIPS 2020"
)
_BYOL = "Grill et al.: Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning, NeurIPS 2020"
_NEWT = (
    "Van Horn, Cole, Beery, Wilber, Belongie, Mac Aodha: Benchmarking Representation Learning for Natural World "
    "Image Collections, CVPR 2021"
)

_LICENSE_FAIR_NC = "CC BY-NC 4.0"
_LICENSE_BTL = "ASU non-commercial research license (BenchmarkTransferLearning LICENSE)"
_FB_MOCO = "https://dl.fbaipublicfiles.com/moco/moco_checkpoints"
_FB_DC = "https://dl.fbaipublicfiles.com/deepcluster"
_PYCONTRAST = "https://www.dropbox.com/sh/87d24jqsl6ra7t2"
_PCL_BUCKET = "https://storage.googleapis.com/sfr-pcl-data-research/PCL_checkpoint"
_ZENODO = "https://zenodo.org/record/5205234/files"
_INAT_BOX = "https://cornell.box.com/s/bnyhq5lwobu6fgjrub44zle0pyjijbmw"

# tag, file name, download address, checkpoint source, modality, pretraining, license, method citation,
# classes of the head the converted file keeps (None: no head survives conversion)
_RELEASES: tuple[tuple[str, str, str, str, str, str, str, str, int | None], ...] = (
    ("imagenet_supervised", "resnet50-0676ba61.pth", "https://download.pytorch.org/models/resnet50-0676ba61.pth",
     "torchvision", _NATURAL, "supervised ImageNet-1k classification (torchvision IMAGENET1K_V1)",
     "BSD-3-Clause (torchvision)", _HE2016, 1000),
    ("moco_v1", "moco_v1_200ep_pretrain.pth.tar", f"{_FB_MOCO}/moco_v1_200ep/moco_v1_200ep_pretrain.pth.tar",
     "moco", _NATURAL, "MoCo v1, self-supervised, 200 epochs on ImageNet-1k", _LICENSE_FAIR_NC, _MOCO_V1, None),
    ("moco_v2", "moco_v2_800ep_pretrain.pth.tar", f"{_FB_MOCO}/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar",
     "moco", _NATURAL, "MoCo v2, self-supervised, 800 epochs on ImageNet-1k", _LICENSE_FAIR_NC, _MOCO_V2, None),
    ("pcl_v1", "PCL_v1_epoch200.pth.tar", f"{_PCL_BUCKET}/PCL_v1_epoch200.pth.tar",
     "moco", _NATURAL, "PCL v1, self-supervised, 200 epochs on ImageNet-1k", "MIT (salesforce/PCL)", _PCL, None),
    ("pcl_v2", "PCL_v2_epoch200.pth.tar", f"{_PCL_BUCKET}/PCL_v2_epoch200.pth.tar",
     "moco", _NATURAL, "PCL v2, self-supervised, 200 epochs on ImageNet-1k", "MIT (salesforce/PCL)", _PCL, None),
    ("swav", "swav_800ep_pretrain.pth.tar", f"{_FB_DC}/swav_800ep_pretrain.pth.tar",
     "swav", _NATURAL, "SwAV (multi-crop), self-supervised, 800 epochs on ImageNet-1k", _LICENSE_FAIR_NC, _SWAV,
     None),
    ("deepcluster_v2", "deepclusterv2_800ep_pretrain.pth.tar", f"{_FB_DC}/deepclusterv2_800ep_pretrain.pth.tar",
     "swav", _NATURAL, "DeepCluster-v2 (multi-crop), self-supervised, 800 epochs on ImageNet-1k", _LICENSE_FAIR_NC,
     _SWAV, None),
    ("sela_v2", "selav2_400ep_pretrain.pth.tar", f"{_FB_DC}/selav2_400ep_pretrain.pth.tar",
     "swav", _NATURAL, "SeLa-v2 (multi-crop), self-supervised, 400 epochs on ImageNet-1k", _LICENSE_FAIR_NC, _SWAV,
     None),
    ("barlowtwins", "resnet50.pth",
     "https://dl.fbaipublicfiles.com/barlowtwins/ep1000_bs2048_lrw0.2_lrb0.0048_lambd0.0051/resnet50.pth",
     "torchvision", _NATURAL, "Barlow Twins, self-supervised, 1000 epochs (batch 2048) on ImageNet-1k",
     "MIT (facebookresearch/barlowtwins)", _BARLOW, None),
    ("insdis", "InsDis.pth", f"{_PYCONTRAST}/AACcsSIt1_Njv7GsmsuzZ6Sta/InsDis.pth",
     "pycontrast", _NATURAL, "Instance Discrimination (PyContrast), self-supervised, 200 epochs on ImageNet-1k",
     "BSD-2-Clause (PyContrast)", _INSDIS, None),
    ("pirl", "PIRL.pth", f"{_PYCONTRAST}/AADN4jKnvTI0U5oT6hTmQZz8a/PIRL.pth",
     "pycontrast", _NATURAL, "PIRL (PyContrast), self-supervised, 200 epochs on ImageNet-1k",
     "BSD-2-Clause (PyContrast)", _PIRL, None),
    ("infomin", "InfoMin_800.pth", f"{_PYCONTRAST}/AAAzMTynP3Qc8mIE4XWkgILUa/InfoMin_800.pth",
     "pycontrast", _NATURAL, "InfoMin Aug (PyContrast), self-supervised, 800 epochs on ImageNet-1k",
     "BSD-2-Clause (PyContrast)", _INFOMIN, None),
    ("byol", "pretrain_res50x1.pkl", "https://storage.googleapis.com/deepmind-byol/checkpoints/pretrain_res50x1.pkl",
     "byol_haiku", _NATURAL, "BYOL, self-supervised on ImageNet-1k (DeepMind res50x1 release, ~74.4% linear top-1)",
     "Apache-2.0 (deepmind-research)", _BYOL, 1000),
    ("chestxray14", "chestxray14.pth.tar", f"{_ZENODO}/chestxray14.pth.tar?download=1",
     "chestxray", _CXR, "supervised multi-label classification of 14 findings on ChestX-ray14, from scratch",
     _LICENSE_BTL, _BTL, None),
    ("chexpert", "chexpert.pth.tar", f"{_ZENODO}/chexpert.pth.tar?download=1",
     "chestxray", _CXR, "supervised multi-label classification of 14 observations on CheXpert, from scratch",
     _LICENSE_BTL, _BTL, None),
    ("imagenet_chestxray14", "ImageNet_chestxray14.pth.tar", f"{_ZENODO}/ImageNet_chestxray14.pth.tar?download=1",
     "chestxray", _CXR, "domain-adapted: supervised ImageNet, then supervised ChestX-ray14 (14 findings)",
     _LICENSE_BTL, _BTL, None),
    ("imagenet_chexpert", "ImageNet_chexpert.pth.tar", f"{_ZENODO}/ImageNet_chexpert.pth.tar?download=1",
     "chestxray", _CXR, "domain-adapted: supervised ImageNet, then supervised CheXpert (14 observations)",
     _LICENSE_BTL, _BTL, None),
    ("inat2021", "inat2021_supervised_large.pth.tar", _INAT_BOX,
     "chestxray", _NATURAL, "supervised iNat2021 species classification (10,000 classes), initialised from ImageNet",
     "MIT (visipedia/newt)", _NEWT, None),
    ("inat2021_mini", "inat2021_supervised_mini.pth.tar", _INAT_BOX,
     "chestxray", _NATURAL, "supervised iNat2021-mini classification (10,000 classes), initialised from ImageNet",
     "MIT (visipedia/newt)", _NEWT, None),
)

_NOTES = {
    "barlowtwins": "The official file name is the generic 'resnet50.pth'; rename it if another file of that name "
    "is in the weights cache.",
    "byol": "A haiku parameter pickle, read by a restricted unpickler (no jax/haiku needed). Haiku used 'SAME' "
    "padding, so stride-2 layers pad asymmetrically there and symmetrically here: features differ slightly from "
    "the JAX network, as in BenchmarkTransferLearning's own conversion. The online linear classifier becomes fc.",
    "inat2021": "The Cornell Box folder holds all NeWT pretrained models; this is the ImageNet-initialised iNat2021 "
    "model. Its 10,000-class fc is dropped on conversion.",
    "inat2021_mini": "The Cornell Box folder holds all NeWT pretrained models; this is the ImageNet-initialised "
    "iNat2021-mini model. Its 10,000-class fc is dropped on conversion.",
}

# sha256 a download must match: only what the publisher states. torchvision names its files by torch.hub's rule,
# `name-<first digits of the sha256>.ext`, and checks that prefix itself on download (check_hash=True); the other
# releases publish no hash (`medtransfer zoo fetch` prints the one it computed).
_SHA256 = {"imagenet_supervised": "0676ba61"}

PRETRAINED: tuple[PretrainedCfg, ...] = tuple(
    PretrainedCfg(
        model="resnet50_2d",
        tag=tag,
        file_name=file_name,
        url=url,
        sha256=_SHA256.get(tag),
        source=source,
        num_classes=num_classes,
        modality=modality,
        in_channels=3,
        intensity=_CXR_NORM if modality == _CXR else _IMAGENET_NORM,
        patch_size=(224, 224),
        pretraining=pretraining,
        license=license_,
        citation=f"{citation}; {_BTL}" if citation != _BTL else _BTL,
        notes=_NOTES.get(tag, ""),
    )
    for tag, file_name, url, source, modality, pretraining, license_, citation, num_classes in _RELEASES
)


@register_model(
    "resnet50_2d",
    family="BenchmarkTransferLearning",
    description="2D ResNet-50 v1.5 in torchvision's layout (fc for classification, smp-style U-Net decoder for "
    "segmentation); loads the ~20 ResNet-50 releases benchmarked by BenchmarkTransferLearning",
    spatial_dims=2,
    default_in_channels=3,
    pretrained=PRETRAINED,
    infer_kwargs=_infer_from_state_dict,
)
def resnet50_2d(
    *,
    task: str = "segmentation",
    num_classes: int | None = 2,
    in_channels: int = 3,
    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
) -> ZooModel:
    return ResNet50(task=task, num_classes=num_classes, in_channels=in_channels, decoder_channels=decoder_channels)
