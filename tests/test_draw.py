"""The research's step picture: GREEN truth, RED prediction, YELLOW error line, and labels."""

from __future__ import annotations

import numpy as np

from seqops.draw import GREEN, MARK, RED, YELLOW, draw_rollout, draw_step

SIZE = 64


def blank() -> np.ndarray:
    return np.full((SIZE, SIZE, 3), 128, np.uint8)


def colour_mask(picture, colour) -> np.ndarray:
    return np.all(np.asarray(picture)[..., :3] == colour, axis=-1)


def count_near(mask: np.ndarray, xy, radius: float) -> int:
    ys, xs = np.nonzero(mask)
    return int(np.sum(np.hypot(xs - xy[0], ys - xy[1]) <= radius))


def test_step_picture_has_truth_prediction_line_and_labels_where_expected():
    gt, pred = (16.0, 16.0), (48.0, 40.0)
    picture = draw_step(blank(), np.array([[8.0, 56.0]]), pred, 0.12, gt, gt_done=0)
    factor = picture.width / SIZE
    assert picture.width == 384 and picture.height > 384  # enlarged; a label band below
    scaled_gt = (gt[0] * factor, gt[1] * factor)
    scaled_pred = (pred[0] * factor, pred[1] * factor)
    green, red, yellow = (colour_mask(picture, c) for c in (GREEN, RED, YELLOW))
    circle = 2.5 * factor + 3
    assert count_near(green, scaled_gt, circle) > 20  # the truth's circle
    assert count_near(red, scaled_pred, circle) > 20  # the prediction's circle
    assert count_near(green, scaled_pred, circle) == 0
    mid = ((scaled_gt[0] + scaled_pred[0]) / 2, (scaled_gt[1] + scaled_pred[1]) / 2)
    assert count_near(yellow, mid, 6) > 0  # the error line passes between them
    assert count_near(colour_mask(picture, MARK), (8 * factor, 56 * factor), 12) > 0
    band = np.asarray(picture)[384:]  # the labels sit below the image, hiding nothing
    assert colour_mask(band, RED).sum() > 10  # pred_done label
    assert colour_mask(band, GREEN).sum() > 10  # gt_done label
    assert colour_mask(np.asarray(picture)[:40, :150], RED).sum() == 0


def test_done_step_shows_no_truth_circle_or_error_line():
    picture = draw_step(blank(), np.zeros((0, 2)), (32.0, 32.0), 0.9, (16.0, 16.0), gt_done=1)
    body = np.asarray(picture)[:384]  # the image, above the labels
    assert colour_mask(body, GREEN).sum() == 0
    assert colour_mask(body, YELLOW).sum() == 0
    assert colour_mask(body, RED).sum() > 20


def test_predict_picture_without_truth_only_labels_the_prediction():
    picture = draw_step(blank(), np.zeros((0, 2)), (32.0, 32.0), 0.5)
    assert colour_mask(picture, GREEN).sum() == 0
    assert colour_mask(picture, RED).sum() > 20


def test_large_inputs_are_not_enlarged():
    pixels = np.zeros((400, 400, 3), np.uint8)
    assert draw_step(pixels, np.zeros((0, 2)), (10.0, 10.0), 0.1).width == 400


def test_rollout_picture_circles_every_prediction():
    pred = np.array([[10.0, 10.0], [50.0, 50.0]])
    picture = draw_rollout(blank(), pred, gt_points_px=pred + 0.5)
    factor = picture.width / SIZE
    red, green = colour_mask(picture, RED), colour_mask(picture, GREEN)
    for x, y in pred:
        assert count_near(red, (x * factor, y * factor), 2.5 * factor + 3) > 20
        assert count_near(green, ((x + 0.5) * factor, (y + 0.5) * factor), 3) > 0
