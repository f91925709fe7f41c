"""What a user's photos go through before they reach the model: greyscale, JPEG, another scale.

The same scene must count the same however it was captured or stored. Evaluation counts
transformed copies of a split with these transforms (``evaluate.transforms``: the robust
rows) and training shows them as augmentation (``train.augment``) so the model learns the
invariance; both call the functions here, in numpy + Pillow (no torch).

A transform is named as in ``params.yaml``:

- ``grey``: converted to greyscale (``L``) and back to RGB, so all three channels are equal;
- ``jpeg<q>``: encoded as JPEG at quality ``q`` (1-100) and decoded, in memory;
- ``scale<f>``: resized by ``f`` (0 < f <= 4; 0.6 is a lower-resolution source); the
  predictor resizes it to the model size itself, and the true points move with the pixels
  (:func:`map_points`);
- ``identity``: unchanged (a check that the transformed path scores what the plain one does).
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

# The JPEG qualities training draws from: 30 is heavy blocking, 90 about a camera's default.
AUGMENT_JPEG_QUALITY = (30, 90)
MAX_SCALE = 4.0

_NAME = re.compile(r"^(identity|grey|jpeg(\d{1,3})|scale(\d*\.?\d+))$")


class TransformError(ValueError):
    """A transform name is not one this module knows; the message names it."""


def to_grey(image: Image.Image) -> Image.Image:
    """Greyscale (Pillow's ITU-R 601 luma) as an RGB image with three equal channels."""
    return image.convert("L").convert("RGB")


def jpeg_round_trip(image: Image.Image, quality: int) -> Image.Image:
    """Encode as JPEG at ``quality`` and decode again, in memory (same size, RGB)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def rescale(image: Image.Image, factor: float) -> Image.Image:
    """Resize by ``factor`` (each side rounded, at least 1 px); Pillow's bilinear filter
    widens with the factor when shrinking, so a downscale averages like a smaller sensor."""
    width, height = image.size
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return image.resize(size, Image.Resampling.BILINEAR)


def map_points(
    points: np.ndarray | Sequence, before: tuple[int, int], after: tuple[int, int]
) -> np.ndarray:
    """Points ``[N, 2]`` (continuous px, ``(x, y)``) of an image of size ``before`` in the
    pixels of the same image resized to ``after`` (both ``(width, height)``)."""
    factor = np.array([after[0] / before[0], after[1] / before[1]], np.float64)
    return np.asarray(points, np.float64).reshape(-1, 2) * factor


def map_boxes(
    boxes: np.ndarray | Sequence, before: tuple[int, int], after: tuple[int, int]
) -> np.ndarray:
    """Boxes ``[N, 4]`` (``x1 y1 x2 y2``) mapped as :func:`map_points` maps their corners."""
    return map_points(np.asarray(boxes, np.float64).reshape(-1, 2), before, after).reshape(-1, 4)


@dataclass(frozen=True)
class Transform:
    """One named transform (see the module docstring); call it on an image."""

    name: str
    kind: str  # identity, grey, jpeg, scale
    value: float = 1.0  # the JPEG quality, or the scale factor

    @property
    def scale(self) -> float:
        """How much the transform resizes the image (1 unless ``kind`` is ``scale``)."""
        return self.value if self.kind == "scale" else 1.0

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.kind == "grey":
            return to_grey(image)
        if self.kind == "jpeg":
            return jpeg_round_trip(image, int(self.value))
        if self.kind == "scale":
            return rescale(image, self.value)
        return image.copy()


def parse_transform(name: str) -> Transform:
    """The transform called ``name`` (``grey``, ``jpeg50``, ``scale0.6``, ``identity``).

    Raises:
        TransformError: an unknown name, or a quality or factor out of range (names it).
    """
    found = _NAME.match(name)
    if found is None:
        raise TransformError(
            f"transform {name!r}: expected identity, grey, jpeg<quality> or scale<factor>"
        )
    if found.group(2) is not None:
        quality = int(found.group(2))
        if not 1 <= quality <= 100:
            raise TransformError(f"transform {name!r}: JPEG quality must be 1-100")
        return Transform(name, "jpeg", float(quality))
    if found.group(3) is not None:
        factor = float(found.group(3))
        if not 0 < factor <= MAX_SCALE:
            raise TransformError(f"transform {name!r}: scale must be in (0, {MAX_SCALE:g}]")
        return Transform(name, "scale", factor)
    return Transform(name, name)


def parse_transforms(names: Sequence[str]) -> list[Transform]:
    """:func:`parse_transform` of each name; a name given twice is an error."""
    if len(set(names)) != len(names):
        raise TransformError(f"transforms {list(names)}: a transform is named twice")
    return [parse_transform(name) for name in names]


def augment_image(
    pixels: np.ndarray,
    rng: np.random.Generator,
    *,
    grey_prob: float,
    jpeg_prob: float,
    scale_range: tuple[float, float],
) -> np.ndarray:
    """A training image as a user's camera might have given it (``train.augment``).

    In this order, as a photo is taken, then stored: downscaled by a factor drawn from
    ``scale_range`` and scaled back up to its size (a lower-resolution source; the points do
    not move); greyscale with probability ``grey_prob``; JPEG at a quality drawn from
    :data:`AUGMENT_JPEG_QUALITY` with probability ``jpeg_prob``. A switched-off transform
    draws nothing from ``rng``, so with all three off the item's other draws are unchanged.

    Args:
        pixels: uint8 ``[H, W, 3]``.
        rng: the item's random source (seeded per item and epoch, so runs reproduce).

    Returns:
        uint8 ``[H, W, 3]``: ``pixels`` itself when nothing was applied.
    """
    low, high = scale_range
    scale = rng.uniform(low, high) if low < 1.0 else 1.0
    grey = grey_prob > 0 and rng.random() < grey_prob
    quality = None
    if jpeg_prob > 0 and rng.random() < jpeg_prob:
        quality = int(rng.integers(AUGMENT_JPEG_QUALITY[0], AUGMENT_JPEG_QUALITY[1] + 1))
    if scale >= 1.0 and not grey and quality is None:
        return pixels
    image = Image.fromarray(pixels)
    if scale < 1.0:
        image = rescale(image, scale).resize(image.size, Image.Resampling.BILINEAR)
    if grey:
        image = to_grey(image)
    if quality is not None:
        image = jpeg_round_trip(image, quality)
    return np.asarray(image, np.uint8)
