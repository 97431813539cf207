import pytest
import torch
import torch.nn.functional as F

from medtransfer.weights.inflate import adapt_input_channels, inflate_conv_weight


def test_i3d_inflation_reproduces_2d_response_on_a_stack_of_identical_slices(seeded):
    w2 = torch.randn(4, 2, 3, 3, generator=seeded)
    image = torch.randn(1, 2, 8, 8, generator=seeded)
    w3 = inflate_conv_weight(w2, depth=3, mode="i3d")
    assert w3.shape == (4, 2, 3, 3, 3)
    volume = image.unsqueeze(2).repeat(1, 1, 5, 1, 1)
    out3 = F.conv3d(volume, w3, padding=(0, 1, 1))  # no depth padding: every output slice sees 3 equal slices
    out2 = F.conv2d(image, w2, padding=1)
    for d in range(out3.shape[2]):
        torch.testing.assert_close(out3[:, :, d], out2, rtol=1e-5, atol=1e-5)


def test_centre_inflation_applies_the_2d_kernel_slice_by_slice(seeded):
    w2 = torch.randn(3, 1, 3, 3, generator=seeded)
    w3 = inflate_conv_weight(w2, depth=5, mode="centre")
    assert torch.equal(w3[:, :, 2], w2)
    assert torch.count_nonzero(w3[:, :, [0, 1, 3, 4]]) == 0
    volume = torch.randn(1, 1, 4, 6, 6, generator=seeded)
    out3 = F.conv3d(volume, w3, padding=(2, 1, 1))
    for d in range(4):
        torch.testing.assert_close(out3[:, :, d], F.conv2d(volume[:, :, d], w2, padding=1), rtol=1e-5, atol=1e-5)


def test_inflation_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown inflation mode 'bogus'"):
        inflate_conv_weight(torch.zeros(1, 1, 3, 3), 3, "bogus")
    with pytest.raises(ValueError, match=r"got shape \(1, 1, 3, 3, 3\)"):
        inflate_conv_weight(torch.zeros(1, 1, 3, 3, 3), 3)


def test_to_one_channel_is_the_mean_over_input_channels():
    w = torch.arange(2 * 3 * 1 * 1, dtype=torch.float32).reshape(2, 3, 1, 1)
    out = adapt_input_channels(w, 1)
    assert out.shape == (2, 1, 1, 1)
    assert out.flatten().tolist() == [1.0, 4.0]  # mean(0,1,2), mean(3,4,5)


def test_more_channels_keep_the_response_to_a_replicated_image(seeded):
    w = torch.randn(4, 3, 3, 3, generator=seeded)
    image = torch.randn(1, 1, 7, 7, generator=seeded)
    wide = adapt_input_channels(w, 6)
    assert wide.shape == (4, 6, 3, 3)
    ref = F.conv2d(image.repeat(1, 3, 1, 1), w)
    torch.testing.assert_close(F.conv2d(image.repeat(1, 6, 1, 1), wide), ref, rtol=1e-4, atol=1e-4)
    # a count that is not a multiple: channel c is channel c mod 3 of the original, scaled by 3/7
    odd = adapt_input_channels(w, 7)
    assert odd.shape == (4, 7, 3, 3)
    torch.testing.assert_close(odd[:, 4], w[:, 1] * 3 / 7)
