"""Training steps drawn from one image's sequence (torch-free).

An image with ``N`` objects in canonical order holds ``N + 1`` steps: with the first ``k``
objects marked, the target is the first unmarked object in that order (object ``k``, or an
earlier one whose mark augmentation dropped: the loop must go back for an object it missed,
not learn to skip it) with ``done = 0``, or, at ``k = N``, nothing left (``done = 1``).
With ``shuffle=True`` (``train.target: nearest_unmarked``) the ``k`` marked objects are a
random subset instead of an order's prefix: a loop that takes any unmarked object next
leaves its marks scattered over the image, and a network only ever trained on prefixes
(marks filling the image from the top) says "done" early on such marks.
Training draws ``steps_per_image`` of them against one image encoding:
``max(1, round(done_share * steps_per_image))`` at ``k = N`` (so every image teaches when to
stop) and the rest uniform in ``[0, N - 1]``.

The marks go through the same :func:`seqops.imaging.render_marks` as in serving. During
training they are perturbed (``params.train.augment``) so the loop learns to recover from
its own small errors: each mark is jittered, a found object's mark may go missing, and a
mark may land where no object is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from seqops.config import AugmentConfig, SamplingConfig
from seqops.imaging import pixels_to_norm, render_marks

# A spurious mark keeps this many mark radii (sigma, in grid cells) away from every object,
# so it never sits on an object that the target still asks for.
SPURIOUS_CLEARANCE_SIGMAS = 3.0
SPURIOUS_TRIES = 20


@dataclass(frozen=True)
class ImageSteps:
    """The steps drawn from one image (``K`` = steps per image, ``N`` = objects)."""

    k: np.ndarray  # [K] int64, objects marked before the step
    marks: np.ndarray  # [K, grid, grid] float32, rendered marks
    mark_points: tuple[np.ndarray, ...]  # K arrays [M, 2] normalised: the marks as drawn
    target_xy: np.ndarray  # [K, 2] float32 normalised next object (0 where done)
    done: np.ndarray  # [K] float32, 1 when every object is marked
    unmarked: np.ndarray  # [K, N] bool, objects without a mark (nearest_unmarked targets)


def done_steps(steps_per_image: int, done_share: float) -> int:
    """How many of an image's ``steps_per_image`` steps have ``k = N`` (done = 1): at least one."""
    return min(steps_per_image, max(1, round(done_share * steps_per_image)))


def choose_ks(
    num_objects: int, steps_per_image: int, done_share: float, rng: np.random.Generator
) -> np.ndarray:
    """Pick the ``k`` of each step: the done steps (``k = N``) first, then uniform in ``[0, N-1]``.

    An image without objects only has the done step, so every ``k`` is 0.
    """
    n_done = done_steps(steps_per_image, done_share)
    ks = np.full(steps_per_image, num_objects, dtype=np.int64)
    if num_objects > 0:
        ks[n_done:] = rng.integers(0, num_objects, size=steps_per_image - n_done)
    return ks


def augment_marks(
    points_norm: np.ndarray,
    k: int,
    augment: AugmentConfig,
    image_size: int,
    clearance: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Perturb the marks of the first ``k`` objects.

    Args:
        points_norm: ``[N, 2]`` every object of the image, normalised, canonical order.
        k: objects marked (the first ``k``).
        augment: jitter (model px), drop and spurious probabilities.
        image_size: model input size, to convert the jitter to normalised units.
        clearance: L1 distance (normalised) a spurious mark keeps from every object.
        rng: the random source.

    Returns:
        ``(marks [M, 2], dropped [N] bool)``. Marks are only dropped while objects remain
        (``k < N``): at ``k = N`` the done target says "every object is marked", which a
        missing mark would contradict.
    """
    num_objects = len(points_norm)
    marks = points_norm[:k].copy()
    dropped = np.zeros(num_objects, bool)
    if k and augment.mark_drop_prob > 0 and k < num_objects:
        drop = rng.random(k) < augment.mark_drop_prob
        dropped[:k] = drop
        marks = marks[~drop]
    if len(marks) and augment.mark_jitter_px > 0:
        sigma_norm = augment.mark_jitter_px * 2.0 / image_size
        marks = marks + rng.normal(0.0, sigma_norm, size=marks.shape).astype(np.float32)
    if augment.spurious_mark_prob > 0 and rng.random() < augment.spurious_mark_prob:
        for _ in range(SPURIOUS_TRIES):
            candidate = rng.uniform(-1.0, 1.0, size=(1, 2)).astype(np.float32)
            if num_objects == 0 or np.abs(points_norm - candidate).sum(1).min() >= clearance:
                marks = np.concatenate([marks, candidate])
                break
    return np.clip(marks, -1.0, 1.0).astype(np.float32), dropped


def sample_image_steps(
    points_px: np.ndarray,
    rng: np.random.Generator,
    *,
    image_size: int,
    sampling: SamplingConfig,
    grid: int,
    mark_sigma: float,
    augment: AugmentConfig | None = None,
    ks: np.ndarray | None = None,
    shuffle: bool = False,
) -> ImageSteps:
    """Draw the training steps of one image.

    Args:
        points_px: ``[N, 2]`` objects in model pixels, canonical order (``Record.points``).
        rng: the random source (a fixed seed makes the steps reproducible, e.g. for val).
        image_size: model input size ``S``.
        sampling: steps per image and done share.
        grid: feature grid side (``ModelSpec.grid``); mark_sigma: mark radius in grid cells.
        augment: mark noise, or ``None`` for clean marks (validation).
        ks: explicit ``k`` values instead of :func:`choose_ks` (pictures, tests).
        shuffle: mark a random subset of ``k`` objects per step (a new permutation per
            step) instead of the first ``k`` in canonical order.

    Returns:
        The steps with marks rendered by :func:`seqops.imaging.render_marks`.
    """
    points = pixels_to_norm(np.asarray(points_px, np.float32).reshape(-1, 2), image_size)
    num_objects = len(points)
    if ks is None:
        ks = choose_ks(num_objects, sampling.steps_per_image, sampling.done_share, rng)
    ks = np.asarray(ks, np.int64)
    if len(ks) and (ks.min() < 0 or ks.max() > num_objects):
        raise ValueError(f"k values must lie in [0, {num_objects}], got {ks.tolist()}")
    clearance = SPURIOUS_CLEARANCE_SIGMAS * mark_sigma * 2.0 / grid
    maps, mark_points = [], []
    target = np.zeros((len(ks), 2), np.float32)
    unmarked = np.zeros((len(ks), num_objects), bool)
    for i, k in enumerate(ks):
        # The order objects are marked in: canonical, or a fresh random one per step.
        order = rng.permutation(num_objects) if shuffle else np.arange(num_objects)
        ordered = points[order]
        marks, left = _mark_first(ordered, int(k), augment, image_size, clearance, rng)
        maps.append(render_marks(marks, grid, mark_sigma))
        mark_points.append(marks)
        unmarked[i, order] = left
        if k < num_objects:
            target[i] = ordered[int(np.argmax(left))]  # the first unmarked in that order
    return ImageSteps(
        k=ks,
        marks=np.stack(maps) if maps else np.zeros((0, grid, grid), np.float32),
        mark_points=tuple(mark_points),
        target_xy=target,
        done=(ks == num_objects).astype(np.float32),
        unmarked=unmarked,
    )


def _mark_first(
    ordered: np.ndarray,
    k: int,
    augment: AugmentConfig | None,
    image_size: int,
    clearance: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Marks of the first ``k`` objects of ``ordered`` (noisy unless ``augment`` is None), and
    ``[N]`` which of them are left unmarked: the rest, plus any dropped mark."""
    if augment is None:
        marks, left = ordered[:k].copy(), np.zeros(len(ordered), bool)
    else:
        marks, left = augment_marks(ordered, k, augment, image_size, clearance, rng)
    left[k:] = True
    return marks, left
