"""Med3D-style multi-dataset pretraining: shared encoder + per-dataset conv_seg heads, downsampled CE, the
interleaving loader, and the MedicalNet-layout export."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import medtransfer as mt
from medtransfer.pretext.multi_dataset import (
    ConvSegHead,
    DownsampledCE,
    MultiDatasetLoader,
    MultiDatasetNet,
    export_medicalnet,
)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    encoder = mt.create_model("medicalnet_resnet10", task="features")
    return MultiDatasetNet(encoder, head_classes=[2, 5, 3])


def test_each_head_has_its_class_count_at_input_over_4(net):
    assert net.feature_channels == 512 and net.head_classes == (2, 5, 3)
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    net.eval()
    with torch.no_grad():
        shapes = [tuple(net(x, head=k).shape) for k in range(3)]
    assert shapes == [(1, 2, 4, 4, 4), (1, 5, 4, 4, 4), (1, 3, 4, 4, 4)]
    # an explicit feature_channels gives the same heads without the dry run
    explicit = MultiDatasetNet(mt.create_model("medicalnet_resnet10", task="features"), [4], feature_channels=512)
    assert explicit.heads[0][0].in_channels == 512 and explicit.heads[0][6].out_channels == 4


def test_forward_uses_the_chosen_head_only(net):
    net.train()
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    for k in range(3):
        net.zero_grad(set_to_none=True)
        net(x, head=k).square().mean().backward()
        for j, head in enumerate(net.heads):
            grads = [p.grad for p in head.parameters()]
            if j == k:
                assert all(g is not None for g in grads)
            else:
                assert all(g is None for g in grads)
        assert all(p.grad is not None for p in net.encoder.parameters())


def test_conv_seg_head_has_the_official_keys_and_loads_into_conv_seg():
    model = mt.create_model("medicalnet_resnet10", task="segmentation", num_classes=3)
    head = ConvSegHead(512, 3)
    own = {k: v.shape for k, v in model.conv_seg.state_dict().items()}
    assert {k: v.shape for k, v in head.state_dict().items()} == own
    model.conv_seg.load_state_dict(head.state_dict(), strict=True)
    assert len(ConvSegHead(512, 3, mid_channels=8)[0].weight) == 512  # (C_in, mid, 2, 2, 2)
    assert ConvSegHead(512, 3, mid_channels=8)[3].weight.shape == (8, 8, 3, 3, 3)


def test_downsampled_ce_equals_ce_on_the_nearest_downsampled_label():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 4, 4, 4, generator=g)
    label = torch.randint(0, 3, (2, 16, 16, 16), generator=g)
    small = label[:, ::4, ::4, ::4]  # nearest with factor 4 takes voxel 4i
    loss = DownsampledCE()(logits, label)
    assert torch.equal(loss, F.cross_entropy(logits, small))
    by_hand = -F.log_softmax(logits, dim=1).gather(1, small.unsqueeze(1)).mean()
    torch.testing.assert_close(loss, by_hand, rtol=1e-6, atol=1e-6)
    # (N, 1, *S) layout, and a non-integer factor: 10 -> 4 takes floor(i * 2.5) = 0, 2, 5, 7
    assert torch.equal(DownsampledCE()(logits, label.unsqueeze(1)), loss)
    label10 = torch.randint(0, 3, (2, 10, 10, 10), generator=g)
    idx = torch.tensor([0, 2, 5, 7])
    picked = label10[:, idx][:, :, idx][:, :, :, idx]
    assert torch.equal(DownsampledCE()(logits, label10), F.cross_entropy(logits, picked))


def test_downsampled_ce_keeps_ignore_index_and_rejects_bad_labels():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 2, 2, 2, 2, generator=g)
    label = torch.randint(0, 2, (1, 8, 8, 8), generator=g)
    label[:, :4] = -1
    small = label[:, ::4, ::4, ::4]
    assert (small == -1).sum() == 4
    assert torch.equal(DownsampledCE(ignore_index=-1)(logits, label), F.cross_entropy(logits, small, ignore_index=-1))
    with pytest.raises(ValueError, match="integer label map"):
        DownsampledCE()(logits, label.float())
    with pytest.raises(ValueError, match=r"label shape \(2, 8, 8, 8\) does not fit"):
        DownsampledCE()(logits, torch.zeros(2, 8, 8, 8, dtype=torch.long))


class _Tagged(Dataset):
    """Items tagged with (dataset, index); records the epochs it was told."""

    def __init__(self, tag: int, n: int):
        self.tag, self.n, self.epochs = tag, n, []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": torch.zeros(1), "label": torch.tensor(i), "tag": self.tag}


def test_loader_yields_every_batch_once_with_its_head_in_a_seeded_order():
    sizes = (3, 5, 2)
    lists = [[{"image": torch.zeros(1), "label": torch.tensor(0), "id": (k, b)} for b in range(n)]
             for k, n in enumerate(sizes)]  # fmt: skip
    loader = MultiDatasetLoader(lists, seed=7)
    assert len(loader) == 10
    orders = []
    for epoch in range(4):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert sorted(b["id"] for b in batches) == sorted((k, b) for k, n in enumerate(sizes) for b in range(n))
        assert all(b["head"] == b["id"][0] for b in batches)
        # each loader's own batches keep their order
        for k in range(3):
            assert [b["id"][1] for b in batches if b["head"] == k] == list(range(sizes[k]))
        orders.append([b["head"] for b in batches])
        assert orders[-1] == loader.order(epoch)
    assert len({tuple(o) for o in orders}) == 4  # 2520 possible interleavings; four epochs differ
    again = MultiDatasetLoader(lists, seed=7)
    again.set_epoch(2)
    assert [b["head"] for b in again] == orders[2]
    assert MultiDatasetLoader(lists, seed=8).order(2) != orders[2]
    assert "head" not in lists[0][0]  # the inner batches are not modified


def test_loader_forwards_set_epoch_to_datasets_and_samplers():
    class EpochSampler(torch.utils.data.SequentialSampler):
        epochs: list

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

    datasets = [_Tagged(0, 4), _Tagged(1, 2)]
    samplers = [EpochSampler(d) for d in datasets]
    for s in samplers:
        s.epochs = []
    loaders = [DataLoader(d, batch_size=2, sampler=s) for d, s in zip(datasets, samplers)]
    loader = MultiDatasetLoader(loaders, seed=0)
    loader.set_epoch(3)
    assert [d.epochs for d in datasets] == [[3], [3]] and [s.epochs for s in samplers] == [[3], [3]]
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    for b in batches:
        assert b["tag"].tolist() == [b["head"]] * len(b["tag"])


def test_loader_rejects_bad_arguments_and_short_loaders():
    with pytest.raises(ValueError, match="non-empty sequence"):
        MultiDatasetLoader([])
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        MultiDatasetLoader([[{}]], seed=-1)

    class Liar(list):
        def __len__(self):
            return 3

    with pytest.raises(RuntimeError, match="stopped before the 3 batches"):
        list(MultiDatasetLoader([Liar([{"image": 0}])]))


def test_encoder_state_dict_has_the_zoo_keys(net):
    reference = mt.create_model("medicalnet_resnet10", task="features").state_dict()
    assert list(net.encoder_state_dict()) == list(reference)


def test_medicalnet_export_loads_back_with_full_encoder_coverage(net, tmp_path):
    path = export_medicalnet(net, tmp_path / "resnet_10_pretext.pth")
    raw = torch.load(path, weights_only=True)
    assert list(raw) == ["state_dict"]
    keys = list(raw["state_dict"])
    assert all(k.startswith("module.") for k in keys) and not any("conv_seg" in k for k in keys)
    model = mt.create_model("medicalnet_resnet10", task="segmentation", pretrained=path)
    report = model.load_report
    assert report.source == "medicalnet" and report.coverage == 1.0 and report.unexpected == []
    assert report.missing and all(k.startswith("conv_seg.") for k in report.missing)
    mine = net.encoder_state_dict()
    theirs = model.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    # a state_dict (already DataParallel-prefixed) and a zoo model with a head export the same encoder
    again = export_medicalnet({f"module.{k}": v for k, v in mine.items()}, tmp_path / "b.pth")
    assert list(torch.load(again, weights_only=True)["state_dict"]) == keys
    from_model = export_medicalnet(model, tmp_path / "c.pth")
    assert list(torch.load(from_model, weights_only=True)["state_dict"]) == keys


def test_multi_dataset_net_rejects_bad_arguments(net):
    with pytest.raises(ValueError, match=r"head must be an integer in \[0, 2\], got 3"):
        net(torch.zeros(1, 1, 16, 16, 16), head=3)
    with pytest.raises(ValueError, match="head_classes must be a non-empty sequence"):
        MultiDatasetNet(net.encoder, [])
    with pytest.raises(ValueError, match=r"head_classes\[1\] must be a positive integer, got 0"):
        MultiDatasetNet(net.encoder, [2, 0], feature_channels=512)
    classifier = mt.create_model("medicalnet_resnet10", task="classification", num_classes=2)
    with pytest.raises(ValueError, match="5-D feature map"):
        MultiDatasetNet(classifier, [2])
    with pytest.raises(ValueError, match="net_or_encoder_state must be"):
        export_medicalnet(42, "x.pth")
