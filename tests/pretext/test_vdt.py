"""VDT: the 2D image -> (1, C, s, s) volume transform, its dataset, loss and recipe, and the 2D->3D inflation path."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import medtransfer as mt
from medtransfer.data.datasets import load_dataset
from medtransfer.data.phantoms import write_phantom_dataset
from medtransfer.errors import CheckpointMismatchError
from medtransfer.pretext.vdt import (
    VDT_MEAN,
    VDT_RECIPE,
    VDT_STD,
    VDTImageDataset,
    VDTTransform,
    sample_crop_box,
    vdt_loss,
)
from medtransfer.train.config import DataConfig, OptimConfig, ScheduleConfig, TrainConfig
from medtransfer.weights.export import export_official


def _within(count: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def _rgb(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _norm(x: torch.Tensor) -> torch.Tensor:
    return (x.float() - VDT_MEAN) / VDT_STD


# a transform that neither crops nor flips: a square image of side `size` goes through untouched
def _no_geometry(size: int, **kw) -> VDTTransform:
    return VDTTransform(size=size, scale=(1, 1), ratio=(1, 1), flip_rate=0.0, **kw)


@pytest.mark.parametrize("train", [True, False])
def test_hwc_chw_and_grayscale_inputs_give_1_c_s_s_volumes(train):
    t = VDTTransform(size=8, train=train)
    g = torch.Generator().manual_seed(0)
    chw = _rgb(20, 24)
    hwc = chw.permute(1, 2, 0).numpy()
    gray = chw[0].numpy()
    for image in (chw, hwc, gray, chw.float(), np.ascontiguousarray(hwc[..., :1])):
        out = t(image, generator=g)
        assert out.shape == (1, 3, 8, 8) and out.dtype == torch.float32
    assert torch.equal(t(hwc, generator=torch.Generator().manual_seed(1)),
                       t(chw, generator=torch.Generator().manual_seed(1)))  # fmt: skip
    slices = t(gray, generator=g)[0]
    assert torch.equal(slices[0], slices[1]) and torch.equal(slices[1], slices[2])
    assert VDTTransform(size=8, channels=5, train=train)(gray, generator=g).shape == (1, 5, 8, 8)


def test_channel_shuffle_permutes_the_channels_at_its_rate():
    image = _rgb(6, 6)
    expected = _norm(image)
    n = 600
    for p in (1.0, 0.5):
        t = _no_geometry(6, channel_shuffle=p)
        g = torch.Generator().manual_seed(11)
        seen = {perm: 0 for perm in itertools.permutations(range(3))}
        for _ in range(n):
            out = t(image, generator=g)[0]
            # sorted over the channel axis: the same values at every pixel, only their order changed
            assert torch.equal(out.sort(dim=0).values, expected.sort(dim=0).values)
            perm = tuple(next(j for j in range(3) if torch.equal(out[i], expected[j])) for i in range(3))
            seen[perm] += 1
        changed = n - seen[(0, 1, 2)]
        assert _within(changed, n, p * 5 / 6)
        for perm, count in seen.items():
            if perm != (0, 1, 2):
                assert _within(count, n, p / 6)
    no_shuffle = _no_geometry(6, channel_shuffle=0.0)
    assert torch.equal(no_shuffle(image, generator=torch.Generator().manual_seed(0))[0], expected)


def test_normalisation_is_exact_on_a_constant_image():
    image = torch.full((3, 8, 8), 200, dtype=torch.uint8)
    want = (torch.tensor(200.0) - VDT_MEAN) / VDT_STD
    out = _no_geometry(8)(image, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, want.expand(1, 3, 8, 8))
    # eval: short side already round(7 * 256 / 224) = 8, so only the crop and the normalisation act
    out = VDTTransform(size=7, train=False)(image)
    assert torch.equal(out, want.expand(1, 3, 7, 7))
    nine = torch.full((3, 9, 9), 200, dtype=torch.uint8)  # short side round(8 * 256 / 224) = 9
    custom = VDTTransform(size=8, train=False, mean=100.0, std=50.0)(nine)
    assert torch.equal(custom, torch.full((1, 3, 8, 8), 2.0))


def test_eval_transform_is_deterministic_and_crops_the_centre():
    t = VDTTransform(size=7, train=False)
    image = _rgb(8, 12, seed=2)  # short side 8 = round(7 * 256 / 224): no resize
    out = t(image, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, t(image, generator=torch.Generator().manual_seed(99)))
    assert torch.equal(out, t(image))
    assert torch.equal(out[0], _norm(image[:, 0:7, 2:9]))
    # portrait, resized: 24 x 16 -> 12 x 8 (bilinear), then rows 2..8, columns 0..6
    tall = _rgb(24, 16, seed=3)
    resized = F.interpolate(tall[None].float(), size=(12, 8), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(t(tall)[0], _norm(resized[:, 2:9, 0:7]), rtol=0, atol=1e-5)


def test_flip_rate():
    image = _rgb(6, 6, seed=4)
    plain, flipped = _norm(image), _norm(image.flip(-1))
    n = 600
    for rate in (0.5, 0.2):
        t = _no_geometry(6, channel_shuffle=0.0)
        t.flip_rate = rate
        g = torch.Generator().manual_seed(5)
        outs = [t(image, generator=g)[0] for _ in range(n)]
        flips = sum(torch.equal(o, flipped) for o in outs)
        assert flips + sum(torch.equal(o, plain) for o in outs) == n
        assert _within(flips, n, rate)


def test_crop_boxes_respect_scale_ratio_and_the_image():
    g = torch.Generator().manual_seed(6)
    H, W = 40, 50
    fractions, aspects = [], []
    for _ in range(500):
        top, left, h, w = sample_crop_box(H, W, scale=(0.2, 0.6), ratio=(3 / 4, 4 / 3), generator=g)
        assert 0 <= top <= H - h and 0 <= left <= W - w and h >= 1 and w >= 1
        # w and h are rounded: the area and the ratio may move by that rounding only
        slack = 0.5 * (h + w) + 0.25
        assert 0.2 * H * W - slack <= h * w <= 0.6 * H * W + slack
        assert (w + 0.5) / (h - 0.5) >= 3 / 4 and (w - 0.5) / (h + 0.5) <= 4 / 3
        fractions.append(h * w / (H * W))
        aspects.append(math.log(w / h))
    # uniform area fraction on [0.2, 0.6]: mean 0.4; log-uniform ratio: mean 0
    assert abs(np.mean(fractions) - 0.4) < 4.5 * (0.4 / math.sqrt(12)) / math.sqrt(500) + 0.01
    assert abs(np.mean(aspects)) < 4.5 * (math.log(16 / 9) / math.sqrt(12)) / math.sqrt(500) + 0.01
    # no candidate fits a 4 x 100 strip at ratio 1: the centred fallback box
    assert sample_crop_box(4, 100, scale=(0.5, 1.0), ratio=(1.0, 1.0), generator=g) == (0, 48, 4, 4)
    assert sample_crop_box(7, 9, scale=(1, 1), ratio=(9 / 7, 9 / 7), generator=g) == (0, 0, 7, 9)


def test_same_seed_same_output_and_draws_on_the_image_device():
    t = VDTTransform(size=8)
    image = _rgb(20, 24, seed=7)
    a = t(image, generator=torch.Generator().manual_seed(3))
    b = t(image, generator=torch.Generator().manual_seed(3))
    c = t(image, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(5)
    d = t(image)
    torch.manual_seed(5)
    assert torch.equal(d, t(image))  # None: torch's global generator


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_have_the_cpu_distribution():
    image = _rgb(6, 6, seed=8)
    n = 400
    for device in ("cpu", "cuda"):
        t = _no_geometry(6, channel_shuffle=0.0)
        g = torch.Generator(device=device).manual_seed(9)
        x = image.to(device)
        flips = sum(torch.equal(t(x, generator=g)[0].cpu(), _norm(image.flip(-1))) for _ in range(n))
        assert _within(flips, n, 0.5)
        boxes = [sample_crop_box(40, 50, (0.2, 0.6), generator=g, device=device) for _ in range(n)]
        fractions = [h * w / 2000 for _, _, h, w in boxes]
        assert abs(np.mean(fractions) - 0.4) < 4.5 * (0.4 / math.sqrt(12)) / math.sqrt(n) + 0.01
    out = VDTTransform(size=8)(image.cuda(), generator=torch.Generator(device="cuda").manual_seed(0))
    assert out.device.type == "cuda" and out.shape == (1, 3, 8, 8)


def test_transform_rejects_bad_arguments():
    for kwargs, match in (
        ({"size": 0}, "size must be an integer in"),
        ({"size": 10**5}, "size must be an integer in"),
        ({"scale": (0.5, 0.2)}, "scale must be"),
        ({"ratio": (0, 1)}, "ratio must be"),
        ({"flip_rate": 1.5}, "flip_rate must be a probability"),
        ({"channel_shuffle": -0.1}, "channel_shuffle must be a probability"),
        ({"std": 0.0}, "std must be > 0"),
    ):
        with pytest.raises(ValueError, match=match):
            VDTTransform(**kwargs)
    t = VDTTransform(size=4)
    with pytest.raises(ValueError, match=r"got shape \(5, 6, 7\)"):
        t(torch.zeros(5, 6, 7))
    with pytest.raises(ValueError, match=r"0\.\.255 scale, got range \[0, 300\]"):
        t(torch.tensor([[0.0, 300.0], [1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"got shape \(6, 6, 2\)"):
        t(torch.zeros(6, 6, 2))  # two channels is no known layout
    with pytest.raises(ValueError, match="RGBA loses A"):
        VDTTransform(size=4, channels=2)(torch.zeros(3, 6, 6))


@pytest.fixture(scope="module")
def phantom_list(tmp_path_factory):
    root = write_phantom_dataset(tmp_path_factory.mktemp("vdt"), 4, 0, shape=(16, 32, 32), with_2d=True)
    rows = (root / "findings2d.csv").read_text().splitlines()
    column = rows[0].split(",").index("cardiomegaly")
    lines = [f"{r.split(',')[0]},{r.split(',')[column]}" for r in rows[1:]]  # Shenzhen-style image,class
    (root / "cardiomegaly.txt").write_text("\n".join(lines) + "\n")
    return root


def test_dataset_items_from_2d_phantoms(phantom_list):
    dataset = load_dataset(phantom_list / "cardiomegaly.txt")
    assert dataset.format == "image_list_2d" and all(isinstance(c.target, int) for c in dataset.cases)
    ds = VDTImageDataset(dataset, VDTTransform(size=16), seed=0)
    assert len(ds) == 4
    item = ds[1]
    assert item["image"].shape == (1, 3, 16, 16) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
    assert item["label"].item() == dataset.cases[1].target and item["case_id"] == dataset.cases[1].case_id
    assert torch.equal(ds[1]["image"], item["image"])  # seeded by (seed, epoch, index)
    assert torch.equal(VDTImageDataset(dataset.cases, VDTTransform(size=16), seed=0)[1]["image"], item["image"])
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["image"], item["image"])
    ds.set_epoch(0)
    assert torch.equal(ds[1]["image"], item["image"])
    # the grayscale radiograph became three equal slices before the shuffle: all slices equal
    assert torch.equal(item["image"][0, 0], item["image"][0, 2])
    # a batch runs through the VDT network and its loss
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 1, 3, 16, 16) and batch["label"].shape == (4,)
    model = mt.create_model("vdt_resnet18_3d", task="classification", num_classes=2).eval()
    with torch.no_grad():
        logits = model(batch["image"])
    assert logits.shape == (4, 2) and torch.isfinite(vdt_loss()(logits, batch["label"]))


def test_dataset_refuses_multilabel_targets(phantom_list):
    findings = load_dataset(phantom_list / "findings2d.csv")  # one 0/1 vector per image
    with pytest.raises(ValueError, match="target must be one class index"):
        VDTImageDataset(findings, VDTTransform(size=16))


def test_loss_is_label_smoothing_cross_entropy():
    g = torch.Generator().manual_seed(12)
    logits, target = torch.randn(6, 5, generator=g), torch.randint(0, 5, (6,), generator=g)
    assert torch.equal(vdt_loss()(logits, target), F.cross_entropy(logits, target, label_smoothing=0.1))
    assert torch.equal(vdt_loss(0.0)(logits, target), F.cross_entropy(logits, target))
    with pytest.raises(ValueError, match="label_smoothing must lie in"):
        vdt_loss(1.5)


def test_recipe_holds_the_published_values_in_config_fields():
    optim = OptimConfig(**VDT_RECIPE["optim"])
    assert (optim.name, optim.lr, optim.momentum, optim.weight_decay) == ("sgd", 0.1, 0.9, 1e-4)
    schedule = ScheduleConfig(**VDT_RECIPE["schedule"])
    assert (schedule.name, schedule.min_lr, schedule.interval) == ("cosine", 0.0, "epoch")
    assert TrainConfig(**VDT_RECIPE["train"]).max_epochs == 100
    data = DataConfig(**VDT_RECIPE["data"])
    assert data.batch_size == 256 and data.patch_size == (224, 224)
    options = dict(VDT_RECIPE["options"])
    assert options.pop("label_smoothing") == 0.1 and options["channel_shuffle"] == 1.0
    t = VDTTransform(VDT_RECIPE["data"]["patch_size"][0], **options)  # the other options are transform keywords
    assert (t.size, t.channels, t.scale, t.flip_rate) == (224, 3, (0.08, 1.0), 0.5)


def test_2d_resnet_inflates_into_the_3d_resnet_of_the_same_depth(tmp_path):
    """The cheaper alternative to VDT pretraining: inflate an ImageNet 2D ResNet (I3D). The zoo's 2D ResNet is a
    ResNet-50, which fits MedicalNet's ResNet-50 key for key; VDT's ResNet3D-18 has no 2D counterpart here."""
    torch.manual_seed(13)
    sd2 = mt.create_model("resnet50_2d", task="features").state_dict()
    path = export_official(sd2, tmp_path / "resnet50_2d.pth", "torchvision")
    model = mt.create_model("medicalnet_resnet50", task="features", pretrained=path, inflate="i3d")
    report = model.load_report
    assert report.coverage == 1.0 and report.mismatched == [] and report.unexpected == []
    sd3 = model.state_dict()
    torch.testing.assert_close(sd3["conv1.weight"].sum(dim=2), sd2["conv1.weight"].mean(dim=1, keepdim=True))
    torch.testing.assert_close(sd3["layer3.1.conv2.weight"].sum(dim=2), sd2["layer3.1.conv2.weight"])
    with torch.no_grad():
        features = model.eval()(VDTTransform(size=16)(_rgb(20, 20))[None])  # a batch of one 3-slice volume
    assert features.shape == (1, 2048, 1, 2, 2) and torch.isfinite(features).all()
    with pytest.raises(CheckpointMismatchError):
        mt.create_model("vdt_resnet18_3d", task="features", pretrained=path)
