import os
import pickle
import zipfile

import pytest
import torch

from medtransfer.errors import CheckpointError, UnsafeCheckpointError
from medtransfer.weights.io import atomic_write, read_checkpoint, save_safetensors
from medtransfer.weights.sources3d import NormalisedWeights


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_carrying_torch_file_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _RunsCode(marker)}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        read_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg and "system" in msg and "never executes code" in msg
    assert not marker.exists()


def test_truncated_file_names_the_file_and_the_fix(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"state_dict": {"w": torch.ones(64, 64)}}, good)
    data = good.read_bytes()
    bad = tmp_path / "trunc.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"trunc\.pth: .*corrupt or truncated"):
        read_checkpoint(bad)


@pytest.mark.parametrize(
    "content, message",
    [(b"", "the file is empty"), (b"hello world, not weights", "not a PyTorch, safetensors or pickle")],
)
def test_empty_and_foreign_files(tmp_path, content, message):
    path = tmp_path / "w.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)


def test_missing_path_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        read_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="is a folder"):
        read_checkpoint(tmp_path)


def test_zip_and_legacy_torch_files_and_numpy_scalars_load(tmp_path):
    import numpy as np

    sd = {"w": torch.arange(3.0)}
    new = tmp_path / "new.pt"
    torch.save({"model_state_dict": sd, "valid_pred": np.float64(0.8), "iteration": 5}, new)
    raw = read_checkpoint(new)
    assert raw.container == "torch-zip" and zipfile.is_zipfile(new)
    assert raw.obj["valid_pred"] == pytest.approx(0.8) and torch.equal(raw.obj["model_state_dict"]["w"], sd["w"])
    legacy = tmp_path / "legacy.pth"
    torch.save({"state_dict": sd}, legacy, _use_new_zipfile_serialization=False)
    raw = read_checkpoint(legacy)
    assert raw.container == "torch-legacy" and torch.equal(raw.obj["state_dict"]["w"], sd["w"])


def test_plain_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"params": _RunsCode(marker)}))
    with pytest.raises(UnsafeCheckpointError):
        read_checkpoint(path)
    assert not marker.exists()


def test_safetensors_round_trip_with_metadata(tmp_path):
    sd = {"a.weight": torch.randn(2, 3), "b": torch.arange(4)}
    out = save_safetensors(sd, tmp_path / "x.safetensors", {"model": "m", "arch_kwargs": {"shortcut": "A"}})
    raw = read_checkpoint(out)
    assert isinstance(raw.obj, NormalisedWeights)
    assert raw.metadata == {"model": "m", "arch_kwargs": {"shortcut": "A"}}
    assert set(raw.obj.state_dict) == {"a.weight", "b"} and torch.equal(raw.obj.state_dict["b"], sd["b"])


def test_truncated_safetensors(tmp_path):
    out = save_safetensors({"a": torch.randn(100, 100)}, tmp_path / "x.safetensors", {"model": "m"})
    data = out.read_bytes()
    out.write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_checkpoint(out)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "result.bin"
    target.write_bytes(b"old")

    def failing(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.bin"]  # no temp file left behind
    atomic_write(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"new"
