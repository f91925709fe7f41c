"""A one-shot density counter beside the loop: the same encoder, data and training run.

A model trained with ``model.count_head=true`` learns a map of the objects still unmarked
(unit-mass Gaussians on the feature grid, ``seqops.training.losses.left_density``). With no
marks (the loop's first step) that map is a density map of every object: summed, it is the
one-shot count of the density counters in the literature (FamNet, LOCA, CounTR); its local
peaks are one-shot points (P2PNet-style). This script scores that one-pass answer on a
prepared split with the evaluate stage's own metrics (``seqops.scoring``), so it stands
beside the loop's row of ``benchmarks/bench_quality.py`` for the same checkpoint::

    .venv/bin/python benchmarks/bench_quality.py --out runs/q-count --config plain \\
        --set model.count_head=true
    .venv/bin/python benchmarks/bench_oneshot.py \\
        --checkpoint runs/q-count/plain/models/best.pt --data runs/q-count/plain/prepared

Peaks: a cell is a point when it is the largest of its 3x3 neighbourhood and that
neighbourhood holds at least half an object's mass; the point is the mass-weighted centre
of the neighbourhood. Prints JSON (and writes it with ``--out``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from seqops import scoring
from seqops.data.manifest import manifest_path, read_manifest
from seqops.imaging import load_image, norm_to_pixels, normalize_pixels, pixels_to_norm
from seqops.io import atomic_write_json
from seqops.rollout import Rollout
from seqops.training.checkpoint import load_model

PEAK_MASS = 0.5  # a 3x3 neighbourhood holding half an object is a point
MATCH_RADIUS_PX = 8.0  # evaluate.match_radius_px of params.yaml


def density_maps(model, pixels: np.ndarray) -> np.ndarray:
    """``[B, g, g]`` density of every object (the count head with no marks)."""
    g = model.spec.grid
    with torch.no_grad():
        features = model.encode(torch.from_numpy(normalize_pixels(pixels)))
        out = model.step(features, torch.zeros(len(pixels), 1, g, g))
    if out.left_map is None:
        raise SystemExit("this checkpoint has no count head: train with model.count_head=true")
    return out.left_map.numpy()


def peaks(density: np.ndarray, image_size: int) -> np.ndarray:
    """One-shot points ``[N, 2]`` (model px): local maxima holding ``PEAK_MASS``."""
    grid = density.shape[-1]
    d = torch.from_numpy(density)[None, None]
    local_max = F.max_pool2d(d, 3, stride=1, padding=1)
    mass = F.avg_pool2d(d, 3, stride=1, padding=1, count_include_pad=False) * 9
    keep = ((d == local_max) & (mass >= PEAK_MASS))[0, 0].numpy()
    centres = (np.arange(grid) + 0.5) / grid * 2.0 - 1.0
    points = []
    for row, col in zip(*np.nonzero(keep), strict=True):
        r0, r1, c0, c1 = max(row - 1, 0), min(row + 2, grid), max(col - 1, 0), min(col + 2, grid)
        window = density[r0:r1, c0:c1]
        ys, xs = np.meshgrid(centres[r0:r1], centres[c0:c1], indexing="ij")
        w = window / window.sum()
        points.append(((xs * w).sum(), (ys * w).sum()))
    return norm_to_pixels(np.asarray(points, np.float32).reshape(-1, 2), image_size)


SNAP_PX = 12.0  # the hybrid loop moves a step's point to a density peak this close


@torch.no_grad()
def hybrid_loop(model, pixels: np.ndarray, max_steps: int, threshold: float) -> list[np.ndarray]:
    """The loop with the density's peaks as its proposals: each step's point moves to the
    nearest peak of the unmarked-object density (within :data:`SNAP_PX`), and the loop also
    stops when no peak is left. Torch, one image at a time (a measurement, not a server)."""
    size, g = model.spec.image_size, model.spec.grid
    features = model.encode(torch.from_numpy(normalize_pixels(pixels)))
    results = []
    for i in range(len(pixels)):
        rollout = Rollout.start(g, model.spec.mark_sigma)
        for _ in range(max_steps):
            out = model.step(features[i : i + 1], torch.from_numpy(rollout.marks[None]))
            found = peaks(out.left_map[0].numpy(), size)
            done = float(torch.sigmoid(out.done_logit[0]))
            if len(found) == 0:
                break
            xy_px = norm_to_pixels(out.xy.numpy(), size)[0]
            distance = np.linalg.norm(found - xy_px, axis=1)
            if distance.min() <= SNAP_PX:
                xy_px = found[distance.argmin()]
            if rollout.advance(pixels_to_norm(xy_px[None], size)[0], done, threshold, max_steps):
                break
        results.append(norm_to_pixels(np.asarray(rollout.points_norm), size))
    return results


def score(checkpoint: Path, data: Path, split: str, batch: int = 16) -> dict:
    """The one-shot count and points of every image of ``split``, scored as evaluate does."""
    model, _ = load_model(checkpoint)
    records = read_manifest(manifest_path(data, split))
    size = model.spec.image_size
    counts, point_counts, truths, matches = [], [], [], []
    hybrid_counts, hybrid_matches = [], []
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        pixels = np.stack([np.asarray(load_image(data / r.image).convert("RGB")) for r in chunk])
        for record, found in zip(chunk, hybrid_loop(model, pixels, 200, 0.5), strict=True):
            hybrid_counts.append(len(found))
            hybrid_matches.append(
                scoring.match_points(found, record.points_array(), MATCH_RADIUS_PX)
            )
        for record, density in zip(chunk, density_maps(model, pixels), strict=True):
            found = peaks(density, size)
            counts.append(round(float(density.sum())))
            point_counts.append(len(found))
            truths.append(record.num_objects)
            matches.append(scoring.match_points(found, record.points_array(), MATCH_RADIUS_PX))
    by_sum = scoring.count_metrics(counts, truths)
    by_peaks = scoring.count_metrics(point_counts, truths)
    located = scoring.localisation_metrics(matches, MATCH_RADIUS_PX)
    by_hybrid = scoring.count_metrics(hybrid_counts, truths)
    hybrid_located = scoring.localisation_metrics(hybrid_matches, MATCH_RADIUS_PX)
    return {
        "checkpoint": str(checkpoint),
        "split": split,
        "num_images": len(records),
        "density_sum": {k: by_sum[k] for k in ("count_exact_acc", "count_mae", "count_bias")},
        "peaks": {k: by_peaks[k] for k in ("count_exact_acc", "count_mae", "count_bias")},
        "points": {k: located[k] for k in ("precision", "recall", "f1", "px_err_median")},
        "hybrid_loop": {
            **{k: by_hybrid[k] for k in ("count_exact_acc", "count_mae", "count_bias")},
            **{k: hybrid_located[k] for k in ("f1", "px_err_median")},
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = score(args.checkpoint, args.data, args.split)
    print(json.dumps(result, indent=2))
    if args.out:
        atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
