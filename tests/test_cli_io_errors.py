"""Commands that find nothing to do say why and exit 1: `zoo inspect` of a file that fits no model, `data cubes`
on volumes that give no cube (and then write nothing)."""

import numpy as np
import torch
from typer.testing import CliRunner

from medtransfer.cli import app
from medtransfer.data.io import write_image
from medtransfer.data.types import Image

runner = CliRunner()


def test_zoo_inspect_of_a_file_that_fits_no_model_exits_1(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"foo.weight": torch.zeros(3, 3), "bar.bias": torch.zeros(3)}, path)
    for extra in ([], ["--all"], ["--json"]):
        result = runner.invoke(app, ["zoo", "inspect", str(path), *extra])
        assert result.exit_code == 1, (extra, result.output)
        assert "Traceback" not in result.output
    assert f"error: {path} fits no registered model (--all shows why for each)" in \
        runner.invoke(app, ["zoo", "inspect", str(path)]).output


def _ct(folder, shape, hu):
    folder.mkdir()
    write_image(Image(np.full(shape, hu, np.int16), (2.5, 0.7, 0.7), (0.0, 0.0, 0.0), np.eye(3)), folder / "ct.nii.gz")
    return folder


def test_data_cubes_on_a_48_slice_ct_says_why_writes_nothing_and_exits_1(tmp_path):
    data = _ct(tmp_path / "data", (48, 40, 40), -800)
    out = tmp_path / "cubes"
    result = runner.invoke(app, ["data", "cubes", str(data), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "no cube extracted from the 1 cases of" in result.output
    assert ("ct: 48 slices, fewer than the 96 needed (cube depth 32 + 4 + 2 x border_z 30); lower --border-z or the "
            "depth in --cube-size") in result.output
    assert not out.exists()


def test_data_cubes_too_small_in_plane_names_the_needed_size(tmp_path):
    data = _ct(tmp_path / "data", (100, 40, 40), -800)
    result = runner.invoke(app, ["data", "cubes", str(data), "--out", str(tmp_path / "cubes")])
    assert result.exit_code == 1
    assert ("in-plane size (40, 40) leaves no room for a 64x64 window inside a 100-voxel border (needs 265x265); "
            "lower --border-xy") in result.output


def test_data_cubes_where_every_window_is_too_dense_gives_the_fraction_and_the_option(tmp_path):
    data = _ct(tmp_path / "data", (20, 24, 24), 40)  # soft tissue everywhere: every voxel is dense (>= -150 HU)
    out = tmp_path / "cubes"
    out.mkdir()
    args = ["data", "cubes", str(data), "--out", str(out), "--cube-size", "8,8,8", "--border-xy", "2",
            "--border-z", "2", "--scale", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    # 100 candidates (50 per wanted cube); each voxel of the 8 slices is dense at offset 0: weight 1 everywhere
    assert ("all 100 candidate windows hold too much dense tissue (>= -150 HU): the least dense has a weighted "
            "fraction of 1.000, above --lung-max 0.15; raise --lung-max") in result.output
    assert list(out.iterdir()) == []
    ok = runner.invoke(app, [*args, "--lung-max", "1"])
    assert ok.exit_code == 0, ok.output
    assert np.load(out / "cubes_8x8x8_all.npy").shape == (2, 8, 8, 8)
