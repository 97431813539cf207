"""In a log (``echo`` given, no bar), the benchmark's fine-tunes and pretrainings print the loop's progress lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from medtransfer.bench import grid

CONFIG = {
    "name": "tiny",
    "inits": [{"name": "scratch"}, {"name": "gen", "pretrain": {"method": "genesis", "train": {"max_steps": 5}}}],
    "tasks": [{"name": "seg", "task": "segmentation"}],
    "fractions": [1.0],
    "trials": 1,
}


@pytest.mark.parametrize("progress, echo, expected", [(False, True, True), (False, False, False), (True, False, False)])
def test_cells_and_pretraining_get_progress_lines_only_in_a_log(tmp_path, monkeypatch, progress, echo, expected):
    import medtransfer.pretext.runner as runner

    seen: dict[str, list] = {"cell": [], "pretrain": []}

    def run_cell(cfg, cell, pretrained, grid_dir, progress=False):
        seen["cell"].append(progress)
        return {"metric": 0.5, "metrics": {"dice_mean": 0.5}, "steps": 1, "run_dir": str(grid_dir / cell["run_id"])}

    def run_pretrain(cfg, *, resume=False, progress=True, **kw):
        seen["pretrain"].append(progress)
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "pretrained.safetensors").write_bytes(b"weights")
        return Path(cfg.out)

    monkeypatch.setattr(grid, "run_cell", run_cell)
    monkeypatch.setattr(runner, "run_pretrain", run_pretrain)
    pool = tmp_path / "pool"
    pool.mkdir()
    cfg = {**CONFIG, "inits": [CONFIG["inits"][0], {"name": "gen", "pretrain": {
        **CONFIG["inits"][1]["pretrain"], "data": {"paths": [str(pool)]}}}]}
    echoed: list[str] = []
    grid.run_benchmark(cfg, out=tmp_path / "g", progress=progress, echo=echoed.append if echo else None)
    assert seen == {"cell": [expected, expected], "pretrain": [expected or progress]}
