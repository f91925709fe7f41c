"""The ``prepare`` stage: turn a source (synthetic, FSC-147, COCO, points) into a dataset.

``run_prepare(params, out_dir)`` writes the directory documented in
:mod:`seqops.data.manifest` inside :func:`seqops.io.atomic_directory`: a failure
leaves no half-written dataset and a previous one untouched.

The records come from the source named by ``prepare.source``, looked up in
:data:`SOURCES`; what sources share (:class:`~seqops.data.sources.Sample`, the
:class:`~seqops.data.sources.IssueLog` of bad input) is in :mod:`seqops.data.sources`.
Prepare orders each record's points, writes the images and manifests, and sums up.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from seqops.config import Params, PrepareConfig
from seqops.data.balance import research_done_share, sampled_done_share
from seqops.data.coco import iter_coco
from seqops.data.fsc147 import iter_fsc147
from seqops.data.manifest import SPLITS, Record, manifest_path, write_manifest
from seqops.data.ordering import order_indices
from seqops.data.points import iter_points
from seqops.data.sources import IssueLog, PrepareError, Sample
from seqops.data.synthetic import iter_synthetic
from seqops.io import atomic_directory, atomic_write_json

log = logging.getLogger(__name__)

HISTOGRAM_BIN = 5  # objects-per-image histogram bucket width
HISTOGRAM_CAP = 100  # counts from here on share one "100+" bucket
PROGRESS_EVERY = 250  # records between progress log lines

# prepare.source -> the source's samples. A new source is a module with such a function,
# registered here (and named in PrepareConfig.source, which a test keeps in step).
SOURCES: dict[str, Callable[[PrepareConfig, IssueLog], Iterator[Sample]]] = {
    "synthetic": iter_synthetic,
    "fsc147": iter_fsc147,
    "coco": iter_coco,
    "points": iter_points,
}


def iter_samples(cfg: PrepareConfig, issues: IssueLog) -> Iterator[Sample]:
    """Yield the samples of ``cfg.source``, reporting bad input to ``issues``."""
    source = SOURCES.get(cfg.source)
    if source is None:
        raise PrepareError(
            f"prepare.source: unknown source {cfg.source!r} (known: {list(SOURCES)})"
        )
    return source(cfg, issues)


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
        "ignored": dict(sorted(issues.ignored.items())),
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
    with atomic_directory(out_dir) as tmp:
        records = _write_images(iter_samples(cfg, issues), tmp, cfg, issues)
        for split in SPLITS:
            write_manifest(manifest_path(tmp, split), records[split])
        atomic_write_json(tmp / "dataset.json", describe_dataset(records, cfg))
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


def _write_images(
    samples: Iterator[Sample], out_dir: Path, cfg: PrepareConfig, issues: IssueLog
) -> dict[str, list[Record]]:
    """Finish each sample's record and write its image once; the records by split."""
    records: dict[str, list[Record]] = {split: [] for split in SPLITS}
    written: set[str] = set()
    ids: set[tuple[str, str]] = set()
    start = time.perf_counter()
    for sample in samples:
        record = _finish_record(sample, cfg)
        if (sample.split, record.id) in ids:
            issues.report(record.source or record.id, "duplicate_entry", f"id {record.id}")
            continue
        ids.add((sample.split, record.id))
        if record.image not in written:  # records of one image (COCO categories) share it
            path = out_dir / record.image
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(sample.png)
            written.add(record.image)
        records[sample.split].append(record)
        if len(ids) % PROGRESS_EVERY == 0:
            log.info("prepare: %d records (%.1f s)", len(ids), time.perf_counter() - start)
    return records


def describe_dataset(records: dict[str, list[Record]], cfg: PrepareConfig) -> dict:
    """The content of ``dataset.json``: what readers of the dataset need to know about it."""
    all_records = [r for recs in records.values() for r in recs]
    return {
        "source": cfg.source,
        "image_size": cfg.image_size,
        "order": cfg.order,
        "row_height": cfg.row_height,
        "splits": {split: len(records[split]) for split in SPLITS},
        "exemplars": any(r.exemplars for r in all_records),
        "max_exemplars": max((len(r.exemplars) for r in all_records), default=0),
        "prepare": cfg.model_dump(mode="json"),
    }
