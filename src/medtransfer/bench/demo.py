"""``medtransfer demo``: the whole job on the embedded phantoms, in under 10 minutes on 2 CPU cores.

1. Write two phantom datasets: a *pool* of 12 cases for pretraining (all 7 labels; the self-supervised methods
   ignore them) and a labelled *task* of 16 cases with the four organs only (lung, heart, liver, spine).
2. Pretrain one small network (FMUNet with 8..128 channels) two ways on the pool, 60 steps each: Models Genesis
   restoration and Volume Fusion pseudo-segmentation.
3. Benchmark scratch vs the two initialisations on the task at two label fractions (25% of the 9 training cases,
   i.e. 2 labelled cases, and 100%) with five trials each (the same splits for every initialisation of a trial),
   64 fine-tuning steps each, scoring Dice on the 4 held-out test cases.
4. Print the table (mean ± std, Holm-corrected paired tests against scratch), the smallest difference the grid can
   detect, the steps each start needs to reach scratch's final validation Dice, and write ``report.md`` /
   ``report.html`` with the learning curves.

Why this design (measured, docs/performance.md "Designing the demo"), chosen from scratch's convergence alone:

* organ task: the vessel and lesion classes span a few voxels at 5 mm and stay near Dice 0 within any budget
  here (0.02 and 0.0 after 100 steps), so a mean over all six foreground classes measures the budget, not the
  start; on the organs, scratch at 100% labels passes 0.7 validation Dice in 40-60 steps;
* lr 5e-3 and 64 steps: the smallest budget at which scratch's validation Dice has passed 0.8 (at 3e-3 it needs
  about 90 steps; 1e-2 is no faster by step 60), so the grid compares where the starts end and the convergence
  table how fast they get there. The lower of two equally fast learning rates was taken because a high one lets
  the fine-tune move far from any start, which can erase what pretraining gave;
* five trials and two pretrained starts: with m = 2 Holm-corrected comparisons the paired t-test over n = 5 trials
  detects, with 80% power, about 2.0 SDs of the paired differences; four starts (m = 3) at n = 4 would need 2.9
  SDs and five trials of four starts do not fit the 10 minutes. Med3D-style supervised pretraining is left out:
  its pool labels are the same anatomy drawn by the same generator as the task, so here it measures "more labelled
  data" rather than transfer (to run it, add an init with ``pretrain: {method: med3d, ...}`` to the demo's
  ``grid.yaml`` and run it with ``medtransfer benchmark``).

On disk the grid shares one prepared cache per intensity pipeline and keeps no weights of a finished run
(``keep: none``): what is left is the data, the store, the runs' metrics, curves and evaluations, the two pretrained
initialisations and the report. To keep each run's ``best.pt`` (for ``evaluate``/``predict`` later), run the
demo's ``grid.yaml`` into a new folder: ``medtransfer benchmark runs/demo/grid.yaml --out NEW --set keep=best``.

``--quick`` (what the tests run): a few steps, two initialisations and two trials; it checks the machinery, not the
science. The numbers are whatever the runs give: the report never edits them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

NETWORK = {"name": "fmunet", "arch": {"feature_chns": [8, 16, 32, 64, 128]}}
PHANTOMS = {"shape": (32, 32, 32), "spacing": (5.0, 5.0, 5.0)}
ORGANS = (1, 2, 3, 4)  # lung, heart, liver, spine of data.phantoms.LABELS
# The grid: full and --quick. Chosen from scratch's convergence alone (docs/performance.md, "Designing the demo").
FULL = {"pretrain": 60, "finetune": 64, "val_every": 8, "lr": 5e-3, "inits": ("scratch", "genesis", "volf"),
        "fractions": [0.25, 1.0], "trials": 5}
QUICK = {"pretrain": 4, "finetune": 6, "val_every": 3, "lr": 5e-3, "inits": ("scratch", "genesis"), "fractions": [1.0],
         "trials": 2}
DATASETS = {"pool": {"n": 12, "seed": 100, "labels": None}, "task": {"n": 16, "seed": 0, "labels": ORGANS}}


def demo_config(root: Path, *, quick: bool = False) -> dict[str, Any]:
    """The demo's benchmark config, its datasets under ``root / "data"`` (see the module docstring for the design)."""
    pool, task = root / "data" / "pool", root / "data" / "task"
    steps = QUICK if quick else FULL
    pretrain_common = {
        "data": {"paths": [str(pool)], "patch_size": [32, 32, 32], "batch_size": 4, "val_batches": 2,
                 "val_fraction": 0.2},
        "recipe": "none",
        "optim": {"name": "adam", "lr": 1e-3},
        "train": {"max_steps": steps["pretrain"], "max_epochs": None, "val_interval": "step",
                  "val_every": max(1, steps["pretrain"] // 2), "seed": 0},
    }
    inits: list[dict[str, Any]] = [
        {"name": "scratch"},
        {"name": "genesis", "pretrain": {**pretrain_common, "method": "genesis"}},
        {"name": "volf", "pretrain": {**pretrain_common, "method": "volf",
                                      "options": {"block_min": [4, 4, 4], "block_max": [16, 16, 16]}}},
    ]
    inits = [init for init in inits if init["name"] in steps["inits"]]
    return {
        "name": "demo-quick" if quick else "demo",
        "model": NETWORK,
        "inits": inits,
        "tasks": [{"name": "phantom_organs", "data": str(task), "task": "segmentation", "metric": "dice_mean"}],
        "fractions": steps["fractions"],
        "trials": steps["trials"],
        "baseline": "scratch",
        "test_fraction": 0.25,
        "keep": "none",  # a finished run keeps its metrics, curves and evaluation, not its weights (< 150 MB left)
        "finetune": {
            "data": {"patch_size": [32, 32, 32], "batch_size": 2, "val_fraction": 0.2},
            "optim": {"name": "adam", "lr": steps["lr"]},
            "train": {"max_steps": steps["finetune"], "max_epochs": None, "val_interval": "step",
                      "val_every": steps["val_every"]},
        },
        "out": str(root),
    }


def write_demo_data(root: Path) -> None:
    """The two phantom datasets (skipped when already complete)."""
    from ..data.phantoms import write_phantom_dataset

    for name, spec in DATASETS.items():
        folder = root / "data" / name
        if not (folder / "dataset.json").is_file():
            write_phantom_dataset(folder, spec["n"], spec["seed"], labels=spec["labels"], with_2d=False, **PHANTOMS)


def run_demo(out: Path = Path("runs/demo"), *, quick: bool = False, progress: bool = True,
             echo=print) -> tuple[Path, str]:
    """Run the demo into ``out``; returns (grid folder, printed table). Resumes a partial demo in the same folder."""
    import platform
    import time

    from .. import provenance
    from .grid import load_benchmark_config, run_benchmark
    from .report import CONVERGENCE_NOTE, convergence, format_convergence, format_table, results_table, write_report
    from .store import ResultStore

    out = Path(out)
    t0 = time.perf_counter()
    echo(f"medtransfer demo{' --quick' if quick else ''}: writing phantom datasets into {out / 'data'}")
    write_demo_data(out)
    cfg = load_benchmark_config(demo_config(out, quick=quick))
    n = len(cfg.inits) * len(cfg.fractions) * cfg.trials
    echo(f"pretraining {len(cfg.inits) - 1} initialisation(s) on the pool, then {n} fine-tunes "
         f"({len(cfg.inits)} inits x {len(cfg.fractions)} label fractions x {cfg.trials} trials)")
    run_benchmark(cfg, progress=progress, echo=None if progress else echo)
    with ResultStore(out / "store.sqlite") as store:
        rows = store.rows()
    meta = {"command": f"medtransfer demo{' --quick' if quick else ''}", "machine": provenance.cpu_name(),
            "platform": platform.platform(), "minutes": round((time.perf_counter() - t0) / 60, 2),
            **provenance.versions()}
    md, html = write_report(out, rows, baseline=cfg.baseline, title=f"medtransfer {cfg.name}", meta=meta)
    entries = results_table(rows, baseline=cfg.baseline)
    speed = format_convergence(convergence(rows, baseline=cfg.baseline), baseline=cfg.baseline)
    # format_table already holds the detectable effect per comparison and per fraction
    table = format_table(entries) + (f"\nConvergence: {CONVERGENCE_NOTE.format(baseline=cfg.baseline)}\n\n{speed}"
                                     if speed else "")
    echo(table)
    echo(f"report: {md}\n        {html}\n(took {meta['minutes']} min on {meta['machine']}; another CPU gives "
         "slightly different numbers, floating point)")
    return out, table
