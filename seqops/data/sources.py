"""What every source importer shares: the samples it yields, the log it reports bad input to.

A source (synthetic, FSC-147, COCO, ...) is a module with a function
``iter_<name>(cfg: PrepareConfig, issues: IssueLog) -> Iterator[Sample]``, registered
under its ``prepare.source`` name in :data:`seqops.data.prepare.SOURCES`. It imports what
it needs from here (image loading, point checks, the exemplar-box mapping) and nothing
from :mod:`seqops.data.prepare`, which imports the sources.

Bad input is reported with the file and the reason. ``prepare.on_error = skip`` logs a
warning, skips the item and counts it by reason in ``stats.json``; ``fail`` raises
:class:`PrepareError` at the first one. A malformed annotation file (invalid JSON, a
missing or mistyped field) is always an error. Items that are valid but outside the
requested data (too few or too many objects, another class) are *filtered*, counted apart
from the skipped ones.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from seqops.config import PrepareConfig
from seqops.contract import MAX_EXEMPLARS
from seqops.data.manifest import Record
from seqops.imaging import ImageError, load_image, resize_for_model

log = logging.getLogger(__name__)

DUPLICATE_TOLERANCE_PX = 1.0  # two points closer than this (original px) are one object twice
MAX_LISTED_ISSUES = 20  # skipped items listed by name in stats.json
PNG_COMPRESS_LEVEL = 1  # fast; level 9 saves ~10 % of the size at 10x the time


class PrepareError(ValueError):
    """Bad input under ``on_error = fail``, or a malformed annotation file (names file, field)."""


@dataclass
class IssueLog:
    """Collects bad input: raises under ``on_error = fail``, counts and logs under ``skip``."""

    on_error: str = "skip"
    skipped: Counter = field(default_factory=Counter)
    items: list = field(default_factory=list)  # the first MAX_LISTED_ISSUES, with file + reason
    filtered: Counter = field(default_factory=Counter)
    ignored: Counter = field(default_factory=Counter)  # annotation parts that are no objects

    def report(self, file: str | Path, reason: str, detail: str = "") -> None:
        """Report a bad item (``reason`` is a snake_case key such as ``missing_image``)."""
        message = f"{file}: {reason.replace('_', ' ')}" + (f" ({detail})" if detail else "")
        if self.on_error == "fail":
            raise PrepareError(f"{message}; prepare.on_error=skip would skip it and go on")
        log.warning("skipped: %s", message)
        self.skipped[reason] += 1
        if len(self.items) < MAX_LISTED_ISSUES:
            self.items.append({"file": str(file), "reason": reason, "detail": detail})

    def filter(self, reason: str) -> None:
        """Count a valid item left out by a filter (not an error)."""
        self.filtered[reason] += 1

    def ignore(self, reason: str, count: int = 1) -> None:
        """Count parts of a valid annotation that are not objects (a LabelMe polygon, ...)."""
        self.ignored[reason] += count


@dataclass(frozen=True)
class Sample:
    """One record with its image, as a source yields it to :func:`~seqops.data.prepare.run_prepare`.

    ``record.points`` are in model pixels, in any order (prepare orders them);
    ``record.image`` is filled in by prepare from ``split`` and ``image_name``.
    Records of one image (COCO: one per category) share ``image_name`` and ``png``.
    """

    split: str
    image_name: str
    png: bytes
    record: Record


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG-encode uint8 ``[H, W, 3]`` pixels (deterministic bytes for the same pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def read_json_file(path: Path, what: str) -> Any:
    """Read a JSON annotation file; a missing or invalid file is a :class:`PrepareError`."""
    if not path.is_file():
        raise PrepareError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PrepareError(f"{path}: {what} is not valid JSON ({exc})") from None


def load_for_model(
    path: Path, size: int, issues: IssueLog
) -> tuple[np.ndarray, tuple[int, int], tuple[float, float]] | None:
    """Load an image and resize it to the model input; report a missing or corrupt one.

    Returns:
        ``(pixels, (width, height), (scale_x, scale_y))``, or None after reporting.
    """
    if not path.is_file():
        issues.report(path, "missing_image", "file not found")
        return None
    try:
        image = load_image(path)
    except ImageError as exc:
        issues.report(path, "corrupt_image", str(exc).removeprefix(f"{path}: "))
        return None
    pixels, scale = resize_for_model(image, size)
    return pixels, image.size, scale


def find_point_problem(points: np.ndarray, width: int, height: int) -> tuple[str, str] | None:
    """Return ``(reason, detail)`` for points outside ``[0, W] x [0, H]`` or duplicated."""
    if len(points) == 0:
        return "no_points", "the entry has no points"
    outside = (points[:, 0] < 0) | (points[:, 0] > width) | (points[:, 1] < 0)
    outside |= points[:, 1] > height
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        x, y = points[i]
        return "point_outside_image", f"point {i} ({x:g}, {y:g}) outside {width}x{height}"
    order = np.lexsort((points[:, 1], points[:, 0]))
    p = points[order]
    # A near neighbour in x is adjacent in this sort or a few rows later; compare all
    # pairs within the x tolerance window (cheap: points are few at each x).
    for a in range(len(p)):
        b = a + 1
        while b < len(p) and p[b, 0] - p[a, 0] < DUPLICATE_TOLERANCE_PX:
            if np.hypot(*(p[b] - p[a])) < DUPLICATE_TOLERANCE_PX:
                i, j = sorted((int(order[a]), int(order[b])))
                return "duplicate_points", (
                    f"points {i} and {j} at ({p[a, 0]:g}, {p[a, 1]:g}) are one object twice"
                )
            b += 1
    return None


def passes_count_filter(num_objects: int, cfg: PrepareConfig, issues: IssueLog) -> bool:
    """Apply ``min_objects``/``max_objects`` (counting what is filtered out)."""
    if num_objects < cfg.min_objects:
        issues.filter("too_few_objects")
        return False
    if num_objects > cfg.max_objects:
        issues.filter("too_many_objects")
        return False
    return True


def to_model_boxes(boxes: np.ndarray, scale: tuple[float, float], size: int) -> tuple:
    """Original-pixel boxes ``[E, 4]`` -> model-pixel tuples, clipped to the image.

    Only the first :data:`~seqops.contract.MAX_EXEMPLARS` are kept: a model takes no more.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)[:MAX_EXEMPLARS]
    boxes = np.clip(boxes * np.array([scale[0], scale[1], scale[0], scale[1]]), 0, size)
    return tuple(tuple(round(float(v), 2) for v in b) for b in boxes)
