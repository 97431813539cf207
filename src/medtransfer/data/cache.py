"""A cache of prepared cases: preprocess once, then load memory-mapped arrays in microseconds.

Layout of a cache folder (one folder per dataset)::

    manifest.json                       what is in the cache and what it was made from
    cases/<case>-<key>.image.npy        float32, channels first: (C, D, H, W) or (C, H, W)
    cases/<case>-<key>.label.npy        uint8 / int16 / int32, spatial only: (D, H, W)

Each case's ``key`` hashes the sha256 of its source files, the pipeline's ``to_dict()`` and the medtransfer version,
so a second :meth:`PreparedCache.prepare` with nothing changed does no work, a changed parameter redoes every case,
and a changed source file redoes only its case. Hashing large files is skipped when size and mtime match the
manifest (the fast path, for files that were settled when hashed); when they differ the file is hashed, so a file
that was only touched is not redone.

Arrays are written atomically, the manifest last, and file names carry the key: a reader never sees new arrays with
old metadata, and an interrupted prepare leaves the previous cache usable. A case that cannot be prepared (corrupt or
missing file) does not stop the others: they are written and recorded, then a :class:`DataError` names every failure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import DataError, MedTransferError
from ..provenance import sha256_file
from ..weights.io import atomic_write
from .datasets.detection import case_reader
from .preprocess import Pipeline
from .types import Case, Dataset, Image

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
_RACY_NS = 2_000_000_000  # coarsest common file timestamp granularity (FAT: 2 s)
Reader = Callable[[Path], Image]


@dataclass(frozen=True)
class CachedCase:
    """One prepared case: where its arrays are and the geometry/history needed to map predictions back."""

    case_id: str
    image: Path
    label: Path | None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    key: str = ""

    def load(self) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
        """``(image memmap, label memmap or None, meta)``."""
        image, label = _load_arrays(self.case_id, self.image, self.label)
        return image, label, self.meta


def _load_arrays(case_id: str, image: Path, label: Path | None) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        img = np.load(image, mmap_mode="r")
        lab = np.load(label, mmap_mode="r") if label is not None else None
    except (OSError, ValueError) as err:
        raise DataError(f"cached case {case_id!r}: cannot read {err}; run prepare again to rebuild it") from None
    return img, lab


class PreparedCache:
    """Prepared cases of one dataset under ``root``; see the module docstring."""

    def __init__(self, root: str | os.PathLike, *, reader: Reader | None = None) -> None:
        self.root = Path(root)
        self.reader = reader  # None: medtransfer.data.io.read_image (resolved in the worker, so it need not pickle)
        self._manifest: dict[str, Any] | None = None
        self.redone = self.reused = 0  # of the last prepare()
        self._hashed: dict[str, dict] = {}  # fingerprints of the last plan, by resolved path

    # ------------------------------------------------------------------------------------------------ reading
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            self._manifest = _read_manifest(self.manifest_path)
        return self._manifest

    def case_ids(self) -> list[str]:
        return list(self.manifest()["cases"])

    def case(self, case_id: str) -> CachedCase:
        entry = self.manifest()["cases"].get(case_id)
        if entry is None:
            raise DataError(
                f"case {case_id!r} is not in the cache at {self.root}; prepare the dataset first "
                "(PreparedCache.prepare or `medtransfer data prepare`)"
            )
        return _cached_case(self.root, case_id, entry)

    def load(self, case_id: str) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
        """``(image memmap, label memmap or None, meta)``; nothing is read until the arrays are indexed."""
        return self.case(case_id).load()

    def boxes(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        """``(voxel boxes (N, 2 * dims) float32 on the prepared array, labels (N,) int64)`` of a detection case
        (corner mode, array order, voxel ``i`` spans ``[i, i + 1)``: :mod:`medtransfer.data.boxes`)."""
        meta = self.case(case_id).meta
        if "boxes" not in meta:
            raise DataError(
                f"case {case_id!r} in the cache at {self.root} was prepared without boxes (not a detection case); "
                "load the dataset for detection (e.g. format luna16 with task='detection') and prepare it again"
            )
        dims = int(meta.get("spatial_dims", 3))
        boxes = np.asarray(meta["boxes"], np.float32).reshape(-1, 2 * dims)
        return boxes, np.asarray(meta["box_labels"], np.int64).reshape(-1)

    def label_max(self) -> int | None:
        """The largest label value over the cached cases (None without labels), from the values the manifest
        records; a case prepared before they were recorded has its label array read."""
        top = None
        for case_id in self.case_ids():
            case = self.case(case_id)
            if case.label is None:
                continue
            values = case.meta.get("label_values")
            if values is None:
                _, label, _ = case.load()
                values = [int(label.max())] if label.size else []
            if values:
                top = max(values) if top is None else max(top, max(values))
        return top

    # ------------------------------------------------------------------------------------------------ writing
    def pending(self, dataset: Dataset, pipeline: Pipeline, *, workers: int | None = None) -> list[str]:
        """Ids of the cases :meth:`prepare` would (re)do: new, changed (by content hash) or failing; no image is
        read, only file sizes and times (and hashes for files whose times changed). Empty: all up to date."""
        entries = self._plan(dataset, pipeline, max(1, workers or os.cpu_count() or 1))[1]
        return [c.case_id for c in dataset.cases if c.case_id not in entries]

    def prepare(
        self, dataset: Dataset, pipeline: Pipeline, *, workers: int | None = None, progress: bool = True
    ) -> list[CachedCase]:
        """Bring the cache up to date with ``dataset`` prepared by ``pipeline``, redoing only what changed.

        ``workers`` processes (default: all cores; 1 runs in this process). Cases no longer in the dataset are
        dropped from the cache. Afterwards ``self.redone`` and ``self.reused`` count the cases prepared now and
        those found up to date.
        """
        workers = max(1, workers or os.cpu_count() or 1)
        recipe, entries, jobs, failures = self._plan(dataset, pipeline, workers)
        ids = [c.case_id for c in dataset.cases]
        reused = len(entries)
        for case_id, result in self._run(jobs, workers, progress):
            if isinstance(result, str):
                failures[case_id] = result
            else:
                entries[case_id] = result
        ordered = {i: entries[i] for i in ids if i in entries}
        manifest = {**recipe, "cases": ordered}
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.manifest_path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
        self._manifest = manifest
        self._remove_unreferenced(ordered)
        self.redone, self.reused = len(ordered) - reused, reused
        log.info("cache %s: %d cases prepared, %d reused, %d failed", self.root, len(ordered) - reused, reused,
                 len(failures))
        if failures:
            lines = "\n".join(f"  {cid}: {failures[cid]}" for cid in ids if cid in failures)
            raise DataError(
                f"{len(failures)} of {len(ids)} cases could not be prepared (the other {len(ordered)} are in the "
                f"cache at {self.root}):\n{lines}"
            )
        return [_cached_case(self.root, i, e) for i, e in ordered.items()]

    def _plan(self, dataset: Dataset, pipeline: Pipeline, workers: int):
        """``(recipe, entries of up-to-date cases, jobs for the others, failures)`` from the manifest and the
        source files' fingerprints; reads no image."""
        from .. import __version__

        ids = [c.case_id for c in dataset.cases]
        dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
        if dupes:
            raise DataError(f"{dataset.root}: duplicate case ids {dupes}; each case needs its own id")
        old_cases: dict[str, Any] = _read_manifest(self.manifest_path)["cases"]
        recipe = {"format": CACHE_FORMAT, "medtransfer": __version__, "pipeline": pipeline.to_dict()}
        failures: dict[str, str] = {}
        reader = self.reader if self.reader is not None else case_reader(dataset)
        fingerprints = self._fingerprint_all(dataset.cases, old_cases, workers, failures, _extra_files(dataset))
        entries: dict[str, Any] = {}
        jobs: list[_Job] = []
        for case in dataset.cases:
            if case.case_id in failures:
                continue
            sources, label_source = fingerprints[case.case_id]
            keyed = {**recipe, "images": [s["sha256"] for s in sources],
                     "label": label_source["sha256"] if label_source else None}
            if case.boxes is not None:  # only detection cases: the keys of the other caches stay what they were
                keyed["boxes"] = [list(case.boxes), list(case.box_labels or ())]
            key = _digest(keyed)[:16]
            previous = old_cases.get(case.case_id)
            if previous and previous["key"] == key and _files_exist(self.root, previous):
                entries[case.case_id] = {**previous, "sources": sources, "label_source": label_source,
                                         "meta": {**previous["meta"], "target": _jsonable(case.target)}}
                continue
            # a dataset's reader cut down to this case, so a job pickles one case's slice list, not the dataset's
            own = reader.for_case(case) if hasattr(reader, "for_case") else reader
            jobs.append(_Job(case, key, pipeline, own, self.root, sources, label_source))
        return recipe, entries, jobs, failures

    def _fingerprint_all(self, cases: list[Case], old: dict[str, Any], workers: int, failures: dict[str, str],
                         extra: dict[str, list[str]]) -> dict[str, tuple[list[dict], dict | None]]:
        known = {s["path"]: s for e in old.values() for s in [*e.get("sources", []), e.get("label_source")] if s}
        known.update(self._hashed)  # what pending() just hashed is not hashed again by prepare()

        def one(case: Case) -> tuple[list[dict], dict | None]:
            sources = [_fingerprint(Path(p), known) for p in (*case.images, *extra.get(case.case_id, ()))]
            return sources, (_fingerprint(Path(case.label), known) if case.label is not None else None)

        result: dict[str, tuple[list[dict], dict | None]] = {}
        # hashlib releases the GIL on large buffers, so threads hash several files at once.
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {c.case_id: pool.submit(one, c) for c in cases}
            for case_id, fut in futures.items():
                try:
                    result[case_id] = fut.result()
                except DataError as err:
                    failures[case_id] = str(err)
        self._hashed = {s["path"]: s for srcs, lab in result.values() for s in [*srcs, lab] if s}
        return result

    def _run(self, jobs: list[_Job], workers: int, progress: bool) -> list[tuple[str, dict | str]]:
        results: list[tuple[str, dict | str]] = []
        if not jobs:
            return results
        bar = _progress_bar(progress)
        if workers == 1 or len(jobs) == 1:
            with bar:
                task = bar.add_task("prepare", total=len(jobs))
                for job in jobs:
                    results.append((job.case.case_id, _run_job(job)))
                    bar.advance(task)
            return results
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            # submit first: the workers start before the progress bar starts its refresh thread
            futures = {pool.submit(_run_job, job): job.case.case_id for job in jobs}
            with bar:
                task = bar.add_task("prepare", total=len(jobs))
                for fut in as_completed(futures):
                    try:
                        results.append((futures[fut], fut.result()))
                    except Exception as err:  # a worker that died (out of memory...) fails its case only
                        results.append((futures[fut], f"the worker preparing it failed: {err!r}"))
                    bar.advance(task)
        return results

    def _remove_unreferenced(self, entries: dict[str, Any]) -> None:
        keep = {self.root / e[k] for e in entries.values() for k in ("image", "label") if e.get(k)}
        for path in (self.root / "cases").glob("*.npy"):
            if path not in keep:
                path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------- helpers


def _progress_bar(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    return Progress(TextColumn("preparing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, disable=not (enabled and console.is_terminal), transient=True)


def _extra_files(dataset: Dataset) -> dict[str, list[str]]:
    """Files a case's reader reads besides its images (DeepLesion: the neighbouring slices), so that a changed
    neighbour changes the case's key too."""
    if dataset.format != "deeplesion":
        return {}
    slices = dataset.description.get("slices", {})
    return {c.case_id: list(slices.get(c.case_id, ())) for c in dataset.cases}


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"cases": {}}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data.get("cases"), dict):
            raise ValueError("no 'cases' table")
        return data
    except (ValueError, OSError) as err:
        log.warning("%s is unreadable (%s); the cache will be rebuilt", path, err)
        return {"cases": {}}


def _cached_case(root: Path, case_id: str, entry: dict[str, Any]) -> CachedCase:
    label = root / entry["label"] if entry.get("label") else None
    return CachedCase(case_id, root / entry["image"], label, entry["meta"], entry["key"])


def _files_exist(root: Path, entry: dict[str, Any]) -> bool:
    return all((root / entry[k]).exists() for k in ("image", "label") if entry.get(k))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()




def _fingerprint(path: Path, known: dict[str, dict]) -> dict[str, Any]:
    """``{path, size, mtime_ns, sha256}`` of a file, or of a folder (a DICOM series) as the hash of its files."""
    path = path.resolve()
    if not path.exists():
        raise DataError(f"{path}: no such file; fix the path in the dataset description or restore the file")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = [p.stat() for p in files]
    stat = {"path": str(path), "size": sum(s.st_size for s in stats),
            "mtime_ns": max((s.st_mtime_ns for s in stats), default=0), "files": len(files)}
    prev = known.get(str(path))
    # Trust size + mtime only for a file that was already old when it was hashed: a file rewritten within the
    # timestamp granularity of its hashing could keep both ("racy" timestamps, as git calls them).
    settled = prev and prev.get("mtime_ns", 0) + _RACY_NS < prev.get("hashed_ns", 0)
    if settled and all(prev.get(k) == stat[k] for k in ("size", "mtime_ns", "files")):
        return {**stat, "sha256": prev["sha256"], "hashed_ns": prev["hashed_ns"]}
    hashed_ns = time.time_ns()
    if path.is_dir():
        sha = _digest([[str(p.relative_to(path)), sha256_file(p)] for p in files])
    else:
        sha = sha256_file(path)
    return {**stat, "sha256": sha, "hashed_ns": hashed_ns}


@dataclass
class _Job:
    case: Case
    key: str
    pipeline: Pipeline
    reader: Reader | None
    root: Path
    sources: list[dict]
    label_source: dict | None


def _run_job(job: _Job) -> dict[str, Any] | str:
    """Prepare one case and write its arrays; a message instead of an exception when its data is bad."""
    try:
        return _prepare_case(job)
    except MedTransferError as err:
        return str(err)
    except Exception as err:  # a reader's own exception on a corrupt file: name the file, keep going
        files = ", ".join(str(p) for p in (*job.case.images, job.case.label) if p is not None)
        return f"cannot read {files}: {type(err).__name__}: {err}; check or replace the file"


def _prepare_case(job: _Job) -> dict[str, Any]:
    reader = job.reader
    if reader is None:
        from .io import read_image as reader
    images = [reader(Path(p)) for p in job.case.images]
    image = _stack_channels(images, job.case.case_id)
    label = reader(Path(job.case.label)) if job.case.label is not None else None
    if label is not None:
        label = _as_label(label)
    image, label = job.pipeline.pair(image, label)

    stem = f"cases/{_safe_name(job.case.case_id)}-{job.key}"
    array = np.asarray(image.array, dtype=np.float32)
    if array.ndim == image.spatial_dims:
        array = array[None]
    entry: dict[str, Any] = {"key": job.key, "image": f"{stem}.image.npy", "label": None}
    _save(job.root / entry["image"], array)
    if label is not None:
        entry["label"] = f"{stem}.label.npy"
        _save(job.root / entry["label"], np.asarray(label.array).reshape(label.spatial_shape))
    entry["sources"], entry["label_source"] = job.sources, job.label_source
    entry["meta"] = {
        "shape": list(array.shape), "spatial_dims": image.spatial_dims,
        "spacing": list(map(float, image.spacing)), "origin": list(map(float, image.origin)),
        "direction": np.asarray(image.direction, dtype=float).tolist(),
        "preprocess": _jsonable(image.meta.get("preprocess", [])),
        "source_images": [str(p) for p in job.case.images],
        "source_label": str(job.case.label) if job.case.label is not None else None,
        "target": _jsonable(job.case.target),
    }
    if label is not None:
        entry["meta"]["label_values"] = _label_values(np.asarray(label.array))
    if job.case.boxes is not None:
        boxes, labels = _prepared_boxes(job.case, image)
        entry["meta"]["boxes"], entry["meta"]["box_labels"] = boxes.tolist(), labels.tolist()
    return entry


def _prepared_boxes(case: Case, image: Image) -> tuple[np.ndarray, np.ndarray]:
    """The world boxes of ``case`` as voxel boxes of the prepared ``image``, clipped to it; a box left with no
    volume (outside the image after cropping) is dropped with a warning naming the case."""
    from .boxes import clip_boxes, world_to_voxel
    from .geometry import Grid

    grid = Grid.of(image)
    labels = np.asarray(case.box_labels if case.box_labels is not None else [1] * len(case.boxes), np.int64)
    if len(labels) != len(case.boxes):
        raise DataError(f"case {case.case_id!r}: {len(case.boxes)} boxes but {len(labels)} box labels; give one "
                        "label per box")  # fmt: skip
    voxel = world_to_voxel(case.boxes, grid) if len(case.boxes) else np.zeros((0, 2 * grid.dims))
    clipped, keep = clip_boxes(voxel, grid.shape)
    if not keep.all():
        log.warning("case %r: %d of %d boxes lie outside the prepared image (shape %s) and are dropped: %s",
                    case.case_id, int((~keep).sum()), len(keep), grid.shape, voxel[~keep].round(2).tolist())
    return clipped[keep].astype(np.float32), labels[keep]


def _label_values(label: np.ndarray) -> list[int]:
    """The distinct values of a label map; counting (linear time) for the usual small non-negative labels."""
    if label.size and label.dtype.kind in "ui" and label.min() >= 0:
        return np.flatnonzero(np.bincount(label.ravel())).tolist()
    return np.unique(label).astype(int).tolist()


def _stack_channels(images: list[Image], case_id: str) -> Image:
    if len(images) == 1:
        return images[0]
    first = images[0]
    for other in images[1:]:
        if other.spatial_shape != first.spatial_shape or other.channels != 1:
            raise DataError(
                f"case {case_id!r}: channel file {other.path} has shape {other.array.shape}, but {first.path} has "
                f"{first.array.shape}; the channels of a case must be single-channel images on one voxel grid"
            )
    array = np.stack([np.asarray(im.array).reshape(first.spatial_shape) for im in images])
    return Image(array, first.spacing, first.origin, first.direction, first.path, dict(first.meta))


def _as_label(label: Image) -> Image:
    """Labels as the smallest integer type that holds them; a label with fractional values is refused."""
    values = np.asarray(label.array)
    if values.dtype.kind == "f":
        if not np.isfinite(values).all() or not np.array_equal(values, np.round(values)):
            raise DataError(
                f"{label.path}: the label has non-integer or NaN values; a segmentation label must hold class "
                "indices (0, 1, 2...) — was an image given as the label, or was the mask resampled linearly?"
            )
    lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
    dtype = np.uint8 if 0 <= lo and hi <= 255 else np.int16 if -32768 <= lo and hi <= 32767 else np.int32
    return Image(values.astype(dtype), label.spacing, label.origin, label.direction, label.path, dict(label.meta))


def _save(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a file object, so numpy does not append ".npy" to the temporary name
            np.save(f, np.ascontiguousarray(array))

    atomic_write(path, write)


def _safe_name(case_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", case_id)[:80] or "case"


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
