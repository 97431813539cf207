"""SegResNet through MONAI's own ``monai.networks.nets.SegResNet``, registered as ``segresnet`` (3D) and
``segresnet_2d``.

A. Myronenko, "3D MRI brain tumor segmentation using autoencoder regularization", BrainLes 2018,
arXiv:1810.11654 (the network without its VAE branch). The model *is* MONAI's class (a subclass adding the zoo
interface): state_dict keys are MONAI's (``convInit.``, ``down_layers.``, ``up_layers.``, ``up_samples.``,
``conv_final.``), so MONAI bundle and SuPreM files load key for key.

- ``task="segmentation"``: MONAI's whole network, logits at input size.
- ``task="features"`` / ``"classification"``: the encoder alone (``convInit`` + ``down_layers``; the decoder and
  ``conv_final`` are removed); :meth:`forward_features` is the deepest level of MONAI's ``encode``,
  ``init_filters * 2 ** (len(blocks_down) - 1)`` channels at stride ``2 ** (len(blocks_down) - 1)``;
  classification adds global average pooling and a Linear ``classifier``.
- Every spatial size must be a multiple of ``2 ** (len(blocks_down) - 1)`` (8 for the published 4 levels), or
  the decoder's skip additions fail; checked up front.
- Published configurations: ``init_filters=16``, ``blocks_down=(1, 2, 2, 4)``, ``blocks_up=(1, 1, 1)`` (MONAI
  bundle ``brats_mri_segmentation``, SuPreM); MONAI's defaults are ``init_filters=8`` with the same blocks.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .pretrained import PretrainedCfg
from .registry import ZooModel, register_model
from .swin_unetr import SUPREM_LICENSE, SUPREM_NOTES, SUPREM_PRETRAINING, _SUPREM, ABDOMEN_WINDOW

_DECODER_PARTS = ("up_layers", "up_samples", "conv_final")


def _count(sd: Mapping[str, torch.Tensor], prefix: str) -> tuple[int, ...]:
    """Blocks per level under ``prefix`` (``down_layers.``: index 0 of a level is its down-sampling conv)."""
    levels: dict[int, set[int]] = {}
    for key in sd:
        if key.startswith(prefix):
            level, block = key[len(prefix):].split(".", 2)[:2]
            if level.isdigit() and block.isdigit():
                levels.setdefault(int(level), set()).add(int(block))
    return tuple(len(levels[i]) for i in sorted(levels))


def infer_segresnet_kwargs(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture options a (converted) SegResNet file implies: width, blocks per level, class count."""
    out: dict[str, Any] = {}
    stem = sd.get("convInit.conv.weight")
    if stem is not None:
        out["init_filters"] = int(stem.shape[0])
    down = _count(sd, "down_layers.")
    if down:
        # level 0 holds only residual blocks; every deeper level starts with its strided conv (index 0)
        out["blocks_down"] = tuple(n if i == 0 else n - 1 for i, n in enumerate(down))
    up = _count(sd, "up_layers.")
    if up:
        out["blocks_up"] = up
    head = sd.get("conv_final.2.conv.weight")
    if head is not None:
        out["head_classes"] = {"segmentation": int(head.shape[0])}
    return out


_OPTIONS = ("init_filters", "blocks_down", "blocks_up", "num_groups", "dropout_prob", "upsample_mode")

SEGRESNET_SUPREM = PretrainedCfg(
    model="segresnet",
    tag="suprem",
    file_name="supervised_suprem_segresnet_2100.pth",
    url="https://huggingface.co/MrGiovanni/SuPreM/resolve/main/supervised_suprem_segresnet_2100.pth",
    source="suprem",
    arch_kwargs={"init_filters": 16, "blocks_down": (1, 2, 2, 4), "blocks_up": (1, 1, 1)},
    num_classes=25,
    modality="CT (abdomen)",
    in_channels=1,
    intensity=ABDOMEN_WINDOW,
    preset=None,
    spacing=(1.5, 1.5, 1.5),
    patch_size=(96, 96, 96),
    pretraining=SUPREM_PRETRAINING + "; a plain MONAI SegResNet (not the Universal Model), dropout 0",
    license=SUPREM_LICENSE,
    citation=_SUPREM,
    notes=SUPREM_NOTES + "Keys are the SegResNet's under 'module.'; conv_final holds the 25 AbdomenAtlas classes.",
)

SEGRESNET_BRATS = PretrainedCfg(
    model="segresnet",
    tag="brats",
    file_name="model_brats_mri_segmentation.pt",
    url="https://developer.download.nvidia.com/assets/Clara/monai/tutorials/model_zoo/model_brats_mri_segmentation.pt",
    source="monai",
    arch_kwargs={"init_filters": 16, "blocks_down": (1, 2, 2, 4), "blocks_up": (1, 1, 1), "dropout_prob": 0.2},
    num_classes=3,
    modality="MRI (brain; T1c, T1, T2, FLAIR)",
    in_channels=4,
    intensity="per channel z-score over non-zero voxels (MONAI NormalizeIntensityd nonzero=True, channel_wise=True)",
    preset="mri_zscore",
    spacing=(1.0, 1.0, 1.0),
    patch_size=(144, 224, 224),  # train.json RandSpatialCrop roi [224, 224, 144] in (x, y, z)
    pretraining=("supervised 3-channel (tumour core, whole tumour, enhancing tumour; sigmoid) segmentation on "
                 "BraTS 2018 (285 volumes), MONAI bundle brats_mri_segmentation (v0.5.2)"),
    license="Apache-2.0 (MONAI model-zoo bundle LICENSE)",
    citation=("A. Myronenko, '3D MRI brain tumor segmentation using autoencoder regularization', BrainLes 2018, "
              "arXiv:1810.11654"),
    notes=("The bundle's models/model.pt (large_files.yml of Project-MONAI/model-zoo, md5 "
           "870e677b782a5184cbc48db1456b78e8, no sha256 published). Inference sliding window 240 x 240 x 160 (x, y, z). "
           "medtransfer's mri_zscore preset z-scores the foreground; the bundle does it per channel."),
)


def _entry(spatial_dims: int):
    def build(*, task: str = "segmentation", num_classes: int | None = 2, in_channels: int = 1,
              **kwargs: Any) -> ZooModel:
        from .monai_nets import SegResNetModel

        return SegResNetModel(task=task, num_classes=num_classes, in_channels=in_channels,
                              spatial_dims=spatial_dims, **kwargs)

    return build


segresnet = register_model(
    "segresnet",
    family="SegResNet",
    description="MONAI SegResNet (3D; init_filters 16, blocks (1,2,2,4)/(1,1,1) as SuPreM and the BraTS bundle); "
                "features: deepest encoder level",
    options=_OPTIONS,
    infer_kwargs=infer_segresnet_kwargs,
    pretrained=(SEGRESNET_SUPREM, SEGRESNET_BRATS),
)(_entry(3))

segresnet_2d = register_model(
    "segresnet_2d",
    family="SegResNet",
    description="MONAI SegResNet, 2D (spatial_dims=2); features: deepest encoder level",
    spatial_dims=2,
    options=_OPTIONS,
    infer_kwargs=infer_segresnet_kwargs,
)(_entry(2))
