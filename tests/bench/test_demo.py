"""`medtransfer demo --quick` end to end: phantoms, Models Genesis pretraining, fine-tunes, store, report."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from medtransfer.bench.store import ResultStore
from medtransfer.cli import app


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| scratch |" in result.output and "| genesis |" in result.output
    assert f"report: {out / 'report.md'}" in result.output
    # the printed power and convergence summaries, and the organ task's four classes
    assert "phantom_organs at 100% labels: with n=2 paired trials and m=1 comparison(s)" in result.output
    assert "| phantom_organs | 100% | genesis |" in result.output and "steps to target" in result.output
    task = json.loads((out / "data" / "task" / "dataset.json").read_text())
    assert task["labels"] == {"0": "background", "1": "lung", "2": "heart", "3": "liver", "4": "spine"}
    with ResultStore(out / "store.sqlite") as store:
        rows = store.rows()
    assert [(r["init"], r["seed"], r["status"]) for r in rows] == [
        ("genesis", 0, "done"), ("genesis", 1, "done"), ("scratch", 0, "done"), ("scratch", 1, "done")]
    assert all(0.0 <= r["metric"] <= 1.0 and r["steps"] == 6 for r in rows)
    assert (out / "pretrain" / "genesis" / "pretrained.safetensors").is_file()
    for name in ("report.md", "report.html", "grid.yaml", "figures/bars_phantom_organs.png",
                 "figures/curves_phantom_organs_1.png"):
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "http" not in html
    # the genesis runs fine-tuned from the pretrained file, with a full load report
    run = out / "runs" / "phantom_organs" / "genesis" / "f1" / "s0"
    assert '"coverage": 1.0' in (run / "load_report.json").read_text()


def test_phantom_label_subset_keeps_the_organs_and_paints_the_rest_background(tmp_path):
    import numpy as np
    import pytest

    from medtransfer.data.io import read_image
    from medtransfer.data.phantoms import make_ct_phantom, write_phantom_dataset
    from medtransfer.errors import DataError

    root = write_phantom_dataset(tmp_path / "organs", 2, 3, shape=(32, 32, 32), spacing=(5.0,) * 3, with_2d=False,
                                 labels=(1, 2, 3, 4))
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "lung", "2": "heart", "3": "liver", "4": "spine"}
    assert meta["medtransfer"]["labels_kept"] == [1, 2, 3, 4]
    case = make_ct_phantom(meta["medtransfer"]["case_seeds"][0], shape=(32, 32, 32), spacing=(5.0,) * 3)
    written = read_image(root / "labelsTr" / "phantom_000.nii.gz").array
    assert np.isin(case.label, (5, 6)).any()  # the case has vessels or a lesion to drop
    assert np.array_equal(written, np.where(np.isin(case.label, (1, 2, 3, 4)), case.label, 0))
    image = read_image(root / "imagesTr" / "phantom_000.nii.gz").array
    assert np.allclose(image, case.image, atol=1e-3)  # the image is the full phantom's
    # renumbered in the order given
    swapped = write_phantom_dataset(tmp_path / "two", 1, 3, shape=(32, 32, 32), spacing=(5.0,) * 3, with_2d=False,
                                    labels=(3, 1))
    assert json.loads((swapped / "dataset.json").read_text())["labels"] == {"0": "background", "1": "liver",
                                                                            "2": "lung"}
    for bad in ((), (0, 1), (1, 1), (7,), (True,)):
        with pytest.raises(DataError, match="distinct foreground ids"):
            write_phantom_dataset(tmp_path / "bad", 1, 3, shape=(32, 32, 32), spacing=(5.0,) * 3, labels=bad)
    assert not (tmp_path / "bad").exists()
