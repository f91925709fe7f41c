"""The synthetic scene generator: determinism, counts, points on their objects."""

import numpy as np
import pytest
from conftest import ROOT, shrink_params

from seqops.config import load_params
from seqops.data.painting import SHAPES, TEXTURES
from seqops.data.synthetic import generate_scene, generate_scenes, scene_rng

SIZE = 128


def _scenes(n, split="train", seed=0, min_objects=3, max_objects=20, **synthetic):
    cfg = shrink_params(
        ("prepare.seed", seed),
        ("prepare.image_size", SIZE),
        ("prepare.min_objects", min_objects),
        ("prepare.max_objects", max_objects),
        *[(f"prepare.synthetic.{key}", value) for key, value in synthetic.items()],
    ).prepare
    return list(generate_scenes(cfg, split, n))


def _assert_same(a, b):
    np.testing.assert_array_equal(a.pixels, b.pixels)
    np.testing.assert_array_equal(a.points, b.points)
    np.testing.assert_array_equal(a.exemplars, b.exemplars)
    assert a.info == b.info


def test_same_seed_split_index_gives_the_same_scene():
    first, second = _scenes(3), _scenes(3)
    for a, b in zip(first, second, strict=True):
        _assert_same(a, b)


def test_a_scene_does_not_depend_on_how_many_others_there_are():
    few, many = _scenes(2), _scenes(5)
    _assert_same(few[1], many[1])


def test_splits_and_seeds_give_different_scenes():
    train, val, other_seed = _scenes(1)[0], _scenes(1, "val")[0], _scenes(1, seed=1)[0]
    assert not np.array_equal(train.pixels, val.pixels)
    assert not np.array_equal(train.pixels, other_seed.pixels)


def test_counts_are_in_range_and_labels_match():
    for scene in _scenes(25, min_objects=4, max_objects=15, distractor_share=0.5):
        n, m = len(scene.points), len(scene.distractor_points)
        assert 4 <= n <= 15
        assert m == scene.info["num_distractors"] and m <= max(1, n // 2)
        assert scene.pixels.shape == (SIZE, SIZE, 3) and scene.pixels.dtype == np.uint8
        assert scene.labels.max() <= n + m


def test_points_are_inside_the_canvas_and_on_their_own_object():
    for scene in _scenes(30, clutter=0.5, distractor_share=0.5):
        pts = np.vstack([scene.points, scene.distractor_points])
        assert (pts > 0).all() and (pts < SIZE).all()
        cols, rows = np.floor(pts).astype(int).T
        # Counted object i owns label i + 1, distractor j label n + 1 + j: the pixel under
        # every point belongs to that very object, even in cluttered scenes.
        np.testing.assert_array_equal(scene.labels[rows, cols], np.arange(1, len(pts) + 1))


def test_objects_stand_out_from_the_background():
    scene = _scenes(1, noise=0.0, clutter=0.0)[0]
    background = scene.pixels[scene.labels == 0].astype(float).mean(0)
    cols, rows = np.floor(scene.points).astype(int).T
    at_points = scene.pixels[rows, cols].astype(float)
    # The colour check in the generator keeps at least 90 RGB apart from the gradient's
    # ends; allow for textures and the background's blotches.
    assert (np.linalg.norm(at_points - background, axis=1) > 30).all()


def _touching_pairs(labels):
    """Adjacent pixels of two different objects (4-neighbourhood)."""
    right = (labels[:, 1:] > 0) & (labels[:, :-1] > 0) & (labels[:, 1:] != labels[:, :-1])
    down = (labels[1:] > 0) & (labels[:-1] > 0) & (labels[1:] != labels[:-1])
    return int(right.sum() + down.sum())


def test_objects_are_kept_apart_without_clutter_and_touch_with_it():
    apart = _scenes(15, clutter=0.0, distractor_share=0.5)
    assert all(_touching_pairs(s.labels) == 0 for s in apart)
    assert not any(s.info["clutter"] for s in apart)
    crowded = _scenes(15, min_objects=15, max_objects=20, clutter=1.0)
    assert all(s.info["clutter"] for s in crowded)
    assert sum(_touching_pairs(s.labels) > 0 for s in crowded) >= 5


def test_distractors_are_another_kind():
    with_distractors = _scenes(10, distractor_share=1.0)
    for scene in with_distractors:
        assert len(scene.distractor_points) >= 1
        assert scene.info["distractor_shape"] not in (None, scene.info["shape"])
    assert all(len(s.distractor_points) == 0 for s in _scenes(10, distractor_share=0.0))


def test_exemplars_box_counted_objects():
    for scene in _scenes(10, num_exemplars=3, distractor_share=1.0):
        assert len(scene.exemplars) == min(3, len(scene.points))
        for x1, y1, x2, y2 in scene.exemplars:
            assert 0 <= x1 < x2 <= SIZE and 0 <= y1 < y2 <= SIZE
            inside = (
                (scene.points[:, 0] >= x1)
                & (scene.points[:, 0] <= x2)
                & (scene.points[:, 1] >= y1)
                & (scene.points[:, 1] <= y2)
            )
            assert inside.any()
    assert all(len(s.exemplars) == 0 for s in _scenes(3, num_exemplars=0))
    assert all(len(s.exemplars) <= 2 for s in _scenes(3, num_exemplars=2))


def test_scenes_vary_in_shape_and_texture():
    scenes = _scenes(40)
    assert len(SHAPES) >= 4 and len(TEXTURES) >= 3
    assert len({s.info["shape"] for s in scenes}) >= 4
    assert len({s.info["texture"] for s in scenes}) >= 3


def test_exact_counts_and_bad_range():
    synthetic = shrink_params().prepare.synthetic
    scene = generate_scene(scene_rng(0, "train", 0), SIZE, 7, 7, synthetic)
    assert len(scene.points) == 7
    empty = generate_scene(scene_rng(0, "train", 0), SIZE, 0, 0, synthetic)
    assert len(empty.points) == 0 and len(empty.exemplars) == 0
    with pytest.raises(ValueError, match=r"min_objects 9 > max_objects 3"):
        generate_scene(scene_rng(0, "train", 0), SIZE, 9, 3, synthetic)


def test_default_settings_keep_their_promises():
    cfg = load_params(ROOT / "params.yaml").prepare  # 384 px, 5..50 objects: the demo's
    for scene in generate_scenes(cfg, "val", 12):
        pts = np.vstack([scene.points, scene.distractor_points])
        cols, rows = np.floor(pts).astype(int).T
        np.testing.assert_array_equal(scene.labels[rows, cols], np.arange(1, len(pts) + 1))
        assert cfg.min_objects <= len(scene.points) <= cfg.max_objects
        if not scene.info["clutter"]:
            assert _touching_pairs(scene.labels) == 0
