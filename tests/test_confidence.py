"""The count confidence: a finished loop's features, the calibration fit, its stored form."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from seqops import confidence as C
from seqops.contract import ContractError, CountCalibration
from seqops.rollout import Rollout


def finished(done_probs: list[float], threshold: float = 0.5, max_objects: int = 100) -> Rollout:
    """A rollout fed these done probabilities step by step (every point at the centre)."""
    rollout = Rollout.start(8, 1.0)
    for done in done_probs:
        if rollout.advance((0.0, 0.0), done, threshold, max_objects):
            break
    return rollout


def synthetic(n: int, seed: int, slope: float = 2.0) -> tuple[list[dict], np.ndarray]:
    """Feature rows with random values, labelled exact with a known logistic law in
    ``stop_log_prob`` alone (the other features are noise)."""
    rng = np.random.default_rng(seed)
    rows = [{name: float(rng.normal()) for name in C.FEATURES} for _ in range(n)]
    z = np.asarray([slope * r["stop_log_prob"] + 1.0 for r in rows])
    return rows, rng.random(n) < 1 / (1 + np.exp(-z))


def test_features_of_a_loop_that_stopped_on_done():
    rollout = finished([0.1, 0.3, 0.05, 0.8])
    assert rollout.stopped_by == "done" and len(rollout.points_norm) == 3
    features = C.rollout_features(rollout)
    stop = math.log(0.9) + math.log(0.7) + math.log(0.95) + math.log(0.8)
    assert features["stop_log_prob"] == pytest.approx(stop)
    assert features["final_done_logit"] == pytest.approx(math.log(0.8 / 0.2))
    assert features["near_miss_logit"] == pytest.approx(math.log(0.3 / 0.7))
    assert features["log_count"] == pytest.approx(math.log(4))
    # Without a calibration: the model's own chance of stopping exactly there.
    assert C.count_confidence(rollout, None) == pytest.approx(math.exp(stop))


def test_a_loop_that_never_said_done_has_confidence_zero():
    guard = finished([0.1, 0.2], max_objects=2)
    assert guard.stopped_by == "max_objects" and C.rollout_features(guard) is None
    assert C.count_confidence(guard, None) == 0.0
    deadline = finished([0.1])
    deadline.stopped_by = "deadline"
    calibration = C.fit_calibration(*synthetic(50, 0))
    assert C.count_confidence(deadline, calibration) == 0.0


def test_saturated_probabilities_stay_finite():
    """onnxruntime's sigmoid gives exact 0 and 1: the features clip them."""
    at_once = finished([1.0])
    features = C.rollout_features(at_once)
    assert all(math.isfinite(v) for v in features.values())
    assert features["near_miss_logit"] == pytest.approx(math.log(C.EPS / (1 - C.EPS)))
    assert C.count_confidence(at_once, None) == pytest.approx(1 - C.EPS)
    assert math.isfinite(C.rollout_features(finished([0.0, 0.0, 1.0]))["stop_log_prob"])


def test_a_separable_split_reaches_high_and_low_confidences():
    rng = np.random.default_rng(1)
    rows = [{name: float(rng.normal()) for name in C.FEATURES} for _ in range(400)]
    exact = np.asarray([r["stop_log_prob"] > 0 for r in rows])
    calibration = C.fit_calibration(rows, exact)
    conf = np.asarray([C.confidence_from_features(r, as_stored(calibration)) for r in rows])
    far = np.abs([r["stop_log_prob"] for r in rows]) > 0.5
    assert conf[exact & far].min() > 0.9
    assert conf[~exact & far].max() < 0.1
    assert calibration["fit"]["images"] == 400
    assert calibration["fit"]["exact_share"] == pytest.approx(exact.mean())


def as_stored(calibration: dict) -> CountCalibration:
    """The calibration as the predictor reads it: through JSON metadata."""
    return CountCalibration.from_metadata(json.loads(json.dumps(calibration)), "test")


def test_the_fit_recovers_a_known_law_and_is_monotone_in_the_stop_probability():
    rows, exact = synthetic(2000, 2)
    calibration = C.fit_calibration(rows, exact)
    coef = dict(zip(calibration["features"], calibration["coef"], strict=True))
    scale = dict(zip(calibration["features"], calibration["scale"], strict=True))
    # The law's slope per unit of stop_log_prob is 2; the noise features get ~0.
    assert coef["stop_log_prob"] / scale["stop_log_prob"] == pytest.approx(2.0, rel=0.15)
    assert all(abs(coef[n]) < 0.2 for n in C.FEATURES if n != "stop_log_prob")
    stored = as_stored(calibration)
    others = {name: 0.0 for name in C.FEATURES}
    grid = [C.confidence_from_features({**others, "stop_log_prob": x}, stored) for x in
            np.linspace(-4, 2, 25)]  # fmt: skip
    assert np.all(np.diff(grid) > 0)
    # Calibrated: within the bins of its own confidence, the exact share matches it.
    conf = np.asarray([C.confidence_from_features(r, stored) for r in rows])
    for lo in (0.2, 0.4, 0.6):
        inside = (conf >= lo) & (conf < lo + 0.2)
        assert exact[inside].mean() == pytest.approx(conf[inside].mean(), abs=0.06)


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_a_one_sided_split_gives_finite_modest_confidences(share: float):
    rows, _ = synthetic(30, 3)
    calibration = C.fit_calibration(rows, [bool(share)] * 30)
    conf = C.confidence_from_features(rows[0], as_stored(calibration))
    # Platt's smoothed targets: 31/32 for all-exact, 1/32 for none.
    assert conf == pytest.approx(31 / 32 if share else 1 / 32, abs=0.01)
    assert all(math.isfinite(v) for v in [calibration["intercept"], *calibration["coef"]])


def test_the_stored_calibration_is_plain_json_and_checked_when_read():
    calibration = C.fit_calibration(*synthetic(40, 4))
    assert json.loads(json.dumps(calibration)) == calibration
    assert C.as_calibration(calibration) == as_stored(calibration)
    with pytest.raises(ContractError, match="count_calibration' lacks or mistypes 'coef'"):
        CountCalibration.from_metadata({k: v for k, v in calibration.items() if k != "coef"}, "m")
    short = {**calibration, "scale": calibration["scale"][:2]}
    with pytest.raises(ContractError, match="one entry each"):
        CountCalibration.from_metadata(short, "m")
    unknown = {**calibration, "features": ["objects_left", *calibration["features"][1:]]}
    with pytest.raises(ValueError, match=r"features \['objects_left'\] this seqops does not"):
        C.as_calibration(unknown, "m")


def test_a_new_feature_is_one_entry_and_old_calibrations_still_apply(monkeypatch):
    old = C.fit_calibration(*synthetic(60, 5))
    extended = {**C.FEATURES, "steps": lambda s: float(len(s.before) + 1)}
    monkeypatch.setattr(C, "FEATURES", extended)
    rollout = finished([0.2, 0.9])
    features = C.rollout_features(rollout)
    assert features["steps"] == 2.0
    rows = [{**r, "steps": float(i % 3)} for i, r in enumerate(synthetic(60, 5)[0])]
    assert C.fit_calibration(rows, [i % 2 == 0 for i in range(60)])["features"][-1] == "steps"
    # A calibration fitted before the feature existed reads only its own features.
    assert 0 < C.count_confidence(rollout, old) < 1


def test_fit_rejects_mismatched_or_empty_input():
    with pytest.raises(ValueError, match="2 feature rows vs 1 labels"):
        C.fit_calibration([{}, {}], [True])
    with pytest.raises(ValueError, match="no images"):
        C.fit_calibration([], [])
