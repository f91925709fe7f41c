"""The ``evaluate`` stage: the exported model on the test split, through the ONNX predictor.

What is measured is what users get: ``seqops.predictor`` (onnxruntime, encode once, step
until done), not the torch model. Outputs:

- the metrics JSON (DVC metrics; the same numbers go to MLflow as ``test/<name>``):
  counting, localisation, duplicates/misses, done calibration, stop timing, latency;
- plots (DVC plots): ``counts.csv`` (per image true vs predicted count) and
  ``calibration.csv`` (the reliability table);
- a report directory: ``per_image.jsonl``, ``calibration.json`` and ``worst/`` pictures of
  the worst images (predicted points numbered in RED, true points in GREEN).

The metric definitions are in :mod:`seqops.scoring`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from seqops import imaging
from seqops import scoring as M
from seqops.config import Params
from seqops.data.manifest import Record, manifest_path, read_dataset_info, read_manifest
from seqops.io import atomic_directory, atomic_write_json

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8
COUNTS_CSV = "counts.csv"
CALIBRATION_CSV = "calibration.csv"


class EvaluateError(ValueError):
    """The model and the dataset do not fit together; the message says how."""


def prepare_record(predictor: Any, data_dir: Path, record: Record) -> Any:
    """The predictor's input for a prepared image (and its exemplar boxes, for a model
    trained with them).

    Prepared images are at model size, so the record's model-pixel boxes are the image's
    own pixels. Boxes are clipped to the image as training's mask rendering does; a record
    without boxes gets the empty mask training used, where a user request would be refused.
    """
    from seqops.predictor import PreparedImage

    image = imaging.load_image(data_dir / record.image)
    if not predictor.info.exemplars:
        return predictor.prepare(image)
    size = predictor.info.image_size
    boxes = np.clip(record.exemplars_array()[:3], 0, size)
    boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
    if len(boxes):
        return predictor.prepare(image, boxes.tolist())
    pixels, scale = imaging.resize_for_model(image, size)
    grid = predictor.info.grid
    empty = np.zeros((1, grid, grid), np.float32)
    return PreparedImage(imaging.normalize_pixels(pixels), image.size, scale, empty)


def evaluate_image(
    record: Record, prediction: Any, radius: float
) -> tuple[dict[str, Any], M.MatchResult, np.ndarray, np.ndarray]:
    """Score one image's prediction (points in model px) against its record.

    Returns:
        ``(row, match, done_probs, done_labels)``: the per-image row of ``per_image.jsonl``,
        the matching, and the rollout's done probabilities with their observed labels.
    """
    true = record.points_array()
    pred = np.asarray(prediction.points_model, np.float64).reshape(-1, 2)
    match = M.match_points(pred, true, radius)
    t_all = M.first_step_all_found(pred, true, radius)
    probs = np.asarray(prediction.done_probs, np.float64)
    labels = M.done_labels(len(probs), t_all)
    tp = match.matches
    row = {
        "id": record.id,
        "true_count": len(true),
        "pred_count": prediction.count,
        "abs_err": abs(prediction.count - len(true)),
        "matches": tp,
        "duplicates": match.duplicates,
        "spurious": match.spurious,
        "misses": match.misses,
        "f1": (2 * tp / (len(pred) + len(true))) if len(pred) + len(true) else 1.0,
        "px_err_mean": float(match.distances.mean()) if tp else None,
        "stopped_by": prediction.stopped_by,
        "stop": M.stop_timing(len(probs), prediction.stopped_by, t_all),
        "t_all": t_all,
        "points": prediction.points_model,
        "done_probs": prediction.done_probs,
    }
    return row, match, probs, labels


def summarise(
    rows: list[dict[str, Any]],
    matches: list[M.MatchResult],
    probs: np.ndarray,
    labels: np.ndarray,
    radius: float,
    done_threshold: float = 0.5,
) -> dict[str, Any]:
    """The stage's metrics from the per-image results (one flat dict: DVC and MLflow)."""
    out: dict[str, Any] = {
        "num_images": len(rows),
        "num_objects": int(sum(r["true_count"] for r in rows)),
        "num_predictions": int(sum(r["pred_count"] for r in rows)),
    }
    out.update(M.count_metrics([r["pred_count"] for r in rows], [r["true_count"] for r in rows]))
    out.update(M.localisation_metrics(matches, radius))
    out.update(M.calibration_metrics(probs, labels, threshold=done_threshold))
    stops = Counter(r["stop"] for r in rows)
    for kind in ("early", "on_time", "late", "guard"):
        out[f"stop_{kind}_rate"] = stops[kind] / len(rows) if rows else math.nan
    return out


def _pick_worst(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The ``n`` worst images: largest count error, then lowest F1."""
    return sorted(rows, key=lambda r: (-r["abs_err"], r["f1"], r["id"]))[:n]


def _write_csv(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if _is_nan(row.get(k)) else row.get(k)) for k in fields})


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    """NaN is not JSON: an undefined metric (an empty bucket) is written as null."""
    return {k: (None if _is_nan(v) else v) for k, v in metrics.items()}


def _draw_worst(data_dir: Path, by_id: dict[str, Record], worst: list[dict], out: Path) -> None:
    from seqops.draw import draw_rollout

    out.mkdir(parents=True, exist_ok=True)
    for rank, row in enumerate(worst, 1):
        record = by_id[row["id"]]
        image = imaging.load_image(data_dir / record.image)
        picture = draw_rollout(image, np.asarray(row["points"]), record.points_array())
        safe_id = "".join(c if c.isalnum() or c in "-_" else "_" for c in row["id"])
        picture.save(out / f"{rank:02d}_{safe_id}.png")


def run_evaluate(
    params: Params,
    model: str | Path,
    data_dir: str | Path,
    split: str = "test",
    metrics_path: str | Path | None = None,
    plots_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    track: bool = True,
    device: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict[str, Any]:
    """Evaluate a model (a directory or an MLflow URI) on ``split`` of a prepared dataset.

    Args:
        params: ``evaluate.*`` (radius, done threshold, max objects, worst images).
        model: the exported model directory or ``models:/seqops@candidate``.
        metrics_path: the metrics JSON (``metrics/evaluate.json``).
        plots_dir: ``counts.csv`` and ``calibration.csv`` go here.
        out_dir: the report directory (per-image results, worst pictures).
        track: log metrics (``test/<name>``) and the report into the model's training run.
        batch_size: images per predictor batch (each image still stops on its own).

    Returns:
        The metrics dict.
    """
    from seqops.predictor import Predictor

    cfg = params.evaluate
    data_dir = Path(data_dir)
    predictor = Predictor.load(model, device=device)
    info = read_dataset_info(data_dir)
    if int(info.get("image_size", -1)) != predictor.info.image_size:
        raise EvaluateError(
            f"{data_dir}/dataset.json: image_size {info.get('image_size')} differs from the "
            f"model's {predictor.info.image_size} ({model}); prepare the data at the model's size"
        )
    records = read_manifest(manifest_path(data_dir, split))
    if not records:
        raise EvaluateError(f"{manifest_path(data_dir, split)}: no images to evaluate")

    rows, matches, all_probs, all_labels = [], [], [], []
    started = time.perf_counter()
    for i in range(0, len(records), batch_size):
        batch = records[i : i + batch_size]
        images = [prepare_record(predictor, data_dir, r) for r in batch]
        predictions = predictor.predict(
            images, max_objects=cfg.max_objects, done_threshold=cfg.done_threshold
        )
        for record, prediction in zip(batch, predictions, strict=True):
            row, match, probs, labels = evaluate_image(record, prediction, cfg.match_radius_px)
            rows.append(row)
            matches.append(match)
            all_probs.append(probs)
            all_labels.append(labels)
    elapsed = time.perf_counter() - started
    probs, labels = np.concatenate(all_probs), np.concatenate(all_labels)
    metrics = summarise(rows, matches, probs, labels, cfg.match_radius_px, cfg.done_threshold)
    metrics["latency_ms_per_image"] = 1e3 * elapsed / len(records)
    metrics["steps_per_image"] = float(len(probs) / len(records))
    metrics = _json_safe(metrics)
    table = [_json_safe(r) for r in M.reliability_table(probs, labels)]

    if plots_dir is not None:
        with atomic_directory(plots_dir) as tmp:
            _write_csv(tmp / COUNTS_CSV, rows, ["id", "true_count", "pred_count", "abs_err"])
            _write_csv(
                tmp / CALIBRATION_CSV,
                [r for r in table if r["steps"]],
                ["bin_lower", "bin_upper", "steps", "mean_done_prob", "observed_done_rate"],
            )
    if out_dir is not None:
        with atomic_directory(out_dir) as tmp:
            with open(tmp / "per_image.jsonl", "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
            atomic_write_json(tmp / "calibration.json", table)
            by_id = {r.id: r for r in records}
            _draw_worst(data_dir, by_id, _pick_worst(rows, cfg.worst_images), tmp / "worst")
    if metrics_path is not None:
        atomic_write_json(metrics_path, metrics)
    if track:
        from seqops.registry import log_evaluation

        artifacts = {"evaluate": Path(out_dir)} if out_dir is not None else {}
        if plots_dir is not None:
            artifacts["evaluate/plots"] = Path(plots_dir)
        log_evaluation(predictor.info.run_id, metrics, artifacts, prefix=split)
    log.info(
        "%s: %d images, count MAE %.3f, F1 %s, %.1f ms/image",
        split, len(records), metrics["count_mae"], metrics["f1"],
        metrics["latency_ms_per_image"],
    )  # fmt: skip
    return metrics
