"""Adapt a converted state_dict to a model, load it, and report exactly what happened.

Silent partial loads are the most-reported bug of every seed system (MedicalNet on CPU loads nothing, the
BenchmarkTransferLearning loader keeps ``encoder_q.`` and loads nothing). Here every load returns a
:class:`LoadReport`; loading no encoder weights, or encoder tensors of the wrong shape, is an error.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointMismatchError
from .inflate import adapt_input_channels, inflate_conv_weight

log = logging.getLogger(__name__)

# Counters, not weights: never counted as missing and never held against coverage.
_IGNORED_SUFFIXES = ("num_batches_tracked",)

STEM_DEPTH_MODES = ("center_pad", "interpolate")
STEM_CHANNEL_MODES = ("average", "tile")


@dataclass(frozen=True)
class StemAdapt:
    """How the input convolution (``first_conv_keys``) of a file is fitted to a stem of another shape.

    ``depth``: ``center_pad`` (file taps in the middle, zeros around them; a deeper file kernel is cut to its
    centre taps) or ``interpolate`` (linear along depth with the end taps at the ends, rescaled by file depth /
    model depth; to depth 1: the sum over depth); None: a kernel of
    another depth is a shape mismatch. ``channels``: ``average`` (every model channel gets the mean over the file's
    channels) or ``tile`` (file channels repeated in order, scaled by file channels / model channels); None: the
    default rule, average to one channel and tile to more.
    """

    depth: str | None = None
    channels: str | None = None


def parse_adapt_stem(value: str | Sequence[str] | StemAdapt | None) -> StemAdapt:
    """``"center_pad"``, ``"average"``, ``"interpolate+tile"`` (parts joined by ``+`` or ``,``), a list of parts,
    or None. At most one depth part and one channel part."""
    if value is None or isinstance(value, StemAdapt):
        return value or StemAdapt()
    parts = value.replace(",", "+").split("+") if isinstance(value, str) else list(value)
    parts = [str(p).strip() for p in parts if str(p).strip()]
    depth = [p for p in parts if p in STEM_DEPTH_MODES]
    channels = [p for p in parts if p in STEM_CHANNEL_MODES]
    unknown = [p for p in parts if p not in STEM_DEPTH_MODES + STEM_CHANNEL_MODES]
    if unknown or len(depth) > 1 or len(channels) > 1:
        raise ValueError(
            f"adapt_stem {value!r}: give at most one depth rule ({', '.join(STEM_DEPTH_MODES)}) and one channel rule "
            f"({', '.join(STEM_CHANNEL_MODES)}), joined by '+', e.g. 'center_pad+average'"
        )
    return StemAdapt(depth[0] if depth else None, channels[0] if channels else None)


def adapt_kernel_depth(weight: torch.Tensor, depth: int, mode: str) -> torch.Tensor:
    """(O, I, d, kh, kw) -> (O, I, depth, kh, kw) by ``center_pad`` or ``interpolate`` (see :class:`StemAdapt`)."""
    have = weight.shape[2]
    if mode == "center_pad":
        if depth >= have:
            before = (depth - have) // 2
            return F.pad(weight, (0, 0, 0, 0, before, depth - have - before))
        start = (have - depth) // 2
        return weight[:, :, start : start + depth].clone()
    if mode == "interpolate":
        if depth == 1:  # one sample of a linear interpolation would be an end tap: keep the depth sum instead
            return weight.sum(dim=2, keepdim=True)
        o, i, d, kh, kw = weight.shape
        rows = weight.permute(0, 1, 3, 4, 2).reshape(-1, 1, d).float()
        out = F.interpolate(rows, size=depth, mode="linear", align_corners=True) * (have / depth)
        return out.reshape(o, i, kh, kw, depth).permute(0, 1, 4, 2, 3).contiguous().to(weight.dtype)
    raise ValueError(f"unknown stem depth rule {mode!r}; choose one of {', '.join(STEM_DEPTH_MODES)}")


def adapt_kernel_channels(weight: torch.Tensor, channels: int, mode: str) -> torch.Tensor:
    """(O, I, ...) -> (O, channels, ...) by ``average`` or ``tile`` (see :class:`StemAdapt`)."""
    have = weight.shape[1]
    if mode == "average":
        mean = weight.mean(dim=1, keepdim=True)
        return mean.expand(-1, channels, *weight.shape[2:]).clone()
    if mode == "tile":
        reps = -(-channels // have)
        return weight.repeat(1, reps, *([1] * (weight.ndim - 2)))[:, :channels] * (have / channels)
    raise ValueError(f"unknown stem channel rule {mode!r}; choose one of {', '.join(STEM_CHANNEL_MODES)}")


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def check_skip_patterns(
    state_dict: Mapping[str, torch.Tensor], skip: str | Sequence[str], path: str | None = None
) -> list[str]:
    """``skip`` as a list; a pattern that matches no key of the file is an error (a typo would skip nothing)."""
    skip = [skip] if isinstance(skip, str) else list(skip or ())
    unused = [p for p in skip if not any(fnmatch.fnmatchcase(k, p) for k in state_dict)]
    if unused:
        raise CheckpointMismatchError(
            f"{path + ': ' if path else ''}skip pattern(s) {', '.join(map(repr, unused))} match no tensor of the "
            f"file (its keys look like {', '.join(list(state_dict)[:3])}); patterns are shell-style, e.g. 'fc.*'"
        )
    return skip


@dataclass
class LoadReport:
    """What a checkpoint load did. ``print(report)`` shows it as a table."""

    source: str
    model: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    adapted: list[tuple[str, str]] = field(default_factory=list)  # (key, what was done)
    skipped: list[str] = field(default_factory=list)  # file tensors left out on request (skip=[patterns])
    cast: dict[str, int] = field(default_factory=dict)  # "bfloat16->float32": tensors converted to the model dtype
    encoder_total: int = 0
    encoder_loaded: int = 0
    encoder_mismatched: list[str] = field(default_factory=list)
    encoder_unexpected: list[str] = field(default_factory=list)  # file keys inside the encoder's modules
    notes: list[str] = field(default_factory=list)  # what the key comparison cannot tell (see zoo.builder)
    path: str | None = None
    stem_keys: tuple[str, ...] = ()  # the model's first_conv_keys, which adapt_stem applies to

    @property
    def coverage(self) -> float:
        """Fraction of the model's encoder tensors that came from the checkpoint."""
        return self.encoder_loaded / self.encoder_total if self.encoder_total else 0.0

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "model": self.model,
            "path": self.path,
            "coverage": round(self.coverage, 6),
            "encoder_loaded": self.encoder_loaded,
            "encoder_total": self.encoder_total,
            "loaded": len(self.loaded),
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "mismatched": [[k, list(a), list(b)] for k, a, b in self.mismatched],
            "adapted": [list(a) for a in self.adapted],
            "skipped": list(self.skipped),
            "cast": dict(self.cast),
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        return (
            f"{self.source} -> {self.model}: encoder coverage {self.coverage:.1%} "
            f"({self.encoder_loaded}/{self.encoder_total}), loaded {len(self.loaded)}, missing {len(self.missing)}, "
            f"unexpected {len(self.unexpected)}, shape-mismatched {len(self.mismatched)}, adapted {len(self.adapted)}"
            + (f", skipped {len(self.skipped)}" if self.skipped else "")
        )

    def __str__(self) -> str:
        rows = [
            ("source", self.source),
            ("file", self.path or "-"),
            ("model", self.model),
            ("encoder coverage", f"{self.coverage:.1%} ({self.encoder_loaded}/{self.encoder_total} tensors)"),
            ("loaded", str(len(self.loaded))),
            ("missing", _short(self.missing)),
            ("unexpected", _short(self.unexpected)),
            ("shape-mismatched", _short([f"{k} {list(a)} vs model {list(b)}" for k, a, b in self.mismatched])),
            ("adapted", _short([f"{k}: {what}" for k, what in self.adapted])),
            ("skipped", _short(self.skipped)),
            ("dtype cast", _casts(self.cast)),
        ] + [("note", note) for note in self.notes]
        width = max(len(r[0]) for r in rows)
        lines = ["LoadReport"] + [f"  {name.ljust(width)} | {value}" for name, value in rows]
        return "\n".join(lines)

    def __rich__(self):
        from rich.table import Table

        table = Table(title=f"LoadReport: {self.source} -> {self.model}", show_header=True)
        table.add_column("what")
        table.add_column("count", justify="right")
        table.add_column("keys")
        table.add_row("encoder coverage", f"{self.coverage:.1%}", f"{self.encoder_loaded}/{self.encoder_total}")
        table.add_row("loaded", str(len(self.loaded)), "")
        table.add_row("missing", str(len(self.missing)), _short(self.missing))
        table.add_row("unexpected", str(len(self.unexpected)), _short(self.unexpected))
        table.add_row(
            "shape-mismatched",
            str(len(self.mismatched)),
            _short([f"{k} {list(a)}->{list(b)}" for k, a, b in self.mismatched]),
        )
        table.add_row("adapted", str(len(self.adapted)), _short([f"{k}: {w}" for k, w in self.adapted]))
        table.add_row("skipped", str(len(self.skipped)), _short(self.skipped))
        table.add_row("dtype cast", str(sum(self.cast.values())), _casts(self.cast))
        for note in self.notes:
            table.add_row("note", "", note)
        return table


def _short(keys: list[str], limit: int = 4) -> str:
    if not keys:
        return "-"
    head = ", ".join(keys[:limit])
    return f"{len(keys)}: {head}" + (f", ... (+{len(keys) - limit})" if len(keys) > limit else "")


def _casts(cast: Mapping[str, int]) -> str:
    return ", ".join(f"{n} tensors {what}" for what, n in cast.items()) or "-"


def _counted(key: str) -> bool:
    return not key.endswith(_IGNORED_SUFFIXES)


def _fit_tensor(
    key: str, value: torch.Tensor, target: torch.Tensor, first_conv: bool, inflate: str, stem: StemAdapt
) -> tuple[torch.Tensor | None, str]:
    """Return ``value`` reshaped to fit ``target`` (inflated, stem-adapted) or None if it cannot fit."""
    done: list[str] = []
    shape = list(value.shape)
    if value.is_floating_point() and target.is_floating_point():
        value = value.to(dtype=target.dtype)  # adapt in the model's precision, not in the file's (bf16 means)
    if value.ndim + 1 == target.ndim and value.ndim == 4 and tuple(value.shape[2:]) == tuple(target.shape[3:]):
        value = inflate_conv_weight(value, target.shape[2], inflate)
        done.append(f"inflated 2D->3D ({inflate}, depth {target.shape[2]})")
    if (
        first_conv
        and stem.depth is not None
        and value.ndim == target.ndim == 5
        and value.shape[0] == target.shape[0]
        and value.shape[3:] == target.shape[3:]
        and value.shape[2] != target.shape[2]
    ):
        done.append(f"depth {value.shape[2]}->{target.shape[2]} ({stem.depth})")
        value = adapt_kernel_depth(value, target.shape[2], stem.depth)
    if (
        first_conv
        and value.ndim == target.ndim
        and value.shape[0] == target.shape[0]
        and value.shape[2:] == target.shape[2:]
        and value.shape[1] != target.shape[1]
    ):
        if stem.channels is None:
            done.append(f"input channels {value.shape[1]}->{target.shape[1]}")
            value = adapt_input_channels(value, target.shape[1])
        else:
            done.append(f"input channels {value.shape[1]}->{target.shape[1]} ({stem.channels})")
            value = adapt_kernel_channels(value, target.shape[1], stem.channels)
    if value.shape != target.shape:
        return None, ""
    if stem != StemAdapt() and done:
        done.append(f"file {shape} -> model {list(target.shape)}")
    return value.to(dtype=target.dtype), "; ".join(done)


def plan_load(
    own: Mapping[str, torch.Tensor],
    state_dict: Mapping[str, torch.Tensor],
    *,
    encoder_prefixes: tuple[str, ...],
    first_conv_keys: set[str] | frozenset[str],
    source: str,
    model_name: str,
    inflate: str = "i3d",
    path: str | None = None,
    adapt_stem: str | Sequence[str] | StemAdapt | None = None,
    skip: Sequence[str] = (),
) -> tuple[LoadReport, dict[str, torch.Tensor]]:
    """Decide, key by key, what of ``state_dict`` fits a model whose own state is ``own``; load nothing.

    File tensors whose key matches a ``skip`` pattern (fnmatch) are left out and listed as skipped. Tensors that
    fit load, cast to the model's dtype; a 2D kernel meeting a 3D one is inflated; the input convolution of another
    channel count is adapted, and of another depth when ``adapt_stem`` names a depth rule; anything else of another
    shape is reported as mismatched.
    """
    stem = parse_adapt_stem(adapt_stem)
    skip = check_skip_patterns(state_dict, skip, path)

    def is_encoder(key: str) -> bool:
        return key.startswith(encoder_prefixes) if encoder_prefixes else True

    report = LoadReport(source=source, model=model_name, path=path, stem_keys=tuple(first_conv_keys))
    to_load: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if skip and _matches(key, skip):
            if _counted(key):
                report.skipped.append(key)
            continue
        if key not in own:
            if _counted(key):
                report.unexpected.append(key)
            continue
        fitted, what = _fit_tensor(key, value, own[key], key in first_conv_keys, inflate, stem)
        if fitted is None:
            report.mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
            continue
        if what:
            report.adapted.append((key, what))
        to_load[key] = fitted
        if value.dtype != fitted.dtype:
            what = f"{str(value.dtype).removeprefix('torch.')}->{str(fitted.dtype).removeprefix('torch.')}"
            report.cast[what] = report.cast.get(what, 0) + 1
        if _counted(key):
            report.loaded.append(key)
    report.missing = [k for k in own if k not in to_load and _counted(k)]
    counted_encoder = [k for k in own if is_encoder(k) and _counted(k)]
    report.encoder_total = len(counted_encoder)
    report.encoder_loaded = sum(1 for k in counted_encoder if k in to_load)
    report.encoder_mismatched = [m[0] for m in report.mismatched if is_encoder(m[0])]
    # Only a real prefix list can say that an unexpected key belongs to the encoder.
    report.encoder_unexpected = [k for k in report.unexpected if encoder_prefixes and is_encoder(k)]
    return report, to_load


def load_state_dict_with_report(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str,
    model_name: str | None = None,
    min_coverage: float | None = None,
    inflate: str = "i3d",
    path: str | None = None,
    notes: list[str] | None = None,
    adapt_stem: str | Sequence[str] | StemAdapt | None = None,
    skip: Sequence[str] = (),
) -> LoadReport:
    """Load ``state_dict`` (canonical keys) into ``model`` and report; ``notes`` are added to the report.

    Shape differences outside the encoder (a classifier for another number of classes) are skipped and reported.
    ``adapt_stem`` and ``skip``: see :func:`plan_load`; skipped tensors keep the model's own values. Errors: no encoder tensor loaded, an encoder tensor of another shape or one the model lacks (another
    architecture), or coverage below ``min_coverage``. The model is left untouched when an error is raised.
    """
    own = model.state_dict()
    report, to_load = plan_load(
        own,
        state_dict,
        encoder_prefixes=tuple(getattr(model, "encoder_prefixes", ()) or ()),
        first_conv_keys=frozenset(getattr(model, "first_conv_keys", ()) or ()),
        source=source,
        model_name=model_name or type(model).__name__,
        inflate=inflate,
        path=path,
        adapt_stem=adapt_stem,
        skip=skip,
    )
    report.notes.extend(notes or [])
    check_fit(report, min_coverage)
    merged = dict(own)
    merged.update(to_load)
    model.load_state_dict(merged, strict=True)
    _log_report(report)
    return report


def check_fit(report: LoadReport, min_coverage: float | None = None) -> None:
    """Raise :class:`CheckpointMismatchError` for a load that must not go ahead."""
    where = f"{report.path}: " if report.path else ""
    encoder_mismatch = [m for m in report.mismatched if m[0] in set(report.encoder_mismatched)]
    if report.encoder_loaded == 0:
        sample = ", ".join(report.unexpected[:3]) or "none"
        raise CheckpointMismatchError(
            f"{where}no encoder weights of '{report.model}' were found in this {report.source} checkpoint "
            f"(checkpoint keys such as {sample} match nothing). It was made for another architecture; "
            "`medtransfer zoo inspect FILE` lists the models it fits.\n" + str(report)
        )
    if encoder_mismatch:
        k, a, b = encoder_mismatch[0]
        stem_depth = [m[0] for m in encoder_mismatch if m[0] in report.stem_keys and len(m[1]) == len(m[2]) == 5
                      and m[1][0] == m[2][0] and m[1][3:] == m[2][3:] and m[1][2] != m[2][2]]
        hint = (
            f" {stem_depth[0]} is a kernel of another depth: adapt_stem='center_pad' or 'interpolate' adapts the "
            "input convolution (the model's option for its stem depth, if it has one, builds it to match)."
            if stem_depth else ""
        )
        raise CheckpointMismatchError(
            f"{where}{len(encoder_mismatch)} encoder tensors of this {report.source} checkpoint have other shapes "
            f"than '{report.model}' (e.g. {k}: file {list(a)} vs model {list(b)}): it was made for another "
            "architecture, or for other architecture options than the model was built with (depth, shortcut, "
            "widths, window sizes, input_size). `medtransfer zoo inspect FILE` lists the models it fits and the "
            "options it implies." + hint + "\n" + str(report)
        )
    if report.encoder_unexpected:
        extra = report.encoder_unexpected
        raise CheckpointMismatchError(
            f"{where}this {report.source} checkpoint has {len(extra)} encoder tensors that '{report.model}' lacks "
            f"(e.g. {', '.join(extra[:3])}): it was made for a deeper or otherwise different variant. "
            "`medtransfer zoo inspect FILE` lists the models it fits.\n" + str(report)
        )
    if min_coverage is not None and report.coverage < min_coverage:
        raise CheckpointMismatchError(
            f"{where}encoder coverage {report.coverage:.1%} is below min_coverage={min_coverage:.1%}.\n" + str(report)
        )


def _log_report(report: LoadReport) -> None:
    # Unused head/decoder tensors of the file and re-initialised heads are normal when fine-tuning: info only.
    if report.coverage < 1.0:
        log.warning("partial load: %s", report.summary())
    else:
        log.info("%s", report.summary())
    for note in report.notes:
        log.warning("%s", note)
