"""``medtransfer pretrain``.

Config building order, as for ``finetune``: the ``--config`` file, then the flags, then each ``--set key=value``;
the method's recipe is merged under the result and everything is validated before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ..pretext.config import METHOD_SUMMARY
from . import _fail

pretrain_app = typer.Typer()

_METHODS_HELP = "; ".join(f"{name}: {text}" for name, text in METHOD_SUMMARY.items())


def build_pretrain_config(config: Optional[Path], *, method: Optional[str] = None, model: Optional[str] = None,
                          data: Optional[list[Path]] = None, recipe: Optional[str] = None,
                          seed: Optional[int] = None, out: Optional[Path] = None, overrides: tuple[str, ...] | list[str] = (),
                          resume: bool = False):
    """The validated :class:`~medtransfer.pretext.config.PretrainConfig` of a command line (``resume``: on top of
    the run folder's ``config.yaml``, as ``finetune --resume``)."""
    from ..pretext.config import load_pretrain_config
    from ..train.config import read_yaml
    from ..train.recipes import merge
    from .train import resume_base

    base: dict[str, Any] = read_yaml(config) if config is not None else {}
    if resume:
        run_dir = out if out is not None else base.get("out")
        base = merge(resume_base(run_dir, "pretrain"), base)
        out = Path(run_dir)
    if method is not None:
        base["method"] = method
    if model is not None:
        base.setdefault("model", {})["name"] = model
    if data:
        base.setdefault("data", {})["paths"] = [str(p) for p in data]
    for key, value in (("recipe", recipe), ("out", str(out) if out is not None else None)):
        if value is not None:
            base[key] = value
    if seed is not None:
        base.setdefault("train", {})["seed"] = seed
    return load_pretrain_config(base, overrides)


@pretrain_app.command(
    short_help="Pretrain a zoo network on your own scans (genesis, volf, med3d, vdt).",
    help=f"Pretrain a zoo network on your own scans. Methods: {_METHODS_HELP}. Writes config.yaml, "
         "env.json, data.json, metrics.jsonl, checkpoints/ and pretrained.safetensors (with its input "
         "contract), which `finetune --pretrained FILE` and mt.create_model(NAME, pretrained=FILE) load.",
)
def pretrain(
    method: Optional[str] = typer.Option(None, "--method", "-m", help="genesis, volf, med3d or vdt."),
    model: Optional[str] = typer.Option(None, "--model", help="Zoo model name (default per method: "
                                        "genesis_unet3d, fmunet, medicalnet_resnet10, vdt_resnet18_3d)."),
    data: Optional[list[Path]] = typer.Option(None, "--data", help="Dataset folder/file (repeat for med3d; "
                                              "a .npy cube file for genesis). Default: embedded phantoms."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="published (default), modern (genesis) or none."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/pretrain)."),
    overrides: list[str] = typer.Option([], "--set", help="key=value override, e.g. train.max_steps=100, "
                                        "options.flip_rate=0.5 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its checkpoints/last.pt "
                                "and config.yaml; other options may only repeat the saved values (or change "
                                "train.max_steps, train.max_epochs, data.workers)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in --out (its files are "
                                   "removed first)."),
) -> None:
    from ..pretext.runner import run_pretrain
    from .train import interrupted

    try:
        cfg = build_pretrain_config(config, method=method, model=model, data=data, recipe=recipe, seed=seed,
                                    out=out, overrides=overrides, resume=resume)
    except ValueError as exc:
        _fail(exc)
    try:
        # a bar on a terminal, else plain lines
        run_dir = run_pretrain(cfg, resume=resume, overwrite=overwrite, progress=True)
    except ValueError as exc:
        _fail(exc)
    except KeyboardInterrupt as exc:
        interrupted(exc, "pretrain", Path(cfg.out))
    typer.echo(str(run_dir / "pretrained.safetensors"))
