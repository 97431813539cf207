"""PCT-Net, the hybrid CNN-Transformer of MIS-FM, with the module names of its published checkpoint.

Wang et al., "MIS-FM: 3D Medical Image Segmentation using Foundation Models Pretrained on a Large-Scale Unannotated
Dataset", arXiv:2306.16925 (openmedlab/MIS-FM ``net/pct_net.py``). Pretrained with Volume Fusion (VolF) on CT10k and
released as a PyMIC checkpoint ``{"model_state_dict": ...}``.

Layout (channels ``C0..C4``, demo ``[24, 48, 128, 256, 512]``):

- ``embeddings.{0,1,2}``: a convolutional stem per ``resolution_mode`` giving x0, x1, x2 at C0, C1, C2. Mode 0 is 3D
  throughout, mode 1 keeps depth at the first level (in-plane kernels and 1x2x2 pooling), mode 2 at the first two.
  All three are built (and stored in checkpoints); only ``embeddings[resolution_mode]`` runs.
- ``pyramid_ct``: ``convtrans_e2 -> down3 -> convtrans_e3 -> down4 -> convtrans_e4`` (the encoder), then
  ``up4 -> convtrans_d3 -> up3 -> convtrans_d2``. Every ``convtrans_*`` returns conv branch + Swin branch.
- ``pred_heads.{0,1,2}``: ``up2 -> conv1 -> up1 -> conv0 -> out_conv0``; again only one runs.

Every unit is pre-activation (BatchNorm3d -> PReLU -> conv); up-sampling is a transposed convolution and skips are
concatenated as ``[skip, up]``. ``out_conv1`` (heads) and ``pyramid_ct.out_conv2/3`` only serve the multi-scale
output, and ``convtrans_*.norm_layer`` is never used; they exist because the checkpoint holds them.

``forward_features`` returns the output of ``convtrans_e4`` (C4 channels, 1/16 in-plane): the deepest map of the
encoder, before the decoder half of the pyramid. Tasks ``features`` and ``classification`` therefore build neither
the decoder half of ``pyramid_ct`` nor ``pred_heads``; loading a full checkpoint reports those keys as unexpected.

``input_size`` only sizes the transformer windows: where the token grid it implies is smaller than a window, the
official network shrinks that window (and with it the bias table). Padding, window shifts and attention masks follow
the actual input, so any size divisible by :attr:`PCTNet.size_divisor` runs, and the output equals the official
network's built for that size whenever the windows agree (always at ``input_size``). A checkpoint's bias tables give
its windows, which ``infer_kwargs`` returns as ``window_sizes``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from .heads import ClassificationHead
from .pretrained import PretrainedCfg
from .registry import ZooModel, constructor_options, register_model
from .swin3d import SwinLayer3d

# The demo configuration of MIS-FM (demo/pctnet_pretrain.cfg), which the released CT10k weights fit.
DEMO_FEATURE_CHNS = (24, 48, 128, 256, 512)
DEMO_DROPOUT = (0.0, 0.0, 0.2, 0.2, 0.2)
DEMO_INPUT_SIZE = (64, 128, 128)
DROP_PATH = 0.2  # stochastic depth of every Swin block, fixed in the official code


def _conv3(in_ch: int, out_ch: int, in_plane: bool) -> nn.Conv3d:
    """3x3x3 convolution, or 1x3x3 where a level keeps the depth resolution."""
    if in_plane:
        return nn.Conv3d(in_ch, out_ch, kernel_size=(1, 3, 3), padding=(0, 1, 1))
    return nn.Conv3d(in_ch, out_ch, kernel_size=3, padding=1)


def _pre_act(in_ch: int, conv: nn.Module) -> list[nn.Module]:
    return [nn.BatchNorm3d(in_ch), nn.PReLU(), conv]


class ConvBlock(nn.Module):
    """Two pre-activation convolutions, dropout between them (official ``ConvBlock``)."""

    def __init__(self, channels: int, in_plane: bool = False, dropout: float = 0.0):
        super().__init__()
        self.conv_conv = nn.Sequential(
            *_pre_act(channels, _conv3(channels, channels, in_plane)),
            nn.BatchNorm3d(channels),
            nn.PReLU(),
            nn.Dropout(dropout),
            _conv3(channels, channels, in_plane),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_conv(x)


class DownSample(nn.Module):
    """Max-pool by 2 (1x2x2 in-plane) then one pre-activation convolution to the next width."""

    def __init__(self, in_ch: int, out_ch: int, pool_in_plane: bool = False, conv_in_plane: bool = False):
        super().__init__()
        self.pool = nn.MaxPool3d((1, 2, 2) if pool_in_plane else 2)
        self.conv = nn.Sequential(*_pre_act(in_ch, _conv3(in_ch, out_ch, conv_in_plane)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class OutputConv(nn.Module):
    """Pre-activation 1x1x1 convolution to class logits (official ``ConvLayer``)."""

    def __init__(self, in_ch: int, num_classes: int):
        super().__init__()
        self.conv = nn.Sequential(*_pre_act(in_ch, nn.Conv3d(in_ch, num_classes, kernel_size=1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UpCatBlock(nn.Module):
    """Pre-activation transposed convolution of the coarse map, concatenation ``[skip, up]``, one convolution."""

    def __init__(self, skip_ch: int, coarse_ch: int, up_in_plane: bool = False, conv_in_plane: bool = False):
        super().__init__()
        stride = (1, 2, 2) if up_in_plane else (2, 2, 2)
        self.up = nn.Sequential(*_pre_act(coarse_ch, nn.ConvTranspose3d(coarse_ch, skip_ch, stride, stride=stride)))
        self.conv = nn.Sequential(*_pre_act(2 * skip_ch, _conv3(2 * skip_ch, skip_ch, conv_in_plane)))

    def forward(self, skip: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(coarse)], dim=1))


class PatchEmbedding(nn.Module):
    """Convolutional stem: x0 (C0, full size), x1 (C1, /2), x2 (C2, /4), with in-plane levels where asked."""

    def __init__(self, in_channels: int, chns: Sequence[int], in_plane: Sequence[bool], dropout: Sequence[float]):
        super().__init__()
        self.proj = _conv3(in_channels, chns[0], in_plane[0])
        self.conv0 = ConvBlock(chns[0], in_plane[0], dropout[0])
        self.conv1 = ConvBlock(chns[1], in_plane[1], dropout[1])
        self.down1 = DownSample(chns[0], chns[1], in_plane[0], in_plane[1])
        self.down2 = DownSample(chns[1], chns[2], in_plane[1], False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x0 = self.conv0(self.proj(x))
        x1 = self.conv1(self.down1(x0))
        return x0, x1, self.down2(x1)


class ConvTransBlock(nn.Module):
    """Sum of a 3D conv branch and a Swin branch over the same map."""

    def __init__(self, chns: int, resolution: Sequence[int], depth: int, num_heads: int, window: int, dropout: float):
        super().__init__()
        self.conv = ConvBlock(chns, False, dropout)
        self.trans = SwinLayer3d(
            chns, resolution, depth, num_heads, window, drop=dropout, attn_drop=dropout, drop_path=DROP_PATH
        )
        self.norm_layer = nn.LayerNorm(chns)  # in the checkpoint, unused by the official forward
        self.pos_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.pos_drop(x.permute(0, 2, 3, 4, 1))
        return self.conv(x) + self.trans(tokens).permute(0, 4, 1, 2, 3)


class PyramidConvTrans(nn.Module):
    """The transformer pyramid over levels 2-4; ``with_decoder=False`` builds only its encoder half."""

    def __init__(
        self,
        resolution: Sequence[int],
        chns: Sequence[int],
        dropout: Sequence[float],
        depths: Sequence[int],
        num_heads: Sequence[int],
        window_sizes: Sequence[int],
        num_classes: int,
        with_decoder: bool = True,
    ):
        super().__init__()
        res = [list(resolution)]
        for _ in range(2):
            res.append([n // 2 for n in res[-1]])

        def level(i: int) -> ConvTransBlock:
            return ConvTransBlock(chns[i], res[i], depths[i], num_heads[i], window_sizes[i], dropout[i])

        self.down3 = DownSample(chns[0], chns[1])
        self.down4 = DownSample(chns[1], chns[2])
        if with_decoder:
            self.up3 = UpCatBlock(chns[0], chns[1])
            self.up4 = UpCatBlock(chns[1], chns[2])
        self.convtrans_e2 = level(0)
        if with_decoder:
            self.convtrans_d2 = level(0)
        self.convtrans_e3 = level(1)
        if with_decoder:
            self.convtrans_d3 = level(1)
        self.convtrans_e4 = level(2)
        if with_decoder:
            self.out_conv2 = OutputConv(chns[0], num_classes)
            self.out_conv3 = OutputConv(chns[1], num_classes)

    def encode(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x2 = self.convtrans_e2(x2)
        x3 = self.convtrans_e3(self.down3(x2))
        return x2, x3, self.convtrans_e4(self.down4(x3))

    def decode(self, x2: torch.Tensor, x3: torch.Tensor, x4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_d3 = self.convtrans_d3(self.up4(x3, x4))
        return self.convtrans_d2(self.up3(x2, x_d3)), x_d3


class PredictionHead(nn.Module):
    """Decoder over the stem's skips back to full size, then 1x1x1 logits (``out_conv1``: the /2 output)."""

    def __init__(self, chns: Sequence[int], in_plane: Sequence[bool], dropout: Sequence[float], num_classes: int):
        super().__init__()
        self.up1 = UpCatBlock(chns[0], chns[1], in_plane[0], in_plane[0])
        self.up2 = UpCatBlock(chns[1], chns[2], in_plane[1], in_plane[1])
        self.conv0 = ConvBlock(chns[0], in_plane[0], dropout[0])
        self.conv1 = ConvBlock(chns[1], in_plane[1], dropout[1])
        self.out_conv0 = OutputConv(chns[0], num_classes)
        self.out_conv1 = OutputConv(chns[1], num_classes)

    def forward(self, x0: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_d1 = self.conv1(self.up2(x1, x2))
        x_d0 = self.conv0(self.up1(x0, x_d1))
        return self.out_conv0(x_d0), x_d1


def _in_plane_levels(mode: int) -> tuple[bool, bool]:
    """Which of the two stem levels keep depth (1x3x3 kernels, 1x2x2 pooling) in ``resolution_mode`` ``mode``."""
    return (mode >= 1, mode >= 2)


def _triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    out = (value,) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(out) != 3:
        raise ValueError(f"{name} needs 3 entries (D, H, W), got {value!r}")
    return out  # type: ignore[return-value]


class PCTNet(ZooModel):
    """PCT-Net for segmentation (official output), classification or feature extraction."""

    def __init__(
        self,
        *,
        task: str = "segmentation",
        num_classes: int = 2,
        in_channels: int = 1,
        feature_chns: Sequence[int] = DEMO_FEATURE_CHNS,
        dropout: Sequence[float] = DEMO_DROPOUT,
        depths: Sequence[int] = (2, 2, 2),
        num_heads: Sequence[int] = (4, 8, 16),
        window_sizes: Sequence[int] = (6, 6, 6),
        resolution_mode: int = 1,
        input_size: int | Sequence[int] = DEMO_INPUT_SIZE,
        multiscale_pred: bool = False,
    ):
        super().__init__()
        _check_args(task, feature_chns, dropout, depths, num_heads, window_sizes, resolution_mode)
        self.task = task
        self.resolution_mode = resolution_mode
        self.multiscale_pred = multiscale_pred and task == "segmentation"
        depth_stride = 4 >> resolution_mode  # 4, 2, 1: depth stride of the stem in modes 0, 1, 2
        self.size_divisor = (4 * depth_stride, 16, 16)
        input_size = _triple(input_size, "input_size")
        resolution = [input_size[0] // depth_stride, input_size[1] // 4, input_size[2] // 4]
        chns, drop = list(feature_chns), list(dropout)
        segmentation = task == "segmentation"
        # Class count of the official heads; the features/classification networks do not build them.
        head_classes = num_classes if segmentation else 1

        self.embeddings = nn.ModuleList(
            PatchEmbedding(in_channels, chns[:3], _in_plane_levels(m), drop[:3]) for m in range(3)
        )
        self.pyramid_ct = PyramidConvTrans(
            resolution, chns[2:], drop[2:], depths, num_heads, window_sizes, head_classes, with_decoder=segmentation
        )
        if segmentation:
            self.pred_heads = nn.ModuleList(
                PredictionHead(chns[:3], _in_plane_levels(m), drop[:3], num_classes) for m in range(3)
            )
        elif task == "classification":
            self.classifier = ClassificationHead(chns[4], num_classes)

        self.encoder_prefixes = ("embeddings.",) + tuple(
            f"pyramid_ct.{name}." for name in ("convtrans_e2", "down3", "convtrans_e3", "down4", "convtrans_e4")
        )
        self.first_conv_keys = tuple(f"embeddings.{m}.proj.weight" for m in range(3))

    def _check_size(self, x: torch.Tensor) -> None:
        if x.ndim != 5:
            raise ValueError(f"PCT-Net takes (N, C, D, H, W) volumes, got a tensor of shape {tuple(x.shape)}")
        size = tuple(x.shape[2:])
        if any(n % d for n, d in zip(size, self.size_divisor)):
            raise ValueError(
                f"PCT-Net (resolution_mode {self.resolution_mode}) needs a spatial size divisible by "
                f"{self.size_divisor} (D, H, W); got {size}"
            )

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._check_size(x)
        x0, x1, x2 = self.embeddings[self.resolution_mode](x)
        return (x0, x1) + self.pyramid_ct.encode(x2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Output of ``pyramid_ct.convtrans_e4``: C4 channels at the deepest level."""
        return self._encode(x)[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.task == "features":
            return self.forward_features(x)
        if self.task == "classification":
            return self.classifier(self.forward_features(x))
        x0, x1, x2, x3, x4 = self._encode(x)
        x_d2, x_d3 = self.pyramid_ct.decode(x2, x3, x4)
        head = self.pred_heads[self.resolution_mode]
        out, x_d1 = head(x0, x1, x_d2)
        if not self.multiscale_pred:
            return out
        # Official order: full size, then /2 (head), /4 and /8 (pyramid); training deep supervision only.
        return [out, head.out_conv1(x_d1), self.pyramid_ct.out_conv2(x_d2), self.pyramid_ct.out_conv3(x_d3)]


def _check_args(
    task: str,
    feature_chns: Sequence[int],
    dropout: Sequence[float],
    depths: Sequence[int],
    num_heads: Sequence[int],
    window_sizes: Sequence[int],
    resolution_mode: int,
) -> None:
    if task not in ("segmentation", "classification", "features"):
        raise ValueError(f"unknown task '{task}'; expected segmentation, classification or features")
    if resolution_mode not in (0, 1, 2):
        raise ValueError(
            f"resolution_mode must be 0 (3D), 1 (first level in-plane) or 2 (two levels), got {resolution_mode}"
        )
    for name, value, n in (("feature_chns", feature_chns, 5), ("dropout", dropout, 5)):
        if len(value) != n:
            raise ValueError(f"{name} needs {n} entries (one per level), got {list(value)}")
    for name, value in (("depths", depths), ("num_heads", num_heads), ("window_sizes", window_sizes)):
        if len(value) != 3:
            raise ValueError(f"{name} needs 3 entries (transformer levels 2-4), got {list(value)}")
    for chns, heads in zip(feature_chns[2:], num_heads):
        if chns % heads:
            raise ValueError(f"feature_chns {list(feature_chns)}: {chns} channels are not divisible by {heads} heads")


def _infer_from_state_dict(sd: Mapping[str, torch.Tensor]) -> dict:
    """Class count of the official heads and the widths, depths, heads and windows of the stored network.

    A window smaller than the demo's 6 means the file comes from a network built for a small ``input_size`` (the
    official code shrinks windows to the token grid); inferring it keeps the bias tables loadable and the outputs
    equal at that size.
    """
    out: dict = {}
    heads = sorted(k for k in sd if k.startswith("pred_heads.") and k.endswith(".out_conv0.conv.2.weight"))
    if heads:
        out["head_classes"] = {"segmentation": int(sd[heads[0]].shape[0])}
    if any(k.startswith("embeddings.1.") for k in sd):
        out["notes"] = [
            "PCT-Net files hold all three resolution variants, so resolution_mode cannot be read from the file: "
            "the model uses the one it was built with (default 1, as the MIS-FM demo); pass resolution_mode= if "
            "the weights were trained with another"
        ]
    width_keys = (
        "embeddings.0.proj.weight",
        "embeddings.0.down1.conv.2.weight",
        "embeddings.0.down2.conv.2.weight",
        "pyramid_ct.down3.conv.2.weight",
        "pyramid_ct.down4.conv.2.weight",
    )
    if all(k in sd for k in width_keys):
        out["feature_chns"] = [int(sd[k].shape[0]) for k in width_keys]
    levels = ("convtrans_e2", "convtrans_e3", "convtrans_e4")
    tables = [f"pyramid_ct.{lv}.trans.blocks.0.attn.relative_position_bias_table" for lv in levels]
    if all(k in sd for k in tables):
        out["num_heads"] = [int(sd[k].shape[1]) for k in tables]
        out["window_sizes"] = [_window_of_table(sd[k].shape[0]) for k in tables]
        out["depths"] = [
            len({k.split(".")[4] for k in sd if k.startswith(f"pyramid_ct.{lv}.trans.blocks.")}) for lv in levels
        ]
    return out


def _window_of_table(rows: int) -> int:
    """Window ``w`` of a bias table with ``(2w - 1)^3`` rows."""
    side = round(rows ** (1 / 3))
    if side**3 != rows or side % 2 == 0:
        raise ValueError(f"a relative-position bias table has (2w-1)^3 rows; {rows} rows fit no window size w")
    return (side + 1) // 2


_CT10K_VOLF = PretrainedCfg(
    model="pctnet",
    tag="ct10k_volf",
    file_name="pctnet_ct10k_volf.pt",
    url="https://drive.google.com/file/d/1jQc-2hhsp3EyZj54_KEJte85diUtW8Fg/view?usp=sharing",
    source="pymic",
    arch_kwargs={"feature_chns": list(DEMO_FEATURE_CHNS), "resolution_mode": 1, "input_size": list(DEMO_INPUT_SIZE)},
    num_classes=5,
    modality="CT",
    in_channels=1,
    intensity="per-volume z-score, (x - mean) / (std + 1e-5), as PyMIC's NormalizeWithMeanStd in the MIS-FM demo",
    spacing=None,
    patch_size=DEMO_INPUT_SIZE,
    pretraining="Volume Fusion (VolF) pseudo-segmentation, self-supervised, on CT10k (about 10k public CT volumes)",
    license="Apache-2.0",
    citation=(
        "Wang G, Wu J, Luo X, Liu X, Li K, Zhang S. MIS-FM: 3D Medical Image Segmentation using Foundation Models "
        "Pretrained on a Large-Scale Unannotated Dataset. arXiv:2306.16925, 2023."
    ),
    notes=(
        "Architecture of MIS-FM demo/pctnet_pretrain.cfg (resolution_mode 1, patch 64x128x128). The head class count "
        "5 is VolF's default pseudo-class count (not stated by the release); the loader reads the stored heads. Also "
        "linked from weights/weight_link.txt: "
        "https://drive.google.com/drive/folders/13OQh2eM0QFnwBRwBcKCqhKa46CnDojrD?usp=sharing"
    ),
)


@register_model(
    "pctnet",
    family="MIS-FM",
    description="PCT-Net hybrid CNN-Transformer (MIS-FM), pretrained with Volume Fusion on CT10k",
    default_num_classes=2,
    pretrained=(_CT10K_VOLF,),
    infer_kwargs=_infer_from_state_dict,
    options=constructor_options(PCTNet),
)
def pctnet(*, task: str = "segmentation", num_classes: int = 2, in_channels: int = 1, **kwargs) -> ZooModel:
    return PCTNet(task=task, num_classes=num_classes, in_channels=in_channels, **kwargs)
