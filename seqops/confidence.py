"""How likely a count is exact: ``count_confidence`` in ``[0, 1]`` from the loop's own signals.

A finished loop says a lot about its count. The done head gave a probability at every step,
so the chance, under the model's own probabilities, that the loop stops exactly where it did
is ``prod_{k<n} (1 - d_k) * d_n``; a late, hesitant done or an earlier near-miss makes a
wrong count likelier. :data:`FEATURES` turns a finished :class:`~seqops.rollout.Rollout` into
such numbers, and a logistic model fitted on the validation split (:func:`fit_calibration`,
at export) turns them into a calibrated probability that the count is exact
(:func:`count_confidence`). A loop stopped by ``max_objects`` or a deadline never said done:
its confidence is 0. A model exported without a calibration gets the uncalibrated stop
probability above.

Numpy only: the predictor, the server and the export all use it. The stored form of a
calibration is ``seqops.contract.CountCalibration``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from seqops.contract import CountCalibration

if TYPE_CHECKING:
    from seqops.rollout import Rollout

# Done probabilities are clipped to [EPS, 1 - EPS] before logs and logits: onnxruntime's
# sigmoid returns exactly 0 or 1 far from 0, and a feature must stay finite. 1e-4 keeps
# logits within +-9.2, about the range a trained done head spans.
EPS = 1e-4
# L2 penalty on the standardised features' weights (not the intercept): a few hundred
# validation images fit four or five weights without it, but a separable split would send
# them to infinity.
L2 = 1.0
NEWTON_STEPS = 50


@dataclass(frozen=True)
class StopSignals:
    """What the features read of a loop that stopped on done."""

    before: np.ndarray  # done probabilities of the steps that marked a point (clipped)
    final: float  # done probability of the step that stopped the loop (clipped)
    rollout: Rollout  # everything else: its points, and any further step outputs


def _logit(p: float) -> float:
    """``log(p / (1 - p))``."""
    return math.log(p) - math.log1p(-p)


# name -> feature. A calibration names the features it was fitted on, so a new feature (one
# line here, e.g. a step's estimate of the objects left) changes no stored calibration; the
# next export fits it.
FEATURES: dict[str, Callable[[StopSignals], float]] = {
    # log P(the loop stops exactly here) = sum_{k<n} log(1 - d_k) + log d_n
    "stop_log_prob": lambda s: float(np.log1p(-s.before).sum() + math.log(s.final)),
    "final_done_logit": lambda s: _logit(s.final),
    # the highest done before the stop: a near-miss says the count could have been smaller
    "near_miss_logit": lambda s: _logit(float(s.before.max()) if len(s.before) else EPS),
    # longer loops have more chances to go wrong (dense scenes count worse)
    "log_count": lambda s: math.log1p(len(s.rollout.points_norm)),
}
UNCALIBRATED_FEATURE = "stop_log_prob"  # exp() of it is the confidence without a calibration


def rollout_features(rollout: Rollout) -> dict[str, float] | None:
    """Every feature of :data:`FEATURES` for a finished rollout; None when it did not stop
    on done (``max_objects``, a deadline, or still running)."""
    if rollout.stopped_by != "done" or not rollout.done_probs:
        return None
    probs = np.clip(np.asarray(rollout.done_probs, np.float64), EPS, 1 - EPS)
    signals = StopSignals(before=probs[:-1], final=float(probs[-1]), rollout=rollout)
    return {name: float(feature(signals)) for name, feature in FEATURES.items()}


def as_calibration(calibration: CountCalibration | Mapping[str, Any] | None, source: str = ""):
    """A :class:`CountCalibration` from its stored form (or None); checks that every feature
    it names is one this code computes."""
    if calibration is None:
        return None
    if not isinstance(calibration, CountCalibration):
        calibration = CountCalibration.from_metadata(calibration, source or "calibration")
    unknown = [name for name in calibration.features if name not in FEATURES]
    if unknown:
        raise ValueError(
            f"{source or 'calibration'}: count_calibration uses features {unknown} this seqops"
            f" does not compute (known: {sorted(FEATURES)}); export the model again"
        )
    return calibration


def confidence_from_features(
    features: Mapping[str, float] | None, calibration: CountCalibration | None
) -> float:
    """``count_confidence`` from :func:`rollout_features`' output (None: 0)."""
    if features is None:
        return 0.0
    if calibration is None:
        return math.exp(features[UNCALIBRATED_FEATURE])
    z = calibration.intercept + sum(
        c * (features[name] - m) / s
        for name, m, s, c in zip(
            calibration.features, calibration.center, calibration.scale, calibration.coef,
            strict=True,
        )
    )  # fmt: skip
    return float(_sigmoid(z))


def count_confidence(
    rollout: Rollout, calibration: CountCalibration | Mapping[str, Any] | None
) -> float:
    """How likely the finished ``rollout``'s count is exact, in ``[0, 1]``.

    Args:
        rollout: a finished loop (its done probabilities and why it stopped).
        calibration: the model's (``ModelInfo.calibration``, or the stored dict); None gives
            the uncalibrated probability that the loop stops exactly where it did.
    """
    return confidence_from_features(rollout_features(rollout), as_calibration(calibration))


def _sigmoid(z):
    """The logistic function, without overflow for large ``|z|``."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, np.float64)))


def fit_calibration(
    features: Sequence[Mapping[str, float]],
    exact: Sequence[bool],
    names: Sequence[str] | None = None,
    l2: float = L2,
) -> dict[str, Any]:
    """Fit ``P(exact | features)``: L2-regularised logistic regression by Newton's method.

    Features are standardised first (so one penalty suits them all); the targets are Platt's
    smoothed ones (``(N+ + 1) / (N+ + 2)`` for exact counts, ``1 / (N- + 2)`` otherwise), so a
    small or one-sided split still gives finite, modest confidences.

    Args:
        features: per image, :func:`rollout_features`' output (images whose loop did not
            stop on done are left out by the caller: their confidence is 0 anyway).
        exact: per image, whether its count was exact.
        names: the features to use (default: all of :data:`FEATURES`).
        l2: the penalty on the standardised weights.

    Returns:
        The stored calibration (plain floats, for JSON metadata): ``features``, ``center``,
        ``scale``, ``coef``, ``intercept`` and ``fit`` (``images``, ``exact_share``, ``l2``,
        ``log_loss``).
    """
    names = list(FEATURES if names is None else names)
    if len(features) != len(exact):
        raise ValueError(f"calibration: {len(features)} feature rows vs {len(exact)} labels")
    if not features:
        raise ValueError("calibration: no images that stopped on done to fit on")
    x = np.asarray([[row[name] for name in names] for row in features], np.float64)
    y = np.asarray(exact, bool)
    center = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-9] = 1.0  # a constant feature: its weight stays ~0 under the penalty
    z = np.hstack([np.ones((len(x), 1)), (x - center) / scale])
    positives = int(y.sum())
    target = np.where(y, (positives + 1) / (positives + 2), 1 / (len(y) - positives + 2))
    weights = _newton(z, target, l2)
    prob = np.clip(_sigmoid(z @ weights), 1e-12, 1 - 1e-12)
    log_loss = -np.mean(np.where(y, np.log(prob), np.log1p(-prob)))
    return {
        "features": names,
        "center": center.tolist(),
        "scale": scale.tolist(),
        "coef": weights[1:].tolist(),
        "intercept": float(weights[0]),
        "fit": {
            "images": len(y),
            "exact_share": positives / len(y),
            "l2": l2,
            "log_loss": float(log_loss),
        },
    }


def _newton(z: np.ndarray, target: np.ndarray, l2: float) -> np.ndarray:
    """Minimise the cross-entropy against ``target`` plus ``l2/2 |w|^2`` (the intercept,
    column 0, unpenalised). Strictly convex, so Newton's steps converge in a few."""
    penalty = np.full(z.shape[1], l2)
    penalty[0] = 0.0
    weights = np.zeros(z.shape[1])
    for _ in range(NEWTON_STEPS):
        prob = _sigmoid(z @ weights)
        gradient = z.T @ (prob - target) + penalty * weights
        hessian = (z.T * (prob * (1 - prob))) @ z + np.diag(penalty)
        # A tiny ridge keeps the solve defined when every probability saturates.
        step = np.linalg.solve(hessian + 1e-9 * np.eye(len(weights)), gradient)
        weights -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return weights
