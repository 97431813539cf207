"""RetinaNet on zoo encoders: pyramid levels per family, packed output, loss going down, postprocess conventions."""

import math

import pytest
import torch

from medtransfer.errors import MedTransferError
from medtransfer.train.detector import build_detector, pad_targets, targets_from_padded, unpack


def _boxes_3d():
    return pad_targets([torch.tensor([[4.0, 4, 4, 12, 12, 12]]), torch.zeros(0, 6)],
                       [torch.tensor([1]), torch.zeros(0)])


@pytest.mark.parametrize("name, levels, strides", [
    # dilated MedicalNet: layer2..4 all at stride 8 -> layer1 and the deepest stride-8 map (layer4)
    ("medicalnet_resnet10", [1, 4], [(4, 4, 4), (8, 8, 8)]),
    # VDT's R3D-18 keeps the depth (temporal stride 1)
    ("vdt_resnet18_3d", [1, 2, 3], [(1, 4, 4), (1, 8, 8), (1, 16, 16)]),
    ("genesis_unet3d", [2, 3], [(4, 4, 4), (8, 8, 8)]),
    ("fmunet", [2, 3, 4], [(4, 4, 4), (8, 8, 8), (16, 16, 16)]),
])
def test_3d_backbones_shapes(name, levels, strides):
    torch.manual_seed(0)
    model, loss_fn, post = build_detector(name, spatial_dims=3, detector={"fpn_channels": 32})
    assert model.pyramid.indices == levels and model.pyramid.strides == strides
    out = model(torch.randn(2, 1, 32, 32, 32))
    n_anchor = sum(math.prod(32 // s for s in st) for st in strides) * 3
    assert out.shape == (2, n_anchor + 1, 1 + 4 * 3 + 1)
    u = unpack(out, 1, 3)
    assert u["image_size"] == [32, 32, 32] and sum(u["counts"]) == n_anchor
    loss = loss_fn(out, _boxes_3d())
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.encoder_prefixes and all(p.startswith("pyramid.encoder.") for p in model.encoder_prefixes)


def test_2d_resnet50_on_nine_slices():
    model, loss_fn, post = build_detector("resnet50_2d", spatial_dims=2, in_channels=9,
                                          detector={"fpn_channels": 32, "anchor_scale": 4})
    assert model.pyramid.strides == [(4, 4), (8, 8), (16, 16)]
    assert model.encoder.conv1.weight.shape[1] == 9  # the stem takes the K slices as channels
    out = model(torch.randn(2, 9, 64, 64))
    assert out.shape == (2, (16 * 16 + 8 * 8 + 4 * 4) * 3 + 1, 1 + 8 + 1)
    # mmdet-style anchors, scale 4: side 16 (ratio 1) at the stride-4 level, centred on the first cell [0, 4)
    anchors = unpack(out, 1, 2)["anchors"]
    assert anchors[1].tolist() == [-6.0, -6.0, 10.0, 10.0]
    target = pad_targets([torch.tensor([[10.0, 10, 30, 30]]), torch.tensor([[0.0, 0, 8, 8], [40, 40, 60, 60]])],
                         [torch.tensor([1]), torch.tensor([1, 1])])
    assert torch.isfinite(loss_fn(out, target))
    boxes, scores, labels = post(out)[0]
    assert boxes.shape[1] == 4


def test_pretrained_encoder_load_report(tmp_path):
    from medtransfer.zoo.builder import create_model

    src = create_model("medicalnet_resnet10", task="features")
    path = tmp_path / "enc.pt"
    torch.save(src.state_dict(), path)
    model, _, _ = build_detector("medicalnet_resnet10", spatial_dims=3, pretrained=str(path),
                                 detector={"fpn_channels": 32})
    assert model.load_report is not None and model.load_report.coverage == 1.0
    assert torch.equal(model.encoder.conv1.weight, src.conv1.weight)


def test_postprocess_returns_anchor_box_in_corner_mode():
    model, _, post = build_detector("medicalnet_resnet10", spatial_dims=3,
                                    detector={"fpn_channels": 32, "score_thresh": 0.5})
    out = model(torch.zeros(1, 1, 32, 32, 32)).detach().clone()
    u = unpack(out, 1, 3)
    out[:, :-1, 0] = -20.0  # every anchor background ...
    out[:, :-1, 1:7] = 0.0  # ... and no box offset
    k = 100
    out[0, k, 0] = 3.0  # ... except one
    boxes, scores, labels = post(out)[0]
    assert boxes.tolist() == [u["anchors"][k].clamp(0, 32).tolist()]
    assert scores.tolist() == pytest.approx([torch.sigmoid(torch.tensor(3.0)).item()])
    assert labels.tolist() == [1]  # 1-based, as the targets
    # a smaller image shape clips the box
    boxes, _, _ = post(out, (16, 16, 16))[0]
    assert float(boxes.max()) <= 16


def test_bright_cube_training_lowers_loss():
    torch.manual_seed(0)
    model, loss_fn, _ = build_detector("medicalnet_resnet10", spatial_dims=3, detector={"fpn_channels": 32})
    gen = torch.Generator().manual_seed(1)

    def batch():
        images, boxes = torch.randn(2, 1, 32, 32, 32, generator=gen) * 0.1, []
        for i in range(2):
            lo = torch.randint(2, 20, (3,), generator=gen)
            images[i, 0, lo[0]:lo[0] + 8, lo[1]:lo[1] + 8, lo[2]:lo[2] + 8] += 2.0
            boxes.append(torch.cat([lo, lo + 8]).float()[None])
        return images, pad_targets(boxes, [torch.tensor([1])] * 2)

    data = [batch() for _ in range(2)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for step in range(8):
        x, t = data[step % 2]
        loss = loss_fn(model(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-2:]) < 0.8 * sum(losses[:2]), losses


def test_bad_targets_are_refused():
    with pytest.raises(ValueError, match=r"\(B, Nmax, 7\)"):
        targets_from_padded(torch.zeros(1, 2, 5), 3)
    with pytest.raises(MedTransferError, match="zero or negative size"):
        targets_from_padded(torch.tensor([[[4.0, 4, 4, 4, 8, 8, 1]]]), 3)
    with pytest.raises(MedTransferError, match="unknown detector option"):
        build_detector("medicalnet_resnet10", spatial_dims=3, detector={"fpn_chanels": 8})
