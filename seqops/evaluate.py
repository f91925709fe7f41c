"""The ``evaluate`` stage: the exported model on the test split, through the ONNX predictor.

What is measured is what users get: ``seqops.predictor`` (onnxruntime, encode once, step
until done), not the torch model. Outputs:

- the metrics JSON (DVC metrics): the headline figures (:data:`HEADLINE_METRICS`); every
  metric (counting per bucket, localisation, duplicates/misses, done calibration, stop
  timing, latency, and the count confidence: its calibration error and the review trade-off
  at ``evaluate.review_threshold``) in the report's ``metrics.json`` and in MLflow as
  ``test/<name>``;
- plots (DVC plots): ``counts.csv`` (per image true vs predicted count),
  ``calibration.csv`` (the done head's reliability table), ``count_reliability.csv`` (the
  count confidence's) and ``review_curve.csv`` (flagged share and miscount recall at every
  review threshold);
- a report directory: ``metrics.json``, ``per_image.jsonl``, ``calibration.json``,
  ``worst/`` pictures of
  the worst images (predicted points numbered in RED, true points in GREEN) and
  ``robust.json``.

Robustness: the same scene must count the same in greyscale, as a JPEG or at another scale.
Each of ``evaluate.transforms`` (:mod:`seqops.transforms`) is applied to a copy of the split,
which is counted and scored like the split: ``robust/<name>/count_exact_acc``, ``count_mae``,
``count_bias`` and ``f1`` go to ``robust.json`` and MLflow, and the metrics JSON gets one
headline, ``robust_count_exact_acc_min`` (the worst transform's exact share).

The metric definitions are in :mod:`seqops.scoring`. The export stage also runs a split
through here: :func:`calibrate_confidence` fits the count confidence on the validation split.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from seqops import imaging
from seqops import scoring as M
from seqops.confidence import fit_calibration
from seqops.config import EvaluateConfig, Params
from seqops.contract import MAX_EXEMPLARS
from seqops.data.manifest import Record, manifest_path, read_dataset_info, read_manifest
from seqops.io import atomic_directory, atomic_write_json, pick
from seqops.transforms import Transform, TransformError, map_boxes, map_points, parse_transforms

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8
COUNTS_CSV = "counts.csv"
CALIBRATION_CSV = "calibration.csv"
COUNT_RELIABILITY_CSV = "count_reliability.csv"
REVIEW_CURVE_CSV = "review_curve.csv"
ROBUST_JSON = "robust.json"
ROBUST_METRICS = ("count_exact_acc", "count_mae", "count_bias", "f1")
ROBUST_HEADLINE = "robust_count_exact_acc_min"
METRICS_JSON = "metrics.json"  # every metric, in the report directory
# What the DVC metrics file holds, so `dvc metrics show` and `diff` fit a screen: the count,
# the points, the done head, the confidence and the cost. Benchmarks and demos read these.
HEADLINE_METRICS = (
    "num_images", "count_mae", "count_exact_acc", "count_bias", "f1", "px_err_median",
    "px_err_p90", "done_f1", "count_confidence_ece", "review_flagged_share",
    "review_miscount_recall", "review_flagged_share_at_recall_80", ROBUST_HEADLINE,
    "latency_ms_per_image",
)  # fmt: skip


class EvaluateError(ValueError):
    """The model and the dataset do not fit together; the message says how."""


def load_record(
    data_dir: Path, record: Record, transform: Transform | None = None
) -> tuple[Image.Image, Record]:
    """A record's image and the record; with ``transform``, the transformed image and a copy
    of the record whose points and exemplar boxes are in the new image's pixels."""
    image = imaging.load_image(data_dir / record.image)
    if transform is None:
        return image, record
    out = transform(image)
    points = map_points(record.points_array(), image.size, out.size)
    boxes = map_boxes(record.exemplars_array(), image.size, out.size)
    return out, replace(
        record,
        points=tuple((x, y) for x, y in points.tolist()),
        exemplars=tuple((x1, y1, x2, y2) for x1, y1, x2, y2 in boxes.tolist()),
    )


def prepare_record(predictor: Any, data_dir: Path, record: Record) -> Any:
    """The predictor's input for a prepared image (and its exemplar boxes, for a model
    trained with them)."""
    return prepare_image(predictor, *load_record(data_dir, record))


def prepare_image(predictor: Any, image: Image.Image, record: Record) -> Any:
    """The predictor's input for ``image`` and the exemplar boxes of ``record`` (in the
    image's pixels: a prepared image's are model pixels).

    Boxes are clipped to the image as training's mask rendering does; a record without boxes
    gets the empty mask training used, where a user request would be refused.
    """
    from seqops.predictor import PreparedImage

    if not predictor.info.exemplars:
        return predictor.prepare(image)
    width, height = image.size
    limits = np.array([width, height, width, height], np.float32)
    boxes = np.clip(record.exemplars_array()[:MAX_EXEMPLARS], 0, limits)
    boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
    if len(boxes):
        return predictor.prepare(image, boxes.tolist())
    pixels, scale = imaging.resize_for_model(image, predictor.info.image_size)
    grid = predictor.info.grid
    empty = np.zeros((1, grid, grid), np.float32)
    normalised = imaging.normalize_pixels(pixels, predictor.info.mean, predictor.info.std)
    return PreparedImage(normalised, image.size, scale, empty)


def evaluate_image(
    record: Record, prediction: Any, radius: float, *, input_px: bool = False
) -> tuple[dict[str, Any], M.MatchResult, np.ndarray, np.ndarray]:
    """Score one image's prediction against its record: in model px (a prepared image), or
    with ``input_px`` in the pixels of the image the predictor was given (``points``: a
    transformed copy, whose record :func:`load_record` mapped to them).

    Returns:
        ``(row, match, done_probs, done_labels)``: the per-image row of ``per_image.jsonl``,
        the matching, and the rollout's done probabilities with their observed labels.
    """
    true = record.points_array()
    pred = np.asarray(prediction.points if input_px else prediction.points_model, np.float64)
    pred = pred.reshape(-1, 2)
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
        "exact": prediction.count == len(true),
        "count_confidence": prediction.count_confidence,
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
        "confidence_features": prediction.confidence_features,
    }
    return row, match, probs, labels


@dataclass(frozen=True)
class Split:
    """One split of a prepared dataset: where it is, its name and its records."""

    data_dir: Path
    name: str
    records: list[Record]


@dataclass
class Scores:
    """The per-image results over a split, as they accumulate."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    matches: list[M.MatchResult] = field(default_factory=list)
    done_probs: list[np.ndarray] = field(default_factory=list)
    done_labels: list[np.ndarray] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the predictor and the scoring

    def add(
        self, row: dict[str, Any], match: M.MatchResult, probs: np.ndarray, labels: np.ndarray
    ) -> None:
        """Add one image's results (as :func:`evaluate_image` returns them)."""
        self.rows.append(row)
        self.matches.append(match)
        self.done_probs.append(probs)
        self.done_labels.append(labels)

    def steps(self) -> tuple[np.ndarray, np.ndarray]:
        """Every step's done probability and its observed label, over all images."""
        if not self.rows:
            return np.zeros(0), np.zeros(0)
        return np.concatenate(self.done_probs), np.concatenate(self.done_labels)

    def confidence(self) -> tuple[np.ndarray, np.ndarray]:
        """Every image's ``count_confidence`` and whether its count was exact."""
        confidence = np.asarray([r["count_confidence"] for r in self.rows], np.float64)
        return confidence, np.asarray([r["exact"] for r in self.rows], bool)


def summarise(scores: Scores, settings: EvaluateConfig) -> dict[str, Any]:
    """The stage's metrics from the per-image results (one flat dict: DVC and MLflow);
    an undefined metric (an empty bucket) is None."""
    rows = scores.rows
    probs, labels = scores.steps()
    out: dict[str, Any] = {
        "num_images": len(rows),
        "num_objects": int(sum(r["true_count"] for r in rows)),
        "num_predictions": int(sum(r["pred_count"] for r in rows)),
    }
    out.update(M.count_metrics([r["pred_count"] for r in rows], [r["true_count"] for r in rows]))
    out.update(M.localisation_metrics(scores.matches, settings.match_radius_px))
    out.update(M.calibration_metrics(probs, labels, threshold=settings.done_threshold))
    stops = Counter(r["stop"] for r in rows)
    for kind in ("early", "on_time", "late", "guard"):
        out[f"stop_{kind}_rate"] = stops[kind] / len(rows) if rows else math.nan
    out.update(M.confidence_metrics(*scores.confidence(), settings.review_threshold))
    out["latency_ms_per_image"] = 1e3 * scores.seconds / len(rows) if rows else math.nan
    out["steps_per_image"] = len(probs) / len(rows) if rows else math.nan
    return _json_safe(out)


def reliability(scores: Scores) -> list[dict[str, Any]]:
    """The done head's reliability table over every step (``calibration.json``)."""
    return [_json_safe(r) for r in M.reliability_table(*scores.steps())]


def _pick_worst(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The ``n`` worst images: largest count error, then lowest F1."""
    return sorted(rows, key=lambda r: (-r["abs_err"], r["f1"], r["id"]))[:n]


def _write_csv(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    """Write ``fields`` of ``rows`` as CSV; NaN as an empty cell."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if _is_nan(row.get(k)) else row.get(k)) for k in fields})


def _is_nan(value: Any) -> bool:
    """True for a float NaN."""
    return isinstance(value, float) and math.isnan(value)


def _json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    """NaN is not JSON: an undefined metric (an empty bucket) is written as null."""
    return {k: (None if _is_nan(v) else v) for k, v in metrics.items()}


def _draw_worst(data_dir: Path, by_id: dict[str, Record], worst: list[dict], out: Path) -> None:
    """Draw each worst image's predicted and true points to ``out/<rank>_<id>.png``."""
    from seqops.draw import draw_rollout

    out.mkdir(parents=True, exist_ok=True)
    for rank, row in enumerate(worst, 1):
        record = by_id[row["id"]]
        image = imaging.load_image(data_dir / record.image)
        picture = draw_rollout(image, np.asarray(row["points"]), record.points_array())
        safe_id = "".join(c if c.isalnum() or c in "-_" else "_" for c in row["id"])
        picture.save(out / f"{rank:02d}_{safe_id}.png")


def require_image_size(data_dir: str | Path, image_size: int, model: str | Path) -> None:
    """An :class:`EvaluateError` unless the dataset was prepared at ``image_size`` (the
    input size of ``model``)."""
    info = read_dataset_info(Path(data_dir))
    if int(info.get("image_size", -1)) != image_size:
        raise EvaluateError(
            f"{data_dir}/dataset.json: image_size {info.get('image_size')} differs from the "
            f"model's {image_size} ({model}); prepare the data at the model's size"
        )


def read_split(data_dir: str | Path, name: str) -> Split:
    """The records of split ``name`` of the prepared dataset at ``data_dir``."""
    records = read_manifest(manifest_path(data_dir, name))
    if not records:
        raise EvaluateError(f"{manifest_path(data_dir, name)}: no images to evaluate")
    return Split(Path(data_dir), name, records)


def predict_split(
    predictor: Any,
    split: Split,
    settings: EvaluateConfig,
    batch_size: int,
    transform: Transform | None = None,
) -> Iterator[tuple[Record, Any]]:
    """Count every image of ``split`` (each through ``transform`` when given) with
    ``predictor``, ``batch_size`` images per batch (each image still stops on its own):
    ``(record, prediction)`` pairs, the record in the given image's pixels
    (:func:`load_record`). Reads ``settings.max_objects`` and ``settings.done_threshold``."""
    for i in range(0, len(split.records), batch_size):
        batch = [
            load_record(split.data_dir, r, transform) for r in split.records[i : i + batch_size]
        ]
        images = [prepare_image(predictor, image, record) for image, record in batch]
        predictions = predictor.predict(
            images, max_objects=settings.max_objects, done_threshold=settings.done_threshold
        )
        yield from zip([record for _, record in batch], predictions, strict=True)


def score_split(
    predictor: Any,
    split: Split,
    settings: EvaluateConfig,
    batch_size: int,
    transform: Transform | None = None,
) -> Scores:
    """Count every image of ``split`` (or its copy through ``transform``) and score each
    against its record. A transformed copy is scored in its own pixels, the match radius
    scaled with the image, so a point is held to the same tolerance relative to the objects."""
    scale = transform.scale if transform is not None else 1.0
    scores = Scores()
    started = time.perf_counter()
    for record, prediction in predict_split(predictor, split, settings, batch_size, transform):
        row = evaluate_image(
            record, prediction, settings.match_radius_px * scale, input_px=transform is not None
        )
        scores.add(*row)
    scores.seconds = time.perf_counter() - started
    return scores


def read_transforms(settings: EvaluateConfig) -> list[Transform]:
    """``settings.transforms`` parsed; an :class:`EvaluateError` names a bad one."""
    try:
        return parse_transforms(settings.transforms)
    except TransformError as exc:
        raise EvaluateError(f"evaluate.transforms: {exc}") from None


def score_robustness(
    predictor: Any,
    split: Split,
    settings: EvaluateConfig,
    batch_size: int,
    transforms: list[Transform],
) -> dict[str, Any]:
    """Count and score a copy of ``split`` through each of ``transforms``.

    Returns:
        ``{robust/<name>/<metric>: value}`` for each transform and :data:`ROBUST_METRICS`
        (None where undefined), as ``robust.json`` holds them.
    """
    robust: dict[str, Any] = {}
    for transform in transforms:
        metrics = summarise(
            score_split(predictor, split, settings, batch_size, transform), settings
        )
        robust.update({f"robust/{transform.name}/{k}": metrics[k] for k in ROBUST_METRICS})
        log.info(
            "%s copy: %s exact, count MAE %.3f, bias %+.2f, F1 %s", transform.name,
            _share(metrics["count_exact_acc"]), metrics["count_mae"], metrics["count_bias"],
            "n/a" if metrics["f1"] is None else f"{metrics['f1']:.3f}",
        )  # fmt: skip
    return robust


def robust_headline(robust: dict[str, Any]) -> float | None:
    """The worst transform's exact-count share (None without transforms)."""
    shares = [v for k, v in robust.items() if k.endswith("/count_exact_acc") and v is not None]
    return min(shares) if shares else None


def write_plots(plots_dir: str | Path, scores: Scores) -> None:
    """``counts.csv`` (true vs predicted count per image), ``calibration.csv`` (the done
    reliability table's non-empty bins), ``count_reliability.csv`` (the count confidence's)
    and ``review_curve.csv`` (the review trade-off per threshold), replacing ``plots_dir``."""
    confidence, exact = scores.confidence()
    with atomic_directory(plots_dir) as tmp:
        _write_csv(
            tmp / COUNT_RELIABILITY_CSV,
            [r for r in M.confidence_reliability(confidence, exact) if r["images"]],
            ["bin_lower", "bin_upper", "images", "mean_confidence", "exact_share"],
        )
        _write_csv(
            tmp / REVIEW_CURVE_CSV,
            M.review_curve(confidence, exact),
            ["threshold", "flagged_share", "miscount_recall"],
        )
        _write_csv(tmp / COUNTS_CSV, scores.rows, ["id", "true_count", "pred_count", "abs_err"])
        _write_csv(
            tmp / CALIBRATION_CSV,
            [r for r in reliability(scores) if r["steps"]],
            ["bin_lower", "bin_upper", "steps", "mean_done_prob", "observed_done_rate"],
        )


def write_report(
    out_dir: str | Path,
    split: Split,
    scores: Scores,
    worst_images: int,
    robust: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> None:
    """``per_image.jsonl``, ``calibration.json``, ``robust.json`` (when ``robust`` is given:
    :func:`score_robustness`), ``metrics.json`` (every metric, when ``metrics`` is given) and
    pictures of the ``worst_images`` worst images under ``worst/``, replacing ``out_dir``."""
    with atomic_directory(out_dir) as tmp:
        if metrics is not None:
            atomic_write_json(tmp / METRICS_JSON, metrics)
        with open(tmp / "per_image.jsonl", "w") as f:
            for row in scores.rows:
                f.write(json.dumps(row) + "\n")
        atomic_write_json(tmp / "calibration.json", reliability(scores))
        if robust is not None:
            atomic_write_json(tmp / ROBUST_JSON, robust)
        worst = _pick_worst(scores.rows, worst_images)
        _draw_worst(split.data_dir, {r.id: r for r in split.records}, worst, tmp / "worst")


def calibrate_confidence(
    model_dir: str | Path,
    data_dir: str | Path,
    settings: EvaluateConfig,
    split: str = "val",
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict[str, Any] | None:
    """Fit the count confidence of the model in ``model_dir`` on ``split`` of a prepared
    dataset: count every image as :func:`run_evaluate` does (on the CPU) and fit
    :func:`seqops.confidence.fit_calibration` on which counts came out exact. Reads
    ``settings.max_objects`` and ``settings.done_threshold`` only (no point matching).

    Returns:
        The calibration to store (its ``fit`` also names the split and how many images did
        not stop on done and were left out), or None when no image stopped on done.
    """
    from seqops.predictor import Predictor

    predictor = Predictor(model_dir, device="cpu", warmup=False)
    require_image_size(data_dir, predictor.info.image_size, model_dir)
    data = read_split(data_dir, split)
    features, exact = [], []
    for record, prediction in predict_split(predictor, data, settings, batch_size):
        if prediction.confidence_features:  # the others did not stop on done: confidence 0
            features.append(prediction.confidence_features)
            exact.append(prediction.count == record.num_objects)
    if not features:
        log.warning(
            "calibration: no %s image stopped on done; confidence stays uncalibrated", split
        )
        return None
    calibration = fit_calibration(features, exact)
    calibration["fit"].update(split=split, not_done=len(data.records) - len(features))
    log.info(
        "calibration: %d %s images (%.0f%% exact), log loss %.3f",
        len(features), split, 100 * calibration["fit"]["exact_share"],
        calibration["fit"]["log_loss"],
    )  # fmt: skip
    return calibration


def run_evaluate(
    params: Params,
    model: str | Path,
    data_dir: str | Path,
    *,
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
        params: ``evaluate.*`` (radius, done threshold, max objects, worst images, review
            threshold, the transformed copies to count too).
        model: the exported model directory or ``models:/seqops@candidate``.
        metrics_path: the headline metrics JSON (``metrics/evaluate.json``).
        plots_dir: the plots CSVs go here (see the module docstring).
        out_dir: the report directory (every metric, per-image results, worst pictures).
        track: log metrics and the robust rows (``<split>/<name>``) and the report into the
            model's training run.
        batch_size: images per predictor batch (each image still stops on its own).

    Returns:
        Every metric (the metrics JSON holds :func:`headline_metrics` of it).
    """
    from seqops.predictor import Predictor

    settings = params.evaluate
    transforms = read_transforms(settings)
    predictor = Predictor.load(model, device=device)
    require_image_size(data_dir, predictor.info.image_size, model)
    data = read_split(data_dir, split)
    scores = score_split(predictor, data, settings, batch_size)
    robust = score_robustness(predictor, data, settings, batch_size, transforms)
    metrics = {**summarise(scores, settings), ROBUST_HEADLINE: robust_headline(robust)}
    if plots_dir is not None:
        write_plots(plots_dir, scores)
    if out_dir is not None:
        write_report(out_dir, data, scores, settings.worst_images, robust, metrics)
    if metrics_path is not None:
        atomic_write_json(metrics_path, headline_metrics(metrics))
    if track:
        from seqops.registry import log_evaluation

        artifacts = report_artifacts(plots_dir, out_dir)
        log_evaluation(predictor.info.run_id, {**metrics, **robust}, artifacts, prefix=split)
    log.info(
        "%s: %d images, count MAE %.3f, %s exact, F1 %s, %.1f ms/image; review below %g flags "
        "%s, catching %s of the miscounts; worst transformed copy %s exact",
        split, len(data.records), metrics["count_mae"], _share(metrics["count_exact_acc"]),
        _fixed(metrics["f1"]),
        metrics["latency_ms_per_image"], settings.review_threshold,
        _share(metrics["review_flagged_share"]), _share(metrics["review_miscount_recall"]),
        _share(metrics[ROBUST_HEADLINE]),
    )  # fmt: skip
    return metrics


def headline_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The :data:`HEADLINE_METRICS` of ``metrics`` (the DVC metrics file's content)."""
    return pick(metrics, HEADLINE_METRICS)


def _fixed(value: float | None) -> str:
    """A score with three decimals for the log (``n/a`` when undefined)."""
    return "n/a" if value is None else f"{value:.3f}"


def _share(value: float | None) -> str:
    """A share as a percentage for the log (``n/a`` when undefined)."""
    return "n/a" if value is None else f"{100 * value:.0f}%"


def report_artifacts(plots_dir: str | Path | None, out_dir: str | Path | None) -> dict[str, Path]:
    """The stage's outputs as MLflow artifacts: ``{artifact dir: local dir}``."""
    artifacts = {"evaluate": Path(out_dir)} if out_dir is not None else {}
    if plots_dir is not None:
        artifacts["evaluate/plots"] = Path(plots_dir)
    return artifacts
