"""A prepared dataset's ``stats.json`` as a short text, for people (``seqops data stats``)."""

from __future__ import annotations

from typing import Any


def _histogram_line(histogram: dict[str, int]) -> str:
    """The non-empty bins of an objects-per-image histogram on one line."""
    return ", ".join(f"{bins}: {n}" for bins, n in histogram.items() if n) or "empty"


def stats_text(stats: dict[str, Any], where: str = "") -> str:
    """The dataset, each split's images and objects, the done share and what was skipped."""
    head = f"{where}: " if where else ""
    lines = [
        f"{head}{stats.get('images', 0)} images, {stats.get('objects', 0)} objects "
        f"(source {stats.get('source')}, {stats.get('image_size')} px, "
        f"order {stats.get('order')})"
    ]
    for name, split in stats.get("splits", {}).items():
        lines.append(
            f"  {name:<5} {split['images']:>6} images, objects per image mean "
            f"{split['objects_mean']:.1f} (min {split['objects_min']}, max {split['objects_max']})"
        )
        lines.append(f"        per image: {_histogram_line(split.get('histogram', {}))}")
    done = stats.get("done_share")
    if done and done.get("sampled") is not None:  # None: no training images to sample
        lines.append(
            f"  done=1 share of {done['split']} steps under the training sampling: "
            f"{done['sampled']:.1%} (`seqops data balance` explains it)"
        )
    skipped = stats.get("skipped_total", 0)
    reasons = ", ".join(f"{k}: {v}" for k, v in stats.get("skipped", {}).items())
    lines.append(f"  skipped: {skipped}" + (f" ({reasons})" if reasons else ""))
    filtered = stats.get("filtered", {})
    if filtered:
        lines.append("  filtered: " + ", ".join(f"{k}: {v}" for k, v in filtered.items()))
    ignored = stats.get("ignored", {})
    if ignored:
        lines.append("  ignored: " + ", ".join(f"{k}: {v}" for k, v in ignored.items()))
    return "\n".join(lines)
