"""Sliding-window inference: same logits as one forward pass, divisor padding, geometry kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import medtransfer as mt
from medtransfer.data.io import read_image, write_image
from medtransfer.data.types import Image
from medtransfer.train.inference import logits_to_labels, predict_volume, sliding_window_predict


def _pointwise(dims: int, in_ch: int = 1, out_ch: int = 2) -> nn.Module:
    """A 1x1(x1) convolution with fixed weights: each output voxel depends on its input voxel only."""
    conv = (nn.Conv3d if dims == 3 else nn.Conv2d)(in_ch, out_ch, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(1.0, 1 + out_ch * in_ch).view(out_ch, in_ch, *([1] * dims)) - 1.5)
        conv.bias.copy_(torch.linspace(-1, 1, out_ch))
    return conv


class NeedsMultipleOf8(nn.Module):
    """A stand-in for a strided network: refuses sizes not divisible by 8, and records its mode when called."""

    def __init__(self):
        super().__init__()
        self.conv = _pointwise(3)
        self.modes: list[bool] = []

    def forward(self, x):
        assert all(s % 8 == 0 for s in x.shape[2:]), x.shape
        self.modes.append(self.training)
        return self.conv(x)


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_sliding_window_equals_direct_forward_3d(mode):
    torch.manual_seed(0)
    model, x = _pointwise(3), torch.randn(2, 1, 20, 24, 28)
    out = sliding_window_predict(model, x, patch_size=(8, 16, 16), overlap=0.5, mode=mode, sw_batch_size=3)
    assert out.shape == (2, 2, 20, 24, 28) and out.dtype == torch.float32
    torch.testing.assert_close(out, model(x).detach(), atol=1e-5, rtol=1e-5)


def test_sliding_window_equals_direct_forward_2d():
    torch.manual_seed(0)
    model, x = _pointwise(2, in_ch=3, out_ch=4), torch.randn(1, 3, 37, 50)
    out = sliding_window_predict(model, x, patch_size=16, overlap=0.25)
    torch.testing.assert_close(out, model(x).detach(), atol=1e-5, rtol=1e-5)


def test_divisor_padding_round_trip_and_mode_restored():
    torch.manual_seed(0)
    model, x = NeedsMultipleOf8(), torch.randn(1, 1, 10, 12, 13)
    model.train()
    whole = sliding_window_predict(model, x, patch_size=None, divisor=8)  # one pass on 16x16x16, cropped back
    assert whole.shape == (1, 2, 10, 12, 13)
    torch.testing.assert_close(whole, model.conv(x).detach(), atol=1e-5, rtol=1e-5)
    windows = sliding_window_predict(model, torch.randn(1, 1, 20, 30, 17), patch_size=(8, 16, 16), divisor=8)
    assert windows.shape == (1, 2, 20, 30, 17)
    assert model.training and model.modes and not any(model.modes)  # eval inside, train mode given back
    assert not windows.requires_grad


def test_bad_arguments_are_refused():
    model = _pointwise(3)
    with pytest.raises(ValueError, match="multiple of divisor"):
        sliding_window_predict(model, torch.zeros(1, 1, 16, 16, 16), patch_size=12, divisor=8)
    with pytest.raises(ValueError, match="patch_size"):
        sliding_window_predict(model, torch.zeros(1, 1, 16, 16, 16), patch_size=(8, 8))
    with pytest.raises(ValueError, match="image must be"):
        sliding_window_predict(model, torch.zeros(16, 16, 16), patch_size=8)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_predict(model, torch.zeros(1, 1, 16, 16, 16), patch_size=8, overlap=1.0)


def test_logits_to_labels():
    logits = torch.tensor([[[0.1, -0.2, 3.0]]])  # one channel: logit > 0 is foreground
    assert logits_to_labels(logits[:, :, None]).tolist() == [[[1, 0, 1]]]
    two = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])[None]  # (1, 2, 1, 2)
    assert logits_to_labels(two).tolist() == [[[0, 1]]]


def test_predict_volume_keeps_geometry_and_writes_back_like_the_input(tmp_path):
    rng = np.random.default_rng(0)
    direction = np.diag([-1.0, 1.0, -1.0])[[0, 2, 1]]  # permuted and flipped: the reader reorients it
    raw = Image(
        array=rng.normal(size=(6, 9, 11)).astype(np.float32),
        spacing=(2.5, 0.8, 0.7),
        origin=(10.0, -20.0, 30.0),
        direction=direction,
    )
    path = write_image(raw, tmp_path / "scan.nii.gz")
    image = read_image(path)  # canonical orientation, original recorded in meta
    model = _pointwise(3)
    pred = predict_volume(model, image, patch_size=(4, 8, 8))
    assert pred.array.shape == image.spatial_shape and pred.array.dtype == np.uint8
    assert pred.spacing == image.spacing and pred.origin == image.origin
    np.testing.assert_array_equal(pred.direction, image.direction)
    x = torch.from_numpy(image.array)[None, None]
    np.testing.assert_array_equal(pred.array, model(x).argmax(1)[0].numpy())

    out = write_image(pred, tmp_path / "pred.nii.gz", like=image)
    back, orig = read_image(out, reorient=False), read_image(path, reorient=False)
    assert back.array.shape == orig.array.shape
    np.testing.assert_allclose(back.spacing, orig.spacing, atol=1e-5)
    np.testing.assert_allclose(back.origin, orig.origin, atol=1e-4)
    np.testing.assert_allclose(back.direction, orig.direction, atol=1e-6)
    expected = model(torch.from_numpy(orig.array)[None, None]).argmax(1)[0].numpy()
    np.testing.assert_array_equal(back.array, expected)  # voxel for voxel over the original scan


def test_zoo_model_runs_through_the_sliding_window():
    torch.manual_seed(0)
    model = mt.create_model("medicalnet_resnet10", num_classes=2)
    x = torch.randn(1, 1, 24, 40, 40)
    out = sliding_window_predict(model, x, patch_size=(16, 32, 32), overlap=0.5)
    assert out.shape == (1, 2, 24, 40, 40) and torch.isfinite(out).all()
    image = Image(array=x[0, 0].numpy(), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=np.eye(3))
    pred = predict_volume(model, image, patch_size=(16, 32, 32), overlap=0.25)
    assert pred.array.shape == (24, 40, 40) and set(np.unique(pred.array)) <= {0, 1}


def test_activation_estimate_of_a_pointwise_conv_is_exact():
    from medtransfer.train.inference import activation_bytes

    model = _pointwise(3, in_ch=1, out_ch=2)  # one leaf: 2 float32 outputs per voxel, plus the 1-channel input
    assert activation_bytes(model, (1, 1, 10, 12, 13)) == 12 * 10 * 12 * 13
    assert activation_bytes(model, (2, 1, 10, 12, 13), divisor=8) == 12 * 2 * 16 * 16 * 16  # padded, batch 2


def test_predict_case_runs_the_whole_volume_when_it_fits_else_windows(caplog):
    from medtransfer.train.inference import activation_bytes, predict_case

    torch.manual_seed(0)
    model, x = NeedsMultipleOf8(), torch.randn(1, 1, 20, 24, 28)
    direct = model(F.pad(x, (0, 4, 0, 0, 0, 4))).detach()[..., :20, :24, :28]
    assert activation_bytes(model, x.shape, divisor=8) == 12 * 24 * 24 * 32  # measured once, on a 16^3 probe
    calls = len(model.modes)
    whole, how = predict_case(model, x, window=(8, 8, 8), divisor=8, memory_gb=1.0)
    assert how == "whole" and len(model.modes) == calls + 1  # one forward pass
    torch.testing.assert_close(whole, direct, atol=1e-5, rtol=1e-5)
    calls = len(model.modes)
    windows, how = predict_case(model, x, window=(8, 8, 8), overlap=0.0, batch_size=2, divisor=8, memory_gb=0)
    assert how == "windows" and len(model.modes) - calls == 3 * 3 * 4 / 2  # 36 windows, 2 per pass
    torch.testing.assert_close(windows, direct, atol=1e-5, rtol=1e-5)
    with caplog.at_level("INFO", logger="medtransfer.train.inference"):
        _, how = predict_case(model, x, window=(8, 8, 8), divisor=8, memory_gb=1e-6)  # 1 KiB: too small
    assert how == "windows" and "budget" in caplog.text


class OutOfMemoryOnLargeInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = _pointwise(3)

    def forward(self, x):
        if x.shape[2:].numel() > 16**3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.conv(x)


def test_whole_volume_out_of_memory_falls_back_to_windows(caplog):
    from medtransfer.train.inference import activation_bytes, predict_case

    torch.manual_seed(0)
    model, x = OutOfMemoryOnLargeInputs(), torch.randn(1, 1, 24, 24, 24)
    activation_bytes(model, x.shape)  # measured on a 16^3 probe, which fits
    with caplog.at_level("WARNING"):
        out, how = predict_case(model, x, window=(8, 8, 8), overlap=0.5, memory_gb=1.0)
    assert how == "windows" and "out of CUDA memory" in caplog.text
    torch.testing.assert_close(out, model.conv(x).detach(), atol=1e-5, rtol=1e-5)
