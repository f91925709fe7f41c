"""Painting synthetic scenes: unit shapes, textures, the background, one object at a time.

Coordinates are continuous (pixel ``i`` covers ``[i, i + 1)``), as everywhere in seqops.
:mod:`seqops.data.synthetic` decides what a scene holds; this module only paints it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw


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


@dataclass(frozen=True)
class ObjectKind:
    """What every object of one kind shares (objects still vary in size, pose, brightness)."""

    shape: str  # a key of SHAPES
    colour: np.ndarray  # float32 RGB, 0..255
    texture: str  # one of TEXTURES
    radius: float  # mean radius, px
    pattern_angle: float


def paint_background(rng: np.random.Generator, size: int, ends: tuple) -> np.ndarray:
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


def paint_object(
    canvas: np.ndarray,
    labels: np.ndarray,
    kind: ObjectKind,
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


def _texture(kind: ObjectKind, colour: np.ndarray, x0, y0, x1, y1, centre, radius, angle):
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
