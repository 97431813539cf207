"""``medtransfer finetune | evaluate | predict``.

Config building order: the ``--config`` file, then the flags (``--model``, ``--task``... are dotted overrides),
then each ``--set key=value``; the recipe is merged under the result and everything is validated before any work,
so a bad value fails in a second with the field named (exit 2, no traceback).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from . import _fail

train_app = typer.Typer()


def build_config(
    config: Optional[Path], *, model: Optional[str] = None, pretrained: Optional[str] = None,
    data: Optional[Path] = None, task: Optional[str] = None, recipe: Optional[str] = None,
    label_fraction: Optional[float] = None, seed: Optional[int] = None, out: Optional[Path] = None,
    overrides: tuple[str, ...] | list[str] = (), resume: bool = False,
):
    """The validated :class:`~medtransfer.train.config.FinetuneConfig` of a command line.

    ``resume``: the run folder's ``config.yaml`` (``--out``, else the ``out`` of ``--config``) is the base and the
    command line lands on it, so the folder alone is enough; ``run_finetune`` then refuses values that differ."""
    from ..train.config import apply_overrides, read_yaml
    from ..train.recipes import merge

    base: dict[str, Any] = read_yaml(config) if config is not None else {}
    if resume:
        run_dir = out if out is not None else base.get("out")
        base = merge(resume_base(run_dir, "finetune"), base)
        out = Path(run_dir)
    # each flag is a dotted override; "true"/"false" for --pretrained read as YAML booleans, else a file path
    fields = {"model.name": model, "model.pretrained": pretrained, "data.path": data, "model.task": task,
              "recipe": recipe, "data.label_fraction": label_fraction, "train.seed": seed, "out": out}
    flags = [f"{key}={value}" for key, value in fields.items() if value is not None]
    return apply_overrides(base, [*flags, *overrides])


def resume_base(run_dir: Optional[str | Path], command: str) -> dict[str, Any]:
    """The saved ``config.yaml`` of the run folder ``--resume`` continues."""
    from ..errors import MedTransferError
    from ..train.config import read_yaml

    if run_dir is None:
        raise MedTransferError(f"--resume: name the run folder, e.g. `medtransfer {command} --out RUN --resume`")
    path = Path(run_dir)
    if not path.is_dir():
        raise MedTransferError(f"--out {path}: {'is a file, not a run folder' if path.exists() else 'no such folder'}"
                               "; --resume continues a run in its folder")
    if not (path / "config.yaml").is_file():
        raise MedTransferError(f"{path}: no config.yaml, so no run to resume; start it without --resume")
    return {**read_yaml(path / "config.yaml"), "out": str(path)}


def interrupted(exc: KeyboardInterrupt, command: str, run_dir: Path) -> None:
    """Ctrl-C: one line saying what was saved and the command that resumes; exit code 130."""
    from ..train.checkpoint import TrainingInterrupted

    if isinstance(exc, TrainingInterrupted):
        line = exc.message(f"medtransfer {command} --out {exc.run_dir} --resume")
    else:
        line = (f"interrupted before training started; nothing was trained in {run_dir}; run the command again "
                "(with --overwrite if the folder holds a run's files)")
    typer.echo(line, err=True)
    raise typer.Exit(code=130)


@train_app.command()
def finetune(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name (model.name)."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="true, false or a weight file."),
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset path (default: embedded phantoms)."),
    task: Optional[str] = typer.Option(None, "--task", help="segmentation, classification or detection."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Seed-system recipe merged under the config."),
    label_fraction: Optional[float] = typer.Option(None, "--label-fraction", help="Share of labelled cases."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder."),
    overrides: list[str] = typer.Option([], "--set", help="key=value override, e.g. optim.lr=1e-4 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its checkpoints/last.pt "
                                "and config.yaml; other options may only repeat the saved values (or change "
                                "train.max_steps, train.max_epochs, data.workers)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in --out (its files are "
                                   "removed first; a cache folder named by data.cache_dir stays)."),
) -> None:
    """Fine-tune a model; writes config.yaml, env.json, split.json, checkpoints/ and metrics.jsonl. An existing
    run folder is never written to unless --resume or --overwrite says so."""
    from ..train.finetune import run_finetune

    try:
        cfg = build_config(config, model=model, pretrained=pretrained, data=data, task=task, recipe=recipe,
                           label_fraction=label_fraction, seed=seed, out=out, overrides=overrides, resume=resume)
    except ValueError as exc:
        _fail(exc)
    try:
        # a bar on a terminal, else plain lines
        run_dir = run_finetune(cfg, resume=resume, overwrite=overwrite, progress=True)
    except ValueError as exc:
        _fail(exc)
    except KeyboardInterrupt as exc:
        interrupted(exc, "finetune", Path(cfg.out))
    typer.echo(str(run_dir))


window_opt = typer.Option(None, "--window", help="Sliding-window size, e.g. 32,128,128 (default: the run's "
                          "inference.window_size, else its training patch).")
overlap_opt = typer.Option(None, "--overlap", help="Window overlap in [0, 1) (default: the run's, 0.5).")
batch_opt = typer.Option(None, "--window-batch", help="Windows per forward pass (default: the run's, 4).")
memory_opt = typer.Option(None, "--memory-gb", help="Memory budget for one whole-volume pass; 0: always "
                          "windows (default: the run's, else 80 percent of free CUDA memory or half the free RAM).")


def _window(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(v) for v in text.replace("x", ",").split(",")]
    except ValueError:
        from ..errors import MedTransferError

        _fail(MedTransferError(f"--window: give integers separated by commas, e.g. 32,128,128; got {text!r}"))


@train_app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="A finetune run folder."),
    data: Optional[Path] = typer.Option(None, "--data", help="Another dataset (default: the run's), read with the "
                                        "run's data.format and data.options (a LUNA16 folder with its boxes for a "
                                        "detection run); scored into RUN_DIR/evaluation-<dataset name>."),
    split: str = typer.Option("val", "--split", help="val, test or all (the run's data only)."),
    grid: str = typer.Option("original", "--grid", help="Score segmentation on the original label grid "
                             "(probabilities mapped back) or on the prepared (resampled) grid."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier evaluation in the same folder."),
    window: Optional[str] = window_opt,
    overlap: Optional[float] = overlap_opt,
    window_batch: Optional[int] = batch_opt,
    memory_gb: Optional[float] = memory_opt,
) -> None:
    """Score the best checkpoint on whole cases; writes cases.csv and summary.json into RUN_DIR/evaluation
    (val split), RUN_DIR/evaluation-<split> or RUN_DIR/evaluation-<dataset name>."""
    from ..train.apply import evaluate as run_evaluate

    try:
        out = run_evaluate(run_dir, data, split=split, grid=grid, overwrite=overwrite, window_size=_window(window),
                           overlap=overlap, batch_size=window_batch, memory_gb=memory_gb)
    except ValueError as exc:
        _fail(exc)
    typer.echo(str(out))


@train_app.command()
def predict(
    run_dir: Path = typer.Argument(..., help="A segmentation or detection finetune run folder."),
    inputs: list[Path] = typer.Argument(..., help="Images to segment, volumes to detect lesions in (3D "
                                      "detection), or DeepLesion folders / key-slice PNGs (2.5D detection)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the label maps (default: RUN_DIR/predictions)."),
    window: Optional[str] = window_opt,
    overlap: Optional[float] = overlap_opt,
    window_batch: Optional[int] = batch_opt,
    memory_gb: Optional[float] = memory_opt,
    fmt: str = typer.Option("nii.gz", "--format", help="Output type: nii.gz, nii, nrrd, mha, or same (the input's "
                            "own type; DICOM gives nii.gz). Names: the input's name without its image extension."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace label maps that exist already."),
    box_labels: bool = typer.Option(False, "--box-labels", help="Detection runs: also write a label map of the "
                                    "boxes (each box filled with its class) for viewers."),
    box_threshold: float = typer.Option(0.5, "--box-threshold", help="Detection runs: the lowest score of a box "
                                        "drawn into the --box-labels map (every box goes into the JSON)."),
) -> None:
    """Write a label map per input (NIfTI by default), on the input's grid (class probabilities mapped back by
    world coordinates, then the argmax). Detection runs write <name>.boxes.json: every box with its score and
    label, in voxel corners on the input's grid and in world (LPS mm, cccwhd) coordinates; 2.5D (DeepLesion) runs
    take a DeepLesion folder or key-slice PNGs (neighbours and spacing from its DL_info.csv) and write
    <case>.boxes.json with pixel boxes (also as DeepLesion's x1, y1, x2, y2) and world boxes (cx, cy, w, h mm).
    Clashing output names are refused before anything is written."""
    from ..paths import check_output_dir
    from ..train.apply import predict as run_predict

    try:
        if out is not None:  # a file or read-only folder is refused before the model is loaded
            check_output_dir(out, "--out")
        paths = run_predict(run_dir, inputs, out if out is not None else run_dir / "predictions",
                            window_size=_window(window), overlap=overlap, batch_size=window_batch,
                            memory_gb=memory_gb, fmt=fmt, overwrite=overwrite, box_labels=box_labels,
                            box_threshold=box_threshold)
    except ValueError as exc:
        _fail(exc)
    for p in paths:
        typer.echo(str(p))
