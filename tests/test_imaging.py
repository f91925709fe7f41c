"""The torch-free image/mark contract of seqops.imaging."""

import io

import numpy as np
import pytest
from PIL import Image

from seqops.imaging import (
    ImageError,
    UnsupportedImageError,
    grid_centres,
    load_image,
    load_image_reduced,
    norm_to_pixels,
    normalize_pixels,
    pixels_to_norm,
    render_exemplar_mask,
    render_marks,
    resize_for_model,
)


def _png_bytes(width=12, height=8, mode="RGB"):
    buffer = io.BytesIO()
    Image.new(mode, (width, height), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def test_pixel_and_normalised_coordinates_round_trip():
    size = 384
    corners = np.array([[0, 0], [size, size], [size / 2, size / 2]])
    np.testing.assert_allclose(pixels_to_norm(corners, size), [[-1, -1], [1, 1], [0, 0]])
    points = np.random.default_rng(0).uniform(0, size, (50, 2))
    np.testing.assert_allclose(
        norm_to_pixels(pixels_to_norm(points, size), size), points, atol=1e-4
    )
    norm = np.random.default_rng(1).uniform(-1, 1, (50, 2))
    np.testing.assert_allclose(pixels_to_norm(norm_to_pixels(norm, size), size), norm, atol=1e-6)


def test_render_marks_peaks_at_the_mark():
    grid = 24
    centres = grid_centres(grid)
    mark = np.array([[centres[5], centres[17]]])  # x in column 5, y in row 17
    heat = render_marks(mark, grid, sigma=1.0)
    assert heat.shape == (grid, grid) and heat.dtype == np.float32
    assert np.unravel_index(np.argmax(heat), heat.shape) == (17, 5)
    assert heat[17, 5] == pytest.approx(1.0)
    assert heat[17, 8] < 0.05  # three cells away at sigma 1: exp(-4.5)


def test_render_marks_empty_and_several():
    assert not render_marks(np.zeros((0, 2)), 16, 1.0).any()
    centres = grid_centres(16)
    marks = np.array([[centres[2], centres[2]], [centres[12], centres[9]]])
    heat = render_marks(marks, 16, 1.0)
    assert heat[2, 2] == pytest.approx(1.0) and heat[9, 12] == pytest.approx(1.0)
    assert heat.max() <= 1.0


def test_exemplar_mask_covers_the_boxes():
    size, grid = 384, 24  # 16 px cells
    mask = render_exemplar_mask(np.array([[32, 48, 96, 80]]), size, grid)
    # Cells whose centres (16 k + 8) fall inside x in [32, 96], y in [48, 80].
    expected = np.zeros((grid, grid), np.float32)
    expected[3:5, 2:6] = 1
    np.testing.assert_array_equal(mask, expected)


def test_exemplar_mask_keeps_tiny_boxes_and_is_empty_without_boxes():
    size, grid = 384, 24
    mask = render_exemplar_mask(np.array([[100, 200, 102, 203]]), size, grid)
    assert mask.sum() == 1 and mask[int(201.5 / 16), int(101 / 16)] == 1
    assert not render_exemplar_mask(np.zeros((0, 4)), size, grid).any()


def test_load_image_reads_files_and_bytes_as_rgb(tmp_path):
    path = tmp_path / "grey.png"
    path.write_bytes(_png_bytes(mode="L"))
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (12, 8)
    assert load_image(_png_bytes()).size == (12, 8)


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(ImageError, match=r"missing.png"):
        load_image(tmp_path / "missing.png")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"this is not an image at all")
    with pytest.raises(ImageError, match=r"corrupt.jpg: not a decodable image"):
        load_image(corrupt)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(_png_bytes(64, 64)[:-40])
    with pytest.raises(ImageError, match=r"truncated.png"):
        load_image(truncated)
    with pytest.raises(ImageError, match=r"<bytes>"):
        load_image(b"\x89PNG garbage")


def test_load_image_refuses_huge_images_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(_png_bytes(100, 100))
    with pytest.raises(ImageError, match=r"big.png: 100x100"):
        load_image(path, max_pixels=5000)


def test_resize_for_model_stretches_non_square_images():
    image = Image.new("RGB", (200, 100), (10, 20, 30))
    pixels, scale = resize_for_model(image, 64)
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    assert scale == (64 / 200, 64 / 100)
    assert tuple(pixels[10, 10]) == (10, 20, 30)


def test_normalize_pixels_is_channels_first_float():
    pixels = np.full((2, 5, 7, 3), 255, np.uint8)
    x = normalize_pixels(pixels)
    assert x.shape == (2, 3, 5, 7) and x.dtype == np.float32
    np.testing.assert_allclose(x, 2.0)  # (1 - 0.5) / 0.25


def test_add_mark_is_the_incremental_render_marks():
    from seqops.imaging import add_mark

    points = np.random.default_rng(2).uniform(-1, 1, (5, 2)).astype(np.float32)
    marks = np.zeros((20, 20), np.float32)
    for point in points:
        add_mark(marks, point, 1.5)
    np.testing.assert_allclose(marks, render_marks(points, 20, 1.5), atol=1e-7)


def test_add_mark_on_grids_of_two_sizes_keeps_each_grids_centres():
    """add_mark keeps each grid's cell centres (computed once): a caller changing the array
    grid_centres returns cannot move them, and two grids do not share them."""
    from seqops.imaging import add_mark

    grid_centres(12)[:] = 0.0  # a caller's own copy
    for grid in (12, 20, 12):
        marks = np.zeros((grid, grid), np.float32)
        add_mark(marks, np.array([0.3, -0.4], np.float32), 1.5)
        np.testing.assert_array_equal(
            marks, render_marks(np.array([[0.3, -0.4]], np.float32), grid, 1.5)
        )


def _encode(image, fmt="PNG", **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("image", "fmt", "grey"),
    [
        (Image.fromarray(np.full((8, 8), 32896, np.uint16)), "PNG", 128),  # I;16, not white
        (Image.fromarray(np.full((8, 8), 0.5, np.float32)), "TIFF", 128),  # F in 0..1, not black
        (Image.fromarray(np.full((8, 8), 32896, np.int32)), "TIFF", 128),  # I holding 16 bits
        (Image.new("LA", (8, 8), (128, 255)), "PNG", 128),
        (Image.new("LA", (8, 8), (0, 0)), "PNG", 255),  # transparent: the white background
        (Image.new("CMYK", (8, 8), (0, 0, 0, 127)), "TIFF", 128),
        (Image.new("1", (8, 8), 1), "PNG", 255),
        (Image.new("L", (8, 8), 128), "JPEG", 128),
        (Image.new("RGB", (8, 8), (128, 128, 128)), "WEBP", 128),
        (Image.new("RGB", (8, 8), (128, 128, 128)), "BMP", 128),
    ],
)
def test_every_decoded_mode_becomes_8bit_rgb_with_its_look(image, fmt, grey):
    decoded = load_image(_encode(image, fmt))
    assert decoded.mode == "RGB" and decoded.size == (8, 8)
    assert np.abs(np.asarray(decoded, np.int16) - grey).max() <= 2, fmt


def test_palette_transparency_is_shown_over_white():
    image = Image.new("P", (8, 8), 0)
    image.putpalette([10, 20, 30] * 256)
    decoded = np.asarray(load_image(_encode(image, transparency=0)))
    assert (decoded == 255).all()


def test_float_or_32bit_images_without_an_8bit_meaning_are_refused_by_mode():
    floats = Image.fromarray(np.full((8, 8), 1e6, np.float32))
    with pytest.raises(UnsupportedImageError, match="mode F"):
        load_image(_encode(floats, "TIFF"))


def test_formats_outside_the_list_are_refused_by_name():
    with pytest.raises(UnsupportedImageError, match="GIF"):
        load_image(_encode(Image.new("RGB", (8, 8)), "GIF"))
    with pytest.raises(UnsupportedImageError, match="ICO"):
        load_image(_encode(Image.new("RGB", (16, 16)), "ICO"))


def test_exif_orientation_is_applied():
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:5, :5] = 255  # a white corner at the top left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: show the stored image rotated 90° clockwise
    decoded = load_image(_encode(Image.fromarray(pixels), "PNG", exif=exif))
    assert decoded.size == (20, 40)  # as the user sees it
    seen = np.asarray(decoded)
    assert seen[:5, -5:].min() == 255 and seen[:5, :5].max() == 0  # now at the top right


def test_a_reduced_jpeg_decode_stays_above_the_size_asked_and_knows_the_full_size():
    big = _encode(Image.new("RGB", (1600, 1200), (50, 100, 150)), "JPEG")
    assert load_image(big).size == (1600, 1200)
    image, full = load_image_reduced(big, 300)
    assert image.size == (400, 300) and full == (1600, 1200)
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = _encode(Image.new("RGB", (1600, 1200)), "JPEG", exif=exif)
    image, full = load_image_reduced(turned, 300)
    assert image.size == (300, 400) and full == (1200, 1600)
    png = _encode(Image.new("RGB", (1600, 1200)), "PNG")  # no reduced decoding: full size
    assert load_image_reduced(png, 300)[0].size == (1600, 1200)
