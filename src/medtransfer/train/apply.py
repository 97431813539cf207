"""A trained run applied to whole cases: :func:`evaluate` scores it, :func:`predict` writes label maps (detection
runs: boxes, see :func:`_predict_detection`; their evaluation writes ``hits.json`` with every hit and miss).

Prediction geometry: the model sees the prepared image (the run's pipeline); its class probabilities (softmax, or
sigmoid for one channel) are moved back onto the grid of the input by world coordinates, undoing every geometric
step recorded in ``meta["preprocess"]`` (:mod:`medtransfer.data.geometry`), and only then turned into labels.
``evaluate`` scores those labels against the original label file (``grid="original"``, the default), or the
network's labels against the prepared label (``grid="prepared"``); ``summary.json`` says which.

Inference options (window size, overlap, window batch, memory budget) come from the run's ``inference`` config
section (defaults for runs made before it existed), each overridable per call; see
:func:`medtransfer.train.inference.predict_case` for when the whole volume runs in one pass.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..errors import MedTransferError

log = logging.getLogger(__name__)

GRIDS = ("original", "prepared")


def _load_run(run_dir: Path):
    from .config import load_config
    from .finetune import _build_model

    run_dir = Path(run_dir)
    for name in ("config.yaml", "run.json"):
        if not (run_dir / name).is_file():
            raise MedTransferError(f"{run_dir}: not a fine-tuning run folder (no {name})")
    cfg = load_config(run_dir / "config.yaml")
    run = json.loads((run_dir / "run.json").read_text())
    ckpt = run_dir / "checkpoints" / "best.pt"
    if not ckpt.is_file():
        ckpt = run_dir / "checkpoints" / "last.pt"
    if not ckpt.is_file() and not ckpt.parent.exists() and (run_dir / "metrics.jsonl").is_file():
        raise MedTransferError(f"{run_dir}: the run keeps no weights (a benchmark with keep: none removes them "
                               "once the run is recorded, and a grid run stopped before its end has not written "
                               "them yet); run the grid with keep: best to evaluate or predict later")
    if not ckpt.is_file():
        raise MedTransferError(f"{run_dir}: no checkpoints/best.pt (or last.pt); the run has not saved a model yet")
    from .checkpoint import read_run_checkpoint

    advice = ("resume the run (`medtransfer finetune --out RUN --resume`) or put an earlier copy in its place"
              if ckpt.name == "last.pt" else
              "the run's checkpoints/last.pt holds its latest weights: copy it over best.pt to use those, or put an "
              "earlier copy of best.pt in its place")
    state = read_run_checkpoint(ckpt, advice=advice)
    if run["task"] == "detection":
        from .finetune import build_detection

        model, _, postprocess = build_detection(run, cfg, False)
        model.postprocess = postprocess
    else:
        model = _build_model(run, cfg, False)
    model.load_state_dict(state["model"])
    from .loop import _resolve_device

    model.to(_resolve_device(None)).eval()  # the GPU when there is one; logits are assembled in host memory
    return cfg, run, model


def inference_options(cfg, dims: Optional[int] = None, **overrides: Any) -> dict[str, Any]:
    """The run's ``inference`` section with the given non-None ``overrides`` (window_size, overlap, batch_size,
    memory_gb) on top, validated like the config; a window must have ``dims`` axes when given."""
    from .config import InferenceConfig

    data = {**cfg.inference.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
    try:
        options = InferenceConfig.model_validate(data).model_dump()
    except ValueError as err:
        raise MedTransferError(f"inference options: {err}") from None
    window = options["window_size"]
    if dims is not None and window is not None and len(window) != dims:
        raise MedTransferError(f"inference window {list(window)} has {len(window)} axes; the run is {dims}D: give "
                               f"{dims} sizes (--window or inference.window_size)")
    return options


def _case_logits(model, image: np.ndarray, run: dict[str, Any], options: Optional[dict[str, Any]] = None):
    """Logits ``(1, C, *spatial)`` of one prepared case; ``options`` as :func:`inference_options` returns."""
    from .inference import predict_case

    options = options or {}
    arr = np.array(image, dtype=np.float32)  # a copy: a cached case is a read-only memmap
    if arr.ndim == run["spatial_dims"]:
        arr = arr[None]
    x = torch.from_numpy(np.ascontiguousarray(arr))[None]
    window = options.get("window_size") or run["patch_size"]
    logits, how = predict_case(model, x, window=window, overlap=options.get("overlap", 0.5),
                               batch_size=options.get("batch_size", 4), divisor=run["divisor"],
                               memory_gb=options.get("memory_gb"))
    log.debug("case of shape %s: %s", tuple(x.shape[2:]), how)
    return logits


def detect_case(model, image: np.ndarray, run: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(voxel boxes (P, 2d) on the prepared array, scores (P,), 1-based labels (P,))`` of one prepared case, the
    whole image in one pass (the detector pads it to its stride; no sliding window)."""
    arr = np.array(image, dtype=np.float32)
    if arr.ndim == run["spatial_dims"]:
        arr = arr[None]
    x = torch.from_numpy(np.ascontiguousarray(arr))[None].to(next(model.parameters()).device)
    with torch.no_grad():
        out = model(x).float()
    boxes, scores, labels = model.postprocess(out, arr.shape[1:])[0]
    return boxes.cpu().numpy(), scores.cpu().numpy(), labels.cpu().numpy()


def _detection_rows(case_id: str, dets, gt, hit) -> tuple[dict[str, Any], dict[str, Any]]:
    """One case's hits and misses: (cases.csv row, hits.json entry), matched by the run's protocol."""
    from .detection_metrics import match_detections

    boxes, scores, labels = dets
    gt_boxes, gt_labels = gt
    m = match_detections([(case_id, float(s), b) for b, s in zip(boxes, scores)],
                         [(case_id, b) for b in gt_boxes], hit)
    lesions = [{"box": [float(v) for v in b], "label": int(lab), "hit": bool(j >= 0),
                "score": None if j < 0 else float(m.lesion_score[k]), "detection": int(j)}
               for k, (b, lab, j) in enumerate(zip(gt_boxes, gt_labels, m.lesion_hit_by))]
    detections = [{"box": [float(v) for v in b], "score": float(s), "label": int(lab), "fp": bool(fp)}
                  for b, s, lab, fp in zip(boxes, scores, labels, m.is_fp)]
    n_hit = sum(les["hit"] for les in lesions)
    row = {"case_id": case_id, "lesions": len(lesions), "hit": n_hit, "missed": len(lesions) - n_hit,
           "detections": len(detections), "false_positives": int(m.is_fp.sum())}
    return row, {"case_id": case_id, "lesions": lesions, "detections": detections}


def _evaluate_detection(model, run: dict[str, Any], cache, ids: list[str]):
    """Rows of cases.csv, the hits.json entries and the pooled metrics (FROC / sensitivity@FP, CPM, mAP@0.1)."""
    from .detection_metrics import box_hit, coco_map, deeplesion_sensitivity, froc

    luna = run.get("protocol", "luna16") == "luna16"
    hit = box_hit("centre_in_radius") if luna else box_hit("iou", 0.5)
    rows, hits, detections, lesions, pred, truth = [], [], [], [], [], []
    started = time.perf_counter()
    for i, case_id in enumerate(ids, 1):
        image, _, _ = cache.load(case_id)
        dets = detect_case(model, image, run)
        gt = cache.boxes(case_id)
        row, entry = _detection_rows(case_id, dets, gt, hit)
        rows.append(row)
        hits.append(entry)
        detections += [(case_id, float(s), b) for b, s in zip(dets[0], dets[1])]
        lesions += [(case_id, b) for b in gt[0]]
        pred.append(dets)
        truth.append(gt)
        _progress("evaluate", i, len(ids), case_id, started)
    if luna:
        metrics = froc(detections, lesions, n_scans=len(ids))
    else:
        metrics = deeplesion_sensitivity(detections, lesions, n_images=len(ids))
    metrics["map_iou0.1"] = coco_map(pred, truth, num_classes=run["num_classes"]) if lesions else float("nan")
    return rows, hits, metrics


def probabilities(logits: torch.Tensor) -> np.ndarray:
    """Class probabilities ``(C, *spatial)`` of one case's logits ``(1, C, *spatial)``: softmax, or sigmoid for one
    channel, so that ``p > 0.5`` and the argmax give the labels the logits give."""
    p = torch.sigmoid(logits[0]) if logits.shape[1] == 1 else torch.softmax(logits[0], dim=0)
    return p.cpu().numpy()


def _one_hot(labels: np.ndarray, channels: int) -> torch.Tensor:
    """Labels as ``(1, C, *spatial)`` scores that the segmentation metrics turn back into the same labels."""
    t = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    if channels == 1:
        return (t > 0).to(torch.float32)[None, None] * 2 - 1
    return torch.nn.functional.one_hot(t, channels).to(torch.uint8).movedim(-1, 0)[None]


def _progress(what: str, i: int, n: int, case: str, started: float, how: str = "") -> None:
    # one plain line per case on stderr, so logs of long jobs (SLURM, nohup) show where they are
    print(f"{what} {i}/{n} {case}: {time.perf_counter() - started:.1f} s{how}", file=sys.stderr, flush=True)


def _evaluation_dir(run_dir: Path, dataset_name: Optional[str], split: str, overwrite: bool) -> Path:
    """``RUN/evaluation`` (the run's val split), ``RUN/evaluation-<split>`` (its test/all split) or
    ``RUN/evaluation-<dataset name>`` (``--data``); an existing evaluation is refused unless ``overwrite``."""
    from ..data.cache import _safe_name

    if dataset_name is not None:
        name = f"evaluation-{_safe_name(dataset_name)}"
    else:
        name = "evaluation" if split == "val" else f"evaluation-{split}"
    out = run_dir / name
    if not overwrite and ((out / "summary.json").exists() or (out / "cases.csv").exists()):
        raise MedTransferError(f"{out} already holds an evaluation; pass --overwrite to replace it, or move it away")
    return out


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys = list(dict.fromkeys(k2 for r in rows for k2 in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _add_once(values: list, spacing) -> None:
    spacing = [float(v) for v in spacing]
    if spacing not in values:
        values.append(spacing)


def _original_label(meta: dict[str, Any], case_id: str) -> np.ndarray:
    from ..data.io import read_image

    source = meta.get("source_label")
    if not source:
        raise MedTransferError(f"case {case_id!r}: the cache does not record its label file, so it cannot be scored "
                               "on the original grid; prepare the cache again, or use --grid prepared")
    return np.asarray(read_image(source).array)


def _evaluation_dataset(cfg, run: dict[str, Any], data_path: str | Path):
    """The dataset at ``data_path`` read as the run read its own: the run's ``data.format`` and layout options
    (a LUNA16 folder then comes with its nodule boxes); a LUNA16 folder given to a detection run is read for
    detection even when the run's own data were the built-in phantoms (no options in its config)."""
    from ..data.datasets import detect_format, load_dataset

    fmt = cfg.data.format if cfg.data.format != "auto" else detect_format(Path(data_path))
    options = dict(cfg.data.options or {})
    if run["task"] == "detection" and fmt == "luna16":
        options.setdefault("task", "detection")
    dataset = load_dataset(data_path, format=fmt, **options)
    if dataset.task != run["task"]:
        raise MedTransferError(f"{data_path}: a {dataset.task} dataset (format {fmt}), but the run is a {run['task']} "
                               "run; give it data of the run's task (or the layout options that make it so, as "
                               "data.options in the run's config.yaml)")
    return dataset


def evaluate(
    run_dir: str | Path, data_path: Optional[str | Path] = None, *, split: str = "val", grid: str = "original",
    overwrite: bool = False, window_size: Optional[Sequence[int]] = None, overlap: Optional[float] = None,
    batch_size: Optional[int] = None, memory_gb: Optional[float] = None,
) -> Path:
    """Score the run's best model on whole cases; writes ``cases.csv`` and ``summary.json`` into the folder
    :func:`_evaluation_dir` names, and returns it.

    Without ``data_path`` the run's cached cases of ``split`` (``val``, ``test`` or ``all``) are used; with it, that
    dataset is prepared with the run's pipeline (into ``<folder>/cache``) and all its cases are scored.
    Segmentation is scored on the original label grid by default (probabilities mapped back, see the module
    docstring); ``grid="prepared"`` scores on the resampled grid the network saw, against the prepared label."""
    from ..data.cache import PreparedCache
    from ..data.geometry import Grid, labels_back, original_grid
    from ..data.preprocess import Pipeline
    from ..data.splits import Split
    from .finetune import _write_json
    from .metrics import build_metrics
    from .torchdata import centre_fit

    run_dir = Path(run_dir)
    if split not in ("val", "test", "all"):
        raise MedTransferError(f"split: choose val, test or all, got {split!r}")
    if grid not in GRIDS:
        raise MedTransferError(f"grid: choose original or prepared, got {grid!r}")
    cfg, run, model = _load_run(run_dir)
    options = inference_options(cfg, run["spatial_dims"], window_size=window_size, overlap=overlap,
                                batch_size=batch_size, memory_gb=memory_gb)
    if data_path is None:
        out = _evaluation_dir(run_dir, None, split, overwrite)
        cache = PreparedCache(run["cache"])
        parts = Split.load(run_dir / "split.json")
        ids = cache.case_ids() if split == "all" else list(getattr(parts, split))
    else:
        dataset = _evaluation_dataset(cfg, run, data_path)
        out = _evaluation_dir(run_dir, dataset.name or Path(data_path).name, split, overwrite)
        cache = PreparedCache(out / "cache")
        cache.prepare(dataset, Pipeline.from_dict(run["pipeline"]), workers=1, progress=False)
        ids = cache.case_ids()
    if not ids:
        raise MedTransferError(f"split {split!r} of {run_dir} holds no cases; choose another with --split")
    task, k = run["task"], run["num_classes"]
    if task == "detection":
        rows, hits, metrics = _evaluate_detection(model, run, cache, ids)
        out.mkdir(parents=True, exist_ok=True)
        _write_csv(out / "cases.csv", rows)
        _write_json(out / "hits.json", {"coordinates": "voxel corner boxes (lo..., hi...) on the prepared arrays",
                                        "protocol": run.get("protocol", "luna16"), "cases": hits})
        _write_json(out / "summary.json", {"split": split if data_path is None else "all",
                                           "data": str(data_path or run["data_path"]), "cases": len(ids),
                                           "protocol": run.get("protocol", "luna16"), "metrics": metrics})
        return out
    total = build_metrics(task, num_classes=k, multilabel=run["multilabel"])
    rows, spacings, scores_by_case = [], {"original": [], "prepared": []}, {}
    for i, case_id in enumerate(ids, 1):
        started = time.perf_counter()
        image, label, meta = cache.load(case_id)
        if task == "segmentation":
            logits = _case_logits(model, image, run, options)
            if grid == "original":
                prepared = Grid.of(meta)
                target_np = _original_label(meta, case_id)
                pred = labels_back(probabilities(logits), prepared, meta.get("preprocess", []))
                if pred.shape != target_np.shape:
                    raise MedTransferError(
                        f"case {case_id!r}: the label file {meta['source_label']} has shape {target_np.shape}, the "
                        f"image it was prepared with {pred.shape}; the label must be drawn on the image's grid")
                scores = _one_hot(pred, logits.shape[1])
                _add_once(spacings["original"], original_grid(prepared, meta.get("preprocess", [])).spacing)
            else:
                scores = logits
                target_np = np.asarray(label).reshape(logits.shape[2:])
            _add_once(spacings["prepared"], meta["spacing"])
            target = torch.from_numpy(np.asarray(target_np, dtype=np.int64))[None]
            one = build_metrics(task, num_classes=k)
            one.update(scores, target)
            total.update(scores, target)
            rows.append({"case_id": case_id, **one.compute()})
        else:
            arr = np.asarray(image, dtype=np.float32)
            arr = centre_fit(arr if arr.ndim > run["spatial_dims"] else arr[None], run["patch_size"])
            with torch.no_grad():
                logits = model(torch.from_numpy(np.ascontiguousarray(arr))[None]).float()
            t = meta.get("target")
            target = (torch.tensor([t], dtype=torch.float32) if isinstance(t, list)
                      else torch.tensor([int(t)], dtype=torch.int64))
            total.update(logits, target)
            if run["multilabel"]:
                pred = (logits[0] > 0).int().tolist()
            else:  # one logit is a sigmoid: positive above 0 (its argmax would always be class 0)
                pred = int(logits[0, 0] > 0) if k == 1 else int(logits[0].argmax())
            if k in (1, 2) and not run["multilabel"]:  # the log-odds of class 1, ranked by AUC and FROC
                scores_by_case[case_id] = float(logits[0, 0] if k == 1 else logits[0, 1] - logits[0, 0])
            rows.append({"case_id": case_id, "target": t, "prediction": pred})
        _progress("evaluate", i, len(ids), case_id, started)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "cases.csv", rows)
    summary: dict[str, Any] = {"split": split if data_path is None else "all",
                               "data": str(data_path or run["data_path"]), "cases": len(ids)}
    if task == "segmentation":
        summary["grid"] = grid
        summary["spacing"] = {key: value for key, value in spacings.items() if value}
    summary["inference"] = options
    summary["metrics"] = total.compute()
    froc = _candidate_froc(data_path or run["data_path"], scores_by_case, out) if scores_by_case else None
    if froc is not None:
        summary["froc"] = froc
    _write_json(out / "summary.json", summary)
    return out


def _candidate_froc(data: str | Path, scores: dict[str, float], out: Path) -> Optional[dict[str, Any]]:
    """For a nodule candidate dataset (``medtransfer data candidates``, data/candidates.py): the FROC of the
    candidate scores (:func:`~medtransfer.train.detection_metrics.froc_points`: a hit is a candidate centre within a
    nodule's radius; sensitivity at 1/8..8 false positives per scan and their mean, LUNA16's CPM) and
    ``luna16_submission.csv`` for LUNA16's own evaluation script. None for any other dataset."""
    from ..data.candidates import froc_inputs, read_manifest, read_table, write_luna_submission

    manifest = read_manifest(data)
    if manifest is None:
        return None
    table = read_table(data)
    write_luna_submission(out / "luna16_submission.csv", scores, table)
    if manifest.get("nodules") is None:
        return {"skipped": "the extraction had no annotations.csv, so there are no nodules to score against"}
    from .detection_metrics import froc_points

    points = froc_inputs(scores, table, manifest)
    result = froc_points(points["detections"], points["lesions"], n_scans=points["n_scans"])
    return {**result, "n_scans": points["n_scans"], "lesions": len(points["lesions"]),
            "every_candidate_of_those_scans_scored": points["complete"]}


# ----------------------------------------------------------------------------------------------- predict


def predict(
    run_dir: str | Path, inputs: Sequence[str | Path], out_dir: str | Path, *,
    window_size: Optional[Sequence[int]] = None, overlap: Optional[float] = None, batch_size: Optional[int] = None,
    memory_gb: Optional[float] = None, fmt: str = "nii.gz", overwrite: bool = False,
    box_labels: bool = False, box_threshold: float = 0.5,
) -> list[Path]:
    """Label maps of ``inputs`` (segmentation runs) written as ``<out_dir>/<name><ext>`` over the input grid,
    in the orientation the input has on disk (module docstring: probabilities mapped back by world coordinates).

    ``<name>`` is the input's name without its image extension (``sub-01.ses-1.nii.gz`` -> ``sub-01.ses-1``);
    ``fmt`` is ``nii.gz`` (default), ``nii``, ``nrrd``, ``mha`` or ``same`` (the input's own file type where it can
    be written). Names that clash, and outputs that exist already (unless ``overwrite``), are refused before
    anything is written, as are inputs whose dimensionality or channel count is not the run's.

    ``<out_dir>/summary.json`` (kept and added to by later calls into the folder) lists per input its file, the output, the input's spacing and shape, the spacing and
    shape the model ran at and whether it was resampled (also said at logging INFO level)."""
    from ..data.geometry import to_original_grid
    from ..data.io import plan_output_paths, read_header, read_image, write_image
    from ..data.preprocess import Pipeline
    from ..data.types import Image

    cfg, run, model = _load_run(Path(run_dir))
    if run["task"] == "detection":
        return _predict_detection(cfg, run, model, Path(run_dir), list(map(Path, inputs)), Path(out_dir), fmt=fmt,
                                  overwrite=overwrite, box_labels=box_labels, box_threshold=box_threshold)
    if box_labels:
        raise MedTransferError("--box-labels applies to detection runs; the run at "
                               f"{run_dir} is a {run['task']} run")
    if run["task"] != "segmentation":
        raise MedTransferError(f"predict writes label maps; the run at {run_dir} is a {run['task']} run")
    options = inference_options(cfg, run["spatial_dims"], window_size=window_size, overlap=overlap,
                                batch_size=batch_size, memory_gb=memory_gb)
    pipeline = Pipeline.from_dict(run["pipeline"])
    out_dir = Path(out_dir)
    paths = list(map(Path, inputs))
    want, channels = run["spatial_dims"], cfg.model.in_channels
    for path in paths:  # every input checked (header only where the format allows) before anything is written
        shape, _, _, has = read_header(path)
        if len(shape) != want:
            hint = " (a DICOM series folder or a volume file, not one slice)" if want == 3 else ""
            raise MedTransferError(f"{path}: a {len(shape)}D image (shape {shape}), but the run at {run_dir} is a "
                                   f"{want}D model; give it {want}D images{hint}")
        if has != channels:
            raise MedTransferError(f"{path}: {has} channel(s), but the run at {run_dir} is a {want}D model of "
                                   f"{channels} input channel(s); give it {want}D images with {channels} channel(s)")
    targets = plan_output_paths(paths, out_dir, fmt)
    _refuse_existing(targets, overwrite)
    summary_path = out_dir / "summary.json"
    earlier = _earlier_predictions(summary_path, overwrite)
    written, cases = [], []
    for i, (path, target) in enumerate(zip(paths, targets), 1):
        started = time.perf_counter()
        original = read_image(path)
        prepared = pipeline(original)
        resampled = (tuple(np.shape(prepared.array)[-want:]) != tuple(np.shape(original.array)[-want:])
                     or not np.allclose(prepared.spacing, original.spacing))
        if resampled:
            log.info("%s: resampled from %s mm to the run's %s mm for the model; the labels are written on the "
                     "input's own grid", path, _mm(original.spacing), _mm(prepared.spacing))
        cases.append({"input": str(path), "output": str(target), "input_spacing": [float(v) for v in original.spacing],
                      "input_shape": list(np.shape(original.array)[-want:]),
                      "model_spacing": [float(v) for v in prepared.spacing],
                      "model_shape": list(np.shape(prepared.array)[-want:]), "resampled": bool(resampled)})
        labels = to_original_grid(probabilities(_case_logits(model, prepared.array, run, options)), prepared, original)
        pred = Image(array=labels, spacing=tuple(original.spacing), origin=tuple(original.origin),
                     direction=np.array(original.direction, dtype=float, copy=True), meta=dict(original.meta))
        written.append(write_image(pred, target, like=original))
        _progress("predict", i, len(paths), str(path), started)
    from .finetune import _write_json

    outputs = {c["output"] for c in cases}
    cases = [c for c in earlier if c.get("output") not in outputs] + cases
    _write_json(summary_path, {"run": str(run_dir), "inference": options, "cases": cases})
    return written


def _earlier_predictions(path: Path, overwrite: bool) -> list[dict[str, Any]]:
    """The cases of an earlier ``summary.json`` in the folder: a later predict adds to it, never drops them."""
    if not path.exists():
        return []
    try:
        return list(json.loads(path.read_text())["cases"])
    except (OSError, ValueError, KeyError, TypeError):
        if overwrite:
            return []
        raise MedTransferError(f"{path}: not a predict summary this command can add to; nothing was written: move "
                               "it away, choose another --out folder or pass --overwrite") from None


def _refuse_existing(targets: list[Path], overwrite: bool) -> None:
    """Refuse, before anything is written, to replace output files that exist (unless ``overwrite``)."""
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise MedTransferError(f"{len(existing)} output file(s) exist already, nothing was written: "
                               f"{', '.join(existing[:5])}{' ...' if len(existing) > 5 else ''}; choose another "
                               "--out folder or pass --overwrite")


def _mm(spacing) -> str:
    return "x".join(f"{float(v):g}" for v in spacing)


def _predict_detection(cfg, run: dict[str, Any], model, run_dir: Path, paths: list[Path], out_dir: Path, *,
                       fmt: str, overwrite: bool, box_labels: bool, box_threshold: float) -> list[Path]:
    """``<out_dir>/<name>.boxes.json`` per input: every detection's score, label, voxel box on the input's own
    grid (array order, corner mode) and world box (LPS mm ``cccwhd``), mapped back through the preprocessing
    records (:func:`medtransfer.data.boxes.boxes_to_original`); with ``box_labels`` also ``<name><ext>``, a label
    map on the input grid where each box of score >= ``box_threshold`` is filled with its class (higher scores
    drawn last, so they win where boxes overlap)."""
    from ..data.boxes import boxes_to_original
    from ..data.io import plan_output_paths, read_header, read_image, write_image
    from ..data.preprocess import Pipeline
    from ..data.types import Image
    from .finetune import _write_json

    want = run["spatial_dims"]
    if want != 3:
        if box_labels:
            raise MedTransferError(f"--box-labels draws label maps of 3D volumes; the run at {run_dir} is a 2.5D "
                                   "detection run, whose predictions are boxes JSON only: leave --box-labels out")
        return _predict_25d(cfg, run, model, run_dir, paths, out_dir, overwrite=overwrite)
    for path in paths:
        shape, _, _, _ = read_header(path)
        if len(shape) != want:
            raise MedTransferError(f"{path}: a {len(shape)}D image (shape {shape}), but the run at {run_dir} is a "
                                   f"{want}D detector; give it 3D volumes")
    maps = plan_output_paths(paths, out_dir, fmt)
    jsons = [m.parent / (m.name[: -len("".join(m.suffixes))] + ".boxes.json") if m.suffixes else
             m.with_name(m.name + ".boxes.json") for m in maps]
    planned = jsons + (maps if box_labels else [])
    _refuse_existing(planned, overwrite)
    pipeline = Pipeline.from_dict(run["pipeline"])
    written: list[Path] = []
    for i, (path, js, lm) in enumerate(zip(paths, jsons, maps), 1):
        started = time.perf_counter()
        original = read_image(path)
        prepared = pipeline(original)
        boxes, scores, labels = detect_case(model, prepared.array, run)
        meta = {"shape": list(np.shape(prepared.array)), "spacing": list(prepared.spacing),
                "origin": list(prepared.origin), "direction": np.asarray(prepared.direction).tolist(),
                "preprocess": prepared.meta.get("preprocess", [])}
        voxel, world = boxes_to_original(boxes, meta) if len(boxes) else (np.zeros((0, 6)), np.zeros((0, 6)))
        found = [{"score": float(s), "label": int(lab), "voxel": [float(v) for v in vb],
                  "world_cccwhd": [float(v) for v in wb]}
                 for s, lab, vb, wb in zip(scores, labels, voxel, world)]
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(js, {"input": str(path), "run": str(run_dir), "coordinates": {
            "voxel": "corner boxes (lo_0, lo_1, lo_2, hi_0, hi_1, hi_2) on the input's array axes, voxel i spans "
                     "[i, i + 1)", "world_cccwhd": "centre (x, y, z) and size (w, h, d) in LPS mm"},
            "detections": found})
        written.append(js)
        if box_labels:
            shape = np.shape(original.array)[-want:]
            lab_map = np.zeros(shape, np.uint16)
            for det in sorted(found, key=lambda d: d["score"]):
                if det["score"] < box_threshold:
                    continue
                vb = det["voxel"]
                lo = [max(0, int(np.floor(v))) for v in vb[:want]]
                hi = [min(n, int(np.ceil(v))) for v, n in zip(vb[want:], shape)]
                lab_map[tuple(slice(a, b) for a, b in zip(lo, hi))] = det["label"]
            image = Image(array=lab_map, spacing=tuple(original.spacing), origin=tuple(original.origin),
                          direction=np.array(original.direction, dtype=float, copy=True), meta=dict(original.meta))
            written.append(write_image(image, lm, like=original))
        _progress("predict", i, len(paths), str(path), started)
    return written


def _deeplesion_inputs(cfg, paths: list[Path]) -> list[tuple[Any, Any]]:
    """``(dataset, case)`` per key slice the inputs name: a DeepLesion folder gives all its key slices, a key-slice
    PNG (``<root>/Images_png/<series>/<slice>.png``) its own, with the neighbours and spacing DL_info.csv gives
    (read with the run's layout options, e.g. ``slices``). Everything is checked before anything is written."""
    from ..data.datasets import load_dataset

    options = dict(cfg.data.options or {}) if cfg.data.format == "deeplesion" else {}
    loaded: dict[Path, Any] = {}
    found, seen = [], set()
    for path in paths:
        root = path if path.is_dir() else path.parent.parent.parent
        if not (path.is_dir() or path.suffix.lower() == ".png") or not (
                options.get("info") or (root / "DL_info.csv").is_file()):
            raise MedTransferError(f"{path}: a 2.5D detection run predicts DeepLesion key slices; give a DeepLesion "
                                   "folder (DL_info.csv, Images_png/) or a key-slice PNG inside one "
                                   "(Images_png/<series>/<slice>.png), nothing was written")
        if root not in loaded:
            loaded[root] = load_dataset(root, format="deeplesion", **options)
        dataset = loaded[root]
        cases = dataset.cases if path.is_dir() else [
            c for c in dataset.cases if Path(c.images[0]).resolve() == path.resolve()]
        if not cases:
            raise MedTransferError(f"{path}: not a key slice that {root / 'DL_info.csv'} lists (its neighbouring "
                                   "slices and pixel spacing come from there); give a listed slice, nothing was "
                                   "written")
        for case in cases:
            if case.case_id not in seen:
                seen.add(case.case_id)
                found.append((dataset, case))
    return found


def _predict_25d(cfg, run: dict[str, Any], model, run_dir: Path, paths: list[Path], out_dir: Path, *,
                 overwrite: bool) -> list[Path]:
    """``<out_dir>/<case>.boxes.json`` per DeepLesion key slice (:func:`_deeplesion_inputs`): the key slice and
    its neighbours stacked as the run's cache stacks them, prepared with the run's pipeline; every detection's
    score, label, pixel box on the key slice (array order, corners), the same box as DeepLesion writes
    ``Bounding_boxes`` (``x1, y1, x2, y2``, pixel centres at integers) and its world box (``cx, cy, w, h`` in mm
    on DL_info's pixel spacing, origin at pixel (0, 0))."""
    from ..data.boxes import boxes_to_original
    from ..data.datasets.detection import DeepLesionReader
    from ..data.preprocess import Pipeline
    from .finetune import _write_json

    inputs = _deeplesion_inputs(cfg, paths)
    jsons = [out_dir / f"{case.case_id}.boxes.json" for _, case in inputs]
    _refuse_existing(jsons, overwrite)
    pipeline = Pipeline.from_dict(run["pipeline"])
    written: list[Path] = []
    for i, ((dataset, case), js) in enumerate(zip(inputs, jsons), 1):
        started = time.perf_counter()
        original = DeepLesionReader.of(dataset).for_case(case)(Path(case.images[0]))
        if original.array.shape[0] != run["in_channels"]:
            raise MedTransferError(f"{case.images[0]}: a stack of {original.array.shape[0]} slices, but the run at "
                                   f"{run_dir} takes {run['in_channels']}; read it with the run's slices= option")
        prepared = pipeline(original)
        boxes, scores, labels = detect_case(model, prepared.array, run)
        meta = {"shape": list(np.shape(prepared.array)[-2:]), "spacing": list(prepared.spacing),
                "origin": list(prepared.origin), "direction": np.asarray(prepared.direction).tolist(),
                "preprocess": prepared.meta.get("preprocess", [])}
        pixel, world = boxes_to_original(boxes, meta) if len(boxes) else (np.zeros((0, 4)), np.zeros((0, 4)))
        found = [{"score": float(s), "label": int(lab), "voxel": [float(v) for v in pb],
                  "pixel_xyxy": [float(pb[1] - 0.5), float(pb[0] - 0.5), float(pb[3] - 0.5), float(pb[2] - 0.5)],
                  "world_cxcywh": [float(v) for v in wb]}
                 for s, lab, pb, wb in zip(scores, labels, pixel, world)]
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(js, {"input": str(case.images[0]), "slices": list(original.meta.get("slices", [])),
                         "run": str(run_dir), "coordinates": {
            "voxel": "corner boxes (lo_row, lo_col, hi_row, hi_col) on the key slice, pixel i spans [i, i + 1)",
            "pixel_xyxy": "DeepLesion's Bounding_boxes convention: x1, y1, x2, y2 with pixel centres at integers",
            "world_cxcywh": "centre (x, y) and size (w, h) in mm on DL_info's pixel spacing, origin at pixel (0, 0)"},
            "detections": found})
        written.append(js)
        _progress("predict", i, len(inputs), case.case_id, started)
    return written
