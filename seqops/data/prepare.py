"""The ``prepare`` stage: turn a source (synthetic, FSC-147, COCO) into a prepared dataset.

``run_prepare(params, out_dir)`` writes the directory documented in
:mod:`seqops.data.manifest` inside :func:`seqops.io.atomic_directory`: a failure
leaves no half-written dataset and a previous one untouched.

Bad input is reported with the file and the reason. ``prepare.on_error = skip``
logs a warning, skips the item and counts it by reason in ``stats.json``;
``fail`` raises :class:`PrepareError` at the first one. A malformed annotation
file (invalid JSON, a missing or mistyped field) is always an error. Items that
are valid but outside the requested data (too few or too many objects, another
class) are *filtered*, counted apart from the skipped ones.

This module also holds what the importers share (:class:`IssueLog`,
:class:`Sample`, image loading, point checks); they import it, and it imports
them lazily in :func:`iter_samples`.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from seqops.config import Params, PrepareConfig
from seqops.data.balance import research_done_share, sampled_done_share
from seqops.data.manifest import SPLITS, Record, manifest_path, write_manifest
from seqops.data.ordering import order_indices
from seqops.data.synthetic import generate_scene, scene_rng
from seqops.imaging import ImageError, load_image, resize_for_model
from seqops.io import atomic_directory, atomic_write_json

log = logging.getLogger(__name__)

MAX_EXEMPLARS = 3  # exemplar boxes kept per record (FSC-147 gives three)
DUPLICATE_TOLERANCE_PX = 1.0  # two points closer than this (original px) are one object twice
MAX_LISTED_ISSUES = 20  # skipped items listed by name in stats.json
HISTOGRAM_BIN = 5  # objects-per-image histogram bucket width
HISTOGRAM_CAP = 100  # counts from here on share one "100+" bucket
PNG_COMPRESS_LEVEL = 1  # fast; level 9 saves ~10 % of the size at 10x the time
PARALLEL_MIN_SCENES = 64  # fewer synthetic scenes are generated in-process (no pool start-up)


class PrepareError(ValueError):
    """Bad input under ``on_error = fail``, or a malformed annotation file (names file, field)."""


@dataclass
class IssueLog:
    """Collects bad input: raises under ``on_error = fail``, counts and logs under ``skip``."""

    on_error: str = "skip"
    skipped: Counter = field(default_factory=Counter)
    items: list = field(default_factory=list)  # the first MAX_LISTED_ISSUES, with file + reason
    filtered: Counter = field(default_factory=Counter)

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


@dataclass(frozen=True)
class Sample:
    """One record with its image, as an importer yields it to :func:`run_prepare`.

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
    """Original-pixel boxes ``[E, 4]`` -> model-pixel tuples, clipped to the image."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)[:MAX_EXEMPLARS]
    boxes = np.clip(boxes * np.array([scale[0], scale[1], scale[0], scale[1]]), 0, size)
    return tuple(tuple(round(float(v), 2) for v in b) for b in boxes)


# --- synthetic -------------------------------------------------------------------------


def _synthetic_sample(job: tuple[PrepareConfig, str, int]) -> Sample:
    """Generate and encode one scene (runs in a worker process)."""
    cfg, split, index = job
    scene = generate_scene(
        scene_rng(cfg.seed, split, index),
        cfg.image_size,
        cfg.min_objects,
        cfg.max_objects,
        cfg.synthetic,
    )
    scene_id = f"{split}-{index:06d}"
    record = Record(
        id=scene_id,
        image="",
        points=tuple((float(x), float(y)) for x, y in scene.points),
        exemplars=tuple(tuple(round(float(v), 2) for v in b) for b in scene.exemplars),
        orig_size=(cfg.image_size, cfg.image_size),
        scale=(1.0, 1.0),
        source="synthetic",
        extra=scene.info,
    )
    return Sample(split, scene_id, encode_png(scene.pixels), record)


def _iter_synthetic(cfg: PrepareConfig) -> Iterator[Sample]:
    """Scenes of every split, in order; generated in parallel when there are many."""
    jobs = [
        (cfg, split, index)
        for split, count in zip(SPLITS, (cfg.num_train, cfg.num_val, cfg.num_test), strict=True)
        for index in range(count)
    ]
    # Each scene depends only on (seed, split, index), so workers change speed, not output.
    # Workers are forked: no re-import of __main__ (spawn breaks scripts without a main
    # guard), and no start-up cost. Forking is only safe without other threads (a lock
    # held by another thread stays locked in the child), so threaded callers run serially.
    workers = min(os.cpu_count() or 1, 4)
    can_fork = "fork" in multiprocessing.get_all_start_methods()
    if (
        workers < 2
        or len(jobs) < PARALLEL_MIN_SCENES
        or not can_fork
        or threading.active_count() > 1
    ):
        yield from map(_synthetic_sample, jobs)
        return
    context = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
    try:
        yield from pool.map(_synthetic_sample, jobs, chunksize=16)
    finally:
        # If the stage fails downstream, drop the scenes not started instead of waiting.
        pool.shutdown(wait=True, cancel_futures=True)


def iter_samples(cfg: PrepareConfig, issues: IssueLog) -> Iterator[Sample]:
    """Yield the samples of ``cfg.source``, reporting bad input to ``issues``."""
    if cfg.source == "synthetic":
        return _iter_synthetic(cfg)
    # Imported here: the importers import IssueLog, Sample and the helpers above.
    if cfg.source == "fsc147":
        from seqops.data.fsc147 import iter_fsc147

        return iter_fsc147(cfg, issues)
    if cfg.source == "coco":
        from seqops.data.coco import iter_coco

        return iter_coco(cfg, issues)
    raise PrepareError(f"prepare.source: unknown source {cfg.source!r}")


# --- the stage -------------------------------------------------------------------------


def _finish_record(sample: Sample, cfg: PrepareConfig) -> Record:
    """Order the points canonically and point the record at its image file."""
    points = np.round(np.asarray(sample.record.points, np.float64).reshape(-1, 2), 3)
    points = points[order_indices(points, cfg.order, cfg.row_height)]
    return replace(
        sample.record,
        image=f"images/{sample.split}/{sample.image_name}.png",
        points=tuple((float(x), float(y)) for x, y in points),
    )


def histogram(counts: list[int]) -> dict[str, int]:
    """Objects-per-image histogram in buckets of :data:`HISTOGRAM_BIN` (``"5-9"``, ...)."""
    if not counts:
        return {}
    bins = Counter(min(n, HISTOGRAM_CAP) // HISTOGRAM_BIN for n in counts)
    out = {}
    for b in range(max(bins) + 1):
        low = b * HISTOGRAM_BIN
        label = f"{low}+" if low >= HISTOGRAM_CAP else f"{low}-{low + HISTOGRAM_BIN - 1}"
        out[label] = bins.get(b, 0)
    return out


def summarize(records: dict[str, list[Record]], params: Params, issues: IssueLog) -> dict:
    """The content of ``stats.json``."""
    cfg, sampling = params.prepare, params.sampling
    splits = {}
    for split, recs in records.items():
        counts = [r.num_objects for r in recs]
        splits[split] = {
            "images": len(recs),
            "objects": sum(counts),
            "objects_mean": round(sum(counts) / len(counts), 3) if counts else 0.0,
            "objects_min": min(counts, default=0),
            "objects_max": max(counts, default=0),
            "histogram": histogram(counts),
        }
    train_counts = [r.num_objects for r in records["train"]]
    sampled, research = (
        sampled_done_share(train_counts, sampling),
        research_done_share(train_counts),
    )
    return {
        "source": cfg.source,
        "image_size": cfg.image_size,
        "order": cfg.order,
        "images": sum(s["images"] for s in splits.values()),
        "objects": sum(s["objects"] for s in splits.values()),
        "splits": splits,
        "done_share": {
            "split": "train",
            "sampled": None if sampled is None else round(sampled, 4),
            "research": None if research is None else round(research, 4),
            "steps_per_image": sampling.steps_per_image,
            "done_share": sampling.done_share,
        },
        "skipped": dict(sorted(issues.skipped.items())),
        "skipped_total": sum(issues.skipped.values()),
        "skipped_items": issues.items,
        "filtered": dict(sorted(issues.filtered.items())),
    }


def run_prepare(params: Params, out_dir: str | Path) -> dict:
    """Prepare the dataset of ``params.prepare`` into ``out_dir`` (replaced atomically).

    Returns:
        The statistics also written to ``stats.json``.

    Raises:
        PrepareError: a malformed annotation file, or any bad input under ``on_error=fail``.
    """
    cfg = params.prepare
    if cfg.min_objects > cfg.max_objects:
        raise PrepareError(
            f"prepare.min_objects ({cfg.min_objects}) > prepare.max_objects ({cfg.max_objects})"
        )
    out_dir = Path(out_dir)
    issues = IssueLog(cfg.on_error)
    start = time.perf_counter()
    log.info("prepare: source %s -> %s", cfg.source, out_dir)
    records: dict[str, list[Record]] = {split: [] for split in SPLITS}
    with atomic_directory(out_dir) as tmp:
        written: set[str] = set()
        ids: set[tuple[str, str]] = set()
        for sample in iter_samples(cfg, issues):
            record = _finish_record(sample, cfg)
            if (sample.split, record.id) in ids:
                issues.report(record.source or record.id, "duplicate_entry", f"id {record.id}")
                continue
            ids.add((sample.split, record.id))
            if record.image not in written:
                path = tmp / record.image
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(sample.png)
                written.add(record.image)
            records[sample.split].append(record)
            if len(ids) % 250 == 0:
                log.info("prepare: %d records (%.1f s)", len(ids), time.perf_counter() - start)
        for split in SPLITS:
            write_manifest(manifest_path(tmp, split), records[split])
        all_records = [r for recs in records.values() for r in recs]
        atomic_write_json(
            tmp / "dataset.json",
            {
                "source": cfg.source,
                "image_size": cfg.image_size,
                "order": cfg.order,
                "row_height": cfg.row_height,
                "splits": {split: len(records[split]) for split in SPLITS},
                "exemplars": any(r.exemplars for r in all_records),
                "max_exemplars": max((len(r.exemplars) for r in all_records), default=0),
                "prepare": cfg.model_dump(mode="json"),
            },
        )
        stats = summarize(records, params, issues)
        atomic_write_json(tmp / "stats.json", stats)
    log.info(
        "prepare: %d images, %d objects, %d skipped, in %.1f s -> %s",
        stats["images"],
        stats["objects"],
        stats["skipped_total"],
        time.perf_counter() - start,
        out_dir,
    )
    return stats
