"""Swin UNETR through MONAI's own ``monai.networks.nets.SwinUNETR``, registered as ``swin_unetr`` (3D) and
``swin_unetr_2d``.

A. Hatamizadeh et al., "Swin UNETR: Swin Transformers for Semantic Segmentation of Brain Tumors in MRI Images",
BrainLes 2021, arXiv:2201.01266; self-supervised pretraining: Y. Tang et al., "Self-Supervised Pre-Training of Swin
Transformers for 3D Medical Image Analysis", CVPR 2022. The network *is* MONAI's class (a subclass adding the zoo
interface), so its state_dict keys are MONAI's (``swinViT.``, ``encoder1.`` ... ``decoder1.``, ``out.``) and every
file saved from a MONAI ``SwinUNETR`` loads key for key.

- ``task="segmentation"``: MONAI's whole network, logits at input size.
- ``task="features"`` / ``"classification"``: the Swin transformer encoder ``swinViT`` alone (the convolutional
  ``encoder*``/``decoder*``/``out`` modules are removed); :meth:`forward_features` is its last stage as MONAI's
  forward hands it on (``normalize=True``: a parameter-free layer norm over channels), ``16 * feature_size``
  channels at stride 32; classification adds global average pooling and a Linear ``classifier``.
- Every spatial size must be a multiple of 32 (``patch_size ** 5``, MONAI's own check, a ``ValueError``).
- ``feature_size`` must be a multiple of 12 (MONAI's check); the published files use 48 (62.2M parameters for
  segmentation), MONAI's research release also has 24 and 12.
- MONAI 1.6 removed the ``img_size`` argument; files saved with it load all the same (it never made tensors).
- MONAI's Swin code moves channels with ``einops.rearrange``, an optional MONAI dependency. Without einops
  installed, :func:`permute_like_einops` stands in for it (the patterns MONAI uses are pure axis permutations);
  :mod:`.monai_nets`, which holds the network class and imports MONAI only when a model is built, installs it.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .pretrained import PretrainedCfg
from .registry import ZooModel, register_model

# MONAI's modules outside the transformer encoder: only the segmentation network keeps them.
_CNN_PARTS = ("encoder1", "encoder2", "encoder3", "encoder4", "encoder10",
              "decoder5", "decoder4", "decoder3", "decoder2", "decoder1", "out")
# Top-level keys of the self-supervised file (research-contributions SwinUNETR/Pretrain SSLHead) that the
# fine-tuned network does not have: rotation and contrastive heads, the reconstruction decoder ``conv``, and a
# final ``norm`` that MONAI's SwinTransformer lacks (research-contributions issue #150).
SSL_PARTS = ("rotation_pre", "rotation_head", "contrastive_pre", "contrastive_head", "conv", "norm")
# Parts of SuPreM's Universal Model around its backbone (MrGiovanni/SuPreM supervised_pretraining/backbone).
UNIVERSAL_PARTS = ("precls_conv", "GAP", "controller", "organ_embedding", "text_to_vision", "text_encoding")


def permute_like_einops(x: torch.Tensor, pattern: str) -> torch.Tensor:
    """``einops.rearrange`` for a pattern that only reorders axes (``"b c d h w -> b d h w c"``)."""
    lhs, _, rhs = pattern.partition("->")
    src, dst = lhs.split(), rhs.split()
    if sorted(src) != sorted(dst) or len(set(src)) != len(src) or len(src) != x.ndim:
        raise ValueError(f"pattern {pattern!r} is not a permutation of a {x.ndim}-D tensor's axes; install einops")
    return x.permute([src.index(name) for name in dst])


def _count_blocks(sd: Mapping[str, torch.Tensor], stage: int) -> int:
    prefix = f"swinViT.layers{stage}.0.blocks."
    return len({k[len(prefix):].split(".", 1)[0] for k in sd if k.startswith(prefix)})


def infer_swin_kwargs(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture options a (converted) Swin UNETR file implies: feature size, blocks and heads per stage, v2,
    the classes of a segmentation ``out`` head, and notes on pretraining parts no zoo model uses."""
    out: dict[str, Any] = {}
    embed = sd.get("swinViT.patch_embed.proj.weight")
    if embed is not None:
        out["feature_size"] = int(embed.shape[0])
        depths = tuple(_count_blocks(sd, s) for s in range(1, 5))
        if all(depths):
            out["depths"] = depths
        tables = [sd.get(f"swinViT.layers{s}.0.blocks.0.attn.relative_position_bias_table") for s in range(1, 5)]
        if all(t is not None for t in tables):
            out["num_heads"] = tuple(int(t.shape[1]) for t in tables)
        out["use_v2"] = any(k.startswith("swinViT.layers1c.") for k in sd)
    head = sd.get("out.conv.conv.weight")
    if head is not None:
        out["head_classes"] = {"segmentation": int(head.shape[0])}
    notes = []
    for parts, what in ((SSL_PARTS, "self-supervised pretraining heads"), (UNIVERSAL_PARTS, "SuPreM Universal Model parts")):
        unused = sorted({k.split(".", 1)[0] for k in sd if k.split(".", 1)[0] in parts})
        if unused:
            count = sum(k.split(".", 1)[0] in parts for k in sd)
            notes.append(f"the file's {what} ({', '.join(unused)}: {count} tensors) are not used by Swin UNETR")
    if notes:
        out["notes"] = notes
    return out


_OPTIONS = ("feature_size", "depths", "num_heads", "norm_name", "use_v2", "dropout_path_rate", "use_checkpoint")

_TANG = ("Y. Tang, D. Yang, W. Li, H. R. Roth, B. Landman, D. Xu, V. Nath, A. Hatamizadeh, 'Self-Supervised "
         "Pre-Training of Swin Transformers for 3D Medical Image Analysis', CVPR 2022, arXiv:2111.14791")
_SUPREM = ("W. Li, A. Yuille, Z. Zhou, 'How Well Do Supervised 3D Models Transfer to Medical Imaging Tasks?', "
           "ICLR 2024 (SuPreM), github.com/MrGiovanni/SuPreM")
ABDOMEN_WINDOW = "HU clipped to [-175, 250] and scaled to [0, 1] (MONAI ScaleIntensityRanged, clip=True)"
SUPREM_LICENSE = ("CC BY-NC-ND 4.0 (MrGiovanni/SuPreM LICENSE, (c) Johns Hopkins University): non-commercial, "
                  "no derivatives")
SUPREM_PRETRAINING = ("supervised segmentation of 25 classes (AbdomenAtlas 1.1, 2100 annotated abdominal CT "
                      "scans per the file name and README; SuPreM supervised_pretraining/train.py defaults)")
SUPREM_NOTES = ("SuPreM's train.py saves {'net': model.state_dict(), 'optimizer', 'scheduler', 'epoch'} from "
                "DistributedDataParallel ('module.' prefix); the released file's contents were not inspected here "
                "(not downloadable from this machine). ")

SWIN_SSL = PretrainedCfg(
    model="swin_unetr",
    tag="ssl",
    file_name="model_swinvit.pt",
    url="https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/model_swinvit.pt",
    source="swinvit_ssl",
    arch_kwargs={"feature_size": 48},
    num_classes=None,
    modality="CT",
    in_channels=1,
    intensity="HU clipped to [-1000, 1000] and scaled to [0, 1] (SwinUNETR/Pretrain main.py a_min/a_max defaults)",
    preset="genesis_ct",
    spacing=None,
    patch_size=(96, 96, 96),
    pretraining=("self-supervised (masked-volume inpainting, rotation prediction, contrastive coding) on ~5050 CT "
                 "scans of 5 public datasets (HNSCC, LUNA16, TCIA CT Colonography, TCIA COVID-19, LIDC) per the "
                 "SwinUNETR/Pretrain README; encoder only"),
    license="Apache-2.0 (Project-MONAI/research-contributions LICENSE)",
    citation=_TANG,
    notes=("Only the transformer encoder (swinViT) is in the file, under 'module.' with the Pretrain code's older "
           "names (no 'swinViT.' prefix, mlp.fc1/fc2 for MONAI's mlp.linear1/linear2: issues #268, #346 of "
           "research-contributions); the BTCV main.py --use_ssl_pretrained path strips 'module.' and loads it "
           "with strict=False, which matches no key of SwinUNETR. The public pretraining transforms do not "
           "resample (Spacingd is imported, unused); the BTCV fine-tuning resamples to 1.5 x 1.5 x 2.0 mm (x, y, z)."),
)

SWIN_BTCV = PretrainedCfg(
    model="swin_unetr",
    tag="btcv",
    file_name="model_swin_unetr_btcv_segmentation_v1.pt",
    url="https://developer.download.nvidia.com/assets/Clara/monai/tutorials/model_zoo/model_swin_unetr_btcv_segmentation_v1.pt",
    source="monai",
    arch_kwargs={"feature_size": 48},
    num_classes=14,
    modality="CT (abdomen)",
    in_channels=1,
    intensity=ABDOMEN_WINDOW,
    preset=None,
    spacing=(2.0, 1.5, 1.5),  # bundle Spacingd pixdim [1.5, 1.5, 2.0] in (x, y, z)
    patch_size=(96, 96, 96),
    pretraining=("supervised 14-class (background + 13 organs) segmentation on BTCV, MONAI bundle "
                 "swin_unetr_btcv_segmentation (v0.5.6); its train.json loads no initial weights"),
    license="Apache-2.0 (MONAI model-zoo bundle LICENSE)",
    citation=("A. Hatamizadeh et al., 'Swin UNETR: Swin Transformers for Semantic Segmentation of Brain Tumors in "
              "MRI Images', BrainLes 2021, arXiv:2201.01266; " + _TANG),
    notes=("The bundle's models/model.pt (large_files.yml of Project-MONAI/model-zoo, md5 "
           "50dd67a01b28a1d5487fd9ac27e682fb, no sha256 published). Orientation RAS, sliding window 96^3, overlap 0.5."),
)

SWIN_SUPREM = PretrainedCfg(
    model="swin_unetr",
    tag="suprem",
    file_name="supervised_suprem_swinunetr_2100.pth",
    url="https://huggingface.co/MrGiovanni/SuPreM/resolve/main/supervised_suprem_swinunetr_2100.pth",
    source="suprem",
    arch_kwargs={"feature_size": 48},
    num_classes=None,
    modality="CT (abdomen)",
    in_channels=1,
    intensity=ABDOMEN_WINDOW,
    preset=None,
    spacing=(1.5, 1.5, 1.5),
    patch_size=(96, 96, 96),
    pretraining=SUPREM_PRETRAINING + "; the Swin UNETR is the backbone of a CLIP-driven Universal Model",
    license=SUPREM_LICENSE,
    citation=_SUPREM,
    notes=(SUPREM_NOTES + "Keys under 'module.backbone.'; SuPreM's SwinUNETR copy has no 'out' head (its class "
           "heads are the Universal Model's controller), so a segmentation model gets a fresh 'out'."),
)


def _entry(spatial_dims: int):
    def build(*, task: str = "segmentation", num_classes: int | None = 2, in_channels: int = 1,
              **kwargs: Any) -> ZooModel:
        from .monai_nets import SwinUNETRModel

        return SwinUNETRModel(task=task, num_classes=num_classes, in_channels=in_channels,
                              spatial_dims=spatial_dims, **kwargs)

    return build


swin_unetr = register_model(
    "swin_unetr",
    family="Swin UNETR",
    description="MONAI SwinUNETR (3D; feature_size 48 = the SSL, BTCV and SuPreM files); features: swinViT stage 4",
    example_size=(32, 32, 64),  # the deepest map must hold more than one voxel for instance norm
    options=_OPTIONS,
    infer_kwargs=infer_swin_kwargs,
    pretrained=(SWIN_SSL, SWIN_BTCV, SWIN_SUPREM),
)(_entry(3))

swin_unetr_2d = register_model(
    "swin_unetr_2d",
    family="Swin UNETR",
    description="MONAI SwinUNETR, 2D (spatial_dims=2); features: swinViT stage 4",
    spatial_dims=2,
    example_size=(64, 64),
    options=_OPTIONS,
    infer_kwargs=infer_swin_kwargs,
)(_entry(2))
