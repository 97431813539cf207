"""PCT-Net (MIS-FM): official key layout and counts, nnFormer position index, shift masks, tasks and sizes."""

from __future__ import annotations

import pytest
import torch

from medtransfer.zoo.pctnet import PCTNet, _infer_from_state_dict
from medtransfer.zoo.registry import get_entry
from medtransfer.zoo.swin3d import (
    SwinLayer3d,
    relative_position_index,
    shifted_window_mask,
    window_merge,
    window_partition,
)

TINY = dict(feature_chns=(4, 8, 16, 32, 64))  # 16/32/64 channels split over 4/8/16 heads
SMALL_INPUT = (16, 32, 32)  # divisible by (8, 16, 16) in resolution_mode 1


def meta_model(**kwargs) -> PCTNet:
    with torch.device("meta"):
        return PCTNet(**kwargs)


def test_demo_config_keys_and_parameter_count():
    model = meta_model()
    sd = model.state_dict()
    assert len(sd) == 684
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params - 45.29e6) / 45.29e6 < 0.005
    # all three stems and heads, the multi-scale outputs and the unused LayerNorms are stored
    for m in range(3):
        assert sd[f"embeddings.{m}.proj.weight"].shape[1] == 1
        assert f"pred_heads.{m}.out_conv0.conv.2.weight" in sd
        assert f"pred_heads.{m}.out_conv1.conv.1.weight" in sd  # PReLU
    assert sd["embeddings.0.proj.weight"].shape == (24, 1, 3, 3, 3)
    assert sd["embeddings.1.proj.weight"].shape == (24, 1, 1, 3, 3)
    assert sd["embeddings.1.conv0.conv_conv.6.weight"].shape == (24, 24, 1, 3, 3)
    assert sd["embeddings.1.down2.conv.2.weight"].shape == (128, 48, 3, 3, 3)
    assert sd["pred_heads.1.up1.up.2.weight"].shape == (48, 24, 1, 2, 2)  # ConvTranspose3d (in, out, k)
    assert sd["pred_heads.0.up1.up.2.weight"].shape == (48, 24, 2, 2, 2)
    assert sd["pred_heads.1.out_conv0.conv.2.weight"].shape == (2, 24, 1, 1, 1)
    assert sd["pyramid_ct.up4.conv.2.weight"].shape == (256, 512, 3, 3, 3)
    assert sd["pyramid_ct.out_conv3.conv.2.weight"].shape == (2, 256, 1, 1, 1)
    assert sd["pyramid_ct.convtrans_e4.norm_layer.weight"].shape == (512,)
    attn = "pyramid_ct.convtrans_e2.trans.blocks.0.attn."
    assert sd[attn + "relative_position_bias_table"].shape == ((2 * 6 - 1) ** 3, 4)
    assert sd[attn + "relative_position_index"].shape == (216, 216)
    assert sd[attn + "relative_position_index"].dtype == torch.int64
    assert sd[attn + "qkv.weight"].shape == (384, 128)
    assert sd["pyramid_ct.convtrans_e4.trans.blocks.1.mlp.fc1.weight"].shape == (2048, 512)
    assert sd["pyramid_ct.convtrans_d3.trans.blocks.1.attn.relative_position_bias_table"].shape == (1331, 8)


def test_window_shrinks_and_shift_drops_as_in_the_official_network():
    # 24x48x48 in mode 1 gives token grids 12^3, 6^3, 3^3: windows 6 (shifted), 6 (unshifted), 3 (unshifted)
    model = meta_model(input_size=(24, 48, 48))
    layers = [getattr(model.pyramid_ct, f"convtrans_e{i}").trans for i in (2, 3, 4)]
    assert [[b.window for b in layer.blocks] for layer in layers] == [[6, 6], [6, 6], [3, 3]]
    grids = [(12, 12, 12), (6, 6, 6), (3, 3, 3)]
    assert [[b.shift_for(g) for b in layer.blocks] for layer, g in zip(layers, grids)] == [[0, 3], [0, 0], [0, 0]]
    # the shift follows the actual grid: larger inputs shift the odd blocks again, by half their window
    assert layers[1].blocks[1].shift_for((12, 12, 12)) == 3
    assert layers[2].blocks[1].shift_for((4, 12, 12)) == 1
    assert layers[0].blocks[1].shift_for((6, 24, 24)) == 0
    assert layers[2].blocks[0].attn.relative_position_bias_table.shape == (125, 16)


def test_relative_position_index_uses_nnformer_multipliers():
    index = relative_position_index(2)
    assert index.shape == (8, 8) and index.dtype == torch.int64
    # tokens are numbered s*4 + h*2 + w; offsets (+1 per axis) weigh 5 (=3w-1), 3 (=2w-1) and 1
    assert index[0, 0] == 1 * 5 + 1 * 3 + 1  # 9
    assert index[0, 7] == 0
    assert index[7, 0] == 2 * 5 + 2 * 3 + 2  # 18
    assert index[1, 2] == 1 * 5 + 0 * 3 + 2  # (0,0,1) vs (0,1,0): offsets (1, 0, 2)
    # not unique: offsets (0, 2, 0) and (1, 0, 1) share row 6
    assert index[2, 5] == 6 and index[0, 2] == 6
    assert int(index.max()) < (2 * 2 - 1) ** 3


def test_shifted_window_mask_by_hand():
    mask = shifted_window_mask((4, 4, 4), window=2, shift=1)
    # per axis the regions are [0, 0, 1, 2]; 8 windows of 8 tokens
    assert mask.shape == (8, 8, 8)
    assert torch.equal(mask[0], torch.zeros(8, 8))  # window at (0, 0, 0): one region
    assert torch.equal(mask[7], -100.0 * (1 - torch.eye(8)))  # every token in its own region
    # window (0, 0, 1): depth and height in one region, width splits into regions 1 and 2
    local_w = torch.arange(8) % 2
    expected = torch.where(local_w[:, None] == local_w[None, :], 0.0, -100.0)
    assert torch.equal(mask[1], expected)
    assert set(mask.unique().tolist()) == {0.0, -100.0}


def test_masks_follow_the_actual_padded_grid_and_stay_out_of_the_state_dict():
    layer = SwinLayer3d(dim=4, resolution=(8, 8, 8), depth=2, num_heads=2, window=2).eval()
    assert [(b.window, b.shift_for((3, 3, 3))) for b in layer.blocks] == [(2, 0), (2, 1)]
    with torch.no_grad():
        out = layer(torch.randn(1, 3, 3, 3, 4))  # padded to 4^3 after the first norm
    assert out.shape == (1, 3, 3, 3, 4)
    (key, cached), = layer._masks.items()
    assert key[0] == (4, 4, 4)
    assert torch.equal(cached, shifted_window_mask((4, 4, 4), 2, 1))
    assert all("mask" not in k for k in layer.state_dict())


def test_window_partition_round_trip():
    x = torch.arange(2 * 4 * 6 * 2 * 3, dtype=torch.float32).view(2, 4, 6, 2, 3)
    windows = window_partition(x, 2)
    assert windows.shape == (2 * 2 * 3 * 1, 8, 3)
    assert torch.equal(windows[0, :, 0], x[0, :2, :2, :2, 0].flatten())
    assert torch.equal(window_merge(windows, 2, (4, 6, 2)), x)


@pytest.mark.parametrize(
    "task, expected",
    [("segmentation", (2, 3) + SMALL_INPUT), ("classification", (2, 3)), ("features", (2, 64, 2, 2, 2))],
)
def test_output_shapes_per_task(task, expected):
    torch.manual_seed(0)
    model = PCTNet(task=task, num_classes=3, **TINY).eval()
    x = torch.randn(2, 1, *SMALL_INPUT)
    with torch.no_grad():
        out = model(x)
        assert out.shape == expected
        assert model.forward_features(x).shape == (2, 64, 2, 2, 2)
    if task != "segmentation":
        decoder = ("pred_heads.", "pyramid_ct.up", "pyramid_ct.convtrans_d")
        assert not any(k.startswith(decoder) for k in model.state_dict())


def test_multiscale_prediction_order():
    model = PCTNet(num_classes=2, multiscale_pred=True, **TINY).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 1, *SMALL_INPUT))
    assert [tuple(o.shape[2:]) for o in outs] == [(16, 32, 32), (16, 16, 16), (8, 8, 8), (4, 4, 4)]


def test_input_size_only_shapes_the_network():
    # without a shrunken window, networks built for different sizes compute the same function at any size
    torch.manual_seed(0)
    a = PCTNet(input_size=(64, 128, 128), **TINY).eval()
    b = PCTNet(input_size=(56, 112, 112), **TINY).eval()
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(1, 1, *SMALL_INPUT)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("mode, divisor", [(0, (16, 16, 16)), (1, (8, 16, 16)), (2, (4, 16, 16))])
def test_invalid_size_raises_with_size_and_divisor(mode, divisor):
    model = PCTNet(resolution_mode=mode, **TINY)
    assert model.size_divisor == divisor
    with pytest.raises(ValueError, match=rf"divisible by \({divisor[0]}, 16, 16\).*\(18, 32, 32\)"):
        model(torch.randn(1, 1, 18, 32, 32))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="resolution_mode"):
        meta_model(resolution_mode=3)
    with pytest.raises(ValueError, match="feature_chns needs 5"):
        meta_model(feature_chns=(24, 48, 128))
    with pytest.raises(ValueError, match="not divisible by 16 heads"):
        meta_model(feature_chns=(24, 48, 128, 256, 520))


def test_encoder_prefixes_and_first_convs():
    model = meta_model(task="features", in_channels=2)
    assert all(model.is_encoder_key(k) for k in model.state_dict())
    seg = meta_model()
    encoder = [k for k in seg.state_dict() if seg.is_encoder_key(k)]
    assert len(encoder) == len(model.state_dict())
    assert not any(k.startswith(("pyramid_ct.convtrans_d", "pyramid_ct.up", "pred_heads.")) for k in encoder)
    assert model.first_conv_keys == tuple(f"embeddings.{m}.proj.weight" for m in range(3))
    assert all(model.state_dict()[k].shape[1] == 2 for k in model.first_conv_keys)


def test_infer_kwargs_reads_classes_and_widths():
    sd = meta_model(num_classes=5, feature_chns=(32, 64, 128, 256, 512)).state_dict()
    inferred = _infer_from_state_dict(sd)
    assert inferred.pop("notes")[0].startswith("PCT-Net files hold all three resolution variants")
    assert inferred == {
        "head_classes": {"segmentation": 5},
        "feature_chns": [32, 64, 128, 256, 512],
        "num_heads": [4, 8, 16],
        "window_sizes": [6, 6, 6],
        "depths": [2, 2, 2],
    }
    # a network built for 32x64x64 has 4^3 tokens at level 4, so its window there shrank to 4
    small = meta_model(input_size=(32, 64, 64)).state_dict()
    assert _infer_from_state_dict(small)["window_sizes"] == [6, 6, 4]
    encoder_only = meta_model(task="features").state_dict()
    assert "num_classes" not in _infer_from_state_dict(encoder_only)


def test_registration():
    entry = get_entry("pctnet")
    assert entry.family == "MIS-FM" and entry.default_num_classes == 2
    cfg = entry.pretrained_cfg("ct10k_volf")
    assert cfg.file_name == "pctnet_ct10k_volf.pt" and cfg.source == "pymic"
    assert cfg.url.startswith("https://drive.google.com/") and "2306.16925" in cfg.citation
    assert cfg.patch_size == (64, 128, 128)
    model = entry.fn(task="segmentation", num_classes=4, in_channels=1, **TINY)
    assert model.pred_heads[1].out_conv0.conv[2].out_channels == 4
