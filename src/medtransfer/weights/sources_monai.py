"""Converters for files of MONAI networks: the Swin UNETR self-supervised encoder, MONAI bundles, SuPreM.

| source      | on disk                                                                        | canonical keys          |
|-------------|--------------------------------------------------------------------------------|-------------------------|
| swinvit_ssl | ``{'state_dict': {'module.patch_embed.proj.weight', 'module.layers1.0.blocks.0.mlp.fc1.weight', ...}}`` (``model_swinvit.pt``), or the Pretrain code's own ``{'epoch', 'state_dict': {'module.swinViT.'...}, 'optimizer'}`` | MONAI SwinUNETR ``swinViT.`` + SSL heads as unused keys |
| suprem      | ``{'net': {'module.backbone.'...} or {'module.'...}, 'optimizer', 'scheduler', 'epoch'}`` | MONAI SwinUNETR / SegResNet, Models Genesis UNet3D (+ Universal Model parts as unused keys) |
| monai       | a MONAI ``SwinUNETR``/``SegResNet`` state_dict, bare (bundle ``models/model.pt``) or under ``model``/``state_dict`` | as saved |

The SSL file names its encoder as the research code's first Swin ViT did: no ``swinViT.`` prefix and
``mlp.fc1``/``mlp.fc2`` for MONAI's ``mlp.linear1``/``mlp.linear2`` (the mapping of MONAI's ``SwinUNETR.load_from``;
research-contributions issues #268, #346). Its heads (``rotation_head``, ``contrastive_head``, the reconstruction
``conv``) and its final ``norm`` keep their names outside ``swinViT.``, so that the load report lists them as unused.
"""

from __future__ import annotations

from typing import Any, Mapping

from .sources import (
    Source,
    StateDict,
    is_tensor_dict,
    keys_start_with,
    register_source,
    strip_prefixes,
    tensors_only,
    unwrap,
)

# Top-level modules of the SSL Swin ViT that are MONAI SwinTransformer modules (everything else is a head).
_SWIN_MODULES = ("patch_embed.", "layers1", "layers2", "layers3", "layers4", "pos_drop.")


def _inner(obj: Any, key: str) -> Mapping:
    inner = obj.get(key) if isinstance(obj, Mapping) else None
    return inner if is_tensor_dict(inner) else {}


def _strip_all(sd: Mapping, prefix: str) -> StateDict:
    """Remove ``prefix`` when every key has it (a DataParallel/DDP wrapper), else leave the keys as they are."""
    sd = tensors_only(sd)
    return strip_prefixes(sd, [prefix]) if keys_start_with(sd, prefix, 1.0) else sd


# -- Swin UNETR self-supervised encoder ------------------------------------------------------------------------------
def _ssl_rename(key: str) -> str:
    key = key.replace("swin_vit.", "swinViT.", 1) if key.startswith("swin_vit.") else key
    if key.startswith(_SWIN_MODULES):
        key = "swinViT." + key
    if key.startswith("swinViT."):
        key = key.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
    return key


def _convert_ssl(obj: Any) -> StateDict:
    return {_ssl_rename(k): v for k, v in _strip_all(obj["state_dict"], "module.").items()}


def _detect_ssl(obj: Any) -> bool:
    sd = _strip_all(_inner(obj, "state_dict"), "module.")
    released = "patch_embed.proj.weight" in sd and any(k.startswith("layers1.0.blocks.") for k in sd)
    pretrain_code = any(k.startswith(("swinViT.patch_embed.", "swin_vit.patch_embed.")) for k in sd) and any(
        k.startswith(("rotation_head.", "contrastive_head.")) for k in sd
    )
    return released or pretrain_code


register_source(
    Source(
        name="swinvit_ssl",
        description="Swin UNETR self-supervised encoder (model_swinvit.pt): {'state_dict'}, 'module.' prefix, SSL heads",
        detect=_detect_ssl,
        convert=_convert_ssl,
        priority=24,
    )
)


# -- SuPreM ----------------------------------------------------------------------------------------------------------
# What SuPreM's three backbones start with once 'module.' and 'backbone.' are gone.
_SUPREM_SIGNATURES = ("swinViT.patch_embed.", "convInit.conv.", "down_tr64.")


def _convert_suprem(obj: Any) -> StateDict:
    sd = _strip_all(obj["net"], "module.")
    return strip_prefixes(sd, ["backbone."])


def _detect_suprem(obj: Any) -> bool:
    if not _inner(obj, "net"):
        return False
    return any(k.startswith(_SUPREM_SIGNATURES) for k in _convert_suprem(obj))


register_source(
    Source(
        name="suprem",
        description="SuPreM (AbdomenAtlas): {'net', 'optimizer', 'scheduler', 'epoch'}, 'module.' / 'module.backbone.'",
        detect=_detect_suprem,
        convert=_convert_suprem,
        priority=22,
    )
)


# -- MONAI networks (bundles, research-contributions fine-tuned files) -----------------------------------------------
def _monai_state_dict(obj: Any) -> StateDict:
    return _strip_all(unwrap(obj, ("model", "state_dict")), "module.")


def _detect_monai(obj: Any) -> bool:
    sd = _monai_state_dict(obj)
    swin = "swinViT.patch_embed.proj.weight" in sd
    segresnet = "convInit.conv.weight" in sd and any(k.startswith("down_layers.") for k in sd)
    return swin or segresnet


register_source(
    Source(
        name="monai",
        description="a MONAI SwinUNETR/SegResNet state_dict: bundle models/model.pt (bare) or under 'model'/'state_dict'",
        detect=_detect_monai,
        convert=_monai_state_dict,
        priority=26,
    )
)
