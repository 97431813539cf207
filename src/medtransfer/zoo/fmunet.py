"""FMUNet: the pre-activation residual 3D U-Net released with MIS-FM (``fmunet_abd1k_volf.pt``).

Wang et al., "MIS-FM: 3D Medical Image Segmentation using Foundation Models Pretrained on a Large-Scale
Unannotated Dataset", arXiv:2306.16925, 2023; pretrained with Volume Fusion (VolF). The layer order and module
names follow the official network (HiLab-git/PyMIC ``pymic/net/net3d/fmunet.py``, the class used by
openmedlab/MIS-FM) so that PyMIC checkpoints load key for key; the code here is our own.

Facts an official checkpoint depends on:

- every unit is pre-activation: InstanceNorm3d (affine, no running statistics, eps 1e-5) -> LeakyReLU(0.01) ->
  [Dropout] -> Conv3d with bias; only the first ``project`` convolution has no norm before it;
- a residual block (``ResConv``) adds each of its ``depth`` units to its input: x <- x + unit(x);
- ``DownSample`` is a unit whose convolution has stride 2; ``UpCatConv`` runs a 1x1x1 convolution to the skip
  width *before* trilinear x2 upsampling (``align_corners=True``), concatenates [skip, up] and applies one unit;
- the bottleneck passes through ``decoder.de_conv4`` before the first upsampling;
- four output layers exist (``out_layers.0..3``, one per decoder level), used together only for multi-scale
  prediction in training, but always present in the state_dict.

``res_mode`` makes the two highest-resolution levels "2D-style" for anisotropic images: 0 = all levels 3D,
1 = level 0 uses (1,3,3) kernels and (1,2,2) down/upsampling, 2 = levels 0 and 1 both do.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from .heads import ClassificationHead
from .pretrained import PretrainedCfg
from .registry import TASKS, ZooModel, constructor_options, register_model

# Per conv style (2 = in-plane only, 3 = isotropic): kernel, padding and down/upsampling factor, in (D, H, W).
_KERNEL = {2: (1, 3, 3), 3: (3, 3, 3)}
_PADDING = {2: (0, 1, 1), 3: (1, 1, 1)}
_SCALE = {2: (1, 2, 2), 3: (2, 2, 2)}
# Conv style of levels 0 and 1 for each res_mode; levels 2-4 are always 3D.
_LEVEL_STYLES = {0: (3, 3), 1: (2, 3), 2: (2, 2)}
INITIALIZATIONS = ("he", "xavier")
# The demo configuration of MIS-FM (demo/fmunet_pretrain.cfg), which is also how the released file is loaded.
DEFAULT_FEATURE_CHNS = (32, 64, 128, 256, 512)


def _norm_act(channels: int) -> list[nn.Module]:
    return [nn.InstanceNorm3d(channels, affine=True), nn.LeakyReLU(0.01)]


class ResConv(nn.Module):
    """``depth`` residual pre-activation units at one width; unit keys ``conv_list.i.{0 (norm), 3 (conv)}``."""

    def __init__(self, channels: int, style: int, dropout: float, depth: int):
        super().__init__()
        self.conv_list = nn.ModuleList(
            nn.Sequential(
                *_norm_act(channels),
                nn.Dropout(dropout),  # kept even at p=0 so the convolution stays at index 3
                nn.Conv3d(channels, channels, kernel_size=_KERNEL[style], padding=_PADDING[style]),
            )
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.conv_list:
            x = x + unit(x)
        return x


class DownSample(nn.Module):
    """Pre-activation strided convolution; keys ``down.{0 (norm), 2 (conv)}``."""

    def __init__(self, in_ch: int, out_ch: int, style: int):
        super().__init__()
        self.down = nn.Sequential(
            *_norm_act(in_ch),
            nn.Conv3d(in_ch, out_ch, kernel_size=_KERNEL[style], padding=_PADDING[style], stride=_SCALE[style]),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(x)


class UpCatConv(nn.Module):
    """1x1x1 projection to the skip width, trilinear upsampling, concatenation [skip, up], one unit."""

    def __init__(self, low_ch: int, skip_ch: int, out_ch: int, style: int):
        super().__init__()
        self.up = nn.Sequential(
            *_norm_act(low_ch),
            nn.Conv3d(low_ch, skip_ch, kernel_size=1),
            # Projecting before upsampling is cheaper than the reverse; align_corners=True as in the official.
            nn.Upsample(scale_factor=_SCALE[style], mode="trilinear", align_corners=True),
        )
        self.conv = nn.Sequential(
            *_norm_act(2 * skip_ch),
            nn.Conv3d(2 * skip_ch, out_ch, kernel_size=_KERNEL[style], padding=_PADDING[style]),
        )

    def forward(self, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(low)], dim=1))


class FMUNetEncoder(nn.Module):
    """Five residual levels joined by four strided convolutions; returns the maps of all five levels."""

    def __init__(self, chns: Sequence[int], styles: Sequence[int], dropout: float, depth: int):
        super().__init__()
        # Dropout only at the three deepest levels, as in the official network.
        drops = (0.0, 0.0, dropout, dropout, dropout)
        for i in range(5):
            self.add_module(f"en_conv{i}", ResConv(chns[i], styles[i], drops[i], depth))
        for i in range(4):
            self.add_module(f"down{i}", DownSample(chns[i], chns[i + 1], styles[i]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = [self.en_conv0(x)]
        for i in range(1, 5):
            down = getattr(self, f"down{i - 1}")
            levels.append(getattr(self, f"en_conv{i}")(down(levels[-1])))
        return levels


class FMUNetDecoder(nn.Module):
    """``de_conv4`` on the bottleneck, then four (upcat, de_conv) steps; returns levels 0..3, finest first."""

    def __init__(self, chns: Sequence[int], styles: Sequence[int], dropout: float, depth: int):
        super().__init__()
        drops = (0.0, 0.0, dropout, dropout, dropout)
        for i in range(4):
            self.add_module(f"upcat{i}", UpCatConv(chns[i + 1], chns[i], chns[i], styles[i]))
        for i in range(5):
            self.add_module(f"de_conv{i}", ResConv(chns[i], styles[i], drops[i], depth))

    def forward(self, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        x = self.de_conv4(levels[4])
        outputs = []
        for i in (3, 2, 1, 0):
            x = getattr(self, f"de_conv{i}")(getattr(self, f"upcat{i}")(x, levels[i]))
            outputs.append(x)
        return outputs[::-1]


class FMUNet(ZooModel):
    """FMUNet. Input ``(N, C, D, H, W)``; see :func:`size_divisors` for the sizes it accepts.

    - ``task="segmentation"``: logits of ``out_layers[0]`` at the input size. With ``multiscale_pred=True`` and
      the module in training mode it returns, like the official network, the list of the four outputs (finest
      first, each at its decoder level's resolution) for deep supervision.
    - ``task="classification"``: ``project`` + encoder + ``classifier`` (GAP, Linear ``feature_chns[-1]`` -> n).
    - ``task="features"``: ``project`` + encoder only; returns the output of ``encoder.en_conv4``.

    Defaults are those of MIS-FM ``demo/fmunet_pretrain.cfg``: ``feature_chns`` (32, 64, 128, 256, 512),
    ``dropout`` 0.2 (levels 2-4 only), ``depth`` 2, ``res_mode`` 0, ``multiscale_pred`` False.
    ``initialization`` "he" (Kaiming-normal with a=0.01, zero bias; the official default) or "xavier"
    (Xavier-uniform, zero bias) sets the convolutions of the official modules.
    """

    encoder_prefixes = ("project.", "encoder.")
    first_conv_keys = ("project.weight",)
    spatial_dims = 3

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int | None = 2,
        task: str = "segmentation",
        feature_chns: Sequence[int] = DEFAULT_FEATURE_CHNS,
        dropout: float = 0.2,
        depth: int = 2,
        res_mode: int = 0,
        multiscale_pred: bool = False,
        initialization: str = "he",
    ):
        super().__init__()
        chns = _check_args(in_channels, num_classes, task, feature_chns, dropout, depth, res_mode, initialization)
        self.task = task
        self.res_mode = res_mode
        self.multiscale_pred = bool(multiscale_pred)
        styles = (*_LEVEL_STYLES[res_mode], 3, 3, 3)
        self.project = nn.Conv3d(
            in_channels, chns[0], kernel_size=_KERNEL[styles[0]], padding=_PADDING[styles[0]]
        )
        self.encoder = FMUNetEncoder(chns, styles, dropout, depth)
        if task == "segmentation":
            self.decoder = FMUNetDecoder(chns, styles, dropout, depth)
            self.out_layers = nn.ModuleList(
                nn.Sequential(
                    *_norm_act(chns[i]),
                    nn.Conv3d(chns[i], num_classes, kernel_size=_KERNEL[styles[i]], padding=_PADDING[styles[i]]),
                )
                for i in range(4)
            )
        _initialise_convs(self, initialization.lower())
        if task == "classification":
            self.classifier = ClassificationHead(chns[4], num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The deepest encoder map (after ``encoder.en_conv4``), at 1/16 of the input in-plane size."""
        return self._encode(x)[4]

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        _check_input(x, self.res_mode)
        return self.encoder(self.project(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.task == "features":
            return self.forward_features(x)
        if self.task == "classification":
            return self.classifier(self.forward_features(x))
        decoded = self.decoder(self._encode(x))
        if self.multiscale_pred and self.training:
            return [layer(level) for layer, level in zip(self.out_layers, decoded)]
        return self.out_layers[0](decoded[0])


def size_divisors(res_mode: int) -> tuple[int, int, int]:
    """What each of (D, H, W) must be a multiple of: 2 per downsampling step along that axis."""
    in_plane_only = sum(style == 2 for style in _LEVEL_STYLES[res_mode])
    return (2 ** (4 - in_plane_only), 16, 16)


def _initialise_convs(model: nn.Module, initialization: str) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv3d):
            if initialization == "he":
                nn.init.kaiming_normal_(module.weight, a=0.01)
            else:
                nn.init.xavier_uniform_(module.weight, gain=1.0)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def _check_args(
    in_channels: int,
    num_classes: int | None,
    task: str,
    feature_chns: Sequence[int],
    dropout: float,
    depth: int,
    res_mode: int,
    initialization: str,
) -> tuple[int, ...]:
    if task not in TASKS:
        raise ValueError(f"unknown task '{task}'; expected one of {', '.join(TASKS)}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
    if task != "features" and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive integer for task '{task}', got {num_classes!r}")
    chns = tuple(int(c) for c in feature_chns)
    if len(chns) != 5 or min(chns) < 1:
        raise ValueError(f"feature_chns needs 5 positive channel counts (one per level), got {list(feature_chns)}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth (residual units per block) must be a positive integer, got {depth!r}")
    if res_mode not in _LEVEL_STYLES:
        raise ValueError(
            f"unknown res_mode {res_mode!r}; expected 0 (all 3D), 1 (level 0 in-plane only) "
            "or 2 (levels 0 and 1 in-plane only)"
        )
    if not isinstance(initialization, str) or initialization.lower() not in INITIALIZATIONS:
        raise ValueError(f"unknown initialization {initialization!r}; expected one of {', '.join(INITIALIZATIONS)}")
    return chns


def _check_input(x: torch.Tensor, res_mode: int) -> None:
    if x.dim() != 5:
        raise ValueError(f"fmunet expects a 5-D input (N, C, D, H, W), got shape {tuple(x.shape)}")
    divisors = size_divisors(res_mode)
    if any(s % d for s, d in zip(x.shape[2:], divisors)):
        raise ValueError(
            f"fmunet with res_mode={res_mode} needs spatial sizes (D, H, W) divisible by {divisors}; "
            f"got {tuple(x.shape[2:])}. Crop or pad the input, e.g. to 64x128x128."
        )
    deepest = [s // d for s, d in zip(x.shape[2:], divisors)]
    if deepest == [1, 1, 1]:
        # InstanceNorm cannot normalise a single voxel; PyTorch's own error would not say which input size to use.
        raise ValueError(
            f"fmunet input {tuple(x.shape[2:])} leaves a single voxel at the deepest level, where InstanceNorm "
            f"needs more than one; use at least twice {divisors} along one axis."
        )


def _infer_kwargs(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Architecture implied by a (canonical) FMUNet checkpoint: class count, widths, depth and res_mode."""
    kwargs: dict = {}
    out = state_dict.get("out_layers.0.2.weight")
    if out is not None:
        kwargs["head_classes"] = {"segmentation": int(out.shape[0])}
    norms = [state_dict.get(f"encoder.en_conv{i}.conv_list.0.0.weight") for i in range(5)]
    if all(n is not None for n in norms):
        kwargs["feature_chns"] = tuple(int(n.shape[0]) for n in norms)
    units = {k.split(".")[3] for k in state_dict if k.startswith("encoder.en_conv0.conv_list.")}
    if units:
        kwargs["depth"] = len(units)
    project, down1 = state_dict.get("project.weight"), state_dict.get("encoder.down1.down.2.weight")
    if project is not None and down1 is not None and project.dim() == 5 and down1.dim() == 5:
        styles = (2 if project.shape[2] == 1 else 3, 2 if down1.shape[2] == 1 else 3)
        modes = {v: k for k, v in _LEVEL_STYLES.items()}
        if styles in modes:
            kwargs["res_mode"] = modes[styles]
    return kwargs


_ABDOMENCT1K_VOLF = PretrainedCfg(
    model="fmunet",
    tag="abdomenct1k_volf",
    file_name="fmunet_abd1k_volf.pt",
    url="https://drive.google.com/drive/folders/13OQh2eM0QFnwBRwBcKCqhKa46CnDojrD?usp=sharing",
    source="pymic",
    num_classes=5,
    modality="CT",
    in_channels=1,
    intensity=(
        "per-volume z-score of channel 0, (x - mean) / (std + 1e-5) over all voxels (PyMIC NormalizeWithMeanStd "
        "as set in MIS-FM demo/fmunet_pretrain.cfg)"
    ),
    spacing=None,
    patch_size=(64, 128, 128),
    pretraining=(
        "Volume Fusion (VolF) pseudo-segmentation on AbdomenCT-1K: two random crops of a scan are fused block-wise "
        "with discrete coefficients k/4, k in 0..4, and the network segments the 5 fusion classes; Dice + CE."
    ),
    license="Apache-2.0 (openmedlab/MIS-FM README)",
    citation=(
        "Wang G, Wu J, Luo X, Liu X, Li K, Zhang S. MIS-FM: 3D Medical Image Segmentation using Foundation Models "
        "Pretrained on a Large-Scale Unannotated Dataset. arXiv:2306.16925, 2023."
    ),
    notes=(
        "The MIS-FM README lists the file as 'fmunet_abk1k_volf.pt' (sic); the demo config loads "
        "'fmunet_abd1k_volf.pt', the name used here. url is the Google Drive folder of weights/weight_link.txt; "
        "the README links https://drive.google.com/file/d/1jQc-2hhsp3EyZj54_KEJte85diUtW8Fg/view?usp=sharing. "
        "The demo config builds FMUNet with feature_chns [32,64,128,256,512], dropout 0.2, depth 2, res_mode 0 "
        "(our defaults) and fine-tunes on left-atrium MRI (AtriaSeg, 2 classes) with 64x128x128 (D, H, W) patches; "
        "the intensity preprocessing used during pretraining is not published, the entry above is the demo's. "
        "The file is a PyMIC checkpoint: 'model_state_dict' without 'module.' prefix. num_classes=5 is VolF's "
        "default cls_num (inferred); infer_kwargs reads the actual count from out_layers.0.2.weight."
    ),
)


@register_model(
    "fmunet",
    family="MIS-FM",
    description="FMUNet pre-activation residual 3D U-Net (47.33M params), VolF-pretrained on AbdomenCT-1K",
    default_num_classes=2,
    pretrained=(_ABDOMENCT1K_VOLF,),
    infer_kwargs=_infer_kwargs,
    example_size=(16, 32, 32),
    options=constructor_options(FMUNet),
)
def fmunet(*, task: str = "segmentation", num_classes: int | None = 2, in_channels: int = 1, **kwargs) -> FMUNet:
    """FMUNet; ``kwargs``: ``feature_chns``, ``dropout``, ``depth``, ``res_mode``, ``multiscale_pred``,
    ``initialization`` (defaults from MIS-FM demo/fmunet_pretrain.cfg; the official ``class_num`` has no
    default, the demo uses 2)."""
    return FMUNet(in_channels=in_channels, num_classes=num_classes, task=task, **kwargs)
