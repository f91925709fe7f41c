"""Torch-free image and mark handling shared by training and serving.

Everything the serving path needs to turn a request into network inputs lives
here, in numpy + Pillow (docs/architecture.md, principle 6): decoding, resizing to the
model's square input, normalisation, the coordinate convention, and the rendering of
marks (objects already found) and exemplar boxes into maps on the feature grid.
Training calls the very same functions, so train and serve cannot drift apart.

Coordinate convention: pixel coordinates are continuous, ``[0, W] x [0, H]``
(pixel ``i`` covers ``[i, i+1)``, as FSC-147's point annotations are). Model
coordinates are normalised to ``[-1, 1]``: ``x_norm = 2 * x_px / S - 1`` at model
input size ``S``.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Per-channel normalisation applied to [0, 1] RGB. Stored in exported models' metadata.
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)

# Larger images are refused before decoding (decompression bombs); 64 MP is generous.
MAX_IMAGE_PIXELS = 64_000_000


# The formats decoded (Pillow's names); others are refused by name, not guessed at. They are
# what cameras, scanners and browsers produce; GIF, ICO, PSD, PDF and the rest are not taken.
FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP")
_ORIENTATION = 0x0112  # the EXIF tag
# Transparent pixels are shown over white, as a browser page shows them.
BACKGROUND = (255, 255, 255)


class ImageError(ValueError):
    """An image could not be read; the message names the file and the reason."""


class ImageTooLargeError(ImageError):
    """More pixels than allowed (a decompression bomb, or just too large; serving: 413)."""


class UnsupportedImageError(ImageError):
    """A readable file in a format or pixel mode that is not taken (serving answers 415)."""


def load_image(
    source: str | Path | bytes,
    max_pixels: int = MAX_IMAGE_PIXELS,
    formats: tuple[str, ...] = FORMATS,
) -> Image.Image:
    """Decode an image (path or bytes) into 8-bit RGB, turned as its EXIF orientation says.

    The pixels are the image as a viewer shows it: EXIF orientation applied (so points are
    where the user sees the objects), 16-bit and float greyscale scaled to 8 bits rather than
    clipped, transparency over :data:`BACKGROUND`.

    Raises:
        UnsupportedImageError: a format outside ``formats``, or a mode with no 8-bit meaning.
        ImageTooLargeError: more than ``max_pixels`` (known from the header, before decoding).
        ImageError: missing, undecodable or truncated (names the source).
    """
    return load_image_reduced(source, 0, max_pixels, formats)[0]


def load_image_reduced(
    source: str | Path | bytes,
    min_side: int,
    max_pixels: int = MAX_IMAGE_PIXELS,
    formats: tuple[str, ...] = FORMATS,
) -> tuple[Image.Image, tuple[int, int]]:
    """:func:`load_image`, with a JPEG decoded at a reduced scale (1/2 to 1/8, in the
    decoder: far less memory and time) as long as both sides stay at least ``min_side``.
    For callers that resize to a model input of that side anyway.

    Returns:
        ``(image, (width, height))``: the RGB image and the full size as the user sees it
        (EXIF orientation applied), the frame point coordinates refer to.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        stream = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    except OSError as exc:
        raise ImageError(f"{name}: cannot open ({exc.strerror or exc})") from None
    with stream:
        image = _open(stream, name, formats)
        try:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    f"{name}: {width}x{height} = {width * height} pixels exceeds {max_pixels}"
                )
            if min_side and image.format == "JPEG":
                image.draft("RGB", (min_side, min_side))
            image.load()  # decode now: a truncated file fails here, not later
        except ImageError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(f"{name}: {exc}") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"{name}: not a decodable image ({exc})") from None
    if width < 1 or height < 1:
        raise ImageError(f"{name}: empty image ({width}x{height})")
    if image.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):  # turned by 90 degrees
        width, height = height, width
    ImageOps.exif_transpose(image, in_place=True)
    return to_rgb(image, name), (width, height)


def _open(stream, name: str, formats: tuple[str, ...]) -> Image.Image:
    """Open (the header only) in one of ``formats``; a file Pillow knows in another format is
    :class:`UnsupportedImageError` naming that format."""
    try:
        return Image.open(stream, formats=list(formats))
    except UnidentifiedImageError:
        stream.seek(0)
        try:
            with Image.open(stream) as other:
                found = other.format
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            found = None
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(f"{name}: {exc}") from None
        if found is not None:
            raise UnsupportedImageError(
                f"{name}: {found} images are not taken; send {', '.join(formats)}"
            ) from None
        raise ImageError(f"{name}: not a decodable image ({', '.join(formats)})") from None
    except Image.DecompressionBombError as exc:  # before OSError: Pillow's own limit
        raise ImageTooLargeError(f"{name}: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: not a decodable image ({exc})") from None


def to_rgb(image: Image.Image, name: str = "<image>") -> Image.Image:
    """Any decoded mode -> 8-bit RGB with the same look, or :class:`UnsupportedImageError`.

    16-bit integers are scaled (65535 -> 255), not clipped (Pillow's own conversion turns a
    16-bit photo white); 32-bit integers are taken when they hold 16-bit values; float
    images when they hold 0..1 (or 0..255) values, the conventions of the tools that write
    them; anything else has no agreed 8-bit meaning and is refused.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_grey_to_8bit(np.asarray(image), mode, name)).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise UnsupportedImageError(f"{name}: pixel mode {mode} is not taken ({exc})") from None


def _grey_to_8bit(values: np.ndarray, mode: str, name: str) -> np.ndarray:
    """16-bit, 32-bit or float greyscale -> uint8, by the value range its mode means."""
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise UnsupportedImageError(f"{name}: pixel mode {mode} with NaN or infinite values")
    low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
    if mode == "F" and low >= 0 and high <= 1:
        scale = 255.0
    elif mode == "F" and low >= 0 and high <= 255:
        scale = 1.0
    elif mode != "F" and low >= 0 and high <= 65535:
        scale = 255.0 / 65535.0
    else:
        raise UnsupportedImageError(
            f"{name}: pixel mode {mode} with values {low:g}..{high:g}: no 8-bit meaning"
            " (take 0..65535 integers or 0..1 floats)"
        )
    return np.clip(np.round(values * scale), 0, 255).astype(np.uint8)


def resize_for_model(image: Image.Image, size: int) -> tuple[np.ndarray, tuple[float, float]]:
    """Resize (stretch) to the square model input.

    Returns:
        ``(pixels, (scale_x, scale_y))``: uint8 ``[size, size, 3]`` and the factors that map
        original pixel coordinates to model pixels (``x_model = x_orig * scale_x``).
    """
    width, height = image.size
    if (width, height) != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8), (size / width, size / height)


def normalize_pixels(
    pixels: np.ndarray, mean: Sequence[float] = MEAN, std: Sequence[float] = STD
) -> np.ndarray:
    """uint8 ``[..., H, W, 3]`` -> float32 ``[..., 3, H, W]`` as ``(x / 255 - mean) / std``.

    ``mean``/``std`` are the model's (its metadata carries them: a pretrained backbone has
    ImageNet's). A 256-entry table per channel, looked up on the channels-first uint8 copy:
    the same values as computing in float32 and moving the axis, three times faster on one
    image (the server's and training's per-image cost).
    """
    planes = np.ascontiguousarray(np.moveaxis(np.asarray(pixels, np.uint8), -1, -3))
    out = np.empty(planes.shape, np.float32)
    for channel, table in enumerate(_normalize_tables(tuple(mean), tuple(std))):
        np.take(table, planes[..., channel, :, :], out=out[..., channel, :, :])
    return out


@functools.lru_cache(maxsize=8)
def _normalize_tables(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """``[3, 256]`` float32: each channel's normalised value of every uint8 level."""
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"normalisation: 3 means and 3 positive stds expected, got {mean}, {std}")
    levels = np.arange(256, dtype=np.float32)[None, :] / 255.0
    return (
        (levels - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]
    ).astype(np.float32)


def pixels_to_norm(points_px: np.ndarray, size: int) -> np.ndarray:
    """Model pixel coordinates ``[N, 2]`` -> normalised ``[-1, 1]``."""
    return np.asarray(points_px, np.float32).reshape(-1, 2) * (2.0 / size) - 1.0


def norm_to_pixels(points_norm: np.ndarray, size: int) -> np.ndarray:
    """Normalised ``[-1, 1]`` coordinates ``[N, 2]`` -> model pixels."""
    return (np.asarray(points_norm, np.float32).reshape(-1, 2) + 1.0) * (size / 2.0)


def grid_centres(grid: int) -> np.ndarray:
    """Normalised coordinates of the centres of ``grid`` cells along one axis."""
    return ((np.arange(grid, dtype=np.float32) + 0.5) / grid) * 2.0 - 1.0


@functools.lru_cache(maxsize=8)
def _grid_centres_cached(grid: int) -> np.ndarray:
    """:func:`grid_centres`, read-only and computed once per grid: :func:`add_mark` runs
    once per step of every loop, where recomputing them was a third of its time."""
    centres = grid_centres(grid)
    centres.flags.writeable = False
    return centres


def add_mark(marks: np.ndarray, point_norm: np.ndarray, sigma: float) -> None:
    """Add one found object to a marks map in place (the incremental form of render_marks).

    The predictor's loop adds one mark per step in O(grid^2) instead of re-rendering all K.
    """
    grid = marks.shape[-1]
    centres = _grid_centres_cached(grid)
    scale = sigma * (2.0 / grid)
    x, y = np.asarray(point_norm, np.float32).reshape(2)
    gx = np.exp(-0.5 * ((centres - x) / scale) ** 2)
    gy = np.exp(-0.5 * ((centres - y) / scale) ** 2)
    np.maximum(marks, gy[:, None] * gx[None, :], out=marks)


# Marks that follow the object's extent (``model.mark_extent``): a mark's radius is that
# share of the object's radius, within these bounds (grid cells). Below ~0.35 cell a mark
# falls between the cell centres it is sampled at; above 4 cells it hides whole clusters.
EXTENT_SIGMA_BOUNDS = (0.35, 4.0)


def extent_mark_sigma(radius_cells: np.ndarray | float, share: float) -> np.ndarray:
    """The mark radius (grid cells) of objects of ``radius_cells``: ``share`` of it, clipped
    to :data:`EXTENT_SIGMA_BOUNDS` (the exported encoder computes the same in-graph)."""
    low, high = EXTENT_SIGMA_BOUNDS
    return np.clip(np.asarray(radius_cells, np.float32) * np.float32(share), low, high)


def exemplar_radius_px(boxes_px: np.ndarray) -> float:
    """The objects' typical radius (px) from exemplar boxes ``[E, 4]``: the mean of each
    box's half width and half height; NaN without boxes (nothing to learn the extent from)."""
    boxes = np.asarray(boxes_px, np.float32).reshape(-1, 4)
    if not len(boxes):
        return float("nan")
    return float(((boxes[:, 2] - boxes[:, 0]) + (boxes[:, 3] - boxes[:, 1])).mean() / 4.0)


def render_marks(points_norm: np.ndarray, grid: int, sigma: float) -> np.ndarray:
    """Render found objects as Gaussian blobs on the feature grid.

    Args:
        points_norm: ``[K, 2]`` normalised ``(x, y)`` of the objects already found (K may be 0).
        grid: side of the square feature grid.
        sigma: blob radius in grid cells.

    Returns:
        float32 ``[grid, grid]`` in ``[0, 1]``: the maximum over the marks' blobs (what
        :func:`add_mark` builds one mark at a time, here all ``K`` at once).
    """
    points = np.asarray(points_norm, np.float32).reshape(-1, 2)
    if not len(points):
        return np.zeros((grid, grid), np.float32)
    centres = grid_centres(grid)
    scale = sigma * (2.0 / grid)
    gx = np.exp(-0.5 * ((centres[None, :] - points[:, :1]) / scale) ** 2)  # [K, grid]
    gy = np.exp(-0.5 * ((centres[None, :] - points[:, 1:]) / scale) ** 2)
    return np.max(gy[:, :, None] * gx[:, None, :], axis=0).astype(np.float32, copy=False)


def render_exemplar_mask(boxes_px: np.ndarray, image_size: int, grid: int) -> np.ndarray:
    """Render exemplar boxes (model pixels ``[x1, y1, x2, y2]``) as a mask on the feature grid.

    A cell is 1 when its centre lies in a box; a box smaller than a cell still marks the
    cell holding its centre, so no exemplar vanishes. No boxes: all zeros.
    """
    boxes = np.asarray(boxes_px, np.float32).reshape(-1, 4)
    mask = np.zeros((grid, grid), np.float32)
    if len(boxes) == 0:
        return mask
    centres_px = (np.arange(grid, dtype=np.float32) + 0.5) * (image_size / grid)
    for x1, y1, x2, y2 in boxes:
        inside_x = (centres_px >= x1) & (centres_px <= x2)
        inside_y = (centres_px >= y1) & (centres_px <= y2)
        mask[np.ix_(inside_y, inside_x)] = 1.0
        cx = min(int((x1 + x2) / 2 / image_size * grid), grid - 1)
        cy = min(int((y1 + y2) / 2 / image_size * grid), grid - 1)
        mask[max(cy, 0), max(cx, 0)] = 1.0
    return mask
