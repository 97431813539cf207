"""Preprocessing steps that are composable and recorded.

Each step is a small frozen dataclass. ``step(image)`` transforms an image; ``step.pair(image, label)`` transforms an
image and its label mask together (geometric steps move both, nearest-neighbour for the label; intensity steps leave
the label alone). ``step.to_dict()`` holds every parameter, so a :class:`Pipeline` can be stored in the cache key and
in the run record, and rebuilt with :meth:`Pipeline.from_dict`.

Every step appends a record to ``image.meta["preprocess"]`` (what it did: the permutation, the old spacing and
shape, the crop box) so that predictions can be put back into the geometry of the input.

Intensity presets match the seed systems (see ``spec/seed-systems.md``):

* ``genesis_ct``: Models Genesis, clip HU to [-1000, 1000] and scale to [0, 1];
* ``volf_ct``: the VolF (PyMIC) LUNA demo, the same window scaled to [-1, 1];
* ``medicalnet_mri``: MedicalNet, z-score with the mean and std of voxels > 0, zeros stay 0 (a voxel within 1e-6 of
  the image's largest absolute value counts as 0, so resampling residues stay background). The MedicalNet demo then
  fills the zeros with N(0, 1) noise; that is a *training augmentation* (it made their inference non-deterministic),
  so it is not part of this deterministic preprocessing and belongs to the random training transforms;
* ``mri_zscore``: the same foreground z-score under the name of the MRI modality default (what a run without a
  weights' contract uses on MRI, :mod:`medtransfer.data.modality`), so a record never credits MedicalNet for it;
* ``zscore``: PyMIC ``NormalizeWithMeanStd``, whole volume, ``(x - mean) / (std + 1e-5)``;
* ``percentile``: clip to the 0.5 and 99.5 percentiles, then scale to [0, 1];
* ``deeplesion``: DeepLesion / MP3D's HU window [-1024, 1050], scaled to [0, 1] (MP3D scales it to [0, 255] and
  subtracts a mean, an affine change the first convolution absorbs).

Intensity statistics are computed per channel, over the spatial axes.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
from scipy import ndimage

from ..errors import DataError, MedTransferError
from .orientation import canonical_axes, permute_axes
from .types import Image

log = logging.getLogger(__name__)

RECORD_KEY = "preprocess"


def _with(image: Image, record: dict[str, Any] | None, **changes: Any) -> Image:
    """A copy of ``image`` with ``changes`` and ``record`` appended to its preprocessing history."""
    meta = dict(image.meta)
    if record is not None:
        meta[RECORD_KEY] = [*meta.get(RECORD_KEY, []), record]
    return dataclasses.replace(image, meta=meta, **changes)


def _spatial_axes(image: Image) -> tuple[int, ...]:
    return tuple(range(image.array.ndim - image.spatial_dims, image.array.ndim))


def _check_pair(image: Image, label: Image | None) -> None:
    if label is not None and label.spatial_shape != image.spatial_shape:
        raise DataError(
            f"{label.path or 'label'}: label shape {label.spatial_shape} differs from image shape "
            f"{image.spatial_shape} ({image.path or 'image'}); the label must be drawn on the same voxel grid"
        )


def _per_axis(value: float | Sequence[float], n: int, what: str) -> tuple:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * n
    if len(values) != n:
        raise MedTransferError(f"{what} has {len(values)} values for a {n}D image; give one per axis or a single one")
    return values


class Step:
    """Base of all steps: an image transform with recorded parameters."""

    name: ClassVar[str]

    def __call__(self, image: Image) -> Image:
        return self.pair(image, None)[0]

    def pair(self, image: Image, label: Image | None) -> tuple[Image, Image | None]:
        _check_pair(image, label)
        return self._apply(image), label

    def _apply(self, image: Image) -> Image:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        params = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        return {"type": self.name, **{k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}}

    def __post_init__(self) -> None:
        # Lists from JSON become tuples, so steps rebuilt by from_dict compare and hash like the originals.
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))


# --------------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Reorient(Step):
    """Permute and flip the array axes so that the direction matrix is as close to identity as it can be.

    Identity direction in the (z, y, x) array order of :class:`Image` is the usual ITK/DICOM orientation: x runs to
    patient Left, y to Posterior, z to Superior (LPS). World coordinates of every voxel are kept; an oblique scan keeps
    its residual rotation in ``direction`` (no resampling here). ``io.read_image`` already loads images in this
    orientation, with the same algorithm (:mod:`medtransfer.data.orientation`); the step matters for images made
    elsewhere or read with ``reorient=False``. The label follows the image's permutation and flips.
    """

    name: ClassVar[str] = "reorient"

    def pair(self, image: Image, label: Image | None) -> tuple[Image, Image | None]:
        _check_pair(image, label)
        perm, flips = canonical_axes(np.asarray(image.direction, dtype=float))
        out = self._transform(image, perm, flips)
        return out, (self._transform(label, perm, flips) if label is not None else None)

    @staticmethod
    def _transform(image: Image, perm: tuple[int, ...], flips: tuple[bool, ...]) -> Image:
        # Not reorient_to_canonical: that would overwrite meta["original"] (the on-disk orientation write_image(like=)
        # restores) and derive the label's permutation from the label's own header instead of the image's.
        record = {
            "step": "reorient", "permutation": list(perm), "flips": list(flips),
            "direction_before": np.asarray(image.direction, dtype=float).tolist(),
            "origin_before": list(map(float, image.origin)),
        }
        moved = permute_axes(image, perm, flips)
        return _with(image, record, array=moved.array, spacing=moved.spacing, origin=moved.origin,
                     direction=moved.direction)  # fmt: skip


@dataclass(frozen=True)
class Resample(Step):
    """Resample to ``spacing`` (mm, array order; ``None`` for an axis keeps it): output shape is
    ``round(shape * old / new)``, origin and direction are kept and the spacing becomes exactly ``spacing``.

    Output voxel ``i`` sits at the world position of input index ``i * new / old``, which keeps world coordinates
    consistent with an unchanged origin (past the last input voxel, edge values extend). Images use linear
    (``order=1``) or cubic B-spline (``order=3``) interpolation; labels always nearest, so no new label values appear.
    """

    spacing: float | tuple[float | None, ...]
    order: int = 1

    name: ClassVar[str] = "resample"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.order not in (0, 1, 3):
            raise MedTransferError(f"Resample: order={self.order} is not supported; use 1 (linear) or 3 (B-spline)")

    def target(self, image: Image) -> tuple[tuple[float, ...], tuple[int, ...]]:
        """The spacing and spatial shape ``image`` will get."""
        wanted = _per_axis(self.spacing, image.spatial_dims, "Resample spacing")
        spacing = tuple(float(old if new is None else new) for old, new in zip(image.spacing, wanted))
        if any(s <= 0 for s in spacing):
            raise MedTransferError(f"Resample: spacing {spacing} must be positive")
        shape = tuple(
            max(1, int(round(n * old / new))) for n, old, new in zip(image.spatial_shape, image.spacing, spacing)
        )
        return spacing, shape

    def pair(self, image: Image, label: Image | None) -> tuple[Image, Image | None]:
        _check_pair(image, label)
        out = self._resample(image, self.order, np.float32)
        return out, (self._resample(label, 0, None) if label is not None else None)

    def _resample(self, image: Image, order: int, dtype: Any) -> Image:
        spacing, shape = self.target(image)
        zoom = np.asarray(spacing) / np.asarray(image.spacing, dtype=float)
        record = {
            "step": "resample", "spacing_before": list(map(float, image.spacing)),
            "shape_before": list(image.spatial_shape), "order": order,
        }
        if tuple(shape) == image.spatial_shape and np.allclose(zoom, 1.0):
            array = image.array.astype(dtype or image.array.dtype, copy=False)
            return _with(image, record, array=array, spacing=spacing)
        src = image.array.reshape(-1, *image.spatial_shape)
        out_dtype = dtype or src.dtype
        out = np.empty((src.shape[0], *shape), dtype=out_dtype)
        for c in range(src.shape[0]):  # a few channels at most; each call is vectorised C
            channel = src[c].astype(np.float32 if order else src.dtype, copy=False)
            ndimage.affine_transform(
                channel, zoom, offset=0.0, output_shape=shape, output=out[c], order=order, mode="nearest",
                prefilter=order > 1,
            )
        array = out.reshape(*image.array.shape[: image.array.ndim - image.spatial_dims], *shape)
        return _with(image, record, array=array, spacing=spacing)


@dataclass(frozen=True)
class CropForeground(Step):
    """Crop to the bounding box of the foreground, plus ``margin`` voxels per side (clipped to the volume).

    Foreground: voxels of the image above ``threshold`` (any channel; the default -500 HU keeps a CT's body and
    drops the air around it; use 0 for MRI, and put the step before intensity normalisation), or with ``source="label"`` the non-zero voxels of the label. The box includes the last foreground
    voxel (MedicalNet's crop dropped it). The box and the original shape are recorded; :func:`uncrop` pads a
    prediction back.
    """

    threshold: float = -500.0
    margin: int | tuple[int, ...] = 0
    source: str = "image"

    name: ClassVar[str] = "crop_foreground"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source not in ("image", "label"):
            raise MedTransferError(f"CropForeground: source={self.source!r}; use 'image' or 'label'")

    def box(self, image: Image, label: Image | None = None) -> tuple[tuple[int, int], ...]:
        """Per spatial axis, ``(start, stop)`` with ``stop`` exclusive, so ``stop - 1`` is the last voxel kept."""
        n = image.spatial_dims
        if self.source == "label":
            if label is None:
                raise MedTransferError("CropForeground(source='label') needs the label: call step.pair(image, label)")
            mask = np.asarray(label.array).reshape(-1, *label.spatial_shape).any(axis=0)
        else:
            mask = (np.asarray(image.array) > self.threshold).reshape(-1, *image.spatial_shape).any(axis=0)
        margin = _per_axis(self.margin, n, "CropForeground margin")
        shape = image.spatial_shape
        if not mask.any():
            log.warning("%s: no foreground found for cropping; the volume is kept whole", image.path or "image")
            return tuple((0, s) for s in shape)
        box = []
        for axis in range(n):
            hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(n) if a != axis)))
            box.append((max(0, int(hits[0]) - margin[axis]), min(shape[axis], int(hits[-1]) + 1 + margin[axis])))
        return tuple(box)

    def pair(self, image: Image, label: Image | None) -> tuple[Image, Image | None]:
        _check_pair(image, label)
        box = self.box(image, label)
        out = _crop(image, box)
        return out, (_crop(label, box) if label is not None else None)


def _crop(image: Image, box: tuple[tuple[int, int], ...]) -> Image:
    lead = image.array.ndim - image.spatial_dims
    index = (slice(None),) * lead + tuple(slice(a, b) for a, b in box)
    start = np.array([a for a, _ in box], dtype=float)
    direction = np.asarray(image.direction, dtype=float)
    origin = np.asarray(image.origin, dtype=float) + direction.T @ (start * np.asarray(image.spacing, dtype=float))
    record = {"step": "crop_foreground", "box": [list(b) for b in box], "shape_before": list(image.spatial_shape)}
    return _with(image, record, array=np.ascontiguousarray(image.array[index]), origin=tuple(map(float, origin)))


def uncrop(array: np.ndarray, record: Mapping[str, Any], value: float = 0) -> np.ndarray:
    """Pad a prediction made on a cropped volume back to the shape before :class:`CropForeground` (its record)."""
    box, shape = record["box"], record["shape_before"]
    lead = array.ndim - len(shape)
    pads = [(0, 0)] * lead + [(a, s - b) for (a, b), s in zip(box, shape)]
    return np.pad(array, pads, mode="constant", constant_values=value)


# --------------------------------------------------------------------------------------------------- intensity


@dataclass(frozen=True)
class CTWindow(Step):
    """Clip to ``[lo, hi]`` (HU) and scale linearly to ``out``: Models Genesis (-1000, 1000) -> [0, 1]."""

    lo: float = -1000.0
    hi: float = 1000.0
    out: tuple[float, float] = (0.0, 1.0)

    name: ClassVar[str] = "ct_window"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.hi > self.lo:
            raise MedTransferError(f"CTWindow: hi={self.hi} must be above lo={self.lo}")

    def _apply(self, image: Image) -> Image:
        x = np.clip(np.asarray(image.array, dtype=np.float32), self.lo, self.hi)
        a, b = self.out
        # divide by the window width (not multiply by its reciprocal) so that round values map exactly in float32
        scaled = (x - np.float32(self.lo)) / np.float32(self.hi - self.lo) * np.float32(b - a) + np.float32(a)
        return _with(image, {"step": self.name}, array=scaled.astype(np.float32, copy=False))


@dataclass(frozen=True)
class NonZeroZScore(Step):
    """Z-score over the foreground with the background set to exactly 0: MedicalNet's MRI normalisation (mean and
    population std of the voxels > 0; voxels equal to 0 stay 0; negative voxels are scaled but not counted).

    Foreground is a voxel above ``rel_threshold`` times the channel's largest absolute value, and background one
    within that band around 0, so the ~1e-13 residues that linear resampling leaves in a zero background count as
    background instead of being z-scored to about -mean/std (the same scan stored at spacing 6.5 and at
    6.499999999999998 then prepares identically). On stored scans, whose foreground lies far above 1e-6 of the
    maximum, this is MedicalNet's rule. No noise is put into the background here: MedicalNet's N(0, 1) background
    fill is a training augmentation.
    """

    rel_threshold: float = 1e-6

    name: ClassVar[str] = "nonzero_zscore"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.rel_threshold < 1:
            raise MedTransferError(f"NonZeroZScore: rel_threshold={self.rel_threshold} must lie in [0, 1)")

    def _apply(self, image: Image) -> Image:
        x = np.asarray(image.array, dtype=np.float64)
        axes = _spatial_axes(image)
        band = self.rel_threshold * np.abs(x).max(axis=axes, keepdims=True)
        mask = x > band
        count = np.maximum(mask.sum(axis=axes, keepdims=True), 1)
        mean = np.where(mask, x, 0.0).sum(axis=axes, keepdims=True) / count
        std = np.sqrt(np.where(mask, (x - mean) ** 2, 0.0).sum(axis=axes, keepdims=True) / count)
        if not mask.any():
            log.warning("%s: no voxel above 0; NonZeroZScore leaves the image as it is", image.path or "image")
        out = np.where(np.abs(x) <= band, 0.0, (x - mean) / np.where(std > 0, std, 1.0))
        return _with(image, {"step": self.name}, array=out.astype(np.float32))


@dataclass(frozen=True)
class ZScore(Step):
    """PyMIC ``NormalizeWithMeanStd``: whole-volume ``(x - mean) / (std + eps)``, no mask."""

    eps: float = 1e-5

    name: ClassVar[str] = "zscore"

    def _apply(self, image: Image) -> Image:
        x = np.asarray(image.array, dtype=np.float64)
        axes = _spatial_axes(image)
        out = (x - x.mean(axis=axes, keepdims=True)) / (x.std(axis=axes, keepdims=True) + self.eps)
        return _with(image, {"step": self.name}, array=out.astype(np.float32))


@dataclass(frozen=True)
class PercentileClip(Step):
    """Clip to the ``lower`` and ``upper`` percentiles of the volume, then scale that range to [0, 1]."""

    lower: float = 0.5
    upper: float = 99.5

    name: ClassVar[str] = "percentile_clip"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.lower < self.upper <= 100:
            raise MedTransferError(f"PercentileClip: need 0 <= lower < upper <= 100, got {self.lower}, {self.upper}")

    def _apply(self, image: Image) -> Image:
        x = np.asarray(image.array, dtype=np.float64)
        axes = _spatial_axes(image)
        lo = np.percentile(x, self.lower, axis=axes, keepdims=True)
        hi = np.percentile(x, self.upper, axis=axes, keepdims=True)
        width = np.where(hi > lo, hi - lo, 1.0)  # a constant image maps to 0 instead of NaN
        out = (np.clip(x, lo, hi) - lo) / width
        return _with(image, {"step": self.name}, array=out.astype(np.float32))


# --------------------------------------------------------------------------------------------------- pipeline

STEP_TYPES: dict[str, type[Step]] = {
    cls.name: cls for cls in (Reorient, Resample, CropForeground, CTWindow, NonZeroZScore, ZScore, PercentileClip)
}

PRESETS: dict[str, Step] = {
    "genesis_ct": CTWindow(-1000.0, 1000.0, (0.0, 1.0)),
    "volf_ct": CTWindow(-1000.0, 1000.0, (-1.0, 1.0)),
    "medicalnet_mri": NonZeroZScore(),
    "mri_zscore": NonZeroZScore(),  # the MRI modality default (data/modality.py): the same step, its own name
    "zscore": ZScore(1e-5),
    "percentile": PercentileClip(0.5, 99.5),
    "deeplesion": CTWindow(-1024.0, 1050.0, (0.0, 1.0)),
}


def preset(name: str) -> Step:
    """The intensity step of a seed system by name (see the module docstring)."""
    if name not in PRESETS:
        raise MedTransferError(f"unknown intensity preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def step_from_dict(data: Mapping[str, Any]) -> Step:
    params = dict(data)
    kind = params.pop("type", None)
    if kind not in STEP_TYPES:
        raise MedTransferError(f"unknown preprocessing step {kind!r}; choose one of {', '.join(sorted(STEP_TYPES))}")
    try:
        return STEP_TYPES[kind](**params)
    except TypeError as err:
        raise MedTransferError(f"preprocessing step {kind!r}: {err}") from None


@dataclass(frozen=True)
class Pipeline:
    """Steps applied in order. ``to_dict()`` is what the cache key and the run record store."""

    steps: tuple[Step, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))

    def __call__(self, image: Image) -> Image:
        return self.pair(image, None)[0]

    def pair(self, image: Image, label: Image | None) -> tuple[Image, Image | None]:
        for step in self.steps:
            image, label = step.pair(image, label)
        return image, label

    def to_dict(self) -> dict[str, Any]:
        return {"steps": [step.to_dict() for step in self.steps]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Pipeline:
        return cls(tuple(step_from_dict(s) for s in data.get("steps", [])))


_intensity_preset = preset  # build_pipeline's keyword shadows the function


def build_pipeline(*, preset: str | None = "genesis_ct", spacing: Sequence[float] | None = None, order: int = 1) -> Pipeline:
    """The usual pipeline: resample to ``spacing`` (when given), then a seed system's intensity preset.

    Images come out of :func:`medtransfer.data.io.read_image` already in canonical orientation, so no
    :class:`Reorient` step is needed here.
    """
    steps: list[Step] = []
    if spacing is not None:
        steps.append(Resample(tuple(float(s) for s in spacing), order=order))
    if preset:
        steps.append(_intensity_preset(preset))
    return Pipeline(tuple(steps))
