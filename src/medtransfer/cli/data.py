"""``medtransfer data inspect | phantoms | cubes | candidates | prepare``: check, make and prepare datasets."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from . import _fail, console, err_console

data_app = typer.Typer(
    help="Datasets: check one before training, write the embedded phantom dataset, prepare a cache, extract cubes "
    "(Genesis pretraining cubes, LUNA16 candidate cubes).",
    no_args_is_help=True,
)


def _load_dataset(path: Path, fmt: str, **options):
    from ..data.datasets import load_dataset

    return load_dataset(path, format=fmt, **{k: v for k, v in options.items() if v is not None})


@data_app.command("inspect")
def data_inspect(
    path: Path = typer.Argument(..., help="A dataset: MSD or nnU-Net folder, list/CSV file, LUNA16 root, DeepLesion "
                                "root, MONAI detection datalist, image folder."),
    fmt: str = typer.Option("auto", "--format", help="Layout; 'auto' detects it."),
    task: Optional[str] = typer.Option(None, "--task", help="LUNA16: 'detection' checks the nodule boxes of "
                                       "annotations.csv (CSV: the task of its columns)."),
    boxes_from: Optional[str] = typer.Option(None, "--boxes-from", help="Segmentation layouts: check the boxes "
                                             "of the masks' objects, 'labels' (connected components per class) or "
                                             "'instances' (each mask value one object)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    workers: Optional[int] = typer.Option(None, help="Threads reading cases (default: up to 8)."),
) -> None:
    """Summarise a dataset and list every problem with its file and fix. Exits 1 when training would break.

    Detection datasets: every box is checked (coordinate count, positive size, inside its scan, declared label),
    and every case for its scan (and DeepLesion's neighbouring slices)."""
    from ..data.check import check_dataset

    dataset = _load_dataset(path, fmt, task=task, boxes_from=boxes_from)
    report = check_dataset(dataset, workers=workers, progress=not as_json and sys.stderr.isatty())
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        _print_data_report(report)
    if not report.ok:
        raise typer.Exit(code=1)


_LABEL_ROWS = 12  # label values listed by `data inspect` before "... and N more" (a 116-label atlas: 12 lines)


def _print_data_report(report) -> None:
    summary = report.summary()
    console.print(f"[bold]{report.dataset}[/] ({report.format}, {report.task}) at {report.root}", highlight=False,
                  soft_wrap=True)
    console.print(f"  cases        : {summary['cases']}")
    if "spatial_dims" in summary:
        mix = ", ".join(f"{n} {d}D" for d, n in summary["spatial_dims"].items())
        console.print(f"  dimensions   : {mix} (shape and spacing below: the {summary['summarised_dims']}D cases)",
                      highlight=False)
    if report.channel_names:
        console.print(f"  channels     : {', '.join(report.channel_names)}", highlight=False)
    for key in ("shape", "spacing"):
        if key in summary:
            s = summary[key]
            console.print(f"  {key:12s} : min {s['min']}  median {s['median']}  max {s['max']}", highlight=False,
                          soft_wrap=True)
    if "anisotropy" in summary:
        a = summary["anisotropy"]
        console.print(f"  anisotropy   : largest/smallest spacing median {a['median']:g}, max {a['max']:g}",
                      highlight=False)
    if "orientation" in summary:
        codes = ", ".join(f"{code} {n}" for code, n in summary["orientation"].items())
        oblique = summary["oblique_cases"]
        console.print(f"  orientation  : {codes} (on disk; {oblique} oblique)" if oblique else
                      f"  orientation  : {codes} (on disk)", highlight=False)
    if "intensity" in summary:
        i = summary["intensity"]
        console.print(f"  intensity    : {i['min']:.4g} .. {i['max']:.4g} (mean of case means {i['mean_of_case_means']:.4g})")
    if "label_voxels" in summary:
        names = report.labels
        values = list(summary["label_voxels"].items())
        console.print(f"  labels       : {len(values)} values" + (f", {min(summary['label_voxels'])}.."
                      f"{max(summary['label_voxels'])}" if len(values) > 1 else ""), highlight=False)
        for v, n in values[:_LABEL_ROWS]:
            name = f" {names[v]}" if v in names else ""
            console.print(f"    {v}{name}: {n} voxels in {summary['label_cases'].get(v, 0)} cases", highlight=False)
        if len(values) > _LABEL_ROWS:
            console.print(f"    ... and {len(values) - _LABEL_ROWS} more (--json lists all)", highlight=False)
    if "num_classes" in summary:
        console.print(f"  classes      : {summary['num_classes']} (from the {summary['num_classes_from']}; finetune "
                      "uses this unless model.num_classes is set)", highlight=False)
    if "class_balance" in summary:
        console.print(f"  classes      : {summary['class_balance']}", highlight=False)
    if "boxes" in summary:
        b = summary["boxes"]
        names = ", ".join(f"{k} {v}" for k, v in sorted(report.labels.items()))
        console.print(f"  boxes        : {b['total']} ({names}); {b['cases_without_boxes']} cases without any, "
                      f"at most {b['max_per_case']} in a case", highlight=False)
    if not report.problems:
        console.print("[green]  no problems found[/]")
        return
    console.print(f"  problems     : {len(report.errors)} errors, {len(report.warnings)} warnings")
    for p in report.problems:
        colour = "red" if p.severity == "error" else "yellow"
        console.print(f"  [{colour}]{p.severity}[/]: {str(p).split(': ', 1)[1]}", highlight=False, soft_wrap=True)


PHANTOM_LAYOUTS = ("msd", "luna16", "datalist", "deeplesion")


@data_app.command("phantoms")
def data_phantoms(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (the dataset is written there)."),
    n: int = typer.Option(8, "--n", min=1, help="Number of cases."),
    seed: int = typer.Option(0, help="Seed: the same seed writes the same dataset."),
    size: Optional[int] = typer.Option(None, help="Cube edge in voxels (D = H = W); default 64 (msd), "
                                       "32x48x48 (detection layouts)."),
    spacing: Optional[float] = typer.Option(None, help="Isotropic voxel spacing in mm; default 2.5 (msd), "
                                            "2.5x2x2 (detection layouts)."),
    no_2d: bool = typer.Option(False, "--no-2d", help="msd: skip the 2D radiograph-like projections."),
    layout: str = typer.Option("msd", "--layout", help="msd (segmentation, classification, 2D), or detection "
                               "phantoms with nodule boxes: luna16 (subset0/*.mhd, annotations.csv, candidates.csv), "
                               "datalist (MONAI detection dataset.json) or deeplesion (DL_info.csv, Images_png/)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Detection layouts: write into a folder that "
                                   "is not empty."),
) -> None:
    """Write the embedded synthetic CT dataset: HU volumes with labels, case classes and 2D projections; or, with
    --layout luna16|datalist|deeplesion, detection phantoms (several nodules of several sizes, instance masks and
    boxes; LUNA16's candidate list with true and false candidates) to try detection and nodule candidate
    classification with no download.

    Labels (msd): 0 background, 1 lung, 2 heart, 3 liver, 4 spine, 5 vessel, 6 lesion. Case class
    (classification.csv): 1 = a malignant lung nodule. 2D: radiograph-like projections, lung masks and findings
    (nodule, cardiomegaly, effusion). The same seed writes the same files.
    """
    from ..paths import check_output_dir

    if layout not in PHANTOM_LAYOUTS:
        _fail(f"--layout {layout!r}: choose one of {', '.join(PHANTOM_LAYOUTS)}", code=2)
    check_output_dir(out, "--out")
    if layout == "msd":
        from ..data.phantoms import write_phantom_dataset

        size, spacing = size or 64, spacing or 2.5
        path = write_phantom_dataset(out, n, seed, shape=(size, size, size), spacing=(spacing,) * 3,
                                     with_2d=not no_2d)
        console.print(f"wrote {n} phantom cases to [bold]{path}[/]")
        return
    from ..data.phantoms_detection import write_detection_phantoms

    if no_2d:
        _fail(f"--no-2d applies to --layout msd; --layout {layout} writes no 2D projections", code=2)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        _fail(f"--out {out} is not empty; nothing was written: choose an empty or new folder, or pass --overwrite",
              code=2)
    if size is not None and size < 16:
        _fail(f"--size {size}: detection phantoms need at least 16 voxels per axis", code=2)
    shape = {"shape": (size,) * 3} if size is not None else {}
    grid = {"spacing": (spacing,) * 3} if spacing is not None else {}
    path = write_detection_phantoms(out, n, seed, layout, **shape, **grid)
    how = {"luna16": "--format luna16 with task=detection", "datalist": "--format monai_detection",
           "deeplesion": "--format deeplesion"}[layout]
    console.print(f"wrote {n} {layout} detection phantom cases to [bold]{path}[/] (read them with {how})")


@data_app.command("cubes")
def data_cubes(
    path: Path = typer.Argument(..., help="A dataset of CT volumes in HU (e.g. LUNA16 root, MSD folder)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for the cube arrays."),
    fmt: str = typer.Option("auto", "--format", help="Layout; 'auto' detects it."),
    seed: int = typer.Option(1, help="Seed (the published extraction uses 1)."),
    scale: int = typer.Option(32, help="Cubes per volume at most."),
    cube_size: str = typer.Option("32,64,64", help="Cube size D,H,W in voxels (published: 32 slices of 64x64)."),
    border_xy: int = typer.Option(100, help="In-plane margin in voxels (published: 100, for 512x512 CT)."),
    border_z: int = typer.Option(30, help="Margin in slices (published: 30)."),
    lung_max: float = typer.Option(0.15, help="Largest accepted dense-tissue fraction (published: 0.15)."),
) -> None:
    """Extract Models Genesis training cubes: HU window [-1000, 1000] -> [0, 1], random windows inside the margins,
    windows with too much dense tissue rejected (the published rule, vectorised). Defaults are the published ones,
    made for LUNA16 volumes (at least 96 slices, 265 voxels in-plane); smaller volumes need smaller margins/cubes.
    Exits 1, writing nothing, when no volume gives a cube, saying why for each."""
    from ..data.cubes import CubeConfig, NoCubesError, extract_cubes_from_dataset
    from ..paths import check_output_dir

    check_output_dir(out, "--out")  # a refusal is reported by _Commands, like every MedTransferError
    dataset = _load_dataset(path, fmt)
    try:
        d, h, w = (int(s) for s in cube_size.split(","))
        config = CubeConfig(cube_depth=d, cube_height=h, cube_width=w, border_xy=border_xy, border_z=border_z,
                            scale=scale, lung_max=lung_max)
        paths = extract_cubes_from_dataset(dataset, out, config=config, seed=seed)
    except NoCubesError as exc:  # the data gave nothing under these options: exit 1, like `data inspect`
        _fail(exc, code=1)
    except ValueError as exc:
        _fail(exc)
    for p in paths:
        console.print(f"wrote [bold]{p}[/]")


@data_app.command("candidates")
def data_candidates(
    luna_dir: Path = typer.Argument(..., help="LUNA16 folder holding subset0/, subset1/, ... with the .mhd scans."),
    candidates: Path = typer.Option(..., "--candidates", help="candidates.csv-style list: seriesuid, coordX, coordY, "
                                    "coordZ (world mm), class (1 = nodule)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: candidates.csv, cubes/, ncc.json, skipped.json."),
    cube_size: str = typer.Option("32,64,64", help="Cube size D,H,W = z,y,x in voxels (published: 64x64x32 in x,y,z)."),
    spacing: Optional[str] = typer.Option(None, help="Resample the cubes to D,H,W mm (default: native spacing, as "
                                          "the published recipe)."),
    subsets: Optional[str] = typer.Option(None, help="Only these subset folders, e.g. subset0,subset1 (a scan-level "
                                          "split: extract the training and the test folds apart)."),
    annotations: Optional[Path] = typer.Option(None, help="annotations.csv for the FROC of evaluate (default: "
                                               "LUNA_DIR/annotations.csv when it exists)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier extraction in --out."),
) -> None:
    """Cut a cube around every candidate of a LUNA16 candidate list (nodule candidate classification, Models Genesis'
    NCC) and write a classification dataset: OUT/candidates.csv is what `finetune` takes as data.path.

    Cubes hold HU clipped to [-1000, 1000] (int16, padded with -1000 outside the scan); the fine-tune's genesis_ct
    preset scales them to [0, 1]. A candidate without its scan in LUNA_DIR, or outside its scan, is skipped, counted
    and listed in OUT/skipped.json; when every one is, nothing is written and the exit code is 2."""
    from ..data.candidates import extract_candidates
    from ..errors import MedTransferError
    from ..paths import check_output_dir

    check_output_dir(out, "--out")
    try:
        size = tuple(int(s) for s in cube_size.split(","))
        target = tuple(float(s) for s in spacing.split(",")) if spacing else None
    except ValueError:
        _fail(MedTransferError(f"--cube-size {cube_size!r} / --spacing {spacing!r}: give three numbers separated by "
                               "commas, e.g. 32,64,64"))
    try:
        result = extract_candidates(luna_dir, candidates, out, size=size, spacing=target,
                                    subsets=subsets.split(",") if subsets else None, annotations=annotations,
                                    overwrite=overwrite, progress=sys.stderr.isatty())
    except MedTransferError as exc:
        _fail(exc)
    console.print(f"wrote {result.written} cubes ({result.positives} nodule candidates) from {result.scans} scans to "
                  f"[bold]{out / 'candidates.csv'}[/]", highlight=False, soft_wrap=True)
    if result.skipped:
        console.print(f"skipped {len(result.skipped)} candidates: {result.skipped_no_scan} without a scan in "
                      f"{luna_dir}, {result.skipped_outside} outside their scan (listed in {out / 'skipped.json'})",
                      highlight=False, soft_wrap=True)


@data_app.command("prepare")
def data_prepare(
    path: Path = typer.Argument(..., help="A dataset (any supported layout)."),
    out: Path = typer.Option(..., "--out", "-o", help="Cache folder (reused: unchanged cases are not redone)."),
    preset: Optional[str] = typer.Option(
        None, help="Intensity preset: genesis_ct, volf_ct, medicalnet_mri, mri_zscore, zscore, percentile "
        "(default: by the data's modality: CT genesis_ct, MRI mri_zscore, 2D or unknown zscore)."),
    modality: str = typer.Option("auto", help="CT, MRI, or auto: the dataset's channel names, else its intensities."),
    spacing: Optional[str] = typer.Option(None, help="Target spacing in mm as D,H,W (default: keep)."),
    fmt: str = typer.Option("auto", "--format", help="Layout; 'auto' detects it."),
    workers: Optional[int] = typer.Option(None, help="Worker processes (default: all cores)."),
) -> None:
    """Check, then preprocess every case once into a memory-mappable cache with a manifest.

    A second run redoes only new or changed cases (by content hash); with nothing to redo it reads no image and
    says so."""
    from ..data.cache import PreparedCache
    from ..data.check import check_dataset
    from ..data.modality import choose_preset, dataset_modality
    from ..data.preprocess import build_pipeline, preset as known_preset
    from ..errors import MedTransferError
    from ..paths import check_output_dir

    if modality.upper() not in ("AUTO", "CT", "MRI"):
        _fail(MedTransferError(f"--modality {modality!r}: choose auto, CT or MRI"))
    check_output_dir(out, "--out")  # a refusal is reported by _Commands, like every MedTransferError
    dataset = _load_dataset(path, fmt)
    try:
        if preset is not None:
            known_preset(preset)
        found = dataset_modality(dataset, modality)
        choice = choose_preset(preset, found, dataset.spatial_dims, user_where="--preset")
        err_console.print(f"intensity preset {choice.preset} ({choice.source}); data modality {found} "
                          f"({found.source})", highlight=False, soft_wrap=True)
        if choice.warning:
            err_console.print(f"[bold yellow]warning:[/] {choice.warning}", highlight=False, soft_wrap=True)
        target = tuple(float(s) for s in spacing.split(",")) if spacing else None
        pipeline = build_pipeline(preset=choice.preset, spacing=target)
        cache = PreparedCache(out)
        todo = cache.pending(dataset, pipeline, workers=workers)  # sizes, times and hashes only: no voxel read
    except ValueError as exc:
        _fail(exc)
    if todo:  # the up-to-date cases were prepared from these very files; a check reads every case
        report = check_dataset(dataset, workers=workers, progress=sys.stderr.isatty())
        if not report.ok:
            _print_data_report(report)
            err_console.print("[bold red]error:[/] fix the problems above before preparing", highlight=False)
            raise typer.Exit(code=1)
    try:
        cases = cache.prepare(dataset, pipeline, workers=workers)
    except ValueError as exc:
        _fail(exc)
    if not todo:
        console.print(f"{len(cases)} cases up to date in [bold]{out}[/], nothing to redo", highlight=False,
                      soft_wrap=True)
    else:
        console.print(f"prepared {cache.redone} cases in [bold]{out}[/] ({cache.reused} up to date)", highlight=False,
                      soft_wrap=True)

