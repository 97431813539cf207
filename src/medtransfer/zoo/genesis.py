"""Models Genesis 3D U-Net (the network behind ``Genesis_Chest_CT.pt``).

Zhou et al., "Models Genesis: Generic Autodidactic Models for 3D Medical Image Analysis", MICCAI 2019, and
"Models Genesis", Medical Image Analysis 67:101840, 2021. The layer order, channel flow and module names follow the
official PyTorch network (MrGiovanni/ModelsGenesis, ``pytorch/unet3d.py``, itself derived from vnet.pytorch) so that
the released checkpoint loads key for key; the code here is our own.

Facts an official checkpoint depends on:

- every unit is Conv3d 3x3x3 (padding 1, with bias) -> ContBatchNorm3d (eps 1e-5, momentum 0.1) -> ReLU;
- channel flow 1->32->64 | pool | 64->64->128 | pool | 128->128->256 | pool | 256->256->512, a 2x2x2 max-pool after
  each encoder block but the last;
- each decoder block keeps the channel count in its transposed convolution (kernel 2, stride 2), concatenates
  [upsampled, skip] and runs two units: 768->256->256, 384->128->128, 192->64->64;
- the output is a 1x1x1 convolution with bias; the official forward applies a sigmoid, ours returns the logits.

The official ContBatchNorm3d normalises with batch statistics in eval mode too (the running statistics are tracked
but never used), so the released weights were trained and used that way. :class:`ContBatchNorm3d` keeps this as the
default and makes it a flag.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .heads import ClassificationHead
from .pretrained import PretrainedCfg
from .registry import TASKS, ZooModel, register_model

# Three 2x2x2 max-pools: every spatial size must be a multiple of 2**3 for the skips to line up again.
# (The official README says 16; 8 is what the network needs.)
SIZE_DIVISOR = 8
ACTIVATIONS = ("relu", "prelu", "elu")


class ContBatchNorm3d(nn.BatchNorm3d):
    """BatchNorm3d that can keep normalising with batch statistics in eval mode.

    ``batch_stats_in_eval=True`` (default) reproduces the official ContBatchNorm3d: the output in eval mode equals
    the train-mode output for the same batch. ``False`` is ordinary BatchNorm3d (running statistics in eval), the
    usual choice for inference on single volumes or when fine-tuning with batch size 1.

    In training both settings update the running statistics exactly like the official module (momentum 0.1,
    unbiased variance). One deliberate difference: the official module also updates them during eval forwards
    (it always calls ``F.batch_norm`` with ``training=True``); we leave them untouched in eval so that evaluating
    a model never changes it. Outputs are unaffected. The state_dict keys are those of ``nn.BatchNorm3d``.
    """

    def __init__(self, num_features: int, *, batch_stats_in_eval: bool = True):
        super().__init__(num_features, eps=1e-5, momentum=0.1)
        self.batch_stats_in_eval = bool(batch_stats_in_eval)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.batch_stats_in_eval:
            return super().forward(x)
        self._check_input_dim(x)
        return F.batch_norm(x, None, None, self.weight, self.bias, training=True, momentum=0.0, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, batch_stats_in_eval={self.batch_stats_in_eval}"


def _activation(name: str, channels: int) -> nn.Module:
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "prelu":  # one slope per channel, stored as `activation.weight`
        return nn.PReLU(channels)
    return nn.ELU(inplace=True)


class LUConv(nn.Module):
    """Conv3d 3x3x3 (bias) -> ContBatchNorm3d -> activation; keys ``conv1.*``, ``bn1.*``."""

    def __init__(self, in_ch: int, out_ch: int, act: str, batch_stats_in_eval: bool):
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, kernel_size=3, padding=1)
        self.bn1 = ContBatchNorm3d(out_ch, batch_stats_in_eval=batch_stats_in_eval)
        self.activation = _activation(act, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.bn1(self.conv1(x)))


def _two_units(in_ch: int, mid_ch: int, out_ch: int, act: str, batch_stats_in_eval: bool) -> nn.Sequential:
    return nn.Sequential(
        LUConv(in_ch, mid_ch, act, batch_stats_in_eval),
        LUConv(mid_ch, out_ch, act, batch_stats_in_eval),
    )


class DownTransition(nn.Module):
    """Two units, then (except in the deepest block) a 2x2x2 max-pool; returns ``(output, skip)``."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, pool: bool, act: str, batch_stats_in_eval: bool):
        super().__init__()
        self.ops = _two_units(in_ch, mid_ch, out_ch, act, batch_stats_in_eval)
        self.maxpool = nn.MaxPool3d(2) if pool else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.ops(x)
        return (self.maxpool(skip) if self.maxpool is not None else skip), skip


class UpTransition(nn.Module):
    """Transposed convolution keeping ``in_ch`` channels, concatenation [up, skip], two units."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, act: str, batch_stats_in_eval: bool):
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(in_ch, in_ch, kernel_size=2, stride=2)
        self.ops = _two_units(in_ch + skip_ch, out_ch, out_ch, act, batch_stats_in_eval)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.ops(torch.cat([self.up_conv(x), skip], dim=1))


class OutputTransition(nn.Module):
    """The 1x1x1 output convolution; the official sigmoid after it is left to the loss or the caller."""

    def __init__(self, in_ch: int, num_classes: int):
        super().__init__()
        self.final_conv = nn.Conv3d(in_ch, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_conv(x)


class GenesisUNet3D(ZooModel):
    """Models Genesis UNet3D. Input ``(N, C, rows, cols, deps)`` with every spatial size a multiple of 8.

    - ``task="segmentation"``: the official encoder-decoder; returns the logits of ``out_tr.final_conv`` at the input
      size (``sigmoid`` of them is the official output).
    - ``task="classification"``: encoder + ``classifier`` (GAP, Linear 512->1024, ReLU, Linear 1024->n), the head of
      the official classification example.
    - ``task="features"``: the encoder only; returns ``out512``.

    ``act`` is the official activation option (``relu``, ``prelu``, ``elu``); ``batch_stats_in_eval`` sets every
    :class:`ContBatchNorm3d` (see there).
    """

    encoder_prefixes = ("down_tr64.", "down_tr128.", "down_tr256.", "down_tr512.")
    first_conv_keys = ("down_tr64.ops.0.conv1.weight",)
    spatial_dims = 3

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int | None = 1,
        task: str = "segmentation",
        act: str = "relu",
        batch_stats_in_eval: bool = True,
    ):
        super().__init__()
        _check_args(in_channels, num_classes, task, act)
        self.task = task
        self.batch_stats_in_eval = bool(batch_stats_in_eval)
        bs = self.batch_stats_in_eval
        self.down_tr64 = DownTransition(in_channels, 32, 64, True, act, bs)
        self.down_tr128 = DownTransition(64, 64, 128, True, act, bs)
        self.down_tr256 = DownTransition(128, 128, 256, True, act, bs)
        self.down_tr512 = DownTransition(256, 256, 512, False, act, bs)
        if task == "segmentation":
            self.up_tr256 = UpTransition(512, 256, 256, act, bs)
            self.up_tr128 = UpTransition(256, 128, 128, act, bs)
            self.up_tr64 = UpTransition(128, 64, 64, act, bs)
            self.out_tr = OutputTransition(64, num_classes)
        elif task == "classification":
            self.classifier = ClassificationHead(512, num_classes, hidden=1024)

    def set_batch_stats_in_eval(self, enabled: bool) -> None:
        """Switch every ContBatchNorm3d between the official eval behaviour and ordinary BatchNorm."""
        self.batch_stats_in_eval = bool(enabled)
        for module in self.modules():
            if isinstance(module, ContBatchNorm3d):
                module.batch_stats_in_eval = self.batch_stats_in_eval

    def _encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        _check_input(x)
        skips = []
        for block in (self.down_tr64, self.down_tr128, self.down_tr256):
            x, skip = block(x)
            skips.append(skip)
        out512, _ = self.down_tr512(x)
        return skips, out512

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``out512``: the deepest 512-channel map, at 1/8 of the input size."""
        return self._encode(x)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.task == "features":
            return self.forward_features(x)
        if self.task == "classification":
            return self.classifier(self.forward_features(x))
        (skip64, skip128, skip256), x = self._encode(x)
        x = self.up_tr256(x, skip256)
        x = self.up_tr128(x, skip128)
        x = self.up_tr64(x, skip64)
        return self.out_tr(x)


def _check_args(in_channels: int, num_classes: int | None, task: str, act: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task '{task}'; expected one of {', '.join(TASKS)}")
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{act}'; Models Genesis supports {', '.join(ACTIVATIONS)}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
    if task != "features" and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive integer for task '{task}', got {num_classes!r}")


def _check_input(x: torch.Tensor) -> None:
    if x.dim() != 5:
        raise ValueError(f"genesis_unet3d expects a 5-D input (N, C, rows, cols, deps), got shape {tuple(x.shape)}")
    bad = [s for s in x.shape[2:] if s % SIZE_DIVISOR]
    if bad:
        raise ValueError(
            f"genesis_unet3d needs every spatial size divisible by {SIZE_DIVISOR} (three 2x2x2 max-pools); "
            f"got spatial size {tuple(x.shape[2:])}. Crop or pad the input, e.g. to 64x64x32."
        )


def _infer_kwargs(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Class count of a whole-network checkpoint, and PReLU when the file carries activation slopes."""
    kwargs: dict = {}
    weight = state_dict.get("out_tr.final_conv.weight")
    if weight is not None:
        kwargs["head_classes"] = {"segmentation": int(weight.shape[0])}
    if "down_tr64.ops.0.activation.weight" in state_dict:
        kwargs["act"] = "prelu"
    return kwargs


_CHEST_CT = PretrainedCfg(
    model="genesis_unet3d",
    tag="chest_ct",
    file_name="Genesis_Chest_CT.pt",
    url="https://www.wjx.top/jq/46747127.aspx",
    source="genesis",
    num_classes=1,
    modality="CT",
    in_channels=1,
    intensity="HU clipped to [-1000, 1000], scaled to [0, 1]",
    spacing=None,
    patch_size=(32, 64, 64),
    pretraining=(
        "Self-supervised image restoration (Models Genesis): flips, local pixel shuffling, non-linear (Bezier) "
        "intensity transform and in-/out-painting of 64x64x32 cubes from LUNA16 chest CT (subsets 0-4 train, "
        "5-6 validate, native spacing); MSE between the sigmoid output and the original cube; SGD lr 1.0."
    ),
    license=(
        "Code MIT (MrGiovanni/ModelsGenesis); the weights are handed out by the authors after a request form, "
        "with no separate weight license stated; the README calls the method patent-pending."
    ),
    citation=(
        "Zhou Z, Sodha V, Rahman Siddiquee MM, Feng R, Tajbakhsh N, Gotway MB, Liang J. Models Genesis: Generic "
        "Autodidactic Models for 3D Medical Image Analysis. MICCAI 2019, LNCS 11767:384-393. "
        "Zhou Z, Sodha V, Pang J, Gotway MB, Liang J. Models Genesis. Medical Image Analysis 67:101840, 2021."
    ),
    notes=(
        "patch_size is in medtransfer's array order (D, H, W) = (z, y, x): the official 64x64x32 cubes, which the "
        "official code feeds as N x 1 x rows x cols x deps (x, y, z, the axial axis last). "
        "Any size divisible by 8 runs; the authors saw the best results keeping 64x64x32. The url is the request "
        "form named in the official README (a download link follows it); the authors' SuPreM README also fetches "
        "the same file from https://www.dropbox.com/s/lh5kuyjxwjsxjpl/Genesis_Chest_CT.pt. The file is a dict "
        "with 'state_dict' (keys prefixed 'module.'), 'epoch' and 'optimizer_state_dict'. Its ContBatchNorm "
        "layers were always run on batch statistics (batch_stats_in_eval=True reproduces that)."
    ),
)

# SuPreM's U-Net backbone (MrGiovanni/SuPreM supervised_pretraining/backbone/unet.py) is this network: the same module
# names and widths, ContBatchNorm3d, ReLU, without out_tr (the Universal Model's heads replace it).
_SUPREM = PretrainedCfg(
    model="genesis_unet3d",
    tag="suprem",
    file_name="supervised_suprem_unet_2100.pth",
    url="https://huggingface.co/MrGiovanni/SuPreM/resolve/main/supervised_suprem_unet_2100.pth",
    source="suprem",
    num_classes=None,
    modality="CT (abdomen)",
    in_channels=1,
    intensity="HU clipped to [-175, 250] and scaled to [0, 1] (MONAI ScaleIntensityRanged, clip=True)",
    spacing=(1.5, 1.5, 1.5),
    patch_size=(96, 96, 96),
    pretraining=("supervised segmentation of 25 classes (AbdomenAtlas 1.1, 2100 annotated abdominal CT scans per the "
                 "file name and README) as the backbone of SuPreM's Universal Model"),
    license="CC BY-NC-ND 4.0 (MrGiovanni/SuPreM LICENSE, (c) Johns Hopkins University): non-commercial, no derivatives",
    citation=("W. Li, A. Yuille, Z. Zhou, 'How Well Do Supervised 3D Models Transfer to Medical Imaging Tasks?', "
              "ICLR 2024 (SuPreM), github.com/MrGiovanni/SuPreM"),
    notes=("{'net': state_dict} with keys under 'module.backbone.' (SuPreM's train.py and target_applications "
           "loaders); no out_tr in the file, so a segmentation model gets a fresh one. The released file's contents "
           "were not inspected here (not downloadable from this machine)."),
)


@register_model(
    "genesis_unet3d",
    family="Models Genesis",
    description="Models Genesis 3D U-Net (ContBatchNorm, 19.07M params), self-supervised on LUNA16 chest CT",
    default_num_classes=1,
    pretrained=(_CHEST_CT, _SUPREM),
    infer_kwargs=_infer_kwargs,
    example_size=(16, 16, 16),
    options=("act", "batch_stats_in_eval"),
)
def genesis_unet3d(
    *, task: str = "segmentation", num_classes: int | None = 1, in_channels: int = 1, **kwargs
) -> GenesisUNet3D:
    """Models Genesis UNet3D; ``kwargs``: ``act`` ("relu"), ``batch_stats_in_eval`` (True)."""
    return GenesisUNet3D(in_channels=in_channels, num_classes=num_classes, task=task, **kwargs)
