"""``medtransfer zoo list | inspect | convert | fetch``: the model zoo and weight files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from . import _fail, console, err_console

zoo_app = typer.Typer(
    help="Models and weights: list the zoo, inspect a weight file, convert one to the normalised format, "
    "fetch published weights into the cache.",
    no_args_is_help=True,
)


_ADAPT_STEM_HELP = (
    "Fit a file's input convolution of another depth and/or channel count: center_pad or interpolate (depth), "
    "average or tile (channels), joined by '+', e.g. center_pad+average."
)
_SKIP_HELP = "Leave out the file tensors whose key matches this shell pattern (repeatable), e.g. --skip 'fc.*'."


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


@zoo_app.command("list")
def zoo_list(
    pattern: str = typer.Argument("*", help="Shell-style pattern of model names, e.g. 'medicalnet_*'."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List models: name, family, parameters, published weights and the input they expect."""
    from dataclasses import asdict

    from ..zoo.tools import describe_models

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
        for field in ("url", "sha256", "pretraining", "modality", "in_channels", "intensity", "spacing", "patch_size",
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
    adapt_stem: Optional[str] = typer.Option(None, "--adapt-stem", help=_ADAPT_STEM_HELP),
    skip: Optional[list[str]] = typer.Option(None, "--skip", help=_SKIP_HELP),
) -> None:
    """Detect a weight file's format, count its tensors, and show which models it fits and with what coverage.

    The file is read without executing anything in it. Models are ranked by encoder coverage plus the share of
    the file used, then by how little adaptation the fit needs. Exits 1 when it fits no registered model.
    """
    from ..zoo.tools import inspect_checkpoint

    try:
        info = inspect_checkpoint(file, source=source, adapt_stem=adapt_stem, skip=tuple(skip or ()))
    except ValueError as exc:
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
                    "cannot_tell": info.unknowable,
                    "fits": [
                        {
                            "model": f.model,
                            "ok": f.ok,
                            "coverage": round(f.coverage, 6),
                            "file_used": round(f.file_used, 6),
                            "adapted": [list(a) for a in f.report.adapted] if f.ok and f.report else [],
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
    for line in info.unknowable:
        console.print(f"  cannot tell     : {line}", highlight=False, soft_wrap=True)
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
    adapt_stem: Optional[str] = typer.Option(None, "--adapt-stem", help=_ADAPT_STEM_HELP),
    skip: Optional[list[str]] = typer.Option(None, "--skip", help=_SKIP_HELP),
) -> None:
    """Convert a weight file to medtransfer's normalised format (safetensors + JSON metadata) and print the report."""
    from ..paths import check_output_file
    from ..zoo.tools import convert_checkpoint

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
            adapt_stem=adapt_stem,
            skip=tuple(skip or ()),
        )
    except (ValueError, TypeError) as exc:
        _fail(exc)
    console.print(report)
    console.print(f"wrote [bold]{path}[/] ({len(report.loaded)} tensors from the file)")



@zoo_app.command(
    "fetch",
    help="Download a model's published weight file into the weights cache ($MEDTRANSFER_HOME/weights, default "
    "~/.cache/medtransfer/weights), where pretrained=True finds it. NAME is a model with an optional weight tag "
    "(medicalnet_resnet10.23dataset; no tag: the model's first file; `zoo list NAME` shows the tags). Only direct "
    "links are fetched (GitHub releases, Zenodo, Hugging Face, file servers); the proxy variables https_proxy, "
    "http_proxy and no_proxy are honoured. The file is written to FILE.part and renamed into place only when whole "
    "and, where the zoo records its sha256, matching it (a wrong file is removed); without a recorded hash the "
    "computed one is printed. A dropped connection keeps the .part: run the command again to resume it. For files "
    "behind a Google Drive, Baidu or similar page it prints the manual steps and the cache path, writes nothing "
    "and exits 1; a failed download also exits 1.",
)
def zoo_fetch(
    name: str = typer.Argument(..., help="Model name with an optional weight tag, e.g. resnet50_2d.moco_v2."),
) -> None:
    from ..weights.fetch import DownloadError, ManualDownloadError
    from ..zoo.builder import split_name
    from ..zoo.pretrained import fetch_pretrained
    from ..zoo.registry import get_entry

    base, tag = split_name(name)
    cfg = get_entry(base).pretrained_cfg(tag)
    if cfg is None:
        _fail(f"model '{base}' has no published weights; nothing to fetch")
    try:
        # a bar on a terminal, else plain lines
        done = fetch_pretrained(cfg, echo=lambda line: typer.echo(line, err=True))
    except (ManualDownloadError, DownloadError) as exc:  # the network or the publisher, not the command line
        _fail(exc, code=1)
    if done.reused:
        err_console.print(f"{cfg.full_name}: already in the cache", highlight=False, soft_wrap=True)
    elif done.resumed_from:
        err_console.print(f"{cfg.full_name}: resumed at byte {done.resumed_from}, {done.downloaded} bytes fetched",
                          highlight=False, soft_wrap=True)
    if done.verified:  # otherwise fetch_pretrained's WARNING gives the hash it computed
        err_console.print(f"sha256 {done.sha256} (matches the zoo's record)", highlight=False, soft_wrap=True)
    typer.echo(str(done.path))
