"""Training steps in the states the model's own loop visits (``train.loop_share``).

The order's prefixes (``seqops.data.sampling``) show the step clean marks of the first ``k``
objects; the served loop's marks are its own points, a few px off, sometimes one for two
touching objects, sometimes spurious. Training on states that loop really reaches (as
DAgger does for imitation learning) teaches the step to go on from them, and done to fire
only when every object is found. Torch-free.
"""

from __future__ import annotations

import numpy as np

from seqops.data.sampling import ImageSteps
from seqops.imaging import pixels_to_norm, render_marks
from seqops.scoring import max_matching, pairwise_distances


def loop_steps(
    points_px: np.ndarray,
    loop_px: np.ndarray,
    rng: np.random.Generator,
    *,
    count: int,
    image_size: int,
    grid: int,
    mark_sigma: float,
    radius_px: float,
) -> ImageSteps:
    """``count`` steps in states the model's own loop visited (DAgger-style training).

    ``loop_px`` are the points the loop found on this image, in its order; a step takes the
    first ``j`` of them as the marks (``j`` uniform in ``[0, n]``, and the last step at
    ``j = n``, the state where the loop said done). The objects those marks found are the
    ones matched one to one within each object's :func:`found_radius`; the target is the
    first unmatched object in canonical order, and ``done = 1`` only when every object is
    matched. So a loop that stopped with objects left is taught to go on from exactly where
    it stopped.
    """
    points = np.asarray(points_px, np.float32).reshape(-1, 2)
    loop = np.asarray(loop_px, np.float32).reshape(-1, 2)
    js = rng.integers(0, len(loop) + 1, size=count)
    if count:
        js[-1] = len(loop)
    # Distances in units of each object's radius: <= 1 found it (each state's marks are the
    # first rows).
    distances = pairwise_distances(loop, points) / found_radius(points, radius_px)
    loop_norm, points_norm = pixels_to_norm(loop, image_size), pixels_to_norm(points, image_size)
    maps, mark_points = [], []
    target = np.zeros((count, 2), np.float32)
    unmarked = np.ones((count, len(points)), bool)
    for i, j in enumerate(js):
        _, found = max_matching(distances[:j], 1.0)
        unmarked[i, found] = False
        maps.append(render_marks(loop_norm[:j], grid, mark_sigma))
        mark_points.append(loop_norm[:j])
        if unmarked[i].any():
            target[i] = points_norm[np.argmax(unmarked[i])]
    return ImageSteps(
        k=np.asarray(js, np.int64),
        marks=np.stack(maps) if maps else np.zeros((0, grid, grid), np.float32),
        mark_points=tuple(mark_points),
        target_xy=target,
        done=(~unmarked.any(axis=1)).astype(np.float32),
        unmarked=unmarked,
    )


def found_radius(points_px: np.ndarray, radius_px: float) -> np.ndarray:
    """``[N]`` px: how far a loop point may lie from each object and still have found it.

    Half the distance to the object's nearest neighbour (a point nearer to it than to any
    other object), at least ``radius_px`` and at most ``3 * radius_px``. A fixed radius as
    small as evaluate's match radius (8 px) calls an isolated object whose loop point is
    10 px off unfound (the loop's misses are mostly 8-14 px off), so the step was taught to
    mark it again and counted it twice; a point between two touching objects still finds
    only one of them, as its mark hides about one object.
    """
    points = np.asarray(points_px, np.float32).reshape(-1, 2)
    if len(points) < 2:
        return np.full(len(points), 3 * radius_px, np.float32)
    apart = pairwise_distances(points, points)
    np.fill_diagonal(apart, np.inf)
    return np.clip(0.5 * apart.min(axis=1), radius_px, 3 * radius_px).astype(np.float32)


def replace_tail(steps: ImageSteps, tail: ImageSteps) -> ImageSteps:
    """``steps`` with its last ``len(tail.k)`` steps replaced by ``tail``'s."""
    keep = len(steps.k) - len(tail.k)
    return ImageSteps(
        k=np.concatenate([steps.k[:keep], tail.k]),
        marks=np.concatenate([steps.marks[:keep], tail.marks]),
        mark_points=steps.mark_points[:keep] + tail.mark_points,
        target_xy=np.concatenate([steps.target_xy[:keep], tail.target_xy]),
        done=np.concatenate([steps.done[:keep], tail.done]),
        unmarked=np.concatenate([steps.unmarked[:keep], tail.unmarked]),
    )
