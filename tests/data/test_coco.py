"""The COCO importer on a tiny instances file and image folder."""

import json

import numpy as np
import pytest
from conftest import shrink_params
from PIL import Image

from seqops.data.coco import split_of
from seqops.data.manifest import SPLITS, read_manifest
from seqops.data.prepare import run_prepare
from seqops.data.sources import PrepareError

SIZE = 64
CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}]


def _image(path, width, height, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _ann(ann_id, image_id, cat, x, y, w, h, crowd=0):
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": [x, y, w, h],
            "iscrowd": crowd, "area": w * h}  # fmt: skip


def write_coco(root):
    """Images 1..4 (non-square), plus a missing file, a bad centre and duplicate centres."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    images = []
    for image_id, (w, h) in {1: (100, 50), 2: (60, 90), 3: (80, 80), 4: (40, 40)}.items():
        _image(images_dir / f"{image_id:04d}.jpg", w, h, image_id)
        images.append({"id": image_id, "file_name": f"{image_id:04d}.jpg", "width": w, "height": h})
    images += [
        {"id": 5, "file_name": "0005.jpg", "width": 50, "height": 50},  # file missing
        {"id": 6, "file_name": "0006.jpg", "width": 50, "height": 50},  # centre outside
        {"id": 7, "file_name": "0007.jpg", "width": 50, "height": 50},  # duplicate centres
        {"id": 8, "file_name": "0008.jpg", "width": 50, "height": 50},  # no annotations
    ]
    for image_id in (6, 7, 8):
        _image(images_dir / f"{image_id:04d}.jpg", 50, 50, image_id)
    annotations = [
        # image 1: three cats (sizes 10x10, 20x10, 4x4) and two dogs
        _ann(1, 1, 1, 0, 0, 10, 10),
        _ann(2, 1, 1, 50, 20, 20, 10),
        _ann(3, 1, 1, 90, 40, 4, 4),
        _ann(4, 1, 2, 30, 30, 6, 8),
        _ann(5, 1, 2, 70, 0, 6, 8),
        # image 2: four cats, the largest last, so the exemplar choice is by size
        _ann(6, 2, 1, 0, 0, 2, 2),
        _ann(7, 2, 1, 10, 10, 4, 4),
        _ann(8, 2, 1, 20, 20, 6, 6),
        _ann(9, 2, 1, 30, 60, 20, 20),
        # image 3: a bird crowd region: the count is unknown
        _ann(10, 3, 3, 0, 0, 80, 30, crowd=1),
        _ann(11, 3, 3, 10, 50, 5, 5),
        # image 4: one dog
        _ann(12, 4, 2, 10, 10, 10, 10),
        _ann(13, 5, 1, 5, 5, 5, 5),
        _ann(14, 6, 1, 45, 45, 20, 20),  # centre (55, 55) outside 50x50
        _ann(15, 7, 2, 10, 10, 4, 4),
        _ann(16, 7, 2, 10, 10, 4, 4),
    ]
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": CATEGORIES}))  # fmt: skip
    return path, images_dir


def _params(path, images_dir, categories=(), val_share=0.0, **prepare):
    """The real params importing this COCO file at 64 px, 1-50 objects, seed 0, then ``prepare``."""
    coco = {"annotations": str(path), "images_dir": str(images_dir),
            "categories": list(categories), "val_share": val_share, "test_share": 0.0}  # fmt: skip
    settings = {"source": "coco", "seed": 0, "order": "reading_order", "row_height": 50.0,
                "on_error": "skip", "min_objects": 1, "max_objects": 50, "image_size": SIZE,
                **prepare}  # fmt: skip
    return shrink_params(
        *[(f"prepare.{key}", value) for key, value in settings.items()],
        *[(f"prepare.coco.{key}", value) for key, value in coco.items()],
    )


def _all_records(out):
    return {r.id: r for split in SPLITS for r in read_manifest(out / f"{split}.jsonl")}


def test_one_record_per_image_and_category_with_box_centres(tmp_path):
    path, images_dir = write_coco(tmp_path / "coco")
    out = tmp_path / "prepared"
    stats = run_prepare(_params(path, images_dir, order="left_to_right"), out)
    records = _all_records(out)
    assert sorted(records) == ["1-c1", "1-c2", "2-c1", "4-c2"]
    cats = records["1-c1"]
    assert cats.extra == {"image_id": 1, "category_id": 1, "category": "cat"}
    assert cats.orig_size == (100, 50) and cats.scale == pytest.approx((SIZE / 100, SIZE / 50))
    centres = np.array([[5, 5], [60, 25], [92, 42]]) * [SIZE / 100, SIZE / 50]
    np.testing.assert_allclose(cats.points_array(), centres, atol=1e-3)
    # Records of one image share its file.
    assert records["1-c1"].image == records["1-c2"].image == "images/train/1.png"
    with Image.open(out / records["1-c1"].image) as image:
        assert image.size == (SIZE, SIZE)
    assert stats["filtered"] == {"crowd": 1, "no_objects": 1}
    assert stats["skipped"] == {"duplicate_points": 1, "missing_image": 1, "point_outside_image": 1}


def test_exemplars_are_the_three_largest_boxes(tmp_path):
    path, images_dir = write_coco(tmp_path / "coco")
    out = tmp_path / "prepared"
    run_prepare(_params(path, images_dir, image_size=90), out)  # image 2 is 60x90
    ex = _all_records(out)["2-c1"].exemplars_array()
    np.testing.assert_allclose(
        ex, np.array([[30, 60, 50, 80], [20, 20, 26, 26], [10, 10, 14, 14]]) * [1.5, 1, 1.5, 1]
    )


def test_category_filter_by_name_and_unknown_names(tmp_path):
    path, images_dir = write_coco(tmp_path / "coco")
    out = tmp_path / "prepared"
    run_prepare(_params(path, images_dir, categories=("dog",)), out)
    assert sorted(_all_records(out)) == ["1-c2", "4-c2"]
    with pytest.raises(PrepareError, match=r"unknown \['zebra'\].*bird, cat, dog"):
        run_prepare(_params(path, images_dir, categories=("zebra",)), tmp_path / "z")


def test_fail_mode_stops_at_the_first_bad_image(tmp_path):
    path, images_dir = write_coco(tmp_path / "coco")
    with pytest.raises(PrepareError, match=r"0005.jpg: missing image"):
        run_prepare(_params(path, images_dir, on_error="fail"), tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


def test_split_by_image_id_is_deterministic_and_disjoint(tmp_path):
    shares = [split_of(i, 0, 0.2, 0.1) for i in range(2000)]
    assert shares == [split_of(i, 0, 0.2, 0.1) for i in range(2000)]
    assert 0.07 < shares.count("test") / 2000 < 0.13
    assert 0.16 < shares.count("val") / 2000 < 0.24
    assert shares != [split_of(i, 1, 0.2, 0.1) for i in range(2000)]  # the seed reshuffles

    path, images_dir = write_coco(tmp_path / "coco")
    out = tmp_path / "prepared"
    run_prepare(_params(path, images_dir, val_share=0.5), out)
    image_ids = {
        s: {r.extra["image_id"] for r in read_manifest(out / f"{s}.jsonl")} for s in SPLITS
    }
    assert not image_ids["train"] & image_ids["val"]
    for split, ids in image_ids.items():
        assert all(split_of(i, 0, 0.5, 0.0) == split for i in ids)


def test_malformed_instances_file_names_the_field(tmp_path):
    path, images_dir = write_coco(tmp_path / "coco")
    raw = json.loads(path.read_text())
    del raw["annotations"][3]["bbox"]
    path.write_text(json.dumps(raw))
    with pytest.raises(PrepareError, match=r"instances.json: annotations\[3\]: missing .*'bbox'"):
        run_prepare(_params(path, images_dir), tmp_path / "out")
    raw["annotations"][3]["bbox"] = [1, 2, 3]
    path.write_text(json.dumps(raw))
    with pytest.raises(PrepareError, match=r"annotations\[3\].bbox: expected \[x, y, w"):
        run_prepare(_params(path, images_dir), tmp_path / "out")
    path.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(PrepareError, match=r"missing required field 'categories'"):
        run_prepare(_params(path, images_dir), tmp_path / "out")
    path.write_text("[1, 2")
    with pytest.raises(PrepareError, match=r"not valid JSON"):
        run_prepare(_params(path, images_dir), tmp_path / "out")


def test_a_file_under_two_image_ids_is_reported(tmp_path):
    path, images_dir = write_coco(tmp_path / "coco")
    raw = json.loads(path.read_text())
    raw["images"].append({"id": 9, "file_name": "0004.jpg"})
    path.write_text(json.dumps(raw))
    stats = run_prepare(_params(path, images_dir), tmp_path / "out")
    assert stats["skipped"]["image_in_two_splits"] == 2  # both entries of the file
    assert "4-c2" not in _all_records(tmp_path / "out")
