"""Models Genesis cube extraction: random 64x64x32 CT sub-volumes that are mostly lung, for self-supervised pretraining.

Reimplements the published sampler (``infinite_generator_3D.py`` of MrGiovanni/ModelsGenesis; Zhou et al., "Models
Genesis", MedIA 2021) with the same defaults and the same accept/reject decisions, vectorised. The published
dense-tissue test is a four-deep Python loop over every voxel of every candidate window (about 400k iterations per
candidate); here it is one threshold comparison, an OR of two shifted copies and two counts over a batch of windows.

**Axes.** The official script reads a volume with SimpleITK (``[z, y, x]``), transposes it to ``(x, y, z)`` and writes
cubes of shape ``(N, 64, 64, 32)`` = ``(N, x, y, z)``: its "rows" are x, its "cols" are y, its "deps" are z.
medtransfer keeps its own array order ``[z, y, x]``, so a cube here is ``(N, 32, 64, 64)`` and
``ours[n, z, y, x] == official[n, x, y, z]``, i.e. ``official = ours.transpose(0, 3, 2, 1)``
(``extract_cubes(..., official_axes=True)`` returns that layout). The dense-tissue test looks at the slices that follow
each slice along increasing array index z, as the official one does along its third axis.

**The published rule**, for the defaults (parameters of :class:`CubeConfig` in brackets):

- Volumes are used at their native spacing; HU are clipped to [-1000, 1000] (``hu_min``, ``hu_max``) and scaled to
  [0, 1]. The arithmetic is float64, as the official script does for LUNA16's int16 volumes.
- A volume is skipped when ``size_z - 32 - 3 - 1 - 30 < 30`` (``cube_depth``, ``len_depth``, the fixed 1,
  ``border_z``), i.e. when it has fewer than **96** slices. The official script checks only z and crashes on an
  in-plane size without room for a window (``size - 64 - 1 - 100 < 100``); here such a volume is skipped too, with a
  log message.
- Up to ``50 * 32`` candidate windows (``candidates_per_cube * scale``) are drawn. Corners are uniform integers,
  bounds included: x and y in ``[100, size - 64 - 1 - 100]`` (``border_xy``), z in ``[30, size_z - 32 - 3 - 1 - 30]``.
  A window holds 32 + 3 slices (``cube_depth + len_depth``) of 64 x 64 voxels.
- Dense-tissue test: for each voxel of the first 32 slices, the first of the slices d, d+1, d+2 whose normalised value
  is >= the normalised -150 HU (``threshold_hu``; 0.425) gives weight ``1 - k / (len_depth - 1)`` for offset k:
  1 at offset 0, 0.5 at offset 1, 0 at offset 2 -- and 0 also when none of the three passes (the official loop then
  records offset ``len_depth - 1``). A window is rejected when the weights sum to more than
  ``0.15 * 64 * 64 * 32`` (``lung_max``): too much dense tissue. Slice d+2 therefore never changes a decision.
- Accepted windows keep their first 32 slices; sampling stops at 32 accepted cubes (``scale``) or when the candidates
  run out, and returns what it found (possibly nothing).

Vectorisation: with ``c_k`` the number of voxels (of the first ``cube_depth`` slices) for which any of the slices
``d..d+k`` passes the threshold, the number whose *first* pass is at offset k is ``c_k - c_{k-1}``, and the weight sum
telescopes to ``sum_{k < len_depth - 1} c_k / (len_depth - 1)``. For the published ``len_depth = 3`` every weight is a
multiple of 0.5, so the official float32 sum and this one are exact and equal; the limit 19660.8 lies 0.3 from the
nearest multiple of 0.5, so comparing in float32 (NumPy 2) or float64 agrees: same decisions, window for window.

Departures from the official script, on purpose: an explicit ``numpy.random.Generator`` instead of Python's global
``random`` (so the windows drawn differ from the official ones for the same seed, the rule does not); float32 output
instead of float64; an empty array instead of ``None``; one file name written and read (:func:`cube_file_name`; the
official script writes ``bat_32_64x64x32_<fold>.npy`` in some versions while its trainer reads
``bat_32_s_64x64x32_<fold>.npy``, the name of the published download, which :func:`read_cube_file` also reads); no
resize step (the official one only runs when the crop size differs from the cube size).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..weights.io import atomic_write

log = logging.getLogger(__name__)


class NoCubesError(DataError):
    """No case gave a cube (every volume too small, or every window too dense): nothing was written."""

CUBE_AXES = "N,z,y,x"  # the layout of every cube array medtransfer writes


@dataclass(frozen=True)
class CubeConfig:
    """Parameters of the sampler; the defaults are the published ones (official names in the module docstring)."""

    hu_min: float = -1000.0
    hu_max: float = 1000.0
    threshold_hu: float = -150.0  # voxels at or above this count as dense tissue
    cube_depth: int = 32  # z (official input_deps)
    cube_height: int = 64  # y (official input_cols)
    cube_width: int = 64  # x (official input_rows)
    len_depth: int = 3  # extra slices looked at by the dense-tissue test
    border_xy: int = 100  # in-plane margin (official len_border)
    border_z: int = 30  # margin in z (official len_border_z)
    scale: int = 32  # cubes kept per volume at most
    candidates_per_cube: int = 50  # candidate windows drawn per wanted cube
    lung_max: float = 0.15  # largest accepted dense-tissue weight, as a fraction of the cube's voxels

    def __post_init__(self) -> None:
        if not self.hu_max > self.hu_min:
            raise ValueError(f"CubeConfig: hu_max ({self.hu_max}) must be greater than hu_min ({self.hu_min})")
        for name in ("cube_depth", "cube_height", "cube_width", "scale", "candidates_per_cube"):
            if getattr(self, name) < 1:
                raise ValueError(f"CubeConfig: {name} must be at least 1, got {getattr(self, name)}")
        if self.len_depth < 2:
            raise ValueError(f"CubeConfig: len_depth must be at least 2 (the weights divide by len_depth - 1), "
                             f"got {self.len_depth}")
        if self.border_xy < 0 or self.border_z < 0:
            raise ValueError(f"CubeConfig: borders must be >= 0, got border_xy={self.border_xy}, "
                             f"border_z={self.border_z}")

    @property
    def threshold(self) -> float:
        """The dense-tissue threshold on the normalised [0, 1] scale (0.425 for the defaults)."""
        return (self.threshold_hu - self.hu_min) / (self.hu_max - self.hu_min)

    @property
    def window_shape(self) -> tuple[int, int, int]:
        """(z, y, x) size of a candidate window: the cube plus ``len_depth`` slices for the test."""
        return (self.cube_depth + self.len_depth, self.cube_height, self.cube_width)

    @property
    def max_dense_weight(self) -> float:
        """Rejection limit on the weight sum; the product is taken in the official order (x, y, z)."""
        return self.lung_max * self.cube_width * self.cube_height * self.cube_depth

    @property
    def min_slices(self) -> int:
        """Fewest slices a volume needs (96 for the defaults); the official skip condition is
        ``size_z - cube_depth - len_depth - 1 - border_z < border_z``."""
        return self.cube_depth + self.len_depth + 1 + 2 * self.border_z


@dataclass
class CubeSample:
    """What one volume gave: the cubes, the ``[z, y, x]`` corners of their windows, and how many candidates were
    drawn and looked at (``evaluated`` may exceed the number needed by less than one batch)."""

    cubes: np.ndarray  # (N, D, H, W) float32 in [0, 1]
    corners: np.ndarray  # (N, 3) int64, [z, y, x] of each cube's first voxel in the volume
    candidates: int
    evaluated: int
    skipped: str | None = None  # why the volume gave no cube (too small, or every window too dense), else None


def corner_ranges(shape: tuple[int, ...], config: CubeConfig) -> tuple[tuple[int, int], ...] | None:
    """Inclusive ``(low, high)`` corner bounds per axis ``(z, y, x)``, or None when an axis has no room."""
    size_z, size_y, size_x = shape
    ranges = (
        (config.border_z, size_z - config.cube_depth - config.len_depth - 1 - config.border_z),
        (config.border_xy, size_y - config.cube_height - 1 - config.border_xy),
        (config.border_xy, size_x - config.cube_width - 1 - config.border_xy),
    )
    return None if any(high < low for low, high in ranges) else ranges


def candidate_corners(shape: tuple[int, ...], rng: np.random.Generator, config: CubeConfig) -> np.ndarray:
    """All ``candidates_per_cube * scale`` candidate corners ``(n, 3)`` ``[z, y, x]``, drawn at once so that the
    decisions do not depend on how many windows are tested together. Empty when the volume has no room."""
    ranges = corner_ranges(shape, config)
    if ranges is None:
        return np.empty((0, 3), dtype=np.int64)
    low = np.array([r[0] for r in ranges], dtype=np.int64)
    high = np.array([r[1] for r in ranges], dtype=np.int64)
    n = config.candidates_per_cube * config.scale
    return rng.integers(low, high, size=(n, 3), endpoint=True, dtype=np.int64)


def normalise_hu(values: np.ndarray, config: CubeConfig) -> np.ndarray:
    """Clip to the HU window and scale to [0, 1], in float64 (a new array)."""
    out = np.clip(values.astype(np.float64), config.hu_min, config.hu_max)
    out -= config.hu_min
    out /= config.hu_max - config.hu_min
    return out


def dense_tissue_weight(windows: np.ndarray, config: CubeConfig) -> np.ndarray:
    """The published weight sum of each normalised window ``(B, cube_depth + len_depth, H, W)`` -> ``(B,)`` float64.

    ``c_k`` counts the voxels of the first ``cube_depth`` slices for which any slice ``d..d+k`` reaches the
    threshold; the sum of ``1 - k/(L-1)`` over each voxel's first passing offset equals ``sum_{k<L-1} c_k / (L-1)``.
    """
    depth, extra = config.cube_depth, config.len_depth
    dense = windows >= config.threshold
    seen = dense[:, :depth].copy()
    total = np.count_nonzero(seen, axis=(1, 2, 3)).astype(np.int64)
    for k in range(1, extra - 1):  # offsets, not voxels; the last offset weighs 0 and is never looked at
        seen |= dense[:, k : k + depth]
        total += np.count_nonzero(seen, axis=(1, 2, 3))
    return total / (extra - 1)


def gather_windows(volume: np.ndarray, corners: np.ndarray, config: CubeConfig) -> np.ndarray:
    """Copy the windows at ``corners`` out of ``volume`` -> ``(B, cube_depth + len_depth, H, W)``, volume dtype."""
    views = np.lib.stride_tricks.sliding_window_view(volume, config.window_shape)
    return views[corners[:, 0], corners[:, 1], corners[:, 2]]


def sample_cubes(volume_hu: np.ndarray, rng: np.random.Generator | int, *, config: CubeConfig = CubeConfig(),
                 batch: int = 4) -> CubeSample:
    """Run the published sampler on one ``[z, y, x]`` volume in Hounsfield units; keep the corners too.

    Candidates are tested ``batch`` at a time in the order drawn and the first ``scale`` accepted ones are kept, so
    the result is the same for every ``batch``. A few windows at a time (about 5 MB of float64) stay in cache and
    waste little past the last cube needed; larger batches measured slower on CPU.
    """
    volume_hu = np.asarray(volume_hu)
    if volume_hu.ndim != 3:
        raise DataError(f"Cube extraction needs one 3D volume indexed [z, y, x]; got an array of shape "
                        f"{volume_hu.shape}. Pass a single-channel CT volume.")
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    depth, height, width = config.cube_depth, config.cube_height, config.cube_width
    empty = CubeSample(np.empty((0, depth, height, width), np.float32), np.empty((0, 3), np.int64), 0, 0)
    if volume_hu.shape[0] < config.min_slices:
        empty.skipped = (f"{volume_hu.shape[0]} slices, fewer than the {config.min_slices} needed (cube depth "
                         f"{depth} + {config.len_depth + 1} + 2 x border_z {config.border_z}); lower --border-z or "
                         "the depth in --cube-size")
        return empty
    corners = candidate_corners(volume_hu.shape, rng, config)
    if len(corners) == 0:
        need = 2 * config.border_xy + 1
        empty.skipped = (f"in-plane size {tuple(volume_hu.shape[1:])} leaves no room for a {height}x{width} window "
                         f"inside a {config.border_xy}-voxel border (needs {height + need}x{width + need}); lower "
                         "--border-xy or the in-plane size in --cube-size")
        return empty

    kept_cubes: list[np.ndarray] = []
    kept_corners: list[np.ndarray] = []
    n_kept = evaluated = 0
    least = np.inf  # smallest dense-tissue weight seen, to say by how much windows missed when none is kept
    for start in range(0, len(corners), batch):
        chunk = corners[start : start + batch]
        windows = normalise_hu(gather_windows(volume_hu, chunk, config), config)
        weight = dense_tissue_weight(windows, config)
        least = min(least, float(weight.min()))
        accept = weight <= config.max_dense_weight
        evaluated += len(chunk)
        take = np.flatnonzero(accept)[: config.scale - n_kept]
        kept_cubes.append(windows[take, :depth].astype(np.float32))
        kept_corners.append(chunk[take])
        n_kept += len(take)
        if n_kept == config.scale:
            break
    sample = CubeSample(np.concatenate(kept_cubes), np.concatenate(kept_corners), len(corners), evaluated)
    if n_kept == 0:
        voxels = config.cube_depth * config.cube_height * config.cube_width
        sample.skipped = (f"all {evaluated} candidate windows hold too much dense tissue (>= {config.threshold_hu:g} "
                          f"HU): the least dense has a weighted fraction of {least / voxels:.3f}, above --lung-max "
                          f"{config.lung_max:g}; raise --lung-max, or check that this is chest CT in HU")
    return sample


def extract_cubes(volume_hu: np.ndarray, rng: np.random.Generator | int, *, config: CubeConfig = CubeConfig(),
                  official_axes: bool = False) -> np.ndarray:
    """Cubes of one CT volume (``[z, y, x]``, HU): ``(N, 32, 64, 64)`` float32 in [0, 1], N <= ``config.scale``.

    ``official_axes=True`` returns the official layout ``(N, 64, 64, 32)`` = ``(N, x, y, z)`` instead. A volume too
    small for the margins gives an empty array of the right shape. :func:`sample_cubes` also returns the corners.
    """
    cubes = sample_cubes(volume_hu, rng, config=config).cubes
    return np.ascontiguousarray(to_official_axes(cubes)) if official_axes else cubes


def to_official_axes(cubes: np.ndarray) -> np.ndarray:
    """``(N, z, y, x)`` -> the official ``(N, x, y, z)`` (a view)."""
    return cubes.transpose(0, 3, 2, 1)


# ---------------------------------------------------------------------------------------------------------------
# Whole datasets


def cube_file_name(config: CubeConfig, group: str) -> str:
    """The one name under which cubes of ``group`` are written and read, e.g. ``cubes_32x64x64_subset0.npy``
    (sizes in medtransfer's (z, y, x) order; a JSON manifest of the same stem sits beside it)."""
    return f"cubes_{config.cube_depth}x{config.cube_height}x{config.cube_width}_{group}.npy"


def read_cube_file(path: str | Path, *, mmap: bool = True) -> np.ndarray:
    """Cubes ``(N, z, y, x)`` from a file written here, or from an official ``bat_*.npy`` download (float64,
    ``(N, x, y, z)``), which is transposed into medtransfer's order and cast to float32."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Cube file not found: {path}. Create it with `medtransfer data cubes DATASET --out DIR`.")
    try:
        cubes = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"Cannot read cube file {path} ({exc}); write it again with `medtransfer data cubes`.") from exc
    if cubes.ndim != 4:
        raise DataError(f"Cube file {path} holds an array of shape {cubes.shape}, not (N, z, y, x) cubes.")
    if path.name.startswith("bat_"):
        return np.ascontiguousarray(to_official_axes(cubes), dtype=np.float32)
    return cubes


def group_of(case_id: str, image_path: Path, dataset) -> str:
    """The file a case's cubes go to: its LUNA16 subset (the official script writes one file per fold), taken from
    the dataset description or from a ``subsetN`` folder in its path; ``all`` for datasets without subsets."""
    subset = dataset.description.get("subset", {}).get(case_id) if isinstance(dataset.description, dict) else None
    if subset:
        return str(subset)
    try:
        parts = image_path.relative_to(dataset.root).parts
    except ValueError:
        parts = image_path.parts
    return next((p for p in parts[:-1] if re.fullmatch(r"subset\d+", p)), "all")


def case_rng(seed: int, case_id: str) -> np.random.Generator:
    """A generator per case from the seed and the case id, so a case's cubes do not depend on the other cases
    (adding, removing or reordering cases leaves them unchanged)."""
    return np.random.default_rng([seed, zlib.crc32(case_id.encode("utf-8"))])


def _write_npy_from_raw(path: Path, raw: Path, shape: tuple[int, ...]) -> Path:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": shape}

    def write(tmp: Path) -> None:
        with tmp.open("wb") as out, raw.open("rb") as src:
            np.lib.format.write_array_header_1_0(out, header)
            shutil.copyfileobj(src, out, length=16 << 20)

    return atomic_write(path, write)


def _case_cubes(case, config: CubeConfig, seed: int) -> tuple[CubeSample, dict]:
    from .io import read_image

    image_path = Path(case.images[0])
    image = read_image(image_path)  # canonical orientation: z runs towards superior, as in LUNA16's raw arrays
    if image.array.ndim != 3:
        raise DataError(f"{image_path}: shape {image.array.shape} is not one 3D volume; cube extraction needs "
                        "single-channel 3D CT in Hounsfield units.")
    if image.array.size and float(np.min(image.array)) > -500:
        log.warning("%s: no voxel below -500 HU; is this CT in Hounsfield units?", image_path)
    sample = sample_cubes(image.array, case_rng(seed, case.case_id), config=config)
    if sample.skipped:
        log.info("%s: skipped (%s)", image_path, sample.skipped)
    record = {"case_id": case.case_id, "image": str(image_path), "n_cubes": len(sample.cubes),
              "corners_zyx": sample.corners.tolist(), "candidates_evaluated": sample.evaluated,
              "skipped": sample.skipped}
    return sample, record


def extract_cubes_from_dataset(dataset, out_dir: str | Path, *, config: CubeConfig = CubeConfig(), seed: int = 1,
                               progress: bool = True) -> list[Path]:
    """Extract cubes from every training case of ``dataset`` (a :class:`~medtransfer.data.types.Dataset` of 3D CT
    in HU, or a path that :func:`~medtransfer.data.datasets.load_dataset` reads); returns the ``.npy`` paths.

    One file per group (:func:`group_of`: LUNA16 subset, else ``all``) named by :func:`cube_file_name`, holding
    ``(N, z, y, x)`` float32, with a JSON manifest beside it: config, seed, axes, and per case the number of cubes,
    their corners, and why it was skipped or failed. Cubes are streamed to a temporary file as they come, so memory
    holds one volume at a time; each file appears atomically, and a group without a cube gets no file. A case that
    cannot be read does not stop the others: the files are written, then a :class:`DataError` names every failure.
    When no case gives a cube, :class:`NoCubesError` says why for each (volume smaller than cube and margins, with
    the numbers and the option to change, or every window over the dense-tissue limit) and nothing is written. The dataset's unlabelled test images are
    left out, so pretraining never sees the images a model is scored on.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..provenance import versions

    if isinstance(dataset, (str, Path)):
        from .datasets import load_dataset

        dataset = load_dataset(dataset)
    if dataset.spatial_dims != 3:
        raise DataError(f"Dataset {dataset.name} ({dataset.root}) is 2D; cube extraction needs 3D CT volumes.")
    if not dataset.cases:
        raise DataError(f"Dataset {dataset.name} ({dataset.root}) has no cases to extract cubes from.")
    out_dir = Path(out_dir)
    made_dir = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list] = {}
    for case in dataset.cases:
        groups.setdefault(group_of(case.case_id, Path(case.images[0]), dataset), []).append(case)

    cube_shape = (config.cube_depth, config.cube_height, config.cube_width)
    written, failures, n_cubes, why_none = [], [], 0, []
    columns = (TextColumn("cubes {task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[n]} cubes"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task("", total=len(dataset.cases), n=0)
        for group in sorted(groups):
            path = out_dir / cube_file_name(config, group)
            raw = out_dir / f".{path.stem}.raw.tmp"
            records, total = [], 0
            try:
                with raw.open("wb") as sink:
                    for case in groups[group]:
                        bar.update(task, description=f"{group}/{case.case_id}")
                        try:
                            sample, record = _case_cubes(case, config, seed)
                        except DataError as err:
                            failures.append(f"  {case.case_id}: {err}")
                            records.append({"case_id": case.case_id, "image": str(case.images[0]), "n_cubes": 0,
                                            "error": str(err)})
                        else:
                            sink.write(np.ascontiguousarray(sample.cubes, dtype=np.float32).tobytes())
                            total += len(sample.cubes)
                            records.append(record)
                        n_cubes += records[-1]["n_cubes"]
                        if records[-1].get("skipped"):
                            why_none.append(f"  {case.case_id}: {records[-1]['skipped']}")
                        bar.update(task, advance=1, n=n_cubes)
                if total:  # an empty (0, ...) file would only fail later, in pretraining
                    _write_npy_from_raw(path, raw, (total, *cube_shape))
            finally:
                raw.unlink(missing_ok=True)
            if not total:
                log.warning("%s: no cube from its %d cases, no file written", path, len(records))
                continue
            manifest = {"format": "medtransfer-cubes-1", "file": path.name, "axes": CUBE_AXES, "dtype": "float32",
                        "shape": [total, *cube_shape], "group": group, "dataset": dataset.name,
                        "seed": seed, "config": asdict(config), "cases": records, "versions": versions()}
            atomic_write(path.with_suffix(".json"), lambda tmp, m=manifest: tmp.write_text(json.dumps(m, indent=1)))
            log.info("%s: %d cubes from %d cases", path, total, len(records))
            written.append(path)
    if n_cubes == 0 and made_dir and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if n_cubes == 0 and not failures:
        shown = why_none[:5] + ([f"  ... and {len(why_none) - 5} more"] if len(why_none) > 5 else [])
        raise NoCubesError(f"no cube extracted from the {len(dataset.cases)} cases of {dataset.root}, nothing "
                           "written:\n" + "\n".join(shown))
    if failures:
        raise DataError(f"{len(failures)} of {len(dataset.cases)} cases gave no cubes because they could not be "
                        f"used (the others are in {out_dir}):\n" + "\n".join(failures))
    return written
