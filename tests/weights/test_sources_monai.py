"""The published layouts of MONAI-network files (Swin UNETR SSL encoder, MONAI bundles, SuPreM), key for key.

Every test builds the reference network from MONAI itself (or, for SuPreM's U-Net, the zoo's Models Genesis UNet3D,
which is that network) with random weights, saves it in the published layout, loads the file into the zoo model,
and compares outputs exactly.
"""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import SegResNet, SwinUNETR

import medtransfer as mt
from medtransfer.errors import CheckpointMismatchError
from medtransfer.weights.sources import convert
from medtransfer.zoo.swin_unetr import permute_like_einops

X3 = torch.randn(1, 1, 32, 32, 64, generator=torch.Generator().manual_seed(0))
HEADS = {  # the SSLHead modules of research-contributions SwinUNETR/Pretrain, for feature_size 12 (dim 192)
    "rotation_head.weight": (4, 192), "rotation_head.bias": (4,),
    "contrastive_head.weight": (512, 192), "contrastive_head.bias": (512,),
    "conv.0.weight": (96, 192, 3, 3, 3), "conv.0.bias": (96,),
    "norm.weight": (192,), "norm.bias": (192,),  # in model_swinvit.pt, not in MONAI's SwinTransformer (issue #150)
}


def _swin(seed: int = 0, **kwargs) -> SwinUNETR:
    torch.manual_seed(seed)
    args = {"in_channels": 1, "out_channels": 3, "feature_size": 12} | kwargs
    return SwinUNETR(**args).eval()


def _released_ssl_layout(ref: SwinUNETR) -> dict:
    """model_swinvit.pt: 'module.' + the encoder keys without 'swinViT.', mlp.fc1/fc2, plus the SSL heads."""
    sd = {}
    for k, v in ref.state_dict().items():
        if k.startswith("swinViT."):
            old = k[len("swinViT."):].replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")
            sd["module." + old] = v.clone()
    g = torch.Generator().manual_seed(1)
    sd.update({"module." + k: torch.randn(s, generator=g) for k, s in HEADS.items()})
    return {"state_dict": sd}


def _save(obj, path):
    torch.save(obj, path)
    return path


def test_the_released_ssl_file_loads_the_whole_encoder_and_reports_its_heads(tmp_path):
    ref = _swin()
    path = _save(_released_ssl_layout(ref), tmp_path / "model_swinvit.pt")
    model = mt.create_model("swin_unetr", task="features", pretrained=path).eval()
    report = model.load_report
    assert report.source == "swinvit_ssl" and model.arch_kwargs["feature_size"] == 12
    assert report.coverage == 1.0 and report.missing == [] and report.mismatched == []
    assert sorted(report.unexpected) == sorted(HEADS)
    assert report.notes == [
        "the file's self-supervised pretraining heads (contrastive_head, conv, norm, rotation_head: 8 tensors) are "
        "not used by Swin UNETR"
    ]
    with torch.no_grad():
        assert torch.equal(model.forward_features(X3), ref.swinViT(X3, True)[4])


def test_the_ssl_key_mapping_is_the_one_of_monai_load_from(tmp_path):
    """MONAI's SwinUNETR.load_from is the loader MONAI ships for model_swinvit.pt: both must fill the same tensors."""
    ref = _swin()
    layout = _released_ssl_layout(ref)
    via_monai = _swin(seed=5)
    via_monai.load_from(weights=layout)
    model = mt.create_model("swin_unetr", task="segmentation", num_classes=3,
                            pretrained=_save(layout, tmp_path / "ssl.pt"))
    ours = model.state_dict()
    theirs = via_monai.state_dict()
    encoder = [k for k in theirs if k.startswith("swinViT.")]
    assert len(encoder) == 2 + 8 * 14 + 4 * 3 and all(torch.equal(ours[k], theirs[k]) for k in encoder)
    # the convolutional encoder/decoder are not in the file: missing, left at their initialisation
    assert sorted(model.load_report.missing) == sorted(k for k in theirs if not k.startswith("swinViT."))


def test_the_pretrain_code_layout_with_swinvit_prefix_is_the_same_source(tmp_path):
    ref = _swin()
    sd = {f"module.{k}": v for k, v in ref.state_dict().items() if k.startswith("swinViT.")}
    sd["module.rotation_head.weight"] = torch.zeros(4, 192)
    obj = {"epoch": 7, "state_dict": sd, "optimizer": {}}
    converted, source = convert(obj)
    assert source.name == "swinvit_ssl"
    assert set(converted) == {k for k in ref.state_dict() if k.startswith("swinViT.")} | {"rotation_head.weight"}


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_monai_bundle_model_pt_loads_the_whole_network(tmp_path, wrapped):
    ref = _swin(out_channels=14)
    obj = {"model": ref.state_dict()} if wrapped else ref.state_dict()
    model = mt.create_model("swin_unetr", pretrained=_save(obj, tmp_path / "model.pt")).eval()
    report = model.load_report
    assert report.source == "monai" and model.out.conv.conv.out_channels == 14  # class count read from the file
    assert report.coverage == 1.0 and report.missing == [] and report.unexpected == []
    with torch.no_grad():
        assert torch.equal(model(X3), ref(X3))


def test_inferred_depths_heads_and_v2_rebuild_the_saved_network(tmp_path):
    ref = _swin(feature_size=24, depths=(1, 1, 2, 1), num_heads=(2, 4, 8, 8), use_v2=True)
    model = mt.create_model("swin_unetr", num_classes=3, pretrained=_save(ref.state_dict(), tmp_path / "m.pt")).eval()
    assert {k: model.arch_kwargs[k] for k in ("feature_size", "depths", "num_heads", "use_v2")} == {
        "feature_size": 24, "depths": (1, 1, 2, 1), "num_heads": (2, 4, 8, 8), "use_v2": True}
    assert model.load_report.missing == []
    with torch.no_grad():
        assert torch.equal(model(X3), ref(X3))


def test_a_2d_swin_unetr_file_loads_into_swin_unetr_2d(tmp_path):
    ref = _swin(spatial_dims=2)
    model = mt.create_model("swin_unetr_2d", num_classes=3, pretrained=_save(ref.state_dict(), tmp_path / "2d.pt"))
    x = torch.randn(2, 1, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ref(x))
    assert model.load_report.missing == [] and model.load_report.coverage == 1.0


UNIVERSAL = {"precls_conv.0.weight": (8,), "controller.weight": (153, 512, 1, 1, 1), "organ_embedding.weight": (25, 256)}


def test_a_suprem_swin_unetr_file_loads_its_backbone(tmp_path):
    ref = _swin()
    net = {f"module.backbone.{k}": v for k, v in ref.state_dict().items() if not k.startswith("out.")}
    net.update({f"module.{k}": torch.zeros(s) for k, s in UNIVERSAL.items()})
    path = _save({"net": net, "optimizer": {}, "scheduler": {}, "epoch": 1000}, tmp_path / "supervised_suprem_swinunetr_2100.pth")
    model = mt.create_model("swin_unetr", num_classes=5, pretrained=path).eval()
    report = model.load_report
    assert report.source == "suprem" and report.coverage == 1.0
    assert sorted(report.missing) == ["out.conv.conv.bias", "out.conv.conv.weight"]  # SuPreM's copy has no out head
    assert sorted(report.unexpected) == sorted(UNIVERSAL)
    assert report.notes == ["the file's SuPreM Universal Model parts (controller, organ_embedding, precls_conv: "
                            "3 tensors) are not used by Swin UNETR"]
    with torch.no_grad():
        assert torch.equal(model.forward_features(X3), ref.swinViT(X3, True)[4])
        # everything up to the head is SuPreM's: the last decoder output matches before the fresh 1x1x1 head
        ref.out = model.out
        assert torch.equal(model(X3), ref(X3))


def _segresnet(seed: int = 0, **kwargs) -> SegResNet:
    torch.manual_seed(seed)
    args = {"init_filters": 8, "blocks_down": (1, 2, 2, 4), "blocks_up": (1, 1, 1), "in_channels": 1,
            "out_channels": 25} | kwargs
    return SegResNet(**args).eval()


def test_a_suprem_segresnet_file_loads_key_for_key(tmp_path):
    ref = _segresnet()
    net = {f"module.{k}": v for k, v in ref.state_dict().items()}
    path = _save({"net": net, "optimizer": {}, "scheduler": {}, "epoch": 10}, tmp_path / "supervised_suprem_segresnet_2100.pth")
    model = mt.create_model("segresnet", pretrained=path).eval()
    report = model.load_report
    assert report.source == "suprem" and report.coverage == 1.0
    assert report.missing == [] and report.unexpected == []
    assert model.arch_kwargs == {"init_filters": 8, "blocks_down": (1, 2, 2, 4), "blocks_up": (1, 1, 1)}
    x = torch.randn(1, 1, 16, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(x)
        assert out.shape == (1, 25, 16, 32, 32) and torch.equal(out, ref(x))


def test_a_brats_bundle_segresnet_with_four_channels_loads_key_for_key(tmp_path):
    ref = _segresnet(init_filters=16, in_channels=4, out_channels=3, dropout_prob=0.2)
    model = mt.create_model("segresnet", in_channels=4, pretrained=_save(ref.state_dict(), tmp_path / "model.pt")).eval()
    assert model.load_report.source == "monai" and model.load_report.missing == []
    x = torch.randn(1, 4, 16, 16, 24, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
        assert torch.equal(mt.create_model("segresnet", task="features", in_channels=4,
                                           pretrained=tmp_path / "model.pt").eval().forward_features(x), ref.encode(x)[0])


def test_a_suprem_unet_file_loads_into_the_models_genesis_unet3d(tmp_path):
    torch.manual_seed(0)
    ref = mt.create_model("genesis_unet3d", task="segmentation")
    net = {f"module.backbone.{k}": v for k, v in ref.state_dict().items() if not k.startswith("out_tr.")}
    net["module.controller.weight"] = torch.zeros(153, 512, 1, 1, 1)
    path = _save({"net": net, "optimizer": {}, "scheduler": {}, "epoch": 1}, tmp_path / "supervised_suprem_unet_2100.pth")
    model = mt.create_model("genesis_unet3d.suprem", pretrained=path)
    report = model.load_report
    assert report.source == "suprem" and report.coverage == 1.0 and report.notes == []
    assert sorted(report.missing) == ["out_tr.final_conv.bias", "out_tr.final_conv.weight"]
    assert report.unexpected == ["controller.weight"]
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(model.eval().forward_features(x), ref.eval().forward_features(x))


def test_a_file_of_the_other_family_is_refused(tmp_path):
    seg = _save({"net": {f"module.{k}": v for k, v in _segresnet().state_dict().items()}}, tmp_path / "segresnet.pth")
    with pytest.raises(CheckpointMismatchError, match=r"no encoder weights of 'swin_unetr' were found in this suprem"):
        mt.create_model("swin_unetr", pretrained=seg)
    swin = _save(_released_ssl_layout(_swin()), tmp_path / "model_swinvit.pt")
    with pytest.raises(CheckpointMismatchError, match=r"no encoder weights of 'segresnet' were found in this swinvit_ssl"):
        mt.create_model("segresnet", pretrained=swin)
    # a 3D file into the 2D network: the window tables differ in size, an encoder shape mismatch
    with pytest.raises(CheckpointMismatchError, match=r"encoder tensors of this monai checkpoint have other shapes"):
        mt.create_model("swin_unetr_2d", pretrained=_save(_swin().state_dict(), tmp_path / "3d.pt"))


def test_each_layout_is_detected_by_its_key_signature():
    swin = _swin().state_dict()
    seg = _segresnet().state_dict()
    cases = {
        "swinvit_ssl": _released_ssl_layout(_swin()),
        "monai": swin,
        "suprem": {"net": {f"module.backbone.{k}": v for k, v in swin.items()}},
    }
    for expected, obj in cases.items():
        assert convert(obj)[1].name == expected
    assert convert({"model": seg})[1].name == "monai"
    assert convert({"net": {f"module.{k}": v for k, v in seg.items()}})[1].name == "suprem"
    # an unrelated 'net' dict is not SuPreM's
    assert convert({"net": {"fc.weight": torch.zeros(2, 2)}})[1].name == "plain"


def test_the_einops_stand_in_permutes_as_rearrange_does():
    x = torch.arange(2 * 3 * 4 * 5 * 6).reshape(2, 3, 4, 5, 6)
    assert torch.equal(permute_like_einops(x, "b c d h w -> b d h w c"), x.permute(0, 2, 3, 4, 1))
    assert torch.equal(permute_like_einops(x.permute(0, 2, 3, 4, 1), "n d h w c -> n c d h w"), x)
    with pytest.raises(ValueError, match="not a permutation"):
        permute_like_einops(x, "b c d h w -> b (d h w) c")
