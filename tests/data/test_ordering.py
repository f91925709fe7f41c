"""The three canonical orders on hand-made points."""

import numpy as np
import pytest

from seqops.data.ordering import ORDERS, order_indices, order_points


def test_reading_order_rows_of_row_height_then_left_to_right():
    points = np.array([[300, 10], [20, 40], [100, 60], [10, 99], [200, 49.9], [5, 100]])
    # Rows are floor(y / 50): y = 49.9 is still row 0, y = 100 starts row 2.
    expected = [[20, 40], [200, 49.9], [300, 10], [10, 99], [100, 60], [5, 100]]
    np.testing.assert_array_equal(order_points(points, "reading_order", 50), expected)
    np.testing.assert_array_equal(order_indices(points, "reading_order", 50), [1, 4, 0, 3, 2, 5])


def test_reading_order_row_height_changes_the_rows():
    points = np.array([[300, 10], [20, 40], [100, 60]])
    # One row of 100 px: purely left to right.
    np.testing.assert_array_equal(order_indices(points, "reading_order", 100), [1, 2, 0])
    # Rows of 20 px: (300, 10) is alone in row 0.
    np.testing.assert_array_equal(order_indices(points, "reading_order", 20), [0, 1, 2])


def test_left_to_right_by_x_then_y():
    points = np.array([[30, 5], [10, 90], [10, 20], [20, 0]])
    np.testing.assert_array_equal(order_indices(points, "left_to_right"), [2, 1, 3, 0])


def test_nearest_neighbor_starts_top_left_and_walks_to_the_nearest():
    points = np.array([[100, 100], [0, 5], [10, 5], [50, 5], [11, 40]])
    # (0, 5) is nearest the corner; then (10, 5); from there (11, 40) at 35 beats (50, 5)
    # at 40; then (50, 5); (100, 100) last. Neither x- nor reading order gives this.
    np.testing.assert_array_equal(order_indices(points, "nearest_neighbor"), [1, 2, 4, 3, 0])


def test_nearest_neighbor_breaks_ties_towards_the_upper_then_left_point():
    # (4, 3) and (3, 4) are both 5 px from the corner; the upper one starts.
    points = np.array([[3.0, 4.0], [4.0, 3.0]])
    np.testing.assert_array_equal(order_points(points, "nearest_neighbor"), [[4, 3], [3, 4]])
    # From (10, 10), (10, 0) and (10, 20) are equally near: the upper one comes first,
    # whatever the input order.
    points = np.array([[10, 20], [10, 10], [10, 0.0], [0, 10]])
    first = order_points(points, "nearest_neighbor")
    again = order_points(points[::-1], "nearest_neighbor")
    np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize("order", ORDERS)
def test_every_order_is_a_permutation_and_independent_of_input_order(order):
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 384, (40, 2)).round(1)
    idx = order_indices(points, order, 50)
    assert sorted(idx.tolist()) == list(range(40))
    shuffled = points[rng.permutation(40)]
    np.testing.assert_array_equal(order_points(shuffled, order, 50), points[idx])


@pytest.mark.parametrize("order", ORDERS)
def test_empty_and_single_point(order):
    assert order_indices(np.zeros((0, 2)), order).shape == (0,)
    np.testing.assert_array_equal(order_indices(np.array([[5.0, 7.0]]), order), [0])


def test_unknown_order_and_bad_row_height_are_errors():
    with pytest.raises(ValueError, match=r"unknown order 'spiral'"):
        order_indices(np.zeros((2, 2)), "spiral")
    with pytest.raises(ValueError, match=r"row_height"):
        order_indices(np.zeros((2, 2)), "reading_order", 0)
