"""Patch sampling and stride padding: positions, determinism, foreground frequency, exact pad/unpad."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medtransfer.data.sampling import PadSpec, balanced_crop, pad_to_multiple, random_crop, unpad
from medtransfer.errors import MedTransferError


def ramp(shape) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def start_of(patch: np.ndarray, volume: np.ndarray) -> tuple[int, ...]:
    """Where a crop of ``ramp`` came from: its first value is the flat index of its corner."""
    return tuple(int(i) for i in np.unravel_index(int(patch.flat[0]), volume.shape))


def test_random_crop_is_a_block_of_the_volume_at_the_same_place_in_the_label():
    image = ramp((10, 12, 14))
    label = (image % 3).astype(np.uint8)
    rng = np.random.default_rng(0)
    starts = []
    for _ in range(200):
        patch, lab = random_crop(image, label, (4, 5, 6), rng)
        z, y, x = start_of(patch, image)
        starts.append((z, y, x))
        np.testing.assert_array_equal(patch, image[z:z + 4, y:y + 5, x:x + 6])
        np.testing.assert_array_equal(lab, label[z:z + 4, y:y + 5, x:x + 6])
    starts_a = np.array(starts)
    np.testing.assert_array_equal(starts_a.min(axis=0), [0, 0, 0])
    np.testing.assert_array_equal(starts_a.max(axis=0), [6, 7, 8])  # every valid start is reachable


def test_crops_are_deterministic_given_the_generator():
    image = ramp((9, 9, 9))
    label = (image > 600).astype(np.uint8)
    draw = lambda seed: [balanced_crop(image, label, 4, np.random.default_rng(seed))[0] for _ in range(5)]
    for a, b in zip(draw(7), draw(7)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(draw(7), draw(8)))


def test_a_volume_smaller_than_the_patch_is_padded_centred():
    image = np.ones((4, 10, 3), dtype=np.float32)
    label = np.ones((4, 10, 3), dtype=np.uint8)
    patch, lab = random_crop(image, label, (8, 8, 8), np.random.default_rng(0), value=-1.0)
    assert patch.shape == lab.shape == (8, 8, 8)
    # axis 0: 4 voxels in 8 -> 2 before, 2 after; axis 2: 3 in 8 -> 3 before, 2 after
    np.testing.assert_array_equal(patch[:, 0, :].sum(axis=1) > -8, [False, False, True, True, True, True, False, False])
    np.testing.assert_array_equal(np.flatnonzero(lab[3, 3]), [3, 4, 5])
    assert patch.min() == -1.0 and lab.sum() == 4 * 8 * 3


def test_channels_ride_along_and_memmaps_come_back_as_arrays(tmp_path):
    image = ramp((2, 6, 6, 6))
    np.save(tmp_path / "x.npy", image)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    label = np.zeros((6, 6, 6), np.uint8)
    patch, lab = random_crop(mm, label, 3, np.random.default_rng(1))  # an int size covers the label's axes
    assert patch.shape == (2, 3, 3, 3) and lab.shape == (3, 3, 3)
    assert type(patch) is np.ndarray
    np.testing.assert_array_equal(patch[1] - patch[0], 216.0)


def test_balanced_crop_hits_foreground_with_the_requested_frequency():
    shape, size = (20, 20, 20), (8, 8, 8)
    label = np.zeros(shape, np.uint8)
    label[2, 2, 2] = 1  # a random crop holds it only when every start is in 0..2 of 0..12
    image = np.zeros(shape, np.float32)
    p_random = (3 / 13) ** 3
    rng = np.random.default_rng(123)
    n = 3000
    hits = sum(balanced_crop(image, label, size, rng, fg_ratio=0.33)[1].any() for _ in range(n))
    expected = 0.33 + (1 - 0.33) * p_random
    assert abs(hits / n - expected) < 0.03  # 3.5 standard deviations
    # fg_ratio 1: always, even for a voxel in the corner (the patch is moved inside the volume)
    corner = np.zeros(shape, np.uint8)
    corner[19, 0, 19] = 2
    assert all(balanced_crop(image, corner, size, rng, fg_ratio=1.0)[1][7, 0, 7] == 2 for _ in range(50))


def test_balanced_crop_centres_the_foreground_voxel_away_from_edges():
    image = ramp((16, 16, 16))
    label = np.zeros((16, 16, 16), np.uint8)
    label[8, 9, 10] = 1
    patch, lab = balanced_crop(image, label, (4, 4, 4), np.random.default_rng(0), fg_ratio=1.0)
    assert start_of(patch, image) == (6, 7, 8)  # centre - size // 2
    assert lab[2, 2, 2] == 1


def test_balanced_crop_on_an_empty_label_falls_back_to_random():
    image = ramp((8, 8, 8))
    patch, lab = balanced_crop(image, np.zeros((8, 8, 8), np.uint8), 4, np.random.default_rng(0), fg_ratio=1.0)
    assert patch.shape == (4, 4, 4) and not lab.any()
    with pytest.raises(MedTransferError, match="fg_ratio=1.5"):
        balanced_crop(image, None, 4, np.random.default_rng(0), fg_ratio=1.5)


def test_pad_to_multiple_and_unpad_round_trip_exactly():
    x = np.random.default_rng(0).normal(size=(5, 7, 9)).astype(np.float32)
    padded, spec = pad_to_multiple(x, 8, value=-3.0)
    assert padded.shape == (8, 8, 16)
    assert spec == PadSpec(((1, 2), (0, 1), (3, 4)), (5, 7, 9))
    assert padded[0, 0, 0] == -3.0
    np.testing.assert_array_equal(unpad(padded, spec), x)
    # a prediction with another channel count unpads with the same spec
    prediction = np.stack([padded, padded * 2, padded * 3])
    np.testing.assert_array_equal(unpad(prediction, spec)[2], x * 3)
    # already a multiple: nothing added
    same, spec0 = pad_to_multiple(x, (5, 7, 9))
    assert same is x and spec0.pads == ((0, 0),) * 3


def test_pad_modes_channels_and_torch_tensors():
    x = np.arange(6.0).reshape(1, 2, 3)  # a channel-first 2D image
    padded, spec = pad_to_multiple(x, (4, 4), mode="edge")
    assert padded.shape == (1, 4, 4)
    np.testing.assert_array_equal(padded[0, :, 0], [0.0, 0.0, 3.0, 3.0])
    np.testing.assert_array_equal(unpad(padded, spec), x)
    t = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6)
    for mode in ("constant", "edge", "reflect"):
        tp, tspec = pad_to_multiple(t, 4, mode=mode)
        assert tuple(tp.shape) == (2, 4, 8, 8)
        assert torch.equal(unpad(tp, tspec), t)
    edge_np, _ = pad_to_multiple(t.numpy(), 4, mode="edge")
    np.testing.assert_array_equal(pad_to_multiple(t, 4, mode="edge")[0].numpy(), edge_np)
    with pytest.raises(MedTransferError, match="padding mode 'wrap'"):
        pad_to_multiple(x, 4, mode="wrap", spatial_dims=2)
