"""The counting loop's state (seqops.rollout): what the predictor, the server and training share."""

from __future__ import annotations

import time

import numpy as np

from seqops.imaging import render_marks
from seqops.rollout import Rollout, run_rollouts

GRID, SIGMA = 8, 1.0


def test_a_continued_rollout_has_the_marks_of_its_points():
    points = [(-0.5, -0.5), (0.25, 0.5)]
    rollout = Rollout.start(GRID, SIGMA, points)
    assert rollout.points_norm == points
    np.testing.assert_allclose(rollout.marks[0], render_marks(np.asarray(points), GRID, SIGMA))
    assert Rollout.start(GRID, SIGMA).marks.max() == 0.0


def test_advance_marks_a_point_until_done_or_the_guard():
    rollout = Rollout.start(GRID, SIGMA)
    assert rollout.advance((0.0, 0.0), done=0.2, threshold=0.5, max_objects=3) is False
    assert rollout.points_norm == [(0.0, 0.0)] and rollout.marks.max() > 0.5
    assert rollout.advance((0.5, 0.5), done=0.7, threshold=0.5, max_objects=3) is True
    assert rollout.stopped_by == "done" and len(rollout.points_norm) == 1  # done adds no point
    assert rollout.done_probs == [0.2, 0.7]

    capped = Rollout.start(GRID, SIGMA)
    finished = [capped.advance((0.1 * i, 0.0), 0.0, 0.5, 2) for i in range(2)]
    assert finished == [False, True] and capped.stopped_by == "max_objects"


def scripted_step(counts: list[int], calls: list[list[int]]):
    """A step that finds ``counts[i]`` objects in image ``i`` (at x = k / 10 in step k), then
    says done; it checks that each image's marks hold the points found before."""

    def step(active: np.ndarray, marks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = len(calls)
        calls.append(active.tolist())
        assert all((marks[j].max() > 0.5) == (k > 0) for j in range(len(active)))
        xy = np.full((len(active), 2), (k / 10, 0.0), np.float32)
        done = np.asarray([float(k >= counts[i]) for i in active])
        return xy, done

    return step


def test_run_rollouts_steps_only_the_images_still_running():
    counts = [0, 2, 1]
    calls: list[list[int]] = []
    rollouts = [Rollout.start(GRID, SIGMA) for _ in counts]
    run_rollouts(rollouts, scripted_step(counts, calls), threshold=0.5, max_objects=10)
    assert [len(r.points_norm) for r in rollouts] == counts
    assert all(r.stopped_by == "done" for r in rollouts)
    assert calls == [[0, 1, 2], [1, 2], [1]]


def test_run_rollouts_stops_at_the_guard_and_the_deadline():
    rollouts = [Rollout.start(GRID, SIGMA) for _ in range(2)]
    run_rollouts(rollouts, scripted_step([99, 99], []), threshold=0.5, max_objects=3)
    assert [len(r.points_norm) for r in rollouts] == [3, 3]
    assert {r.stopped_by for r in rollouts} == {"max_objects"}

    late = [Rollout.start(GRID, SIGMA)]
    run_rollouts(late, scripted_step([99], []), 0.5, 10, deadline=time.monotonic() - 1)
    assert late[0].stopped_by == "deadline" and late[0].points_norm == []


def test_one_image_alone_steps_the_same_as_in_a_batch():
    """A lone image's marks go to the step as a view of a batch of one (no copy per step);
    its points and marks are the same as the same image's in a batch with another."""
    seen: list[np.ndarray] = []

    def step(active: np.ndarray, marks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert marks.shape == (len(active), 1, GRID, GRID) and marks.dtype == np.float32
        seen.append(marks[0].copy())
        k = len(seen)
        xy = np.tile([[0.1 * k - 0.6, 0.05 * k]], (len(active), 1)).astype(np.float32)
        return xy, np.full(len(active), 0.9 if k > 4 else 0.1, np.float32)

    alone = [Rollout.start(GRID, SIGMA)]
    run_rollouts(alone, step, 0.5, 10)
    alone_seen, seen[:] = list(seen), []
    batch = [Rollout.start(GRID, SIGMA), Rollout.start(GRID, SIGMA)]
    run_rollouts(batch, step, 0.5, 10)
    assert alone[0].points_norm == batch[0].points_norm and len(alone[0].points_norm) == 4
    np.testing.assert_array_equal(alone[0].marks, batch[0].marks)
    for a, b in zip(alone_seen, seen, strict=True):
        np.testing.assert_array_equal(a, b)
