"""The counting loop's state, written once: "encode once, step until done".

The predictor (onnxruntime), the server's step batcher and training's validation rollout
(torch) all keep one :class:`Rollout` per image and advance it with a step's output; the
predictor and validation also share :func:`run_rollouts`, the loop that steps every image
still running together. Numpy and the torch-free mark renderer only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from seqops import imaging

# A step on a batch: (indices of the rollouts still running, their marks [n, 1, g, g]) ->
# (normalised xy [n, 2], done probability [n]).
StepFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class Rollout:
    """One image's loop: its marks, the points found so far and why it stopped."""

    marks: np.ndarray  # float32 [1, g, g], the rendered marks of the points below
    mark_sigma: float  # mark radius, grid cells (the model's)
    points_norm: list[tuple[float, float]] = field(default_factory=list)
    done_probs: list[float] = field(default_factory=list)
    stopped_by: str | None = None  # "done" | "max_objects" | "deadline"
    image: Any = None  # what the caller needs to map the points back (the predictor's image)
    features: Any = None  # the image's encoding, kept by callers that step it alone

    @classmethod
    def start(
        cls,
        grid: int,
        mark_sigma: float,
        points_norm: Sequence[Sequence[float]] = (),
        **kwargs: Any,
    ) -> Rollout:
        """A fresh rollout, or one that continues from ``points_norm`` already found."""
        rollout = cls(np.zeros((1, grid, grid), np.float32), mark_sigma, **kwargs)
        for xy in points_norm:
            rollout.mark(xy)
        return rollout

    def mark(self, xy: Sequence[float]) -> None:
        """Record a found point and render its mark."""
        self.points_norm.append((float(xy[0]), float(xy[1])))
        imaging.add_mark(self.marks[0], np.asarray(xy, np.float32), self.mark_sigma)

    def advance(self, xy: Sequence[float], done: float, threshold: float, max_objects: int) -> bool:
        """Take one step's output; True when this image's loop has finished.

        ``done`` above ``threshold`` ends the loop without a point (done cannot switch back
        off); otherwise the point is marked, and ``max_objects`` points end the loop too.
        """
        self.done_probs.append(float(done))
        if done > threshold:
            self.stopped_by = "done"
            return True
        self.mark(xy)
        if len(self.points_norm) >= max_objects:
            self.stopped_by = "max_objects"
            return True
        return False


def run_rollouts(
    rollouts: Sequence[Rollout],
    step: StepFn,
    threshold: float,
    max_objects: int,
    deadline: float | None = None,
) -> None:
    """Step every unfinished rollout together until each has stopped.

    Args:
        step: one batched step for the rollouts at the given indices (see :data:`StepFn`);
            the caller keeps the encodings and selects them by index.
        threshold: done above it stops an image.
        max_objects: an image stops after this many points (a loop that never says done).
        deadline: a ``time.monotonic()`` value; rollouts still running then stop with
            ``stopped_by = "deadline"``.
    """
    active = np.asarray([i for i, r in enumerate(rollouts) if r.stopped_by is None], np.intp)
    while len(active):
        if deadline is not None and time.monotonic() > deadline:
            for i in active:
                rollouts[i].stopped_by = "deadline"
            return
        # One image (a single request's loop): its marks as a batch of one, a view, not
        # a copy; more: stacked (the step needs one contiguous batch).
        if len(active) == 1:
            marks = rollouts[active[0]].marks[None]
        else:
            marks = np.stack([rollouts[i].marks for i in active])
        xy, done = step(active, marks)
        finished = [
            rollouts[i].advance(xy[j], done[j], threshold, max_objects)
            for j, i in enumerate(active)
        ]
        active = active[~np.asarray(finished, bool)]
