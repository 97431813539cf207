"""FMUNet (MIS-FM): official key layout, parameter count, pre-activation units, res_mode, tasks and errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medtransfer.zoo.fmunet import FMUNet, ResConv, UpCatConv, _infer_kwargs, size_divisors
from medtransfer.zoo.registry import get_entry

SPEC_PARAMS = 47.33e6
SPEC_KEYS = 146
SMALL = (4, 8, 16, 32, 64)  # narrow widths keep the forward tests fast; the layout is the same


@pytest.fixture(scope="module")
def meta_model():
    with torch.device("meta"):
        return FMUNet()


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_state_dict_matches_the_official_keys_and_shapes(meta_model):
    sd = meta_model.state_dict()
    assert len(sd) == SPEC_KEYS
    shapes = {
        "project.weight": (32, 1, 3, 3, 3),
        "project.bias": (32,),
        "encoder.en_conv0.conv_list.0.0.weight": (32,),  # InstanceNorm affine
        "encoder.en_conv0.conv_list.0.3.weight": (32, 32, 3, 3, 3),
        "encoder.en_conv0.conv_list.1.3.bias": (32,),
        "encoder.en_conv4.conv_list.1.3.weight": (512, 512, 3, 3, 3),
        "encoder.down0.down.0.weight": (32,),
        "encoder.down0.down.2.weight": (64, 32, 3, 3, 3),
        "encoder.down3.down.2.weight": (512, 256, 3, 3, 3),
        "decoder.upcat0.up.0.weight": (64,),
        "decoder.upcat0.up.2.weight": (32, 64, 1, 1, 1),  # 1x1x1 projection to the skip width
        "decoder.upcat0.conv.0.weight": (64,),
        "decoder.upcat0.conv.2.weight": (32, 64, 3, 3, 3),
        "decoder.upcat3.up.2.weight": (256, 512, 1, 1, 1),
        "decoder.de_conv4.conv_list.1.3.weight": (512, 512, 3, 3, 3),
        "decoder.de_conv0.conv_list.0.0.bias": (32,),
        "out_layers.0.2.weight": (2, 32, 3, 3, 3),
        "out_layers.3.0.weight": (256,),
        "out_layers.3.2.weight": (2, 256, 3, 3, 3),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any("running" in k or "num_batches" in k for k in sd)  # InstanceNorm keeps no statistics
    assert {k.split(".")[1] for k in sd if k.startswith("out_layers.")} == {"0", "1", "2", "3"}


def test_parameter_count_matches_the_spec(meta_model):
    n = sum(p.numel() for p in meta_model.parameters())
    assert abs(n - SPEC_PARAMS) / SPEC_PARAMS < 0.005


def test_encoder_prefixes_and_first_conv(meta_model):
    keys = list(meta_model.state_dict())
    encoder = [k for k in keys if meta_model.is_encoder_key(k)]
    assert len(encoder) == 2 + 5 * 8 + 4 * 4
    assert meta_model.first_conv_keys == ("project.weight",)


def test_demo_config_defaults():
    model = FMUNet(feature_chns=SMALL)
    assert model.multiscale_pred is False and model.res_mode == 0
    drops = [m.p for name, m in model.encoder.named_modules() if isinstance(m, nn.Dropout)]
    assert drops == [0.0] * 4 + [0.2] * 6  # dropout only at levels 2-4
    assert get_entry("fmunet").default_num_classes == 2  # the demo's class_num (no official default)


def test_output_shapes_for_each_task():
    x = _x(2, 1, 16, 32, 32)
    seg = FMUNet(num_classes=3, feature_chns=SMALL).eval()
    cls = FMUNet(num_classes=4, task="classification", feature_chns=SMALL).eval()
    feats = FMUNet(task="features", num_classes=None, feature_chns=SMALL).eval()
    with torch.no_grad():
        assert seg(x).shape == (2, 3, 16, 32, 32)
        assert cls(x).shape == (2, 4)
        out = feats(x)
    assert out.shape == (2, 64, 1, 2, 2)
    assert torch.equal(out, feats.forward_features(x))
    assert tuple(cls.state_dict()["classifier.mlp.0.weight"].shape) == (4, 64)
    for model in (cls, feats):
        assert not any(k.startswith(("decoder.", "out_layers.")) for k in model.state_dict())


def test_multiscale_prediction_in_training_only():
    x = _x(1, 1, 16, 32, 32)
    model = FMUNet(num_classes=2, feature_chns=SMALL, multiscale_pred=True, dropout=0.0)
    outs = model.train()(x)
    assert [tuple(o.shape) for o in outs] == [(1, 2, 16, 32, 32), (1, 2, 8, 16, 16), (1, 2, 4, 8, 8), (1, 2, 2, 4, 4)]
    with torch.no_grad():
        single = model.eval()(x)
    torch.testing.assert_close(single, outs[0].detach())
    assert torch.is_tensor(FMUNet(feature_chns=SMALL).train()(x))  # default False: one tensor


def test_forward_is_the_official_composition():
    """project -> encoder; de_conv4 on the bottleneck; each level: upcat [skip, up], de_conv; out_layers[0]."""
    torch.manual_seed(1)
    model = FMUNet(num_classes=2, feature_chns=SMALL).eval()
    x = _x(1, 1, 16, 32, 32, seed=1)
    enc = model.encoder
    with torch.no_grad():
        levels = [enc.en_conv0(model.project(x))]
        for i in range(4):
            levels.append(getattr(enc, f"en_conv{i + 1}")(getattr(enc, f"down{i}")(levels[-1])))
        y = model.decoder.de_conv4(levels[4])
        for i in (3, 2, 1, 0):
            upcat = getattr(model.decoder, f"upcat{i}")
            y = upcat.conv(torch.cat([levels[i], upcat.up(y)], dim=1))
            y = getattr(model.decoder, f"de_conv{i}")(y)
        expected = model.out_layers[0](y)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(model.forward_features(x), levels[4], rtol=0, atol=0)


def test_units_are_pre_activation_and_residual():
    block = ResConv(4, style=3, dropout=0.0, depth=2)
    unit = block.conv_list[0]
    assert [type(m) for m in unit] == [nn.InstanceNorm3d, nn.LeakyReLU, nn.Dropout, nn.Conv3d]
    assert unit[0].affine and not unit[0].track_running_stats and unit[1].negative_slope == 0.01
    with torch.no_grad():
        for u in block.conv_list:
            u[3].weight.zero_()
            u[3].bias.fill_(0.5)
    x = _x(1, 4, 4, 4, 4)
    torch.testing.assert_close(block(x), x + 1.0)  # x + 0.5, then + 0.5 again


def test_upsampling_projects_first_then_trilinear_align_corners():
    up = UpCatConv(low_ch=2, skip_ch=1, out_ch=1, style=3)
    norm, act, proj, resize = up.up
    assert isinstance(proj, nn.Conv3d) and proj.kernel_size == (1, 1, 1)
    assert resize.mode == "trilinear" and resize.align_corners is True
    ramp = torch.tensor([0.0, 1.0]).view(1, 1, 2, 1, 1).expand(1, 1, 2, 2, 2)
    # align_corners=True: the ends stay put and the new samples fall at thirds.
    torch.testing.assert_close(resize(ramp)[0, 0, :, 0, 0], torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))
    assert UpCatConv(2, 1, 1, style=2).up[3].scale_factor == (1.0, 2.0, 2.0)


@pytest.mark.parametrize(
    "res_mode, styles", [(0, ((3, 3, 3), (3, 3, 3))), (1, ((1, 3, 3), (3, 3, 3))), (2, ((1, 3, 3), (1, 3, 3)))]
)
def test_res_mode_sets_in_plane_levels(res_mode, styles):
    with torch.device("meta"):
        model = FMUNet(res_mode=res_mode)
    sd = model.state_dict()
    level0, level1 = styles
    assert tuple(sd["project.weight"].shape[2:]) == level0
    assert tuple(sd["encoder.en_conv0.conv_list.0.3.weight"].shape[2:]) == level0
    assert model.encoder.down0.down[2].stride == ((1, 2, 2) if level0 == (1, 3, 3) else (2, 2, 2))
    assert tuple(sd["encoder.down1.down.2.weight"].shape[2:]) == level1
    assert tuple(sd["decoder.upcat1.conv.2.weight"].shape[2:]) == level1
    assert tuple(sd["out_layers.0.2.weight"].shape[2:]) == level0
    assert tuple(sd["out_layers.1.2.weight"].shape[2:]) == level1
    assert tuple(sd["encoder.en_conv2.conv_list.0.3.weight"].shape[2:]) == (3, 3, 3)
    assert len(sd) == SPEC_KEYS


def test_anisotropic_res_modes_run_at_their_own_sizes():
    with torch.no_grad():
        out1 = FMUNet(feature_chns=SMALL, res_mode=1).eval()(_x(1, 1, 8, 32, 32))
        out2 = FMUNet(feature_chns=SMALL, res_mode=2).eval()(_x(1, 1, 4, 32, 32))
    assert out1.shape == (1, 2, 8, 32, 32) and out2.shape == (1, 2, 4, 32, 32)


def test_spatial_size_errors_name_the_size_and_the_divisor():
    assert [size_divisors(m) for m in (0, 1, 2)] == [(16, 16, 16), (8, 16, 16), (4, 16, 16)]
    model = FMUNet(task="features", num_classes=None, feature_chns=SMALL)
    with pytest.raises(ValueError, match=r"res_mode=0.*\(16, 16, 16\).*\(8, 32, 32\)"):
        model(torch.zeros(1, 1, 8, 32, 32))
    with pytest.raises(ValueError, match="single voxel at the deepest level"):
        model(torch.zeros(1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="5-D input"):
        model(torch.zeros(1, 32, 32, 32))


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown res_mode 3"):
        FMUNet(res_mode=3)
    with pytest.raises(ValueError, match="feature_chns needs 5"):
        FMUNet(feature_chns=(8, 16, 32, 64))
    with pytest.raises(ValueError, match="unknown initialization 'orthogonal'"):
        FMUNet(initialization="orthogonal")
    with pytest.raises(ValueError, match="dropout must be in"):
        FMUNet(dropout=1.5)
    with pytest.raises(ValueError, match="unknown task"):
        FMUNet(task="detection")


def test_initialisation_he_and_xavier():
    torch.manual_seed(0)
    he = FMUNet(feature_chns=(16, 16, 16, 16, 16), depth=1)
    conv = he.encoder.en_conv0.conv_list[0][3]
    fan_in = 16 * 27
    expected_std = math.sqrt(2.0 / (1 + 0.01**2) / fan_in)  # Kaiming normal, leaky_relu a=0.01
    assert abs(conv.weight.std().item() - expected_std) / expected_std < 0.05
    assert all(torch.count_nonzero(m.bias) == 0 for m in he.modules() if isinstance(m, nn.Conv3d))
    xavier = FMUNet(feature_chns=(16, 16, 16, 16, 16), depth=1, initialization="Xavier")
    w = xavier.encoder.en_conv0.conv_list[0][3].weight
    assert w.abs().max().item() <= math.sqrt(6.0 / (2 * fan_in))


def test_infer_kwargs_reads_the_architecture_of_a_checkpoint():
    with torch.device("meta"):
        source = FMUNet(num_classes=5, feature_chns=(8, 16, 32, 64, 128), depth=3, res_mode=1)
    inferred = _infer_kwargs(source.state_dict())
    assert inferred == {"head_classes": {"segmentation": 5}, "feature_chns": (8, 16, 32, 64, 128), "depth": 3, "res_mode": 1}
    encoder_only = {k: v for k, v in source.state_dict().items() if source.is_encoder_key(k)}
    assert "num_classes" not in _infer_kwargs(encoder_only)
    assert _infer_kwargs({}) == {}


def test_registry_entry_and_pretrained_cfg():
    entry = get_entry("fmunet")
    assert entry.family == "MIS-FM"
    cfg = entry.pretrained_cfg()
    assert (cfg.tag, cfg.file_name, cfg.source) == ("abdomenct1k_volf", "fmunet_abd1k_volf.pt", "pymic")
    assert cfg.patch_size == (64, 128, 128) and cfg.modality == "CT" and "abk1k" in cfg.notes
    assert "arXiv:2306.16925" in cfg.citation and cfg.url.startswith("https://drive.google.com/")
    model = entry.fn(task="segmentation", num_classes=2, in_channels=2, feature_chns=SMALL)
    assert isinstance(model, FMUNet) and model.project.in_channels == 2
