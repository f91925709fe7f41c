"""The transforms evaluation scores and training augments with (numpy + Pillow)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from seqops.transforms import (
    TransformError,
    augment_image,
    map_boxes,
    map_points,
    parse_transform,
    parse_transforms,
)


def colour_image(width: int = 80, height: int = 60, seed: int = 0) -> Image.Image:
    """Noisy colour blocks: every channel differs, and JPEG has detail to lose."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2, 0] = 230  # a red half: channels far apart
    return Image.fromarray(pixels)


def test_grey_gives_three_equal_channels():
    image = colour_image()
    grey = np.asarray(parse_transform("grey")(image))
    assert grey.shape == (60, 80, 3)
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])
    assert not np.array_equal(grey, np.asarray(image))


def mean_change(before: Image.Image, after: Image.Image) -> float:
    return float(np.abs(np.asarray(after, int) - np.asarray(before, int)).mean())


def test_a_jpeg_round_trip_changes_pixels_but_keeps_the_shape():
    image = colour_image()
    jpeg = parse_transform("jpeg50")
    out = jpeg(image)
    assert (jpeg.kind, jpeg.value, jpeg.scale) == ("jpeg", 50.0, 1.0)
    assert np.asarray(out).shape == (60, 80, 3) and np.asarray(out).dtype == np.uint8
    assert mean_change(image, out) > 1
    assert mean_change(image, parse_transform("jpeg5")(image)) > mean_change(image, out)


def test_a_rescale_maps_the_true_points_by_its_factor():
    image = colour_image(100, 50)
    scale = parse_transform("scale0.6")
    out = scale(image)
    assert out.size == (60, 30) and scale.scale == 0.6
    points = np.array([[10.0, 20.0], [99.5, 0.5], [0.0, 50.0]])
    np.testing.assert_allclose(
        map_points(points, image.size, out.size), [[6.0, 12.0], [59.7, 0.3], [0.0, 30.0]]
    )
    np.testing.assert_allclose(
        map_boxes([[10, 10, 20, 40]], image.size, out.size), [[6, 6, 12, 24]]
    )
    # Rounded sides: the points follow the pixels, not the nominal factor.
    odd = parse_transform("scale0.5")(colour_image(81, 61))
    assert odd.size == (40, 30)
    np.testing.assert_allclose(map_points([[81, 61]], (81, 61), odd.size), [[40, 30]])


def test_identity_leaves_the_image_alone():
    image = colour_image()
    assert np.array_equal(np.asarray(parse_transform("identity")(image)), np.asarray(image))


@pytest.mark.parametrize("name", ["gray", "jpeg0", "jpeg101", "scale0", "scale5", "scale", ""])
def test_a_bad_transform_name_is_refused(name: str):
    with pytest.raises(TransformError, match="transform"):
        parse_transform(name)


def test_a_transform_named_twice_is_refused():
    with pytest.raises(TransformError, match="named twice"):
        parse_transforms(["grey", "grey"])
    assert [t.name for t in parse_transforms(["grey", "scale1.5"])] == ["grey", "scale1.5"]


def augment(pixels: np.ndarray, seed: int, **settings) -> np.ndarray:
    settings = {"grey_prob": 0.0, "jpeg_prob": 0.0, "scale_range": (1.0, 1.0), **settings}
    return augment_image(pixels, np.random.default_rng(seed), **settings)


def test_augmentation_off_returns_the_image_and_draws_nothing():
    pixels = np.asarray(colour_image())
    rng = np.random.default_rng(3)
    out = augment_image(pixels, rng, grey_prob=0.0, jpeg_prob=0.0, scale_range=(1.0, 1.0))
    assert out is pixels
    assert rng.random() == np.random.default_rng(3).random()  # the item's next draws unchanged


def test_each_augmentation_at_probability_one_changes_the_image():
    pixels = np.asarray(colour_image())
    grey = augment(pixels, 0, grey_prob=1.0)
    assert np.array_equal(grey[..., 0], grey[..., 2])
    jpeg = augment(pixels, 0, jpeg_prob=1.0)
    assert jpeg.shape == pixels.shape and not np.array_equal(jpeg, pixels)
    low_res = augment(pixels, 0, scale_range=(0.4, 0.6))
    assert low_res.shape == pixels.shape and not np.array_equal(low_res, pixels)
    # Same seed, same image; another seed draws another factor or quality.
    both = {"jpeg_prob": 1.0, "scale_range": (0.3, 0.9)}
    assert np.array_equal(augment(pixels, 5, **both), augment(pixels, 5, **both))
    assert not np.array_equal(augment(pixels, 5, **both), augment(pixels, 6, **both))
