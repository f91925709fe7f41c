"""Steps in the states the model's own loop visits (seqops.training.loop_states)."""

from __future__ import annotations

import numpy as np

from seqops.training.loop_states import found_radius, loop_steps


def test_loop_steps_teach_the_loop_to_go_on_where_it_stopped_early():
    points = np.array([[10.0, 10.0], [30.0, 10.0], [50.0, 40.0]], np.float32)
    # the loop found the first two objects (2 px off) and a spurious one, then said done
    loop = np.array([[12.0, 10.0], [60.0, 60.0], [30.0, 12.0]], np.float32)
    steps = loop_steps(
        points, loop, np.random.default_rng(0), count=4, image_size=64, grid=8,
        mark_sigma=1.0, radius_px=8.0,
    )  # fmt: skip
    assert steps.k[-1] == 3  # the state where the loop stopped is always trained
    assert steps.done[-1] == 0  # an object is left: not done
    np.testing.assert_allclose(steps.target_xy[-1], [50 / 32 - 1, 40 / 32 - 1])
    assert steps.unmarked[-1].tolist() == [False, False, True]
    for k, unmarked in zip(steps.k, steps.unmarked, strict=True):
        assert unmarked.sum() == 3 - int((loop[:k, 0] < 40).sum())  # only near points count
    complete = loop_steps(
        points, points, np.random.default_rng(0), count=2, image_size=64, grid=8,
        mark_sigma=1.0, radius_px=8.0,
    )  # fmt: skip
    assert complete.done[-1] == 1


def test_found_radius_is_half_the_gap_to_the_nearest_object_within_bounds():
    points = np.array([[0.0, 0.0], [20.0, 0.0], [200.0, 0.0], [100.0, 0.0]], np.float32)
    # gaps to the nearest: 20, 20, 100, 80 -> halves 10, 10, 50, 40 -> clipped to [8, 24]
    np.testing.assert_allclose(found_radius(points, 8.0), [10.0, 10.0, 24.0, 24.0])
    np.testing.assert_allclose(found_radius(points[:1], 8.0), [24.0])


def test_a_loop_point_a_little_off_an_isolated_object_found_it_but_one_between_two_finds_one():
    points = np.array([[20.0, 20.0], [100.0, 100.0], [116.0, 100.0]], np.float32)
    # 12 px off the isolated object (beyond evaluate's 8 px), then the midpoint of the pair
    loop = np.array([[32.0, 20.0], [108.0, 100.0]], np.float32)
    steps = loop_steps(
        points, loop, np.random.default_rng(0), count=1, image_size=128, grid=16,
        mark_sigma=1.0, radius_px=8.0,
    )  # fmt: skip
    assert steps.k.tolist() == [2]
    assert steps.unmarked[0].tolist().count(True) == 1  # one of the pair is still to find
    assert steps.unmarked[0][0] == np.False_  # the isolated object is not asked for again
    assert steps.done[0] == 0
