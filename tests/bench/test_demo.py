"""`medtransfer demo --quick` end to end: phantoms, Models Genesis pretraining, fine-tunes, store, report."""

from __future__ import annotations

from typer.testing import CliRunner

from medtransfer.bench.store import ResultStore
from medtransfer.cli import app


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| scratch |" in result.output and "| genesis |" in result.output
    assert f"report: {out / 'report.md'}" in result.output
    with ResultStore(out / "store.sqlite") as store:
        rows = store.rows()
    assert [(r["init"], r["seed"], r["status"]) for r in rows] == [
        ("genesis", 0, "done"), ("genesis", 1, "done"), ("scratch", 0, "done"), ("scratch", 1, "done")]
    assert all(0.0 <= r["metric"] <= 1.0 and r["steps"] == 6 for r in rows)
    assert (out / "pretrain" / "genesis" / "pretrained.safetensors").is_file()
    for name in ("report.md", "report.html", "grid.yaml", "figures/bars_phantom_seg.png",
                 "figures/curves_phantom_seg_1.png"):
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "http" not in html
    # the genesis runs fine-tuned from the pretrained file, with a full load report
    run = out / "runs" / "phantom_seg" / "genesis" / "f1" / "s0"
    assert '"coverage": 1.0' in (run / "load_report.json").read_text()
