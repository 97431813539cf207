"""The `medtransfer` command line. Each command parses its options, imports lazily and calls one library function."""

from __future__ import annotations

import errno
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from typer.core import TyperGroup


class _Commands(TyperGroup):
    """The root command group: whatever command runs, an error of the OS (a full disk, a read-only folder, a file
    where a folder is needed), of torch's checkpoint writer or of SQLite on a full disk ends as one line and exit 1,
    a medtransfer error not caught by its command as one line and exit 2. Any other exception is a bug and keeps its
    traceback.

    Sitting in ``invoke`` (not ``main``) it also holds under ``typer.testing.CliRunner().invoke(app, ...)``."""

    def invoke(self, ctx):
        from .errors import MedTransferError
        from .paths import describe_os_error, describe_write_failure

        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort):
            raise
        except MedTransferError as exc:  # before OSError: WeightsNotFoundError is both
            _fail(exc)
        except OSError as exc:
            if exc.errno == errno.EPIPE:  # click's own handling of a closed pipe (`| head`)
                raise
            _fail(describe_os_error(exc), code=1)
        except Exception as exc:  # torch's and SQLite's write failures carry no errno
            message = describe_write_failure(exc)
            if message is None:
                raise
            _fail(message, code=1)


app = typer.Typer(
    cls=_Commands,
    name="medtransfer",
    help="Transfer learning for 3D (and 2D) medical image analysis: a model zoo that loads every published "
    "checkpoint of MedicalNet, VDT, Models Genesis, MIS-FM and BenchmarkTransferLearning with a load report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
zoo_app = typer.Typer(
    help="Models and weights: list the zoo, inspect a weight file, convert one to the normalised format.",
    no_args_is_help=True,
)
app.add_typer(zoo_app, name="zoo")
data_app = typer.Typer(
    help="Datasets: check one before training, write the embedded phantom dataset, prepare a cache, extract cubes.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")


def _register_training_commands() -> None:
    # finetune / evaluate / predict live with the training code; their options import nothing heavy.
    from .bench.cli_bench import register as register_bench
    from .pretext.cli_pretrain import register as register_pretrain
    from .train.cli_train import register

    register_pretrain(app)
    register(app)
    register_bench(app)

console = Console()
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"medtransfer {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress and load reports in detail."),
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _fail(exc: Exception | str, code: int = 2) -> None:
    """Print one ``error:`` line and exit: 2 for a refused input (the default), 1 for a failure of the OS."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=code)


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


@zoo_app.command("list")
def zoo_list(
    pattern: str = typer.Argument("*", help="Shell-style pattern of model names, e.g. 'medicalnet_*'."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List models: name, family, parameters, published weights and the input they expect."""
    from dataclasses import asdict

    from .zoo.tools import describe_models

    infos = describe_models(pattern)
    if not infos:
        _fail(ValueError(f"no model matches '{pattern}'"))
    if as_json:
        typer.echo(json.dumps([asdict(i) for i in infos], indent=2))
        return
    from rich.table import Table

    if len(infos) == 1:
        _print_model_detail(infos[0])
        return
    table = Table(title=f"medtransfer model zoo ({len(infos)} models)")
    table.add_column("model", no_wrap=True)
    table.add_column("family")
    table.add_column("dims")
    table.add_column("encoder", justify="right")
    table.add_column("published weights (tags)")
    table.add_column("input (default weights)")
    for i in infos:
        tags = [w.split(".", 1)[1] for w in i.weights]
        weights = ", ".join(tags[:3]) + (f" +{len(tags) - 3} more" if len(tags) > 3 else "") if tags else "-"
        table.add_row(i.name, i.family, f"{i.spatial_dims}D", _millions(i.encoder_parameters), weights, i.input_contract)
    console.print(table)
    console.print("`medtransfer zoo list NAME` shows one model's weights in full: file, address, input contract.")


def _print_model_detail(info) -> None:
    console.print(f"[bold]{info.name}[/] ({info.family}, {info.spatial_dims}D): {info.description}", highlight=False)
    console.print(f"  parameters: {_millions(info.parameters)} (encoder {_millions(info.encoder_parameters)})")
    console.print(f"  options   : {', '.join(info.options) or '-'} (keyword arguments of create_model)", highlight=False)
    if not info.pretrained:
        console.print("  no published weights")
    for cfg in info.pretrained:
        console.print(f"\n  [bold]{cfg['model']}.{cfg['tag']}[/]  file {cfg['file_name']}  (format {cfg['source']})")
        for field in ("url", "pretraining", "modality", "in_channels", "intensity", "spacing", "patch_size",
                      "num_classes", "arch_kwargs", "license", "citation", "notes"):
            value = cfg.get(field)
            if value not in (None, "", {}, ()):
                console.print(f"    {field:12s} {value}", highlight=False, soft_wrap=True)


@zoo_app.command("inspect")
def zoo_inspect(
    file: Path = typer.Argument(..., help="A weight file (.pth, .pt, .pth.tar, .pkl, .safetensors)."),
    source: str = typer.Option("auto", help="Checkpoint format; 'auto' detects it from the key signature."),
    show_all: bool = typer.Option(False, "--all", help="Also list the models the file does not fit."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Detect a weight file's format, count its tensors, and show which models it fits and with what coverage.

    The file is read without executing anything in it. Exits 1 when it fits no registered model.
    """
    from .errors import MedTransferError
    from .zoo.tools import inspect_checkpoint

    try:
        info = inspect_checkpoint(file, source=source)
    except MedTransferError as exc:
        _fail(exc)
    fits = info.fits if show_all else [f for f in info.fits if f.ok]
    fits_none = not any(f.ok for f in info.fits)  # exit 1 then, so scripts can tell
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "file": str(info.path),
                    "source": info.source,
                    "tensors": info.tensors,
                    "parameters": info.parameters,
                    "key_groups": info.key_groups,
                    "metadata": info.metadata,
                    "fits": [
                        {
                            "model": f.model,
                            "ok": f.ok,
                            "coverage": round(f.coverage, 6),
                            "file_used": round(f.file_used, 6),
                            "note": f.reason,
                        }
                        for f in fits
                    ],
                },
                indent=2,
                default=str,
            )
        )
        if fits_none:
            raise typer.Exit(code=1)
        return
    from rich.table import Table

    console.print(f"[bold]{info.path}[/]")
    console.print(f"  detected source : {info.source}")
    console.print(f"  tensors         : {info.tensors} ({_millions(info.parameters)} floating-point values)")
    groups = ", ".join(f"{k} ({v})" for k, v in sorted(info.key_groups.items()))
    console.print(f"  key groups      : {groups}", highlight=False)
    made = info.metadata.get("pretrained_cfg") if isinstance(info.metadata, dict) else None
    if isinstance(made, dict):  # a `medtransfer pretrain` file: how it was made and the input it expects
        console.print(f"  pretrained      : {made.get('pretraining', '')}", highlight=False)
        contract = [f"preset {made['preset']}" if made.get("preset") else made.get("intensity", ""),
                    f"patch {made['patch_size']}" if made.get("patch_size") else "",
                    f"spacing {made['spacing']}" if made.get("spacing") else "native spacing"]
        console.print(f"  input contract  : {', '.join(c for c in contract if c)}", highlight=False)
    table = Table(title="models this file fits" if not show_all else "all models")
    table.add_column("model", no_wrap=True)
    table.add_column("fits")
    table.add_column("encoder loaded", justify="right")
    table.add_column("file used", justify="right")
    table.add_column("note", overflow="fold")
    for f in fits:
        verdict = "no" if not f.ok else ("yes" if f.coverage == 1.0 else "partial")
        used = f"{f.file_used:.1%}" if f.ok else "-"
        table.add_row(f.model, verdict, f"{f.coverage:.1%}", used, f.reason)
    if fits:
        console.print(table)
    if fits_none:
        err_console.print(f"[bold red]error:[/] {info.path} fits no registered model"
                          + ("" if show_all else " (--all shows why for each)"), highlight=False, soft_wrap=True)
        raise typer.Exit(code=1)


@zoo_app.command("convert")
def zoo_convert(
    file: Path = typer.Argument(..., help="A weight file in any supported format."),
    model: str = typer.Option(..., "--model", "-m", help="Target model name (see `medtransfer zoo list`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output file; '.safetensors' is appended if missing."),
    task: str = typer.Option("segmentation", help="segmentation, classification or features."),
    num_classes: Optional[int] = typer.Option(None, help="Output classes (default: the file's own head, if any)."),
    in_channels: Optional[int] = typer.Option(None, help="Input channels (the input convolution is adapted)."),
    source: str = typer.Option("auto", help="Checkpoint format; 'auto' detects it."),
    min_coverage: Optional[float] = typer.Option(None, help="Fail when less of the encoder loads (0-1)."),
    inflate: str = typer.Option("i3d", help="2D->3D kernel inflation: i3d (repeat and divide) or centre."),
) -> None:
    """Convert a weight file to medtransfer's normalised format (safetensors + JSON metadata) and print the report."""
    from .errors import MedTransferError
    from .paths import check_output_file
    from .zoo.tools import convert_checkpoint

    try:
        check_output_file(out if out.suffix == ".safetensors" else out.with_name(out.name + ".safetensors"), "--out")
        path, report = convert_checkpoint(
            file,
            model,
            out,
            task=task,
            num_classes=num_classes,
            in_channels=in_channels,
            source=source,
            min_coverage=min_coverage,
            inflate=inflate,
        )
    except (MedTransferError, ValueError, TypeError) as exc:
        _fail(exc)
    console.print(report)
    console.print(f"wrote [bold]{path}[/] ({len(report.loaded)} tensors from the file)")


def _load_dataset(path: Path, fmt: str):
    from .data.datasets import load_dataset
    from .errors import MedTransferError

    try:
        return load_dataset(path, format=fmt)
    except MedTransferError as exc:
        _fail(exc)


@data_app.command("inspect")
def data_inspect(
    path: Path = typer.Argument(..., help="A dataset: MSD or nnU-Net folder, list/CSV file, LUNA16 root, image folder."),
    fmt: str = typer.Option("auto", "--format", help="Layout; 'auto' detects it."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    workers: Optional[int] = typer.Option(None, help="Threads reading cases (default: up to 8)."),
) -> None:
    """Summarise a dataset and list every problem with its file and fix. Exits 1 when training would break."""
    from .data.check import check_dataset

    dataset = _load_dataset(path, fmt)
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
    if not report.problems:
        console.print("[green]  no problems found[/]")
        return
    console.print(f"  problems     : {len(report.errors)} errors, {len(report.warnings)} warnings")
    for p in report.problems:
        colour = "red" if p.severity == "error" else "yellow"
        console.print(f"  [{colour}]{p.severity}[/]: {str(p).split(': ', 1)[1]}", highlight=False, soft_wrap=True)


@data_app.command("phantoms")
def data_phantoms(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (an MSD-format dataset is written there)."),
    n: int = typer.Option(8, "--n", min=1, help="Number of cases."),
    seed: int = typer.Option(0, help="Seed: the same seed writes the same dataset."),
    size: int = typer.Option(64, help="Cube edge in voxels (D = H = W)."),
    spacing: float = typer.Option(2.5, help="Isotropic voxel spacing in mm."),
    no_2d: bool = typer.Option(False, "--no-2d", help="Skip the 2D radiograph-like projections."),
) -> None:
    """Write the embedded synthetic CT dataset: HU volumes with labels, case classes and 2D projections.

    Labels: 0 background, 1 lung, 2 heart, 3 liver, 4 spine, 5 vessel, 6 lesion. Case class (classification.csv):
    1 = a malignant lung nodule. 2D: radiograph-like projections, lung masks and findings (nodule, cardiomegaly,
    effusion). The same seed writes the same files.
    """
    from .data.phantoms import write_phantom_dataset
    from .errors import MedTransferError
    from .paths import check_output_dir

    try:
        check_output_dir(out, "--out")
        path = write_phantom_dataset(out, n, seed, shape=(size, size, size), spacing=(spacing,) * 3, with_2d=not no_2d)
    except MedTransferError as exc:
        _fail(exc)
    console.print(f"wrote {n} phantom cases to [bold]{path}[/]")


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
    from .data.cubes import CubeConfig, NoCubesError, extract_cubes_from_dataset
    from .errors import MedTransferError
    from .paths import check_output_dir

    check_output_dir(out, "--out")  # a refusal is reported by _Commands, like every MedTransferError
    dataset = _load_dataset(path, fmt)
    try:
        d, h, w = (int(s) for s in cube_size.split(","))
        config = CubeConfig(cube_depth=d, cube_height=h, cube_width=w, border_xy=border_xy, border_z=border_z,
                            scale=scale, lung_max=lung_max)
        paths = extract_cubes_from_dataset(dataset, out, config=config, seed=seed)
    except NoCubesError as exc:  # the data gave nothing under these options: exit 1, like `data inspect`
        _fail(exc, code=1)
    except (MedTransferError, ValueError) as exc:
        _fail(exc)
    for p in paths:
        console.print(f"wrote [bold]{p}[/]")


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
    from .data.cache import PreparedCache
    from .data.check import check_dataset
    from .data.modality import choose_preset, dataset_modality
    from .data.preprocess import build_pipeline, preset as known_preset
    from .errors import MedTransferError
    from .paths import check_output_dir

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
    except (MedTransferError, ValueError) as exc:
        _fail(exc)
    if todo:  # the up-to-date cases were prepared from these very files; a check reads every case
        report = check_dataset(dataset, workers=workers, progress=sys.stderr.isatty())
        if not report.ok:
            _print_data_report(report)
            err_console.print("[bold red]error:[/] fix the problems above before preparing", highlight=False)
            raise typer.Exit(code=1)
    try:
        cases = cache.prepare(dataset, pipeline, workers=workers)
    except (MedTransferError, ValueError) as exc:
        _fail(exc)
    if not todo:
        console.print(f"{len(cases)} cases up to date in [bold]{out}[/], nothing to redo", highlight=False,
                      soft_wrap=True)
    else:
        console.print(f"prepared {cache.redone} cases in [bold]{out}[/] ({cache.reused} up to date)", highlight=False,
                      soft_wrap=True)


_register_training_commands()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
