"""The pure evaluation metrics on hand-made cases."""

import math

import numpy as np
import pytest

from seqops import scoring as M


def test_match_points_pairs_within_radius_and_reports_distances():
    true = [[10, 10], [50, 50], [90, 10]]
    pred = [[12, 10], [50, 56], [200, 200]]
    m = M.match_points(pred, true, radius=8)
    assert m.matches == 2
    assert sorted(zip(m.pred_index.tolist(), m.true_index.tolist(), strict=True)) == [
        (0, 0),
        (1, 1),
    ]
    assert sorted(m.distances.tolist()) == pytest.approx([2.0, 6.0])
    assert (m.misses, m.false_positives, m.duplicates, m.spurious) == (1, 1, 0, 1)


def test_match_maximises_the_number_of_matches_before_distance():
    # Greedy nearest would pair pred 0 with true 0 (distance 1) and leave true 1 unmatched;
    # the maximum matching pairs pred 0 - true 1 and pred 1 - true 0.
    true = [[0, 0], [7, 0]]
    pred = [[1, 0], [-6, 0]]
    m = M.match_points(pred, true, radius=7)
    assert m.matches == 2
    assert m.misses == 0


def test_match_prefers_the_closer_assignment_among_maximal_ones():
    true = [[0, 0], [10, 0]]
    pred = [[9, 0], [1, 0]]
    m = M.match_points(pred, true, radius=8)
    pairs = dict(zip(m.pred_index.tolist(), m.true_index.tolist(), strict=True))
    assert pairs == {0: 1, 1: 0}
    assert m.distances.sum() == pytest.approx(2.0)


def test_duplicates_are_unmatched_predictions_on_a_found_object():
    true = [[20, 20], [60, 60]]
    pred = [[20, 21], [21, 20], [22, 22], [100, 100]]  # three on the first object, one far
    m = M.match_points(pred, true, radius=8)
    assert m.matches == 1
    assert m.duplicates == 2
    assert m.spurious == 1
    assert m.misses == 1


def test_match_with_no_points_on_either_side():
    assert M.match_points([], [], 8).matches == 0
    m = M.match_points([], [[1, 1], [2, 2]], 8)
    assert (m.matches, m.misses, m.false_positives) == (0, 2, 0)
    m = M.match_points([[1, 1]], [], 8)
    assert (m.matches, m.misses, m.spurious, m.duplicates) == (0, 0, 1, 0)


def test_match_rejects_malformed_points():
    with pytest.raises(ValueError, match="pred"):
        M.match_points([[1, 2, 3]], [[1, 2]], 8)


def test_first_step_all_found():
    true = [[10, 10], [50, 50]]
    pred = [[11, 10], [11, 11], [200, 0], [50, 49], [49, 50]]
    # The second object is found by the 4th prediction: 4 marks find everything.
    assert M.first_step_all_found(pred, true, 8) == 4
    assert M.first_step_all_found(pred[:3], true, 8) is None  # never all found
    assert M.first_step_all_found([], [], 8) == 0  # nothing to find: done from step 0
    assert M.first_step_all_found(pred, [], 8) == 0
    # Two true objects close together need two predictions, not one covering both.
    close = [[10, 10], [14, 10]]
    assert M.first_step_all_found([[12, 10]], close, 8) is None
    assert M.first_step_all_found([[12, 10], [13, 10]], close, 8) == 2


def test_done_labels_switch_to_one_at_t_all():
    assert M.done_labels(5, 3).tolist() == [0, 0, 0, 1, 1]
    assert M.done_labels(3, None).tolist() == [0, 0, 0]
    assert M.done_labels(2, 0).tolist() == [1, 1]


def test_count_metrics_overall_and_per_bucket():
    true = [5, 10, 12, 30, 2]
    pred = [5, 8, 15, 30, 3]
    out = M.count_metrics(pred, true)
    errors = np.array([0, -2, 3, 0, 1])
    assert out["count_mae"] == pytest.approx(np.abs(errors).mean())
    assert out["count_rmse"] == pytest.approx(math.sqrt((errors**2).mean()))
    assert out["count_exact_acc"] == pytest.approx(2 / 5)
    assert out["count_bias"] == pytest.approx(errors.mean())
    assert out["count_rel_mae"] == pytest.approx(6 / 59)
    assert out["num_images_5_10"] == 2
    assert out["count_mae_5_10"] == pytest.approx(1.0)
    assert out["count_exact_acc_5_10"] == pytest.approx(0.5)
    assert out["num_images_11_20"] == 1
    assert out["count_mae_11_20"] == pytest.approx(3.0)
    assert out["count_mae_21_50"] == pytest.approx(0.0)
    # The image with 2 objects is in no bucket: buckets hold 4 of the 5 images.
    assert sum(out[f"num_images_{a}_{b}"] for a, b in M.COUNT_BUCKETS) == 4


def test_count_metrics_empty_bucket_is_nan():
    out = M.count_metrics([3], [3])
    assert math.isnan(out["count_mae_5_10"])
    assert out["num_images_5_10"] == 0
    with pytest.raises(ValueError, match="counts"):
        M.count_metrics([1, 2], [1])


def test_localisation_metrics_pool_over_images():
    a = M.match_points([[0, 0], [30, 30]], [[1, 0]], 8)  # 1 tp, 1 fp (spurious)
    b = M.match_points([[5, 5]], [[5, 9], [40, 40]], 8)  # 1 tp, 1 miss
    out = M.localisation_metrics([a, b], 8)
    assert out["precision"] == pytest.approx(2 / 3)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["px_err_mean"] == pytest.approx(2.5)
    assert out["px_err_median"] == pytest.approx(2.5)
    assert out["px_err_p90"] == pytest.approx(1.0 + 0.9 * 3.0)  # errors 1 and 4
    assert (out["misses"], out["spurious"], out["duplicates"]) == (1, 1, 0)
    assert out["miss_rate"] == pytest.approx(1 / 3)


def test_localisation_metrics_without_predictions():
    out = M.localisation_metrics([M.match_points([], [[1, 1]], 8)], 8)
    assert math.isnan(out["precision"])
    assert out["recall"] == 0.0
    assert math.isnan(out["px_err_median"])


def test_reliability_table_bins_and_rates():
    probs = [0.05, 0.05, 0.15, 0.95, 1.0, 0.5]
    labels = [0, 1, 0, 1, 1, 0]
    table = M.reliability_table(probs, labels, bins=10)
    assert len(table) == 10
    assert table[0]["steps"] == 2
    assert table[0]["mean_done_prob"] == pytest.approx(0.05)
    assert table[0]["observed_done_rate"] == pytest.approx(0.5)
    assert table[1]["steps"] == 1
    assert table[5]["steps"] == 1  # 0.5 lies in [0.5, 0.6)
    assert table[9]["steps"] == 2  # 1.0 goes to the last bin
    assert table[9]["observed_done_rate"] == 1.0
    assert math.isnan(table[3]["mean_done_prob"])
    assert sum(row["steps"] for row in table) == len(probs)


def test_calibration_metrics():
    perfect = M.calibration_metrics([0.0, 0.0, 1.0], [0, 0, 1], threshold=0.5)
    assert perfect["done_ece"] == pytest.approx(0.0)
    assert perfect["done_brier"] == pytest.approx(0.0)
    wrong = M.calibration_metrics([0.95, 0.95], [0, 0], threshold=0.5)
    assert wrong["done_ece"] == pytest.approx(0.95)
    assert wrong["done_brier"] == pytest.approx(0.95**2)
    assert wrong["done_steps"] == 2
    assert perfect["done_f1"] == perfect["done_precision"] == perfect["done_recall"] == 1.0
    # Said done (> 0.5): steps 1, 2; truly done: steps 1, 3.
    mixed = M.calibration_metrics([0.1, 0.9, 0.8, 0.2], [0, 1, 0, 1], threshold=0.5)
    assert (mixed["done_precision"], mixed["done_recall"]) == (0.5, 0.5)
    assert mixed["done_f1"] == pytest.approx(0.5)
    assert M.calibration_metrics([0.9, 0.8], [0, 1], threshold=0.85)["done_f1"] == 0.0
    assert math.isnan(wrong["done_recall"])  # no done step to find


def test_stop_timing():
    assert M.stop_timing(4, "done", 3) == "on_time"  # steps 0..3, stopped at step 3
    assert M.stop_timing(3, "done", 3) == "early"
    assert M.stop_timing(6, "done", 3) == "late"
    assert M.stop_timing(5, "done", None) == "early"
    assert M.stop_timing(200, "max_objects", None) == "guard"


# Five images: their count confidence and whether the count was exact (two miscounted).
CONFIDENCE = [0.1, 0.4, 0.6, 0.95, 0.99]
EXACT = [False, True, False, True, True]


def test_confidence_reliability_by_hand():
    table = M.confidence_reliability(CONFIDENCE, EXACT)
    filled = [(r["bin_lower"], r["images"], r["mean_confidence"], r["exact_share"])
              for r in table if r["images"]]  # fmt: skip
    assert filled == [
        (0.1, 1, 0.1, 0.0),
        (pytest.approx(0.4), 1, 0.4, 1.0),
        (0.6, 1, 0.6, 0.0),
        (0.9, 2, pytest.approx(0.97), 1.0),
    ]
    assert sum(r["images"] for r in table) == 5 and len(table) == 10


def test_review_trade_off_and_curve_by_hand():
    # Below 0.5: 0.1 (miscounted) and 0.4 (exact) are flagged: 2 of 5, 1 of 2 miscounts.
    assert M.review_trade_off(CONFIDENCE, EXACT, 0.5) == (0.4, 0.5)
    curve = M.review_curve(CONFIDENCE, EXACT)
    assert [(r["threshold"], r["flagged_share"], r["miscount_recall"]) for r in curve] == [
        (0.0, 0.0, 0.0),
        (0.1, 0.0, 0.0),  # flagged means strictly below the threshold
        (0.4, 0.2, 0.5),
        (0.6, 0.4, 0.5),
        (0.95, 0.6, 1.0),
        (0.99, 0.8, 1.0),
        (1.0, 1.0, 1.0),
    ]
    flagged, recall = M.review_trade_off([0.3, 0.9], [True, True], 0.5)
    assert flagged == 0.5 and math.isnan(recall)  # nothing miscounted: recall undefined


def test_confidence_metrics_by_hand():
    metrics = M.confidence_metrics(CONFIDENCE, EXACT, review_threshold=0.5)
    # ECE: 1/5 |0.1 - 0| + 1/5 |0.4 - 1| + 1/5 |0.6 - 0| + 2/5 |0.97 - 1|
    assert metrics["count_confidence_ece"] == pytest.approx(0.02 + 0.12 + 0.12 + 0.012)
    assert (metrics["review_flagged_share"], metrics["review_miscount_recall"]) == (0.4, 0.5)
    # 80% of the miscounts are first caught below 0.95, flagging 3 of 5 images.
    assert metrics["review_flagged_share_at_recall_80"] == 0.6
    none_wrong = M.confidence_metrics([0.5, 0.9], [True, True], review_threshold=0.6)
    assert math.isnan(none_wrong["review_miscount_recall"])
    assert math.isnan(none_wrong["review_flagged_share_at_recall_80"])
    assert math.isnan(M.confidence_metrics([], [], 0.5)["count_confidence_ece"])
