"""Canonical object orders: which object is "the next one".

The network is trained to predict the next object of a sequence, so the sequence
must be well defined. Three orders are offered (``prepare.order``):

- ``reading_order``: rows of ``row_height`` pixels from the top (row index
  ``floor(y / row_height)``, as the research code computes it), left to right
  within a row. The research default, with rows of 50 px at 384.
- ``left_to_right``: by x, ties by y.
- ``nearest_neighbor``: start at the object nearest the top-left corner, then
  repeatedly the nearest object not yet visited.

Ties are broken deterministically: by y, then x, then the input index, so the
same points always give the same order.
"""

from __future__ import annotations

import numpy as np

ORDERS = ("reading_order", "left_to_right", "nearest_neighbor")


def order_indices(points_px: np.ndarray, order: str, row_height: float = 50.0) -> np.ndarray:
    """Return the permutation that sorts ``points_px`` into the canonical ``order``.

    Args:
        points_px: ``[N, 2]`` ``(x, y)`` in pixels (model or original: only relative
            positions and ``row_height`` matter, so use the same units for both).
        order: one of :data:`ORDERS`.
        row_height: row height of ``reading_order``, in the units of ``points_px``.

    Returns:
        int64 ``[N]`` indices: ``points_px[result]`` is the ordered sequence.
    """
    points = np.asarray(points_px, np.float64).reshape(-1, 2)
    x, y = points[:, 0], points[:, 1]
    index = np.arange(len(points))
    if order == "reading_order":
        if row_height <= 0:
            raise ValueError(f"row_height must be > 0, got {row_height}")
        row = np.floor(y / row_height)
        # np.lexsort sorts by the last key first: row, then x, then y, then input index.
        return np.lexsort((index, y, x, row))
    if order == "left_to_right":
        return np.lexsort((index, y, x))
    if order == "nearest_neighbor":
        return _nearest_neighbor_indices(points)
    raise ValueError(f"unknown order {order!r} (known: {', '.join(ORDERS)})")


def order_points(points_px: np.ndarray, order: str, row_height: float = 50.0) -> np.ndarray:
    """Return ``points_px`` (``[N, 2]``) sorted into the canonical ``order``."""
    points = np.asarray(points_px, np.float64).reshape(-1, 2)
    return points[order_indices(points, order, row_height)]


def _nearest_neighbor_indices(points: np.ndarray) -> np.ndarray:
    """Greedy nearest-neighbour tour from the point nearest the top-left corner."""
    n = len(points)
    if n == 0:
        return np.zeros(0, np.int64)
    # Visit candidates in (y, x, index) order so that np.argmin's "first minimum wins"
    # breaks exact distance ties towards the upper, then the left point.
    presort = np.lexsort((np.arange(n), points[:, 0], points[:, 1]))
    p = points[presort]
    visited = np.zeros(n, bool)
    tour = np.empty(n, np.int64)
    current = int(np.argmin(np.hypot(p[:, 0], p[:, 1])))
    for step in range(n):
        tour[step] = current
        visited[current] = True
        if step == n - 1:
            break
        # One row of distances per step: O(N) memory even for dense FSC-147 images.
        dist = np.hypot(p[:, 0] - p[current, 0], p[:, 1] - p[current, 1])
        dist[visited] = np.inf
        current = int(np.argmin(dist))
    return presort[tour]
