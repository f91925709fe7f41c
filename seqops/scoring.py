"""Pure evaluation metrics: counting, point matching, duplicates/misses, done calibration.

Everything here works on numpy arrays in model pixels (the model's input size, as the
design reports pixel errors) and has no I/O, so each function is tested on hand-made cases.

Definitions:

- Matching: predicted and true points are matched one to one (Hungarian,
  ``scipy.optimize.linear_sum_assignment``) so that the number of pairs closer than the
  radius is as large as possible and, among such matchings, their total distance is least.
  A pair farther apart than the radius is not a match.
- A *duplicate* is an unmatched prediction within the radius of a true object: that object
  was matched to another prediction (it cannot be unmatched, or the matching would not be
  maximal), so this prediction counts an object twice. A *spurious* prediction is unmatched
  and near no true object. A *miss* is an unmatched true object.
- Count confidence: an image's ``count_confidence`` is scored against whether its count was
  exact: a reliability table over confidence bins, its expected calibration error, and the
  review trade-off. Flagging the images whose confidence is below a threshold for a person
  to check flags a share of all images and catches a share of the miscounted ones (the
  recall); the curve gives both at every threshold that changes them.
- Done calibration: step ``t`` of a rollout (``t = 0, 1, ...``) runs with the first ``t``
  predictions marked. Its observed label is 1 when those ``t`` predictions already find
  every true object (a matching of them to the true points within the radius covers all
  true points), else 0: "done" is right exactly when nothing is left to find. Labels only
  go from 0 to 1 as ``t`` grows, so the first such ``t`` (``t_all``) describes a rollout;
  an image with no objects has ``t_all = 0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

# Objects per image, as the issue asks; images outside every bucket count only overall.
COUNT_BUCKETS: tuple[tuple[int, int], ...] = ((5, 10), (11, 20), (21, 50))
CALIBRATION_BINS = 10


@dataclass(frozen=True)
class MatchResult:
    """The matching of one image's predicted points to its true points."""

    pred_index: np.ndarray  # [K] matched predictions
    true_index: np.ndarray  # [K] their true objects
    distances: np.ndarray  # [K] px
    num_pred: int
    num_true: int
    duplicates: int  # unmatched predictions within the radius of a (matched) true object
    spurious: int  # unmatched predictions near no true object

    @property
    def matches(self) -> int:
        """Predictions matched to a true object (true positives)."""
        return len(self.pred_index)

    @property
    def misses(self) -> int:
        """True objects no prediction matched."""
        return self.num_true - self.matches

    @property
    def false_positives(self) -> int:
        """Predictions matched to no true object (duplicates and spurious ones)."""
        return self.num_pred - self.matches


def _as_points(points: np.ndarray | Sequence, name: str) -> np.ndarray:
    """``points`` as float64 ``[N, 2]`` (empty: ``[0, 2]``); a ValueError naming ``name``."""
    array = np.asarray(points, np.float64)
    if array.size == 0:
        return np.zeros((0, 2))
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"{name}: expected [N, 2] points, got shape {array.shape}")
    return array


def pairwise_distances(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Euclidean distances ``[len(pred), len(true)]``."""
    return np.linalg.norm(pred[:, None, :] - true[None, :, :], axis=-1)


def max_matching(distances: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(rows, cols)`` of a maximum matching within ``radius``, least total distance.

    A pair beyond the radius costs more than any set of pairs within it could, so the
    assignment first maximises the number of pairs within the radius.
    """
    if distances.size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty
    within = distances <= radius
    big = radius * (min(distances.shape) + 1) + 1.0
    rows, cols = linear_sum_assignment(np.where(within, distances, big))
    keep = within[rows, cols]
    return rows[keep], cols[keep]


def match_points(
    pred: np.ndarray | Sequence, true: np.ndarray | Sequence, radius: float
) -> MatchResult:
    """Match predicted to true points (both ``[N, 2]``, px) within ``radius`` px."""
    pred, true = _as_points(pred, "pred"), _as_points(true, "true")
    distances = pairwise_distances(pred, true)
    rows, cols = max_matching(distances, radius)
    unmatched = np.ones(len(pred), bool)
    unmatched[rows] = False
    near_any = (distances <= radius).any(axis=1) if len(true) else np.zeros(len(pred), bool)
    return MatchResult(
        pred_index=rows,
        true_index=cols,
        distances=distances[rows, cols],
        num_pred=len(pred),
        num_true=len(true),
        duplicates=int((unmatched & near_any).sum()),
        spurious=int((unmatched & ~near_any).sum()),
    )


def first_step_all_found(pred: np.ndarray | Sequence, true: np.ndarray | Sequence, radius: float):
    """``t_all``: the fewest leading predictions that find every true object, or ``None``
    when all the predictions together do not (see the module docstring)."""
    pred, true = _as_points(pred, "pred"), _as_points(true, "true")
    if len(true) == 0:
        return 0
    distances = pairwise_distances(pred, true)

    def finds_all(t: int) -> bool:
        return t >= len(true) and len(max_matching(distances[:t], radius)[0]) == len(true)

    if not finds_all(len(pred)):
        return None
    lo, hi = len(true), len(pred)  # finds_all is monotone in t: binary search
    while lo < hi:
        mid = (lo + hi) // 2
        if finds_all(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def done_labels(num_steps: int, t_all: int | None) -> np.ndarray:
    """Observed done label of steps ``0 .. num_steps - 1``: 1 from ``t_all`` on."""
    steps = np.arange(num_steps)
    if t_all is None:
        return np.zeros(num_steps, np.int64)
    return (steps >= t_all).astype(np.int64)


def count_metrics(
    pred_counts: Sequence[int],
    true_counts: Sequence[int],
    buckets: Sequence[tuple[int, int]] = COUNT_BUCKETS,
) -> dict[str, float]:
    """MAE, RMSE, exact-count accuracy and bias overall; MAE, accuracy and images per bucket
    of true objects per image (``count_mae_5_10``, ...; NaN for an empty bucket)."""
    pred = np.asarray(pred_counts, np.float64)
    true = np.asarray(true_counts, np.float64)
    if pred.shape != true.shape:
        raise ValueError(f"counts: {pred.shape} predicted vs {true.shape} true")
    err = pred - true
    out = {
        "count_mae": _mean(np.abs(err)),
        "count_rmse": math.sqrt(_mean(err**2)) if len(err) else math.nan,
        "count_exact_acc": _mean(err == 0),
        "count_bias": _mean(err),
        "count_rel_mae": float(np.abs(err).sum() / true.sum()) if true.sum() > 0 else math.nan,
    }
    for lo, hi in buckets:
        inside = (true >= lo) & (true <= hi)
        out[f"count_mae_{lo}_{hi}"] = _mean(np.abs(err[inside]))
        out[f"count_exact_acc_{lo}_{hi}"] = _mean(err[inside] == 0)
        out[f"num_images_{lo}_{hi}"] = int(inside.sum())
    return out


def localisation_metrics(matches: Sequence[MatchResult], radius: float) -> dict[str, float]:
    """Precision, recall, F1 (pooled over images), matched error mean/median/p90 (px),
    duplicates, spurious predictions and misses (totals and rates)."""
    tp = sum(m.matches for m in matches)
    num_pred = sum(m.num_pred for m in matches)
    num_true = sum(m.num_true for m in matches)
    precision = tp / num_pred if num_pred else math.nan
    recall = tp / num_true if num_true else math.nan
    f1 = 2 * tp / (num_pred + num_true) if num_pred and num_true else math.nan
    errors = np.concatenate([m.distances for m in matches]) if matches else np.zeros(0)
    duplicates = sum(m.duplicates for m in matches)
    misses = sum(m.misses for m in matches)
    return {
        "match_radius_px": float(radius),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "px_err_mean": _mean(errors),
        "px_err_median": float(np.median(errors)) if len(errors) else math.nan,
        "px_err_p90": float(np.percentile(errors, 90)) if len(errors) else math.nan,
        "duplicates": int(duplicates),
        "duplicate_rate": duplicates / num_pred if num_pred else math.nan,
        "spurious": int(sum(m.spurious for m in matches)),
        "misses": int(misses),
        "miss_rate": misses / num_true if num_true else math.nan,
    }


def reliability_table(
    probs: Sequence[float], labels: Sequence[int], bins: int = CALIBRATION_BINS
) -> list[dict[str, float]]:
    """Per equal-width bin of predicted done probability: the steps in it, their mean
    predicted probability and the observed done rate (NaN for an empty bin)."""
    return _binned(
        probs, labels, bins, ("steps", "mean_done_prob", "observed_done_rate"), "calibration"
    )


def _binned(
    predicted: Sequence[float],
    observed: Sequence[float],
    bins: int,
    names: tuple[str, str, str],
    what: str,
) -> list[dict[str, float]]:
    """A reliability table: per equal-width bin of ``predicted``, how many fall in it, their
    mean and the mean of ``observed`` (NaN for an empty bin), under ``names``."""
    predicted = np.asarray(predicted, np.float64)
    observed = np.asarray(observed, np.float64)
    if predicted.shape != observed.shape:
        raise ValueError(f"{what}: {predicted.shape} values vs {observed.shape} labels")
    edges, index = _bin(predicted, bins)
    count, mean, rate = names
    return [
        {
            "bin_lower": float(edges[i]),
            "bin_upper": float(edges[i + 1]),
            count: int((index == i).sum()),
            mean: _mean(predicted[index == i]),
            rate: _mean(observed[index == i]),
        }
        for i in range(bins)
    ]


def calibration_metrics(
    probs: Sequence[float],
    labels: Sequence[int],
    threshold: float,
    bins: int = CALIBRATION_BINS,
) -> dict[str, float]:
    """Expected calibration error (bin-weighted |mean predicted - observed|), Brier score,
    precision, recall and F1 of ``done > threshold``, and the number of steps scored."""
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels, np.float64)
    table = reliability_table(probs, labels, bins)
    total = len(probs)
    return {
        "done_ece": _ece(table, "steps", "mean_done_prob", "observed_done_rate"),
        "done_brier": _mean((probs - labels) ** 2),
        **done_scores(probs, labels, threshold),
        "done_steps": int(total),
        "done_positive_rate": _mean(labels),
    }


def done_scores(
    probs: Sequence[float],
    labels: Sequence[int],
    threshold: float,
    undefined: float = math.nan,
) -> dict[str, float]:
    """Precision, recall and F1 of ``done > threshold`` against the labels; ``undefined``
    where a denominator is 0 (F1 is 0 when only one side has done steps)."""
    said = np.asarray(probs, np.float64) > threshold
    truth = np.asarray(labels, np.float64) > 0.5
    tp, num_said, num_true = int(np.sum(said & truth)), int(said.sum()), int(truth.sum())
    return {
        "done_precision": tp / num_said if num_said else undefined,
        "done_recall": tp / num_true if num_true else undefined,
        "done_f1": 2 * tp / (num_said + num_true) if num_said + num_true else undefined,
    }


def stop_timing(num_steps: int, stopped_by: str, t_all: int | None) -> str:
    """Whether a rollout stopped ``early`` (said done with an object left), ``on_time``,
    ``late`` (kept going after every object was found) or hit the ``guard``."""
    if stopped_by != "done":
        return "guard"
    stop_step = num_steps - 1  # the step whose done ended the loop
    if t_all is None or stop_step < t_all:
        return "early"
    return "on_time" if stop_step == t_all else "late"


def confidence_reliability(
    confidence: Sequence[float], exact: Sequence[bool], bins: int = CALIBRATION_BINS
) -> list[dict[str, float]]:
    """Per equal-width bin of ``count_confidence``: the images in it, their mean confidence
    and the share of them counted exactly (NaN for an empty bin)."""
    return _binned(
        confidence, exact, bins, ("images", "mean_confidence", "exact_share"), "confidence"
    )


def review_trade_off(
    confidence: Sequence[float], exact: Sequence[bool], threshold: float
) -> tuple[float, float]:
    """``(flagged share, miscount recall)`` of flagging the images whose confidence is below
    ``threshold``: the share of all images flagged, and of the miscounted ones (NaN when
    none is miscounted)."""
    flagged = np.asarray(confidence, np.float64) < threshold
    wrong = ~np.asarray(exact, bool)
    recall = float((flagged & wrong).sum() / wrong.sum()) if wrong.any() else math.nan
    return _mean(flagged), recall


def review_curve(confidence: Sequence[float], exact: Sequence[bool]) -> list[dict[str, float]]:
    """The review trade-off at 0, 1 and every confidence seen (each threshold that changes
    which images are flagged), ascending: ``threshold``, ``flagged_share``,
    ``miscount_recall``."""
    thresholds = np.unique(np.concatenate([np.asarray(confidence, np.float64), [0.0, 1.0]]))
    rows = []
    for threshold in thresholds:
        flagged, recall = review_trade_off(confidence, exact, threshold)
        rows.append(
            {"threshold": float(threshold), "flagged_share": flagged, "miscount_recall": recall}
        )
    return rows


def confidence_metrics(
    confidence: Sequence[float],
    exact: Sequence[bool],
    review_threshold: float,
    target_recall: float = 0.8,
) -> dict[str, float]:
    """The headline figures of ``count_confidence``: its expected calibration error, the
    review trade-off at ``review_threshold``, and the least flagged share that catches
    ``target_recall`` of the miscounted images at any threshold (NaN when none is
    miscounted or no threshold does)."""
    table = confidence_reliability(confidence, exact)
    flagged, recall = review_trade_off(confidence, exact, review_threshold)
    reaching = [
        row["flagged_share"]
        for row in review_curve(confidence, exact)
        if row["miscount_recall"] >= target_recall  # NaN compares False
    ]
    return {
        "count_confidence_ece": _ece(table, "images", "mean_confidence", "exact_share"),
        "review_flagged_share": flagged,
        "review_miscount_recall": recall,
        f"review_flagged_share_at_recall_{round(100 * target_recall)}": (
            min(reaching) if reaching else math.nan
        ),
    }


def _bin(values: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Equal-width bin edges over ``[0, 1]`` and each value's bin: bin i holds
    ``[edge_i, edge_i+1)``, the last also 1.0."""
    # i / bins, not linspace (whose 0.6 is 0.6000000000000001 and would put a value of
    # exactly 0.6 in the bin below); floor(v * bins) puts each edge of 10 bins in its own.
    edges = np.arange(bins + 1) / bins
    index = np.floor(np.asarray(values, np.float64) * bins).astype(np.int64)
    return edges, np.clip(index, 0, bins - 1)


def _ece(table: list[dict[str, float]], count: str, predicted: str, observed: str) -> float:
    """Expected calibration error of a reliability table: the bin-weighted mean of
    ``|predicted - observed|`` (NaN for an empty table)."""
    total = sum(row[count] for row in table)
    if not total:
        return math.nan
    return float(
        sum(row[count] / total * abs(row[predicted] - row[observed]) for row in table if row[count])
    )


def _mean(values: np.ndarray) -> float:
    """The mean, NaN when empty."""
    values = np.asarray(values, np.float64)
    return float(values.mean()) if values.size else math.nan
