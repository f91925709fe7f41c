"""Pictures of predictions (torch-free; used by train, evaluate and predict).

The research's picture of one step: the input with the objects already marked; the
ground truth as a GREEN circle (when an object is left, ``done = 0``); the prediction as a
RED circle; a YELLOW line between them labelled ``err=NNpx`` (model pixels); and the text
``pred_done=0.xx`` in red and ``gt_done=0/1`` in green. Small inputs are enlarged (nearest
neighbour) so the labels stay legible, and the labels go in a black band below the image so
they never hide an object; coordinates are always given in model pixels.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GREEN = (0, 255, 0)
RED = (255, 0, 0)
YELLOW = (255, 255, 0)
MARK = (0, 170, 255)  # marks of the objects already found: a colour none of the above
TEXT_BG = (0, 0, 0)


def _canvas(
    pixels: np.ndarray | Image.Image, min_size: int, label_lines: int
) -> tuple[Image.Image, float, int]:
    """The image enlarged by a whole factor, above a black band for ``label_lines`` labels
    (so labels never hide an object).

    Returns:
        ``(canvas, factor, band_top)``: ``band_top`` is the band's first row.
    """
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(np.asarray(pixels))
    image = image.convert("RGB")
    factor = max(1, math.ceil(min_size / max(image.size)))
    if factor > 1:
        image = image.resize(
            (image.width * factor, image.height * factor), Image.Resampling.NEAREST
        )
    band = label_lines * (_font_size(image.width) + 8) + 4
    canvas = Image.new("RGB", (image.width, image.height + band), TEXT_BG)
    canvas.paste(image, (0, 0))
    return canvas, float(factor), image.height


def _font_size(width: int) -> int:
    return max(10, width // 28)


def _font(canvas: Image.Image) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=_font_size(canvas.width))


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour, font) -> float:
    """Text on a black box (legible on any background); returns the box's bottom."""
    left, top, right, bottom = draw.textbbox(xy, text, font=font)
    draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=TEXT_BG)
    draw.text(xy, text, fill=colour, font=font)
    return bottom + 4


def _draw_marks(draw: ImageDraw.ImageDraw, marks_px: np.ndarray, factor: float) -> None:
    arm = max(3.0, 1.5 * factor)
    for x, y in np.asarray(marks_px, np.float32).reshape(-1, 2) * factor:
        draw.line((x - arm, y - arm, x + arm, y + arm), fill=MARK, width=2)
        draw.line((x - arm, y + arm, x + arm, y - arm), fill=MARK, width=2)


def _circle(draw: ImageDraw.ImageDraw, xy, radius: float, colour) -> None:
    x, y = xy
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=colour, width=2)


def draw_step(
    pixels: np.ndarray | Image.Image,
    marks_px: np.ndarray,
    pred_xy_px: tuple[float, float] | np.ndarray,
    pred_done: float,
    gt_xy_px: tuple[float, float] | np.ndarray | None = None,
    gt_done: float | None = None,
    min_size: int = 384,
) -> Image.Image:
    """Draw one step: marks, ground truth, prediction, their error and the done values.

    Args:
        pixels: the model input, uint8 ``[S, S, 3]`` (or a PIL image).
        marks_px: ``[M, 2]`` marks shown to the network, model pixels.
        pred_xy_px: predicted next object, model pixels; pred_done: predicted probability.
        gt_xy_px: the target object (drawn only when ``gt_done`` is 0 or unknown).
        gt_done: the target done (0/1), or ``None`` when unknown (predict).
        min_size: the picture is enlarged by a whole factor to at least this size.

    Returns:
        An RGB picture.
    """
    canvas, factor, band_top = _canvas(pixels, min_size, label_lines=2)
    draw = ImageDraw.Draw(canvas)
    font = _font(canvas)
    radius = max(6.0, 2.5 * factor)
    _draw_marks(draw, marks_px, factor)
    pred = np.asarray(pred_xy_px, np.float32).reshape(2)
    show_gt = gt_xy_px is not None and not (gt_done is not None and gt_done >= 0.5)
    if show_gt:
        gt = np.asarray(gt_xy_px, np.float32).reshape(2)
        err_px = float(np.linalg.norm(pred - gt))
        draw.line((*(gt * factor), *(pred * factor)), fill=YELLOW, width=2)
        _circle(draw, gt * factor, radius, GREEN)
    _circle(draw, pred * factor, radius, RED)
    if show_gt:
        mid = (gt + pred) * factor / 2 + radius
        _label(draw, (float(mid[0]), float(mid[1])), f"err={err_px:.0f}px", YELLOW, font)
    y = _label(draw, (4, band_top + 6), f"pred_done={pred_done:.2f}", RED, font)
    if gt_done is not None:
        _label(draw, (4, y), f"gt_done={round(gt_done)}", GREEN, font)
    return canvas


def draw_rollout(
    pixels: np.ndarray | Image.Image,
    pred_points_px: np.ndarray,
    gt_points_px: np.ndarray | None = None,
    min_size: int = 384,
) -> Image.Image:
    """Draw a full rollout: predicted objects as RED circles numbered in order, ground-truth
    objects as GREEN dots, and the counts."""
    canvas, factor, band_top = _canvas(pixels, min_size, label_lines=1)
    draw = ImageDraw.Draw(canvas)
    font = _font(canvas)
    radius = max(6.0, 2.5 * factor)
    pred = np.asarray(pred_points_px, np.float32).reshape(-1, 2) * factor
    if gt_points_px is not None:
        for x, y in np.asarray(gt_points_px, np.float32).reshape(-1, 2) * factor:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=GREEN)
    small = ImageFont.load_default(size=max(8, int(radius)))
    for i, (x, y) in enumerate(pred, 1):
        _circle(draw, (x, y), radius, RED)
        draw.text((x + radius, y - radius), str(i), fill=RED, font=small)
    text = f"count={len(pred)}"
    if gt_points_px is not None:
        text += f" gt={len(np.asarray(gt_points_px).reshape(-1, 2))}"
    _label(draw, (4, band_top + 6), text, YELLOW, font)
    return canvas
