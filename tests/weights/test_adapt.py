"""The load/adapt/report machinery on a toy model, so that it is tested independently of the zoo's networks."""

import pytest
import torch
from torch import nn

from medtransfer.errors import CheckpointMismatchError
from medtransfer.weights.adapt import LoadReport, load_state_dict_with_report


class Toy(nn.Module):
    encoder_prefixes = ("stem.", "body.")
    first_conv_keys = ("stem.weight",)

    def __init__(self, in_ch=1, classes=2):
        super().__init__()
        self.stem = nn.Conv3d(in_ch, 4, 3, padding=1, bias=False)
        self.body = nn.Sequential(nn.BatchNorm3d(4), nn.Conv3d(4, 4, 1))
        self.head = nn.Linear(4, classes)


def _reference(in_ch=1, classes=2, seed=1):
    torch.manual_seed(seed)
    return Toy(in_ch, classes).state_dict()


def test_full_load_reports_everything_and_copies_values():
    sd = _reference()
    model = Toy()
    report = load_state_dict_with_report(model, sd, source="plain", model_name="toy")
    assert isinstance(report, LoadReport)
    counted = [k for k in sd if not k.endswith("num_batches_tracked")]
    assert sorted(report.loaded) == sorted(counted)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert report.coverage == 1.0 and report.encoder_total == 7  # stem.w, bn(w,b,rm,rv), conv(w,b)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    text = str(report)
    assert "encoder coverage | 100.0% (7/7 tensors)" in text and "source" in text


def test_head_of_another_class_count_is_skipped_and_reported():
    sd = _reference(classes=5)
    model = Toy(classes=3)
    before = model.head.weight.clone()
    report = load_state_dict_with_report(model, sd, source="plain")
    assert report.mismatched == [("head.weight", (5, 4), (3, 4)), ("head.bias", (5,), (3,))]
    assert report.missing == ["head.weight", "head.bias"]
    assert report.coverage == 1.0
    assert torch.equal(model.head.weight, before)


def test_input_convolution_is_adapted_to_the_channel_count():
    sd = _reference(in_ch=3)
    model = Toy(in_ch=1)
    report = load_state_dict_with_report(model, sd, source="plain")
    assert report.adapted == [("stem.weight", "input channels 3->1")]
    torch.testing.assert_close(model.stem.weight, sd["stem.weight"].mean(dim=1, keepdim=True))


def test_2d_kernels_are_inflated_into_3d():
    sd = _reference()
    sd["stem.weight"] = torch.randn(4, 3, 3, 3)  # a 2D RGB stem
    model = Toy(in_ch=1)
    report = load_state_dict_with_report(model, sd, source="plain", inflate="centre")
    assert report.adapted == [("stem.weight", "inflated 2D->3D (centre, depth 3); input channels 3->1")]
    torch.testing.assert_close(model.stem.weight[:, :, 1], sd["stem.weight"].mean(dim=1, keepdim=True))
    assert torch.count_nonzero(model.stem.weight[:, :, 0]) == 0


def test_nothing_of_the_encoder_loads_is_an_error_and_the_model_is_unchanged():
    model = Toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    foreign = {"encoder_q.conv1.weight": torch.zeros(4, 1, 3, 3, 3), "head.weight": torch.zeros(2, 4)}
    with pytest.raises(CheckpointMismatchError, match="no encoder weights of 'toy'.*encoder_q.conv1.weight"):
        load_state_dict_with_report(model, foreign, source="plain", model_name="toy", path="x.pth")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_encoder_tensor_of_another_shape_means_another_architecture():
    sd = _reference()
    sd["body.1.weight"] = torch.zeros(4, 4, 3, 3, 3)
    with pytest.raises(CheckpointMismatchError, match=r"body\.1\.weight: file \[4, 4, 3, 3, 3\] vs model \[4, 4, 1, 1, 1\]"):
        load_state_dict_with_report(Toy(), sd, source="plain")


def test_min_coverage_turns_a_partial_load_into_an_error():
    sd = {k: v for k, v in _reference().items() if not k.startswith("body.1")}
    report = load_state_dict_with_report(Toy(), sd, source="plain")
    assert report.coverage == pytest.approx(5 / 7)
    assert report.missing == ["body.1.weight", "body.1.bias"]
    with pytest.raises(CheckpointMismatchError, match=r"coverage 71\.4% is below min_coverage=100\.0%"):
        load_state_dict_with_report(Toy(), sd, source="plain", min_coverage=1.0)


def test_unexpected_keys_are_reported():
    sd = _reference()
    sd["queue"] = torch.zeros(3)
    report = load_state_dict_with_report(Toy(), sd, source="plain")
    assert report.unexpected == ["queue"]
    assert report.to_dict()["unexpected"] == ["queue"]
