"""Training steps drawn from a sequence: k values, targets, and the mark augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from seqops.config import AugmentConfig, SamplingConfig
from seqops.data.sampling import ImageSteps, augment_marks, choose_ks, sample_image_steps
from seqops.imaging import pixels_to_norm, render_marks

SIZE, GRID, SIGMA = 64, 8, 1.0
POINTS_PX = np.array([[10, 10], [40, 12], [20, 40], [50, 50], [8, 56]], np.float32)
# Image augmentation (seqops.transforms) is not the sampler's: off here.
CLEAN_IMAGES = {"grey_prob": 0.0, "jpeg_prob": 0.0, "scale_range": (1.0, 1.0)}
NO_NOISE = AugmentConfig(mark_jitter_px=0, mark_drop_prob=0, spurious_mark_prob=0, **CLEAN_IMAGES)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def steps_of(generator: np.random.Generator, **kwargs) -> ImageSteps:
    """The steps of :data:`POINTS_PX` at the test sizes."""
    sampling = SamplingConfig(steps_per_image=8, done_share=0.2)  # params.yaml's
    sizes = {"image_size": SIZE, "sampling": sampling, "grid": GRID, "mark_sigma": SIGMA}
    return sample_image_steps(POINTS_PX, generator, **sizes, **kwargs)


@pytest.mark.parametrize(
    ("steps", "share", "n_done"), [(8, 0.2, 2), (8, 0.0, 1), (10, 0.5, 5), (3, 1.0, 3), (1, 0.2, 1)]
)
def test_choose_ks_puts_the_done_share_at_k_equals_n(steps, share, n_done):
    ks = choose_ks(5, steps, share, rng())
    assert len(ks) == steps
    assert int(np.sum(ks == 5)) >= n_done  # the uniform draws never reach N
    assert np.all(ks[:n_done] == 5)
    assert np.all((ks[n_done:] >= 0) & (ks[n_done:] <= 4))


def test_choose_ks_covers_every_k_below_n():
    ks = np.concatenate([choose_ks(5, 8, 0.2, rng(s)) for s in range(50)])
    assert set(ks.tolist()) == {0, 1, 2, 3, 4, 5}
    assert np.mean(ks == 5) == pytest.approx(0.25)  # 2 of 8 per image


def test_choose_ks_without_objects_is_all_done():
    assert choose_ks(0, 4, 0.2, rng()).tolist() == [0, 0, 0, 0]


def test_clean_steps_have_the_next_point_as_target_and_the_first_k_as_marks():
    ks = np.array([0, 2, 4, 5])
    steps = steps_of(rng(), ks=ks)
    points = pixels_to_norm(POINTS_PX, SIZE)
    assert steps.k.tolist() == [0, 2, 4, 5]
    assert steps.done.tolist() == [0, 0, 0, 1]
    np.testing.assert_allclose(steps.target_xy[:3], points[[0, 2, 4]])
    np.testing.assert_array_equal(steps.target_xy[3], [0, 0])
    for i, k in enumerate(ks):
        np.testing.assert_allclose(steps.mark_points[i], points[:k])
        np.testing.assert_allclose(steps.marks[i], render_marks(points[:k], GRID, SIGMA))
        assert steps.unmarked[i].tolist() == [j >= k for j in range(5)]
    assert steps.marks.shape == (4, GRID, GRID)
    assert steps.marks.dtype == np.float32


def test_shuffled_steps_mark_random_subsets_and_target_an_unmarked_object():
    points = pixels_to_norm(POINTS_PX, SIZE)
    ks = np.full(200, 2)
    steps = steps_of(rng(), augment=NO_NOISE, ks=ks, shuffle=True)
    subsets = set()
    for i in range(len(ks)):
        marked = ~steps.unmarked[i]
        assert marked.sum() == 2
        # The marks drawn are exactly the objects the unmarked mask leaves out.
        np.testing.assert_allclose(
            np.sort(steps.mark_points[i], axis=0), np.sort(points[marked], axis=0)
        )
        assert any(np.allclose(steps.target_xy[i], p) for p in points[steps.unmarked[i]])
        subsets.add(tuple(np.flatnonzero(marked)))
    assert len(subsets) == 10  # every 2-subset of 5 objects, not only the prefix (0, 1)


def test_sampling_is_reproducible_with_a_seed():
    augment = AugmentConfig(
        mark_jitter_px=2, mark_drop_prob=0.3, spurious_mark_prob=0.5, **CLEAN_IMAGES
    )
    a = steps_of(rng(7), augment=augment)
    b = steps_of(rng(7), augment=augment)
    np.testing.assert_array_equal(a.k, b.k)
    np.testing.assert_array_equal(a.marks, b.marks)


def test_jitter_moves_marks_by_about_the_configured_pixels():
    points = pixels_to_norm(POINTS_PX, SIZE)
    augment = AugmentConfig(
        mark_jitter_px=1.5, mark_drop_prob=0, spurious_mark_prob=0, **CLEAN_IMAGES
    )
    offsets = []
    for seed in range(200):
        marks, dropped = augment_marks(points, 4, augment, SIZE, 0.5, rng(seed))
        assert not dropped.any()
        offsets.append((marks - points[:4]) * SIZE / 2)  # back to pixels
    offsets = np.concatenate(offsets)
    assert np.abs(offsets).max() > 0
    assert offsets.std() == pytest.approx(1.5, rel=0.1)


def test_dropped_marks_become_unmarked_but_never_at_k_equals_n():
    augment = AugmentConfig(
        mark_jitter_px=0, mark_drop_prob=1.0, spurious_mark_prob=0, **CLEAN_IMAGES
    )
    ks = np.array([3, 5])
    steps = steps_of(rng(), augment=augment, ks=ks)
    assert len(steps.mark_points[0]) == 0  # every mark of k=3 dropped
    assert steps.unmarked[0].all()  # so every object counts as unmarked
    # ...and the next object is the first unmarked one: go back for it, never skip it.
    np.testing.assert_allclose(steps.target_xy[0], pixels_to_norm(POINTS_PX, SIZE)[0])
    assert len(steps.mark_points[1]) == 5  # k = N keeps every mark: done must stay true
    assert steps.done.tolist() == [0, 1]


def test_spurious_marks_land_away_from_every_object():
    points = pixels_to_norm(POINTS_PX, SIZE)
    augment = AugmentConfig(
        mark_jitter_px=0, mark_drop_prob=0, spurious_mark_prob=1.0, **CLEAN_IMAGES
    )
    clearance = 0.4
    for seed in range(50):
        marks, _ = augment_marks(points, 2, augment, SIZE, clearance, rng(seed))
        assert len(marks) == 3
        np.testing.assert_allclose(marks[:2], points[:2])
        assert np.abs(points - marks[2]).sum(1).min() >= clearance


def test_augmentation_is_off_with_zero_settings():
    a = steps_of(rng(3), augment=NO_NOISE)
    b = steps_of(rng(3))
    np.testing.assert_array_equal(a.k, b.k)
    np.testing.assert_allclose(a.marks, b.marks)


def test_k_out_of_range_is_an_error():
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        steps_of(rng(), ks=[6])
