"""Models Genesis cube extraction: the vectorised sampler makes exactly the published decisions.

The reference below is a direct loop transcription of the published dense-tissue rule (spec section 3b), written
here in medtransfer's [z, y, x] order on a scaled-down config (16x16 in-plane, 8 deep, len_depth 3) so that it runs
in milliseconds.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medtransfer.data.cubes import (
    CubeConfig,
    candidate_corners,
    case_rng,
    cube_file_name,
    dense_tissue_weight,
    extract_cubes,
    extract_cubes_from_dataset,
    gather_windows,
    normalise_hu,
    read_cube_file,
    sample_cubes,
)
from medtransfer.data.types import Case, Dataset
from medtransfer.errors import DataError

SMALL = CubeConfig(cube_depth=8, cube_height=16, cube_width=16, len_depth=3, border_xy=4, border_z=2, scale=4,
                   candidates_per_cube=5)


# --- the published rule, one voxel at a time -------------------------------------------------------------------

def loop_weight(window: np.ndarray, cfg: CubeConfig) -> float:
    """Weight sum of one normalised window (D + len_depth, H, W): per voxel of the first D slices, the first offset
    k whose slice reaches the threshold weighs 1 - k/(L-1); no passing slice counts as offset L-1."""
    last = cfg.len_depth - 1
    offsets = np.zeros((cfg.cube_depth, cfg.cube_height, cfg.cube_width), dtype=np.float32)
    for d in range(cfg.cube_depth):
        for i in range(cfg.cube_height):
            for j in range(cfg.cube_width):
                for k in range(cfg.len_depth):
                    if window[d + k, i, j] >= cfg.threshold:
                        offsets[d, i, j] = k
                        break
                else:
                    offsets[d, i, j] = last
    return float(np.sum(1.0 - offsets / np.float32(last)))


def loop_accepts(window: np.ndarray, cfg: CubeConfig) -> bool:
    return not loop_weight(window, cfg) > cfg.lung_max * cfg.cube_width * cfg.cube_height * cfg.cube_depth


def loop_sampler(volume: np.ndarray, seed: int, cfg: CubeConfig) -> tuple[np.ndarray, np.ndarray]:
    """Candidates one by one, in the order drawn, until `scale` are accepted."""
    cubes, corners = [], []
    for z, y, x in candidate_corners(volume.shape, np.random.default_rng(seed), cfg):
        window = normalise_hu(volume[z : z + cfg.cube_depth + cfg.len_depth, y : y + cfg.cube_height,
                                     x : x + cfg.cube_width], cfg)
        if loop_accepts(window, cfg):
            cubes.append(window[: cfg.cube_depth].astype(np.float32))
            corners.append((z, y, x))
            if len(cubes) == cfg.scale:
                break
    shape = (0, cfg.cube_depth, cfg.cube_height, cfg.cube_width)
    return (np.stack(cubes) if cubes else np.empty(shape, np.float32)), np.array(corners, np.int64).reshape(-1, 3)


def lung_like_volume(shape=(24, 40, 40), seed=0) -> np.ndarray:
    """Air-filled lung (around -850 HU) with scattered dense voxels whose density grows along x, so that windows
    fall on both sides of the 15 % limit; int16 like LUNA16."""
    rng = np.random.default_rng(seed)
    vol = rng.normal(-850, 60, shape)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    density = 0.02 + 0.3 * (x / shape[2]) ** 2  # more tissue towards high x
    vol[rng.random(shape) < density] = 40.0
    vol[np.broadcast_to((x + y + z) % 23 == 0, shape)] = -150  # exactly on the threshold: counts as dense
    return vol.astype(np.int16)


# --- the rule ------------------------------------------------------------------------------------------------

def test_config_defaults_are_the_published_ones():
    cfg = CubeConfig()
    assert cfg.threshold == pytest.approx(0.425, abs=0)
    assert cfg.window_shape == (35, 64, 64)
    assert cfg.max_dense_weight == pytest.approx(0.15 * 64 * 64 * 32)
    assert cfg.min_slices == 96  # size_z - 32 - 3 - 1 - 30 < 30 skips
    assert (cfg.scale, cfg.candidates_per_cube, cfg.border_xy, cfg.border_z) == (32, 50, 100, 30)
    with pytest.raises(ValueError, match="len_depth must be at least 2"):
        CubeConfig(len_depth=1)
    with pytest.raises(ValueError, match="hu_max"):
        CubeConfig(hu_min=0, hu_max=0)


@pytest.mark.parametrize("p_dense", [0.0, 0.03, 0.06, 0.09, 0.12, 0.2, 0.6, 1.0])
def test_vectorised_weight_equals_loop_on_random_windows(p_dense):
    rng = np.random.default_rng(int(p_dense * 100))
    shape = (6, *SMALL.window_shape)
    hu = np.where(rng.random(shape) < p_dense, rng.uniform(-150, 1200, shape), rng.uniform(-1100, -151, shape))
    hu[rng.random(shape) < 0.05] = -150.0
    windows = normalise_hu(hu, SMALL)
    weights = dense_tissue_weight(windows, SMALL)
    expected = [loop_weight(w, SMALL) for w in windows]
    assert weights.tolist() == expected
    accepted = weights <= SMALL.max_dense_weight
    assert accepted.tolist() == [loop_accepts(w, SMALL) for w in windows]


def test_published_size_windows_near_the_limit_equal_loop():
    cfg = CubeConfig()
    rng = np.random.default_rng(5)
    shape = (2, *cfg.window_shape)
    p = np.array([0.101, 0.106])[:, None, None, None]  # weight ~ N * (p + p(1-p)/2): either side of 0.15 N
    hu = np.where(rng.random(shape) < p, 40.0, -850.0)
    windows = normalise_hu(hu, cfg)
    weights = dense_tissue_weight(windows, cfg)
    assert weights.tolist() == [loop_weight(w, cfg) for w in windows]
    assert (weights <= cfg.max_dense_weight).tolist() == [True, False]
    assert abs(weights - cfg.max_dense_weight).max() < 0.05 * cfg.max_dense_weight


@pytest.mark.parametrize("len_depth", [2, 4])
def test_other_len_depths_follow_the_same_rule(len_depth):
    cfg = CubeConfig(cube_depth=6, cube_height=8, cube_width=8, len_depth=len_depth)
    rng = np.random.default_rng(len_depth)
    windows = normalise_hu(rng.uniform(-1000, 200, (5, *cfg.window_shape)), cfg)
    weights = dense_tissue_weight(windows, cfg)
    assert weights == pytest.approx([loop_weight(w, cfg) for w in windows], rel=1e-6)


def test_hand_made_windows():
    n = 8 * 16 * 16  # voxels of a SMALL cube; limit 0.15 * n = 307.2
    depth = SMALL.cube_depth
    air = np.full(SMALL.window_shape, -1000.0)
    tissue = np.full(SMALL.window_shape, 40.0)

    def weight(hu: np.ndarray) -> float:
        return float(dense_tissue_weight(normalise_hu(hu[None], SMALL), SMALL)[0])

    assert weight(air) == 0.0  # no slice passes: offset 2, weight 0
    assert weight(tissue) == n  # every voxel passes at offset 0
    half = air.copy()
    half[:, :, 8:] = 40.0
    assert weight(half) == n / 2
    assert weight(half) > SMALL.max_dense_weight
    assert dense_tissue_weight(normalise_hu(half[None], SMALL), CubeConfig(
        cube_depth=8, cube_height=16, cube_width=16, lung_max=0.5))[0] <= 0.5 * n  # equal to the limit: kept

    near = air.copy()
    near[:, :6, :6] = 40.0  # 36 full columns: 36 * 8 = 288
    near[5, 10, 0:7] = 40.0  # 7 isolated voxels inside the cube: 1 at d=5, 0.5 at d=4 -> 7 * 1.5 = 10.5
    near[0, 12, 0:5] = 40.0  # slice 0: 1 each, nothing before it -> 5
    near[depth, 14, 0:7] = 40.0  # first extra slice: 0.5 each (offset 1 of d=7) -> 3.5
    near[depth + 1, 15, :] = 40.0  # second extra slice: offset 2 weighs 0 -> 0
    assert weight(near) == 288 + 10.5 + 5 + 3.5 == 307.0
    assert weight(near) <= SMALL.max_dense_weight  # 307 <= 307.2: accepted
    near[depth, 14, 7] = -150.0  # exactly on the threshold counts: +0.5
    assert weight(near) == 307.5 > SMALL.max_dense_weight  # rejected
    near[depth, 14, 8] = -151.0  # just below does not
    assert weight(near) == 307.5
    for hu in (air, tissue, half, near):
        assert weight(hu) == loop_weight(normalise_hu(hu, SMALL), SMALL)


def test_single_position_volume_accepts_air_and_rejects_tissue():
    cfg = CubeConfig(cube_depth=8, cube_height=16, cube_width=16, border_xy=0, border_z=0, scale=2)
    shape = (cfg.min_slices, 17, 17)  # every candidate window sits at (0, 0, 0)
    air = sample_cubes(np.full(shape, -1000, np.int16), 0, config=cfg)
    assert air.corners.tolist() == [[0, 0, 0], [0, 0, 0]] and np.all(air.cubes == 0)
    tissue = sample_cubes(np.full(shape, 40, np.int16), 0, config=cfg)
    assert len(tissue.cubes) == 0 and tissue.evaluated == cfg.candidates_per_cube * cfg.scale == tissue.candidates
    half = np.full(shape, -1000, np.int16)
    half[:, :, 8:] = 40  # weight 8 * 16 * 8 = 1024 = 0.5 * 16 * 16 * 8 exactly: at the limit is not above it
    assert len(sample_cubes(half, 0, config=replace(cfg, lung_max=0.5)).cubes) == 2
    assert len(sample_cubes(half, 0, config=replace(cfg, lung_max=0.49)).cubes) == 0


# --- the sampler -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampler_equals_loop_transcription(seed):
    vol = lung_like_volume(seed=seed)
    expected_cubes, expected_corners = loop_sampler(vol, seed, SMALL)
    for batch in (1, 3, 64):
        got = sample_cubes(vol, np.random.default_rng(seed), config=SMALL, batch=batch)
        assert np.array_equal(got.corners, expected_corners)
        assert np.array_equal(got.cubes, expected_cubes)
    assert 0 < len(expected_corners)  # the fixture exercises acceptance ...
    windows = normalise_hu(gather_windows(vol, candidate_corners(vol.shape, np.random.default_rng(seed), SMALL),
                                          SMALL), SMALL)
    assert not np.all(dense_tissue_weight(windows, SMALL) <= SMALL.max_dense_weight)  # ... and rejection


def test_output_shape_dtype_range_and_official_axes():
    vol = np.full((96, 265, 265), -850, np.int16)  # the smallest volume the published config accepts
    vol[::7, ::5, ::3] = 40  # 1/105 dense: accepted
    vol[40:44, 120:140, 120:140] = 300
    cubes = extract_cubes(vol, np.random.default_rng(1), config=CubeConfig())
    assert cubes.shape == (32, 32, 64, 64)  # every candidate is accepted; sampling stops at scale
    assert cubes.dtype == np.float32 and cubes.min() >= 0 and cubes.max() <= 1
    official = extract_cubes(vol, np.random.default_rng(1), config=CubeConfig(), official_axes=True)
    assert official.shape == (len(cubes), 64, 64, 32)
    assert np.array_equal(official, cubes.transpose(0, 3, 2, 1))
    sample = sample_cubes(vol, 1, config=CubeConfig())
    assert np.all(sample.corners == [30, 100, 100])  # each axis has one legal start at this size
    expected = normalise_hu(vol[30:62, 100:164, 100:164], CubeConfig()).astype(np.float32)
    assert np.array_equal(sample.cubes[0], expected)


def test_deterministic_for_a_seed():
    vol = lung_like_volume(seed=4)
    a = sample_cubes(vol, np.random.default_rng(7), config=SMALL)
    b = sample_cubes(vol, 7, config=SMALL)
    c = sample_cubes(vol, 8, config=SMALL)
    assert np.array_equal(a.corners, b.corners) and np.array_equal(a.cubes, b.cubes)
    assert not np.array_equal(a.corners, c.corners)


@pytest.mark.parametrize("shape, reason", [((95, 265, 265), "95 slices, fewer than the 96"),
                                           ((96, 264, 265), "no room"), ((96, 265, 264), "no room")])
def test_too_small_volumes_are_skipped(shape, reason):
    sample = sample_cubes(np.full(shape, -1000, np.int16), 1, config=CubeConfig())
    assert sample.cubes.shape == (0, 32, 64, 64) and sample.cubes.dtype == np.float32
    assert sample.corners.shape == (0, 3) and reason in sample.skipped
    assert extract_cubes(np.full(shape, -1000, np.int16), 1, official_axes=True).shape == (0, 64, 64, 32)


def test_corners_respect_the_margins():
    vol = np.full((30, 44, 50), -900, np.int16)
    cfg = CubeConfig(cube_depth=8, cube_height=16, cube_width=16, border_xy=5, border_z=3, scale=200,
                     candidates_per_cube=1)
    sample = sample_cubes(vol, 0, config=cfg)
    z, y, x = sample.corners.T
    assert len(sample.corners) == 200
    assert z.min() == 3 and z.max() == 30 - 8 - 3 - 1 - 3  # 200 draws hit both ends of these small ranges
    assert y.min() == 5 and y.max() == 44 - 16 - 1 - 5
    assert x.min() == 5 and x.max() == 50 - 16 - 1 - 5


def test_non_3d_input_is_refused():
    with pytest.raises(DataError, match="one 3D volume"):
        extract_cubes(np.zeros((2, 40, 40, 40)), 0)


# --- whole datasets --------------------------------------------------------------------------------------------

def _write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


def test_dataset_extraction_writes_one_file_per_subset(tmp_path):
    from medtransfer.data.io import read_image

    root = tmp_path / "luna"
    cases = [Case("a", (_write(root / "subset0" / "a.mhd", lung_like_volume(seed=10)),)),
             Case("b", (_write(root / "subset0" / "b.mhd", lung_like_volume(seed=11)),)),
             Case("small", (_write(root / "subset1" / "small.mhd", lung_like_volume((10, 40, 40))),)),
             Case("c", (_write(root / "subset1" / "c.mhd", lung_like_volume(seed=12)),))]
    out = tmp_path / "cubes"
    paths = extract_cubes_from_dataset(root, out, config=SMALL, seed=1, progress=False)  # a path: load_dataset
    assert [p.name for p in paths] == [cube_file_name(SMALL, "subset0"), cube_file_name(SMALL, "subset1")]
    assert paths[0].name == "cubes_8x16x16_subset0.npy"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [p.name for p in paths] + [p.with_suffix(".json").name for p in paths])  # no temporary files left

    def expected(case: Case) -> np.ndarray:
        return sample_cubes(read_image(case.images[0]).array, case_rng(1, case.case_id), config=SMALL).cubes

    subset0 = read_cube_file(paths[0])
    assert subset0.dtype == np.float32 and len(subset0) > 0
    assert np.array_equal(subset0, np.concatenate([expected(cases[0]), expected(cases[1])]))
    manifest = json.loads(paths[1].with_suffix(".json").read_text())
    assert manifest["axes"] == "N,z,y,x" and manifest["seed"] == 1 and manifest["config"]["cube_depth"] == 8
    records = {r["case_id"]: r for r in manifest["cases"]}
    small, c = records["small"], records["c"]
    assert small["n_cubes"] == 0 and "10 slices" in small["skipped"]
    assert c["n_cubes"] == manifest["shape"][0] == len(read_cube_file(paths[1])) > 0
    assert np.array_equal(np.array(c["corners_zyx"]), sample_cubes(
        read_image(cases[3].images[0]).array, case_rng(1, "c"), config=SMALL).corners)

    # A case's cubes do not depend on the other cases; groups also come from the folder names.
    alone = extract_cubes_from_dataset(Dataset("one", root, "luna16", "unlabelled", [cases[3]]), tmp_path / "alone",
                                       config=SMALL, seed=1, progress=False)
    assert alone[0].name == "cubes_8x16x16_subset1.npy"
    assert np.array_equal(np.load(alone[0]), np.load(paths[1]))


def test_dataset_without_subsets_and_bad_images(tmp_path):
    good = _write(tmp_path / "img" / "v.nii.gz", lung_like_volume(seed=5))
    vector = _write(tmp_path / "img" / "rgb.nii.gz", np.zeros((24, 40, 40, 3), np.float32))
    dataset = Dataset("d", tmp_path, "folder", "unlabelled", [Case("rgb", (vector,)), Case("v", (good,))])
    with pytest.raises(DataError, match="1 of 2 cases .*\n  rgb: .*rgb.nii.gz"):
        extract_cubes_from_dataset(dataset, tmp_path / "out", config=SMALL, progress=False)
    # the readable case is still written, and the manifest names the failure
    written = np.load(tmp_path / "out" / "cubes_8x16x16_all.npy")
    assert np.array_equal(written, sample_cubes(lung_like_volume(seed=5), case_rng(1, "v"), config=SMALL).cubes)
    manifest = json.loads((tmp_path / "out" / "cubes_8x16x16_all.json").read_text())
    assert "rgb.nii.gz" in manifest["cases"][0]["error"] and manifest["cases"][1]["n_cubes"] == len(written)
    with pytest.raises(DataError, match="2D"):
        extract_cubes_from_dataset(Dataset("x", tmp_path, "image_list_2d", "classification", [Case("v", (good,))],
                                           spatial_dims=2), tmp_path / "out3", progress=False)


def test_read_cube_file_accepts_official_downloads(tmp_path):
    official = np.random.default_rng(0).random((3, 64, 64, 32))  # (N, x, y, z) float64, as published
    np.save(tmp_path / "bat_32_s_64x64x32_0.npy", official)
    cubes = read_cube_file(tmp_path / "bat_32_s_64x64x32_0.npy")
    assert cubes.shape == (3, 32, 64, 64) and cubes.dtype == np.float32
    assert cubes[1, 5, 6, 7] == np.float32(official[1, 7, 6, 5])
    with pytest.raises(DataError, match="not found"):
        read_cube_file(tmp_path / "missing.npy")
