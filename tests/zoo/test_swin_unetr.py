"""Swin UNETR (MONAI's SwinUNETR with the zoo interface): sizes, tasks, errors, published records."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import SwinUNETR

import medtransfer as mt
import medtransfer.zoo.monai_nets  # noqa: F401  (MONAI's Swin code needs einops or the stand-in this installs)
from medtransfer.zoo.tools import describe_model

X = torch.randn(1, 1, 32, 32, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("feature_size", "params"), [(12, 4078220), (24, 15703304), (36, 35072996), (48, 62187296)])
def test_every_feature_size_builds_with_monai_parameter_counts(feature_size, params):
    with torch.device("meta"):  # also proves that zoo list / zoo inspect (meta builds) work for this family
        model = mt.create_model("swin_unetr", feature_size=feature_size, num_classes=14)
    assert sum(p.numel() for p in model.parameters()) == params  # 48: SuPreM's README lists 62.19M
    assert model.state_dict()["swinViT.patch_embed.proj.weight"].shape == (feature_size, 1, 2, 2, 2)
    assert model.out_channels == 16 * feature_size


def test_the_whole_network_is_monai_s_key_for_key():
    model = mt.create_model("swin_unetr", feature_size=12, num_classes=3)
    torch.manual_seed(0)
    ref = SwinUNETR(in_channels=1, out_channels=3, feature_size=12)
    assert list(model.state_dict()) == list(ref.state_dict())
    model.load_state_dict(ref.state_dict())
    with torch.no_grad():
        assert torch.equal(model.eval()(X), ref.eval()(X))


def test_features_and_classification_keep_only_the_transformer_encoder():
    feats = mt.create_model("swin_unetr", task="features", feature_size=12).eval()
    assert {k.split(".", 1)[0] for k in feats.state_dict()} == {"swinViT"}
    clf = mt.create_model("swin_unetr", task="classification", num_classes=5, feature_size=12).eval()
    assert {k.split(".", 1)[0] for k in clf.state_dict()} == {"swinViT", "classifier"}
    clf.swinViT.load_state_dict(feats.swinViT.state_dict())
    with torch.no_grad():
        f = feats(X)
        assert f.shape == (1, 192, 1, 1, 2) and torch.equal(f, feats.forward_features(X))
        torch.testing.assert_close(clf(X), clf.classifier.mlp(f.mean(dim=(2, 3, 4))), rtol=0, atol=1e-6)


def test_the_classifier_trains_with_finite_gradients_everywhere():
    model = mt.create_model("swin_unetr", task="classification", num_classes=2, feature_size=12).train()
    loss = torch.nn.functional.cross_entropy(model(X), torch.tensor([1]))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_2d_variant_shapes():
    x = torch.randn(1, 1, 64, 96)
    for task, shape in (("segmentation", (1, 3, 64, 96)), ("classification", (1, 3)), ("features", (1, 192, 2, 3))):
        model = mt.create_model("swin_unetr_2d", task=task, num_classes=3, feature_size=12).eval()
        with torch.no_grad():
            assert model(x).shape == shape


def test_bad_sizes_are_clear_errors():
    model = mt.create_model("swin_unetr", task="features", feature_size=12)
    with pytest.raises(ValueError, match=r"spatial dimensions \[4\] of input image .* must be divisible by 2\*\*5"):
        model(torch.zeros(1, 1, 32, 32, 40))
    with pytest.raises(ValueError, match="feature_size should be divisible by 12"):
        mt.create_model("swin_unetr", feature_size=30)


def test_another_channel_count_adapts_the_patch_embedding(tmp_path):
    torch.manual_seed(0)
    ref = SwinUNETR(in_channels=1, out_channels=2, feature_size=12)
    torch.save(ref.state_dict(), tmp_path / "m.pt")
    model = mt.create_model("swin_unetr", in_channels=2, num_classes=2, pretrained=tmp_path / "m.pt")
    adapted = dict(model.load_report.adapted)
    assert set(adapted) == {"swinViT.patch_embed.proj.weight", "encoder1.layer.conv1.conv.weight",
                            "encoder1.layer.conv3.conv.weight"}
    assert all("input channels 1->2" in what for what in adapted.values())
    assert model.load_report.coverage == 1.0


def test_published_records():
    entry = mt.get_entry("swin_unetr")
    assert [c.tag for c in entry.pretrained] == ["ssl", "btcv", "suprem"]
    ssl, btcv, suprem = entry.pretrained
    assert (ssl.source, btcv.source, suprem.source) == ("swinvit_ssl", "monai", "suprem")
    assert ssl.url == "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/model_swinvit.pt"
    assert ssl.preset == "genesis_ct" and ssl.patch_size == (96, 96, 96)
    assert btcv.num_classes == 14 and btcv.spacing == (2.0, 1.5, 1.5)
    assert suprem.spacing == (1.5, 1.5, 1.5) and "CC BY-NC-ND" in suprem.license
    assert all(c.arch_kwargs == {"feature_size": 48} for c in entry.pretrained)
    info = describe_model("swin_unetr")
    assert info.family == "Swin UNETR"
