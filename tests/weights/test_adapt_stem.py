"""Stem adaptation (depth: centre-pad / interpolate; channels: average / tile), explicit skips, dtype casts, and
which format a ``{state_dict, meta}`` container is attributed to."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import medtransfer as mt
from medtransfer.errors import CheckpointMismatchError
from medtransfer.weights.adapt import (
    StemAdapt,
    adapt_kernel_channels,
    adapt_kernel_depth,
    load_state_dict_with_report,
    parse_adapt_stem,
)
from medtransfer.weights.sources import convert


class Toy(nn.Module):
    encoder_prefixes = ("stem.", "body.")
    first_conv_keys = ("stem.weight",)

    def __init__(self, in_ch=1, depth=7):
        super().__init__()
        self.stem = nn.Conv3d(in_ch, 4, (depth, 5, 5), padding=(depth // 2, 2, 2), bias=False)
        self.body = nn.Sequential(nn.BatchNorm3d(4), nn.Conv3d(4, 4, 1))
        self.head = nn.Linear(4, 2)


def _file(in_ch=3, depth=3, seed=1):
    torch.manual_seed(seed)
    return Toy(in_ch, depth).state_dict()


def test_parse_adapt_stem_accepts_one_depth_and_one_channel_rule():
    assert parse_adapt_stem("center_pad+average") == StemAdapt("center_pad", "average")
    assert parse_adapt_stem("tile, interpolate") == StemAdapt("interpolate", "tile")
    assert parse_adapt_stem(["average"]) == StemAdapt(None, "average")
    assert parse_adapt_stem(None) == StemAdapt()
    for bad in ("center_pad+interpolate", "average+tile", "stretch"):
        with pytest.raises(ValueError, match="at most one depth rule .center_pad, interpolate. and one channel rule"):
            parse_adapt_stem(bad)


def test_center_pad_puts_the_file_taps_in_the_middle_and_zeros_around_them():
    w = torch.randn(4, 2, 3, 5, 5)
    out = adapt_kernel_depth(w, 7, "center_pad")
    assert out.shape == (4, 2, 7, 5, 5)
    assert torch.equal(out[:, :, 2:5], w)
    assert torch.count_nonzero(out[:, :, :2]) == 0 and torch.count_nonzero(out[:, :, 5:]) == 0
    # an even difference is split evenly; an odd one puts the extra zero slice after
    assert torch.equal(adapt_kernel_depth(w, 4, "center_pad")[:, :, :3], w)
    # a deeper file kernel keeps its centre taps
    assert torch.equal(adapt_kernel_depth(out, 3, "center_pad"), w)
    # with the model's own padding, the padded kernel computes exactly what the file's kernel computed
    x = torch.randn(1, 2, 6, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(
        F.conv3d(x, out.double(), padding=(3, 2, 2)), F.conv3d(x, w.double(), padding=(1, 2, 2)), rtol=0, atol=1e-12
    )


def test_interpolate_is_linear_along_depth_with_the_ends_kept_and_rescaled():
    w = torch.randn(4, 2, 3, 5, 5)
    out = adapt_kernel_depth(w, 7, "interpolate")
    # trilinear with the in-plane size unchanged and align_corners=True is linear along depth only
    by_hand = F.interpolate(w, size=(7, 5, 5), mode="trilinear", align_corners=True) * (3 / 7)
    torch.testing.assert_close(out, by_hand, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out[:, :, 0], w[:, :, 0] * 3 / 7)
    torch.testing.assert_close(out[:, :, 3], w[:, :, 1] * 3 / 7)  # centre stays the centre
    torch.testing.assert_close(out[:, :, 1], (w[:, :, 0] * 2 / 3 + w[:, :, 1] / 3) * 3 / 7)
    torch.testing.assert_close(adapt_kernel_depth(w, 1, "interpolate"), w.sum(dim=2, keepdim=True))


def test_average_and_tile_channel_rules():
    w = torch.randn(4, 3, 3, 5, 5)
    avg = adapt_kernel_channels(w, 2, "average")
    assert avg.shape == (4, 2, 3, 5, 5)
    for c in range(2):
        torch.testing.assert_close(avg[:, c], w.mean(dim=1))
    tiled = adapt_kernel_channels(w, 5, "tile")
    torch.testing.assert_close(tiled, w[:, [0, 1, 2, 0, 1]] * (3 / 5))
    torch.testing.assert_close(adapt_kernel_channels(w, 1, "tile"), w[:, :1] * 3.0)


def test_load_adapts_depth_and_channels_on_request_and_reports_it():
    sd = _file(in_ch=3, depth=3)
    model = Toy(in_ch=1, depth=7)
    report = load_state_dict_with_report(model, sd, source="plain", adapt_stem="center_pad+average")
    assert report.adapted == [
        ("stem.weight", "depth 3->7 (center_pad); input channels 3->1 (average); file [4, 3, 3, 5, 5] -> model "
                        "[4, 1, 7, 5, 5]")
    ]
    expected = F.pad(sd["stem.weight"].mean(dim=1, keepdim=True), (0, 0, 0, 0, 2, 2))
    assert torch.equal(model.stem.weight.detach(), expected)
    assert report.coverage == 1.0 and report.mismatched == []


def test_a_stem_of_another_depth_is_refused_without_a_rule_with_the_fix_named():
    with pytest.raises(CheckpointMismatchError, match=r"stem.weight is a kernel of another depth: "
                                                      r"adapt_stem='center_pad' or 'interpolate'"):
        load_state_dict_with_report(Toy(in_ch=3, depth=7), _file(in_ch=3, depth=3), source="plain")


def test_skip_leaves_the_named_tensors_at_their_initial_values():
    sd = _file(in_ch=1, depth=7, seed=1)
    torch.manual_seed(5)
    model = Toy(in_ch=1, depth=7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_state_dict_with_report(model, sd, source="plain", skip=["body.0.*", "head.*"])
    after = model.state_dict()
    skipped = ["body.0.weight", "body.0.bias", "body.0.running_mean", "body.0.running_var", "head.weight", "head.bias"]
    assert report.skipped == skipped
    for k in skipped + ["body.0.num_batches_tracked"]:
        assert torch.equal(after[k], before[k]), k
    for k in ("stem.weight", "body.1.weight", "body.1.bias"):
        assert torch.equal(after[k], sd[k]), k
    assert report.encoder_loaded == 3 and report.encoder_total == 7
    assert report.to_dict()["skipped"] == skipped and "skipped          | 6: body.0.weight" in str(report)


def test_a_skip_pattern_that_matches_nothing_is_an_error():
    with pytest.raises(CheckpointMismatchError, match=r"skip pattern\(s\) 'fc.\*' match no tensor of the file"):
        load_state_dict_with_report(Toy(), _file(in_ch=1, depth=7), source="plain", skip=["fc.*"])


def test_a_half_precision_file_is_cast_and_the_cast_is_reported():
    sd = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in _file(in_ch=1, depth=7).items()}
    model = Toy()
    report = load_state_dict_with_report(model, sd, source="plain")
    assert report.cast == {"bfloat16->float32": 9}  # 7 encoder tensors and the head's two
    assert model.stem.weight.dtype == torch.float32
    assert torch.equal(model.stem.weight.detach(), sd["stem.weight"].float())
    assert "dtype cast       | 9 tensors bfloat16->float32" in str(report)


def _resnet_sd(in_ch=1, stem=(7, 7, 7)):
    return {
        "conv1.weight": torch.zeros(64, in_ch, *stem),
        "bn1.weight": torch.ones(64),
        "layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3, 3),
        "layer4.1.conv2.weight": torch.zeros(512, 512, 3, 3, 3),
    }


def test_a_state_dict_meta_container_is_vdt_only_when_its_keys_say_so():
    # the case: a torchvision-style 3D ResNet (3-channel 3x7x7 stem, bottlenecks) saved as {state_dict, meta}
    other = {**_resnet_sd(3, (3, 7, 7)), "layer1.0.conv3.weight": torch.zeros(256, 64, 1, 1, 1), "fc.weight": torch.zeros(400, 2048)}
    sd, source = convert({"state_dict": other, "meta": {"epoch": 90}})
    assert source.name == "plain" and set(sd) == set(other)
    # even a one-channel ResNet-18 (VDT's shapes) is not VDT's without the keys of an mmcls classifier
    assert convert({"meta": {}, "state_dict": _resnet_sd()})[1].name == "plain"
    # VDT's signature: the mmcls classifier's module names, backbone. and head.
    sd, source = convert({"meta": {}, "state_dict": {f"backbone.{k}": v for k, v in _resnet_sd().items()}})
    assert source.name == "mmcv" and set(sd) == set(_resnet_sd())
    sd, source = convert({"meta": {}, "state_dict": {**_resnet_sd(), "head.fc.weight": torch.zeros(2, 512)}})
    assert source.name == "mmcv" and "fc.weight" in sd


def test_resnet_keys_alone_are_not_medicalnet():
    module = {f"module.{k}": v for k, v in _resnet_sd().items()}
    assert convert({"state_dict": module})[1].name == "medicalnet"
    # Kinetics 3D-ResNets (Hara et al.) save {'epoch', 'arch', 'state_dict' (module.), 'optimizer'}
    sd, source = convert({"epoch": 200, "arch": "resnet-50", "state_dict": module, "optimizer": {}})
    assert source.name == "plain" and set(sd) == set(_resnet_sd())
    assert convert({"state_dict": _resnet_sd()})[1].name == "plain"


def test_create_model_adapts_a_shallow_stem_into_a_deeper_one(tmp_path):
    torch.manual_seed(0)
    ref = mt.create_model("resnet3d_18", task="features", stem_depth=3)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    model = mt.create_model("resnet3d_18", task="features", stem_depth=7, pretrained=path, adapt_stem="interpolate")
    report = model.load_report
    assert report.coverage == 1.0
    assert report.adapted == [("conv1.weight", "depth 3->7 (interpolate); file [64, 1, 3, 7, 7] -> model [64, 1, 7, 7, 7]")]
    torch.testing.assert_close(model.conv1.weight.detach(), adapt_kernel_depth(ref.conv1.weight.detach(), 7, "interpolate"))
    with pytest.raises(ValueError, match="adapt_stem 'pad'"):
        mt.create_model("resnet3d_18", task="features", pretrained=path, adapt_stem="pad")


def test_finetune_config_carries_adapt_stem_and_skip_to_the_load(tmp_path):
    from medtransfer.errors import MedTransferError
    from medtransfer.train.config import validate
    from medtransfer.train.finetune import check_weights

    torch.manual_seed(0)
    path = tmp_path / "r18.pth"
    torch.save(mt.create_model("resnet3d_18", task="features", stem_depth=3).state_dict(), path)
    model = {"name": "resnet3d_18", "pretrained": str(path), "arch": {"stem_depth": 7}}
    with pytest.raises(CheckpointMismatchError, match="adapt_stem='center_pad' or 'interpolate'"):
        check_weights(validate({"model": model}))
    check_weights(validate({"model": {**model, "adapt_stem": "center_pad", "skip": ["layer4.*"]}}))
    with pytest.raises(CheckpointMismatchError, match=r"skip pattern\(s\) 'head.\*' match no tensor"):
        check_weights(validate({"model": {**model, "adapt_stem": "center_pad", "skip": ["head.*"]}}))
    with pytest.raises(MedTransferError, match=r"model.adapt_stem: .*adapt_stem 'pad': give at most one depth rule"):
        validate({"model": {**model, "adapt_stem": "pad"}})


def test_load_checkpoint_takes_the_same_options_and_notes(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "r18.pth"
    torch.save(mt.create_model("resnet3d_18", task="features", stem_depth=3).state_dict(), path)
    model = mt.create_model("resnet3d_18", task="features")
    report = mt.load_checkpoint(model, path, adapt_stem="center_pad", skip=["layer4.*"])
    assert report.adapted[0][1].startswith("depth 3->7 (center_pad)")
    assert report.skipped and all(k.startswith("layer4.") for k in report.skipped)
    assert report.notes[-1].startswith("networks of this depth the file fits, best first (encoder coverage): ")
