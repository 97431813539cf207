"""Models Genesis UNet3D: official key layout, parameter count, ContBatchNorm eval behaviour, tasks and errors."""

from __future__ import annotations

import pytest
import torch

from medtransfer.zoo.genesis import ContBatchNorm3d, GenesisUNet3D, _infer_kwargs
from medtransfer.zoo.registry import get_entry

SPEC_PARAMS = 19.07e6
SPEC_KEYS = 106
BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module")
def meta_model():
    with torch.device("meta"):
        return GenesisUNet3D()


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_state_dict_matches_the_official_keys_and_shapes(meta_model):
    sd = meta_model.state_dict()
    assert len(sd) == SPEC_KEYS
    shapes = {
        "down_tr64.ops.0.conv1.weight": (32, 1, 3, 3, 3),
        "down_tr64.ops.0.conv1.bias": (32,),
        "down_tr64.ops.1.conv1.weight": (64, 32, 3, 3, 3),
        "down_tr128.ops.0.conv1.weight": (64, 64, 3, 3, 3),
        "down_tr128.ops.1.conv1.weight": (128, 64, 3, 3, 3),
        "down_tr256.ops.1.conv1.weight": (256, 128, 3, 3, 3),
        "down_tr512.ops.0.conv1.weight": (256, 256, 3, 3, 3),
        "down_tr512.ops.1.conv1.weight": (512, 256, 3, 3, 3),
        "up_tr256.up_conv.weight": (512, 512, 2, 2, 2),  # transposed conv keeps the channel count
        "up_tr256.up_conv.bias": (512,),
        "up_tr256.ops.0.conv1.weight": (256, 768, 3, 3, 3),
        "up_tr128.ops.0.conv1.weight": (128, 384, 3, 3, 3),
        "up_tr64.ops.0.conv1.weight": (64, 192, 3, 3, 3),
        "up_tr64.ops.1.conv1.weight": (64, 64, 3, 3, 3),
        "out_tr.final_conv.weight": (1, 64, 1, 1, 1),
        "out_tr.final_conv.bias": (1,),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    for suffix in BN_SUFFIXES:
        assert f"down_tr64.ops.0.bn1.{suffix}" in sd
        assert f"up_tr128.ops.1.bn1.{suffix}" in sd
    assert sum(k.endswith("conv1.bias") for k in sd) == 14  # every unit's convolution has a bias


def test_parameter_count_matches_the_spec(meta_model):
    n = sum(p.numel() for p in meta_model.parameters())
    assert abs(n - SPEC_PARAMS) / SPEC_PARAMS < 0.005


def test_encoder_prefixes_and_first_conv(meta_model):
    keys = list(meta_model.state_dict())
    encoder = [k for k in keys if meta_model.is_encoder_key(k)]
    assert len(encoder) == 8 * 7  # 4 blocks x 2 units x (conv w, b + 5 BN entries)
    assert set(meta_model.first_conv_keys) == {"down_tr64.ops.0.conv1.weight"}


def test_output_shapes_for_each_task():
    torch.manual_seed(0)
    x = _x(2, 1, 8, 8, 16)
    seg = GenesisUNet3D(num_classes=3).eval()
    cls = GenesisUNet3D(num_classes=4, task="classification").eval()
    feats = GenesisUNet3D(task="features", num_classes=None).eval()
    with torch.no_grad():
        assert seg(x).shape == (2, 3, 8, 8, 16)
        assert cls(x).shape == (2, 4)
        out = feats(x)
    assert out.shape == (2, 512, 1, 1, 2)
    assert torch.equal(out, feats.forward_features(x))


def test_heads_per_task_do_not_collide_with_official_keys():
    with torch.device("meta"):
        cls = GenesisUNet3D(num_classes=5, task="classification")
        feats = GenesisUNet3D(task="features", num_classes=None)
    cls_keys, feat_keys = set(cls.state_dict()), set(feats.state_dict())
    assert not any(k.startswith(("up_tr", "out_tr")) for k in cls_keys | feat_keys)
    assert cls_keys - feat_keys == {f"classifier.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    assert tuple(cls.state_dict()["classifier.mlp.0.weight"].shape) == (1024, 512)  # GAP, FC 1024, ReLU, FC n
    assert tuple(cls.state_dict()["classifier.mlp.2.weight"].shape) == (5, 1024)


def test_forward_is_the_official_composition_without_sigmoid():
    """[up, skip] concatenation, no pool after down_tr512, logits of out_tr.final_conv (sigmoid gives the official)."""
    torch.manual_seed(1)
    model = GenesisUNet3D(num_classes=2).eval()
    x = _x(2, 1, 8, 8, 8, seed=1)
    with torch.no_grad():
        s64 = model.down_tr64.ops(x)
        s128 = model.down_tr128.ops(torch.max_pool3d(s64, 2))
        s256 = model.down_tr256.ops(torch.max_pool3d(s128, 2))
        out512 = model.down_tr512.ops(torch.max_pool3d(s256, 2))
        y = out512
        for up, skip in ((model.up_tr256, s256), (model.up_tr128, s128), (model.up_tr64, s64)):
            y = up.ops(torch.cat([up.up_conv(y), skip], dim=1))
        expected = model.out_tr.final_conv(y)
        logits = model(x)
        features = model.forward_features(x)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    torch.testing.assert_close(features, out512, rtol=0, atol=0)
    assert logits.min() < 0 or logits.max() > 1  # logits, not probabilities
    torch.testing.assert_close(torch.sigmoid(logits), torch.sigmoid(expected))


def test_cont_batchnorm_by_hand():
    x = _x(2, 3, 2, 2, 2, seed=2)
    bn = ContBatchNorm3d(3)
    assert set(bn.state_dict()) == set(BN_SUFFIXES)
    mean = x.mean(dim=(0, 2, 3, 4))
    var_biased = x.var(dim=(0, 2, 3, 4), unbiased=False)
    var_unbiased = x.var(dim=(0, 2, 3, 4), unbiased=True)
    batch_normed = (x - mean.view(1, 3, 1, 1, 1)) / torch.sqrt(var_biased.view(1, 3, 1, 1, 1) + 1e-5)

    bn.train()
    torch.testing.assert_close(bn(x), batch_normed)
    # Training updates the running statistics like the official module (momentum 0.1, unbiased variance).
    torch.testing.assert_close(bn.running_mean, 0.1 * mean)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * var_unbiased)
    running = (bn.running_mean.clone(), bn.running_var.clone())

    bn.eval()  # flag on: batch statistics in eval too, running statistics left as they are
    torch.testing.assert_close(bn(x), batch_normed)
    torch.testing.assert_close((bn.running_mean, bn.running_var), running)

    bn.batch_stats_in_eval = False  # flag off: ordinary BatchNorm, running statistics in eval
    by_running = (x - running[0].view(1, 3, 1, 1, 1)) / torch.sqrt(running[1].view(1, 3, 1, 1, 1) + 1e-5)
    torch.testing.assert_close(bn(x), by_running)


def test_eval_uses_batch_statistics_with_the_flag_on_and_running_statistics_with_it_off():
    torch.manual_seed(2)
    x = _x(2, 1, 8, 8, 8, seed=3)
    model = GenesisUNet3D()
    assert model.batch_stats_in_eval is True
    with torch.no_grad():
        train_out = model.train()(x)  # also moves the running statistics away from 0/1
        eval_out = model.eval()(x)
        torch.testing.assert_close(eval_out, train_out, rtol=0, atol=0)
        model.set_batch_stats_in_eval(False)
        off_out = model(x)
        assert not torch.allclose(off_out, train_out, atol=1e-3)
        # Flag off, the output depends on the running statistics (flag on, it does not).
        for bn in (m for m in model.modules() if isinstance(m, ContBatchNorm3d)):
            bn.running_mean.add_(0.5)
        assert not torch.allclose(model(x), off_out, atol=1e-3)
        model.set_batch_stats_in_eval(True)
        torch.testing.assert_close(model(x), train_out, rtol=0, atol=0)
        model.set_batch_stats_in_eval(False)
    assert all(not m.batch_stats_in_eval for m in model.modules() if isinstance(m, ContBatchNorm3d))


def test_eval_forward_leaves_the_running_statistics_unchanged():
    model = GenesisUNet3D().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model(_x(2, 1, 8, 8, 8, seed=4))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_spatial_size_must_be_divisible_by_8():
    model = GenesisUNet3D(task="features", num_classes=None)
    with pytest.raises(ValueError, match=r"divisible by 8.*\(16, 12, 16\)"):
        model(torch.zeros(1, 1, 16, 12, 16))
    with pytest.raises(ValueError, match="5-D input"):
        model(torch.zeros(1, 16, 16, 16))


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown task 'detection'"):
        GenesisUNet3D(task="detection")
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        GenesisUNet3D(act="gelu")
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        GenesisUNet3D(num_classes=0)


def test_prelu_option_has_the_official_activation_keys():
    with torch.device("meta"):
        model = GenesisUNet3D(act="prelu")
    sd = model.state_dict()
    assert tuple(sd["down_tr64.ops.0.activation.weight"].shape) == (32,)
    assert len(sd) == SPEC_KEYS + 14


def test_infer_kwargs_reads_the_class_count_and_activation():
    assert _infer_kwargs({"out_tr.final_conv.weight": torch.zeros(3, 64, 1, 1, 1)}) == {"head_classes": {"segmentation": 3}}
    assert _infer_kwargs({"down_tr64.ops.0.conv1.weight": torch.zeros(32, 1, 3, 3, 3)}) == {}
    assert _infer_kwargs({"down_tr64.ops.0.activation.weight": torch.zeros(32)}) == {"act": "prelu"}


def test_registry_entry_and_pretrained_cfg():
    entry = get_entry("genesis_unet3d")
    assert entry.family == "Models Genesis" and entry.default_num_classes == 1
    cfg = entry.pretrained_cfg()
    assert (cfg.tag, cfg.file_name, cfg.source, cfg.num_classes) == ("chest_ct", "Genesis_Chest_CT.pt", "genesis", 1)
    assert cfg.patch_size == (32, 64, 64) and cfg.modality == "CT" and "[-1000, 1000]" in cfg.intensity
    assert cfg.url.startswith("https://") and "MICCAI 2019" in cfg.citation
    model = entry.fn(task="segmentation", num_classes=1, in_channels=2, batch_stats_in_eval=False)
    assert isinstance(model, GenesisUNet3D) and model.down_tr64.ops[0].conv1.in_channels == 2
    assert not model.down_tr64.ops[0].bn1.batch_stats_in_eval
