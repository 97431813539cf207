"""SegResNet (MONAI's SegResNet with the zoo interface): sizes, tasks, errors, published records."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import SegResNet

import medtransfer as mt

X = torch.randn(2, 1, 16, 32, 24, generator=torch.Generator().manual_seed(0))


def test_the_published_configuration_has_monai_s_parameter_count():
    with torch.device("meta"):
        model = mt.create_model("segresnet", num_classes=25)
    assert sum(p.numel() for p in model.parameters()) == 4701305  # SuPreM's README lists 4.70M
    assert model.arch_kwargs == {}  # the defaults are the published init_filters 16, blocks (1,2,2,4)/(1,1,1)


def test_the_whole_network_is_monai_s_key_for_key():
    model = mt.create_model("segresnet", num_classes=3, init_filters=8)
    torch.manual_seed(0)
    ref = SegResNet(init_filters=8, in_channels=1, out_channels=3)
    assert list(model.state_dict()) == list(ref.state_dict())
    model.load_state_dict(ref.state_dict())
    with torch.no_grad():
        assert torch.equal(model.eval()(X), ref.eval()(X))
        feats = mt.create_model("segresnet", task="features", init_filters=8).eval()
        feats.load_state_dict({k: v for k, v in ref.state_dict().items() if k.startswith(("convInit.", "down_layers."))})
        f = feats(X)
        assert f.shape == (2, 64, 2, 4, 3) and torch.equal(f, ref.encode(X)[0])


def test_features_and_classification_drop_the_decoder():
    clf = mt.create_model("segresnet", task="classification", num_classes=4, init_filters=8)
    assert {k.split(".", 1)[0] for k in clf.state_dict()} == {"convInit", "down_layers", "classifier"}
    assert clf(X).shape == (2, 4)


def test_2d_variant_shapes():
    x = torch.randn(2, 1, 64, 48)
    for task, shape in (("segmentation", (2, 3, 64, 48)), ("classification", (2, 3)), ("features", (2, 64, 8, 6))):
        model = mt.create_model("segresnet_2d", task=task, num_classes=3, init_filters=8).eval()
        with torch.no_grad():
            assert model(x).shape == shape


def test_bad_sizes_and_options_are_clear_errors():
    model = mt.create_model("segresnet", init_filters=8)
    with pytest.raises(ValueError, match=r"every S a multiple of 8, got shape \(1, 1, 16, 32, 20\)"):
        model(torch.zeros(1, 1, 16, 32, 20))
    with pytest.raises(ValueError, match=r"blocks_up needs one entry less than blocks_down \(3\), got \(1, 1\)"):
        mt.create_model("segresnet", blocks_up=(1, 1))


def test_blocks_and_width_are_read_from_a_file(tmp_path):
    torch.manual_seed(1)
    ref = SegResNet(init_filters=8, blocks_down=(2, 1, 3), blocks_up=(2, 1), out_channels=6).eval()
    torch.save(ref.state_dict(), tmp_path / "m.pt")
    model = mt.create_model("segresnet", pretrained=tmp_path / "m.pt").eval()
    assert model.arch_kwargs == {"init_filters": 8, "blocks_down": (2, 1, 3), "blocks_up": (2, 1)}
    assert model.load_report.missing == [] and model.conv_final[2].conv.out_channels == 6
    x = torch.randn(1, 1, 8, 16, 12)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def test_published_records():
    entry = mt.get_entry("segresnet")
    assert [c.tag for c in entry.pretrained] == ["suprem", "brats"]
    suprem, brats = entry.pretrained
    assert suprem.source == "suprem" and suprem.num_classes == 25 and suprem.spacing == (1.5, 1.5, 1.5)
    assert brats.source == "monai" and brats.in_channels == 4 and brats.num_classes == 3 and brats.modality.startswith("MRI")
    genesis = mt.get_entry("genesis_unet3d").pretrained_cfg("suprem")
    assert genesis.source == "suprem" and genesis.file_name == "supervised_suprem_unet_2100.pth"
