"""A seeded, deterministic generator of countable scenes.

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
another split's size leaves it unchanged, and splits never share a scene.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from seqops.config import PrepareConfig, SyntheticConfig


def _regular(n: int, phase: float = -np.pi / 2) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(angles), np.sin(angles)], 1)


def _star(tips: int = 5, inner: float = 0.45) -> np.ndarray:
    radii = np.where(np.arange(2 * tips) % 2 == 0, 1.0, inner)
    return _regular(2 * tips) * radii[:, None]


def _cross(arm: float = 0.3, length: float = 0.95) -> np.ndarray:
    """A plus sign: one arm's end and the inner corner after it, turned four times."""
    quarter = np.array([[-arm, -length], [arm, -length], [arm, -arm]])
    turn = np.array([[0, 1], [-1, 0]])  # (x, y) -> (-y, x): 90 degrees
    parts = [quarter]
    for _ in range(3):
        parts.append(parts[-1] @ turn)
    return np.concatenate(parts)


# Unit polygons: every vertex within radius 1 of the centre, and every shape contains
# its centre (the annotated point), so a point is always on its object.
SHAPES: dict[str, np.ndarray] = {
    "circle": _regular(32, phase=0.0),
    "ellipse": _regular(32, phase=0.0) * np.array([1.0, 0.55]),
    "square": _regular(4, phase=np.pi / 4),
    "triangle": _regular(3),
    "diamond": np.array([[0.0, -1.0], [0.62, 0.0], [0.0, 1.0], [-0.62, 0.0]]),
    "star": _star(),
    "hexagon": _regular(6),
    "cross": _cross(),
}
TEXTURES = ("solid", "stripes", "dots", "checker", "shaded")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

# Share of the canvas covered by objects; a crowded scene is denser (more overlap).
_DENSITY = {False: 0.2, True: 0.32}
_RADIUS_RANGE = (0.016, 0.075)  # object radius bounds, share of the canvas side
_MIN_CONTRAST = 90.0  # RGB distance between an object colour and the background ends


@dataclass(frozen=True)
class _Kind:
    shape: str
    colour: np.ndarray  # float32 RGB, 0..255
    texture: str
    radius: float  # mean radius, px
    pattern_angle: float


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
    size = image_size
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

    canvas = _background(rng, size, bg_ends)
    labels = np.zeros((size, size), np.int16)
    counted_idx = np.flatnonzero(kind_of == 0)
    distractor_idx = np.flatnonzero(kind_of == 1)
    label_of = np.empty(len(kind_of), np.int16)
    label_of[counted_idx] = np.arange(1, len(counted_idx) + 1)
    label_of[distractor_idx] = len(counted_idx) + 1 + np.arange(len(distractor_idx))
    boxes = np.zeros((len(kind_of), 4))
    areas = np.zeros(len(kind_of), np.int64)
    for i in range(len(kind_of)):
        boxes[i], areas[i] = _draw_object(
            canvas, labels, kinds[kind_of[i]], centres[i], radii[i], angles[i], brightness[i],
            int(label_of[i]),
        )  # fmt: skip
    if cfg.noise > 0:
        # Luminance noise: one field for the three channels (a third of the cost of three).
        noise = rng.standard_normal((size, size), dtype=np.float32) * np.float32(cfg.noise * 255)
        canvas += noise[:, :, None]
    pixels = np.clip(canvas, 0, 255).astype(np.uint8)

    visible = np.bincount(labels.ravel(), minlength=len(kind_of) + 1)[label_of]
    exemplars = _choose_exemplars(rng, counted_idx, visible / np.maximum(areas, 1), cfg)
    info = {
        "shape": counted.shape,
        "texture": counted.texture,
        "clutter": clutter,
        "distractor_shape": kinds[1].shape if has_distractors else None,
        "num_distractors": len(distractor_idx),
    }
    return Scene(
        pixels=pixels,
        points=centres[counted_idx],
        exemplars=boxes[exemplars].reshape(-1, 4),
        labels=labels,
        distractor_points=centres[distractor_idx],
        info=info,
    )


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32) * 255


def _background_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two desaturated colours for the gradient ends."""
    hue, sat, val = rng.random(), rng.uniform(0, 0.35), rng.uniform(0.25, 0.85)
    other = _hsv(hue + rng.uniform(-0.1, 0.1), sat, np.clip(val + rng.uniform(-0.3, 0.3), 0.1, 1))
    return _hsv(hue, sat, val), other


def _draw_kind(
    rng: np.random.Generator, radius: float, bg_ends: tuple, avoid: _Kind | None
) -> _Kind:
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
    return _Kind(shape, colour, texture, radius, float(rng.uniform(0, np.pi)))


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


def _background(rng: np.random.Generator, size: int, ends: tuple) -> np.ndarray:
    """A linear gradient between two colours with soft low-frequency blotches, float32.

    Both are smooth, so they are computed on a coarse grid and upsampled (fast).
    """
    coarse = 24
    angle = rng.uniform(0, 2 * np.pi)
    coords = (np.arange(coarse, dtype=np.float32) + 0.5) / coarse
    t = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    start, end = ends
    small = start[None, None, :] + (end - start)[None, None, :] * t[:, :, None]
    clouds = Image.fromarray(rng.random((6, 6)).astype(np.float32), mode="F")
    clouds = np.asarray(clouds.resize((coarse, coarse), Image.Resampling.BILINEAR))
    small += (clouds[:, :, None] - 0.5) * np.float32(rng.uniform(10, 50))
    image = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8))
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), np.float32)


def _draw_object(
    canvas: np.ndarray,
    labels: np.ndarray,
    kind: _Kind,
    centre: np.ndarray,
    radius: float,
    angle: float,
    brightness: float,
    label: int,
) -> tuple[np.ndarray, int]:
    """Paint one object onto ``canvas`` and ``labels``; return its box and pixel area."""
    size = canvas.shape[0]
    cos, sin = np.cos(angle), np.sin(angle)
    verts = SHAPES[kind.shape] @ np.array([[cos, sin], [-sin, cos]]) * radius + centre
    (left, top), (right, bottom) = verts.min(0).tolist(), verts.max(0).tolist()
    x0, y0 = max(math.floor(left) - 1, 0), max(math.floor(top) - 1, 0)
    x1, y1 = min(math.ceil(right) + 2, size), min(math.ceil(bottom) + 2, size)
    # PIL puts integer coordinates at pixel centres; ours are continuous (pixel i is [i, i+1)).
    local = (verts - [x0 + 0.5, y0 + 0.5]).ravel().tolist()
    mask_image = Image.new("L", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(mask_image).polygon(local, fill=1, outline=2)
    mask = np.asarray(mask_image)
    fill, edge = mask == 1, mask == 2

    colour = np.minimum(kind.colour * np.float32(brightness), 255)
    region = canvas[y0:y1, x0:x1]
    region[fill] = _texture(kind, colour, x0, y0, x1, y1, centre, radius, angle)[fill]
    region[edge] = colour * 0.45  # a darker outline separates touching objects
    labels[y0:y1, x0:x1][fill | edge] = label
    box = np.array([max(left, 0.0), max(top, 0.0), min(right, size), min(bottom, size)])
    return box, int(fill.sum() + edge.sum())


def _texture(kind: _Kind, colour: np.ndarray, x0, y0, x1, y1, centre, radius, angle):
    """The object's colour pattern over its crop, ``[h, w, 3]``."""
    ys = np.arange(y0, y1, dtype=np.float32) + 0.5 - np.float32(centre[1])
    xs = np.arange(x0, x1, dtype=np.float32) + 0.5 - np.float32(centre[0])
    shape = (len(ys), len(xs), 3)
    if kind.texture == "solid":
        return np.broadcast_to(colour, shape)
    a = kind.pattern_angle + angle
    u = np.cos(a) * xs[None, :] + np.sin(a) * ys[:, None]
    v = -np.sin(a) * xs[None, :] + np.cos(a) * ys[:, None]
    if kind.texture == "shaded":
        rho2 = (xs[None, :] ** 2 + ys[:, None] ** 2) / radius**2
        return colour * (1.0 - 0.5 * np.minimum(rho2, 1))[:, :, None]
    period = max(4.0, 0.5 * radius)
    if kind.texture == "stripes":
        on = (u / period) % 1.0 < 0.5
    elif kind.texture == "dots":
        du, dv = u % period - period / 2, v % period - period / 2
        on = du**2 + dv**2 < (0.3 * period) ** 2
    else:  # checker
        on = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    # The second colour: darker for bright objects, lighter for dark ones.
    second = colour * 0.55 if colour.mean() > 110 else colour + (255 - colour) * 0.5
    return np.where(on[:, :, None], second, colour)


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
