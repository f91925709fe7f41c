"""The ``synthetic`` source: a seeded, deterministic generator of countable scenes.

Each scene is a square canvas with a gradient + cloudy + noisy background and
``min_objects..max_objects`` objects of one *kind* (shape, colour, texture, size),
the kind that is counted. Objects of a kind vary in size, rotation and brightness.
Options (``prepare.synthetic``):

- ``clutter``: the share of scenes whose objects may touch and overlap (otherwise
  they are kept apart). Overlap never hides an object's centre: every centre
  stays at least the larger radius away from every other centre.
- ``distractor_share``: the share of scenes with a second kind (another shape
  *and* a clearly different hue) that must not be counted. Distractors are
  fewer than the counted objects (1 to half as many), so without exemplars the
  counted kind is the majority kind; with exemplars it is the exemplified kind.
- ``num_exemplars``: up to that many boxes around counted objects, preferring
  objects that are not occluded (FSC-147 gives three).

A scene depends only on ``(seed, split, index)``: adding scenes or changing
another split's size leaves it unchanged, and splits never share a scene. This module
decides what a scene holds; :mod:`seqops.data.painting` paints it.
"""

from __future__ import annotations

import colorsys
import multiprocessing
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from seqops.config import PrepareConfig, SyntheticConfig
from seqops.data.manifest import SPLITS, Record
from seqops.data.painting import SHAPES, TEXTURES, ObjectKind, paint_background, paint_object
from seqops.data.sources import IssueLog, Sample, encode_png

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

# Share of the canvas covered by objects; a crowded scene is denser (more overlap).
_DENSITY = {False: 0.2, True: 0.32}
_RADIUS_RANGE = (0.016, 0.075)  # object radius bounds, share of the canvas side
_MIN_CONTRAST = 90.0  # RGB distance between an object colour and the background ends
PARALLEL_MIN_SCENES = 64  # fewer scenes are generated in-process (no pool start-up)


@dataclass(frozen=True)
class Scene:
    """One generated scene.

    ``labels`` says which object owns each pixel (the topmost one): 0 is background,
    ``i + 1`` is counted object ``i`` (the row ``i`` of ``points``), and
    ``len(points) + 1 + j`` is distractor ``j``. Tests use it to check that every
    point lies on its own object.
    """

    pixels: np.ndarray  # uint8 [S, S, 3]
    points: np.ndarray  # float64 [N, 2], centres of the counted objects, model px
    exemplars: np.ndarray  # float64 [E, 4], x1 y1 x2 y2 around counted objects
    labels: np.ndarray  # int16 [S, S]
    distractor_points: np.ndarray  # float64 [M, 2]
    info: dict = field(default_factory=dict)  # kinds and options, for Record.extra


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random generator of scene ``index`` of ``split``: depends on nothing else."""
    return np.random.default_rng(
        np.random.SeedSequence([seed % 2**64, SPLIT_CODES[split], int(index)])
    )


def generate_scenes(cfg: PrepareConfig, split: str, count: int) -> Iterator[Scene]:
    """Yield ``count`` scenes of ``split`` with the settings of ``cfg``."""
    for index in range(count):
        rng = scene_rng(cfg.seed, split, index)
        yield generate_scene(rng, cfg.image_size, cfg.min_objects, cfg.max_objects, cfg.synthetic)


def iter_synthetic(cfg: PrepareConfig, issues: IssueLog) -> Iterator[Sample]:
    """The ``synthetic`` source: the scenes of every split, in order, as samples.

    Generated in parallel when there are many. A generated scene is valid by construction,
    so nothing is reported to ``issues``.
    """
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
        yield from map(_scene_sample, jobs)
        return
    context = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
    try:
        yield from pool.map(_scene_sample, jobs, chunksize=16)
    finally:
        # If the stage fails downstream, drop the scenes not started instead of waiting.
        pool.shutdown(wait=True, cancel_futures=True)


def _scene_sample(job: tuple[PrepareConfig, str, int]) -> Sample:
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


def generate_scene(
    rng: np.random.Generator,
    image_size: int,
    min_objects: int,
    max_objects: int,
    cfg: SyntheticConfig,
) -> Scene:
    """Generate one scene; the same generator state always gives the same scene."""
    if min_objects > max_objects:
        raise ValueError(f"min_objects {min_objects} > max_objects {max_objects}")
    layout = _lay_out(rng, image_size, min_objects, max_objects, cfg)
    canvas = paint_background(rng, image_size, layout.bg_ends)
    counted_idx = np.flatnonzero(layout.kind_of == 0)
    distractor_idx = np.flatnonzero(layout.kind_of == 1)
    # Labels as Scene documents them: counted objects first, then the distractors.
    label_of = np.empty(len(layout.kind_of), np.int16)
    label_of[counted_idx] = np.arange(1, len(counted_idx) + 1)
    label_of[distractor_idx] = len(counted_idx) + 1 + np.arange(len(distractor_idx))
    labels, boxes, areas = _paint_objects(canvas, layout, label_of)
    if cfg.noise > 0:
        # Luminance noise: one field for the three channels (a third of the cost of three).
        noise = rng.standard_normal(canvas.shape[:2], dtype=np.float32)
        canvas += noise[:, :, None] * np.float32(cfg.noise * 255)
    pixels = np.clip(canvas, 0, 255).astype(np.uint8)

    visible = np.bincount(labels.ravel(), minlength=len(label_of) + 1)[label_of]
    exemplars = _choose_exemplars(rng, counted_idx, visible / np.maximum(areas, 1), cfg)
    counted, *distractor = layout.kinds
    info = {
        "shape": counted.shape,
        "texture": counted.texture,
        "clutter": layout.clutter,
        "distractor_shape": distractor[0].shape if distractor else None,
        "num_distractors": len(distractor_idx),
    }
    return Scene(
        pixels=pixels,
        points=layout.centres[counted_idx],
        exemplars=boxes[exemplars].reshape(-1, 4),
        labels=labels,
        distractor_points=layout.centres[distractor_idx],
        info=info,
    )


@dataclass(frozen=True)
class _Layout:
    """A scene before painting: its kinds and each object's kind, place, size and pose."""

    clutter: bool
    bg_ends: tuple[np.ndarray, np.ndarray]
    kinds: list[ObjectKind]  # the counted kind, then the distractor kind if the scene has one
    kind_of: np.ndarray  # int [K], index into kinds, in painting order
    centres: np.ndarray  # float64 [K, 2], model px
    radii: np.ndarray  # float64 [K], px
    angles: np.ndarray  # float64 [K], radians
    brightness: np.ndarray  # float64 [K], colour factor


def _lay_out(
    rng: np.random.Generator, size: int, min_objects: int, max_objects: int, cfg: SyntheticConfig
) -> _Layout:
    """Draw the kinds, the object counts and every object's place, size and pose."""
    clutter = bool(rng.random() < cfg.clutter)
    num_counted = int(rng.integers(min_objects, max_objects + 1))
    has_distractors = bool(rng.random() < cfg.distractor_share) and num_counted > 0
    num_distractors = int(rng.integers(1, max(1, num_counted // 2) + 1)) if has_distractors else 0

    bg_ends = _background_colours(rng)
    base = size * np.sqrt(_DENSITY[clutter] / (np.pi * max(1, num_counted + num_distractors)))
    base = float(np.clip(base, _RADIUS_RANGE[0] * size, _RADIUS_RANGE[1] * size))
    counted = _draw_kind(rng, base * rng.uniform(0.8, 1.2), bg_ends, avoid=None)
    kinds = [counted]
    if has_distractors:
        kinds.append(_draw_kind(rng, base * rng.uniform(0.7, 1.3), bg_ends, avoid=counted))

    # Interleave the kinds so that, in clutter, either may lie on top of the other.
    kind_of = np.array([0] * num_counted + [1] * num_distractors)
    kind_of = kind_of[rng.permutation(len(kind_of))]
    radii = np.array([kinds[k].radius for k in kind_of]) * rng.uniform(0.85, 1.15, len(kind_of))
    centres, radii, placed = _place(rng, radii, size, clutter)
    # An object that found no room at all is dropped (not seen in practice at the defaults).
    kind_of, centres, radii = kind_of[placed], centres[placed], radii[placed]
    angles = rng.uniform(0, 2 * np.pi, len(kind_of))
    brightness = rng.uniform(0.88, 1.12, len(kind_of))
    return _Layout(clutter, bg_ends, kinds, kind_of, centres, radii, angles, brightness)


def _paint_objects(
    canvas: np.ndarray, layout: _Layout, label_of: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paint the objects in order; return the label map, each box and each pixel area."""
    size = canvas.shape[0]
    labels = np.zeros((size, size), np.int16)
    boxes = np.zeros((len(label_of), 4))
    areas = np.zeros(len(label_of), np.int64)
    for i, kind in enumerate(layout.kind_of):
        boxes[i], areas[i] = paint_object(
            canvas, labels, layout.kinds[kind], layout.centres[i], layout.radii[i],
            layout.angles[i], layout.brightness[i], int(label_of[i]),
        )  # fmt: skip
    return labels, boxes, areas


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32) * 255


def _background_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two desaturated colours for the gradient ends."""
    hue, sat, val = rng.random(), rng.uniform(0, 0.35), rng.uniform(0.25, 0.85)
    other = _hsv(hue + rng.uniform(-0.1, 0.1), sat, np.clip(val + rng.uniform(-0.3, 0.3), 0.1, 1))
    return _hsv(hue, sat, val), other


def _draw_kind(
    rng: np.random.Generator, radius: float, bg_ends: tuple, avoid: ObjectKind | None
) -> ObjectKind:
    """A kind that stands out from the background and, for distractors, from ``avoid``."""
    shapes = [s for s in SHAPES if avoid is None or s != avoid.shape]
    shape = shapes[int(rng.integers(len(shapes)))]
    avoid_hue = colorsys.rgb_to_hsv(*(avoid.colour / 255))[0] if avoid is not None else None
    colour = _hsv(0, 0, 1)
    for _ in range(50):
        hue = rng.random()
        if avoid_hue is not None:
            # Distractor hues keep at least 0.2 of the colour circle away from the counted hue.
            hue = avoid_hue + rng.uniform(0.2, 0.8)
        colour = _hsv(hue, rng.uniform(0.55, 1.0), rng.uniform(0.5, 1.0))
        if min(np.linalg.norm(colour - end) for end in bg_ends) >= _MIN_CONTRAST:
            break
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    return ObjectKind(shape, colour, texture, radius, float(rng.uniform(0, np.pi)))


def _place(
    rng: np.random.Generator, radii: np.ndarray, size: int, clutter: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rejection-sample centres, a batch of candidates at a time.

    Apart: centres at least ``r_i + r_j + gap`` away (no contact). Clutter: at least
    ``max(r_i, r_j) + 2``, so shapes overlap but no centre is covered. An object that
    finds no room shrinks, then may touch others (rare: only in the densest scenes).
    Returns ``(centres, radii, placed)``; an object is dropped only if all that fails.
    """
    radii = radii.copy()
    centres = np.zeros((len(radii), 2))
    placed = np.zeros(len(radii), bool)
    for i in range(len(radii)):
        for attempt in range(20):
            r = radii[i]
            low, high = r + 1.0, size - r - 1.0
            candidates = rng.uniform(low, high, (64, 2))
            others, other_r = centres[placed], radii[placed]
            dist = np.hypot(*(candidates[:, None, :] - others[None, :, :]).transpose(2, 0, 1))
            if clutter or attempt >= 12:
                need = np.maximum(r, other_r) + 2.0
            else:
                need = r + other_r + np.maximum(2.0, 0.15 * (r + other_r))
            ok = np.flatnonzero((dist >= need[None, :]).all(1))
            if len(ok):
                centres[i] = np.round(candidates[ok[0]], 2)
                placed[i] = True
                break
            if 3 <= attempt < 12:
                radii[i] = max(3.0, r * 0.85)  # no room at this size: try smaller
    return centres, radii, placed


def _choose_exemplars(
    rng: np.random.Generator,
    counted_idx: np.ndarray,
    visible_share: np.ndarray,
    cfg: SyntheticConfig,
) -> np.ndarray:
    """Indices (into all objects) of up to ``num_exemplars`` counted objects, unoccluded first."""
    if cfg.num_exemplars == 0 or len(counted_idx) == 0:
        return np.zeros(0, np.int64)
    shuffled = counted_idx[rng.permutation(len(counted_idx))]
    # Stable sort: fully visible objects (>= 90 % of their pixels) first, in random order.
    rank = np.argsort(visible_share[shuffled] < 0.9, kind="stable")
    return shuffled[rank][: cfg.num_exemplars]
