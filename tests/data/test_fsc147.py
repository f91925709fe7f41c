"""The FSC-147 importer on a tiny tree written in the exact FSC-147 layout."""

import json

import numpy as np
import pytest
from conftest import shrink_params
from PIL import Image

from seqops.data.fsc147 import ANNOTATION_FILE, CLASSES_FILE, IMAGES_DIR, SPLIT_FILE
from seqops.data.manifest import read_dataset_info, read_manifest
from seqops.data.prepare import run_prepare
from seqops.data.sources import PrepareError

SIZE = 64


def _corners(x1, y1, x2, y2):
    return [[x1, y1], [x1, y2], [x2, y2], [x2, y1]]


def _entry(points, boxes=((2, 2, 10, 12),)):
    return {
        "H": 384,  # the real file has these; the importer uses the decoded size
        "W": 576,
        "ratio_h": 1.0,
        "ratio_w": 1.0,
        "points": [list(p) for p in points],
        "box_examples_coordinates": [_corners(*b) for b in boxes],
    }


GOOD = {
    # name: (width, height, points, class, split)
    "1.jpg": (96, 64, [(10.5, 20.0), (50.0, 10.0), (90.0, 60.0)], "apples", "train"),
    "2.jpg": (80, 48, [(5.0, 5.0), (79.0, 47.0), (40.0, 24.0), (60.0, 10.0)], "cars", "val"),
    "3.jpg": (48, 72, [(12.0, 60.0), (30.0, 30.0)], "apples", "test"),
}
# name: (reason it must be reported with, split)
BAD = {
    "corrupt.jpg": ("corrupt_image", "train"),
    "missing.jpg": ("missing_image", "train"),
    "outside.jpg": ("point_outside_image", "train"),
    "dup.jpg": ("duplicate_points", "val"),
    "both.jpg": ("image_in_two_splits", "train"),
    "empty.jpg": ("no_points", "test"),
    "noentry.jpg": ("missing_annotation", "test"),
}


def _write_image(path, width, height, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=95)


def write_fsc147(root, bad=tuple(BAD)):
    """Write the good images plus the chosen bad items; return the root."""
    images = root / IMAGES_DIR
    images.mkdir(parents=True)
    annotations, splits, classes = {}, {"train": [], "val": [], "test": []}, []
    for seed, (name, (w, h, points, cls, split)) in enumerate(GOOD.items()):
        _write_image(images / name, w, h, seed)
        annotations[name] = _entry(points)
        splits[split].append(name)
        classes.append(f"{name}\t{cls}")
    for name in bad:
        split = BAD[name][1]
        splits[split].append(name)
        classes.append(f"{name}\tapples")
        if name == "noentry.jpg":
            _write_image(images / name, 32, 32)
            continue
        annotations[name] = _entry([(5.0, 5.0), (20.0, 20.0)])
        if name == "corrupt.jpg":
            (images / name).write_bytes(b"\xff\xd8\xff\xe0 definitely not a whole jpeg")
            continue
        if name != "missing.jpg":
            _write_image(images / name, 40, 30)
        if name == "outside.jpg":
            annotations[name]["points"].append([40.5, 10.0])  # x > W = 40
        elif name == "dup.jpg":
            annotations[name]["points"].append([20.0, 20.0])
        elif name == "both.jpg":
            splits["val"].append(name)
        elif name == "empty.jpg":
            annotations[name]["points"] = []
    (root / ANNOTATION_FILE).write_text(json.dumps(annotations))
    (root / SPLIT_FILE).write_text(json.dumps(splits))
    (root / CLASSES_FILE).write_text("\n".join(classes) + "\n")
    return root


def _params(root, classes=(), **prepare):
    """The real params importing this tree at 64 px, 1-50 objects, then ``prepare``."""
    settings = {"source": "fsc147", "order": "reading_order", "row_height": 50.0,
                "on_error": "skip", "min_objects": 1, "max_objects": 50, "image_size": SIZE,
                **prepare}  # fmt: skip
    return shrink_params(
        *[(f"prepare.{key}", value) for key, value in settings.items()],
        ("prepare.fsc147.root", str(root)),
        ("prepare.fsc147.classes", list(classes)),
    )


def test_skip_mode_imports_the_good_and_reports_every_bad_item(tmp_path):
    root = write_fsc147(tmp_path / "FSC147")
    out = tmp_path / "prepared"
    stats = run_prepare(_params(root), out)

    assert stats["skipped"] == {reason: 1 for reason, _ in BAD.values()}
    listed = {(item["reason"], item["file"].split("/")[-1]) for item in stats["skipped_items"]}
    assert ("corrupt_image", "corrupt.jpg") in listed
    assert ("point_outside_image", "outside.jpg") in listed
    assert ("duplicate_points", "dup.jpg") in listed
    assert ("image_in_two_splits", SPLIT_FILE) in listed
    assert ("no_points", ANNOTATION_FILE) in listed
    assert {s: v["images"] for s, v in stats["splits"].items()} == {"train": 1, "val": 1, "test": 1}
    info = read_dataset_info(out)
    assert info["source"] == "fsc147" and info["exemplars"] is True


def test_points_and_boxes_map_from_non_square_images_to_model_pixels(tmp_path):
    root = write_fsc147(tmp_path / "FSC147", bad=())
    out = tmp_path / "prepared"
    run_prepare(_params(root, order="left_to_right"), out)
    (record,) = read_manifest(out / "train.jsonl")
    assert record.id == "1" and record.source == "1.jpg"
    assert record.orig_size == (96, 64)
    assert record.scale == pytest.approx((SIZE / 96, SIZE / 64))
    expected = np.array(GOOD["1.jpg"][2]) * [SIZE / 96, SIZE / 64]
    np.testing.assert_allclose(
        record.points_array(), expected[np.argsort(expected[:, 0])], atol=1e-3
    )
    np.testing.assert_allclose(
        record.exemplars_array(), [[2 * SIZE / 96, 2 * SIZE / 64, 10 * SIZE / 96, 12 * SIZE / 64]],
        atol=0.01,
    )  # fmt: skip
    assert record.extra == {"class": "apples"}
    with Image.open(out / record.image) as image:
        assert image.size == (SIZE, SIZE) and image.format == "PNG"
    # A point on the far edge (x = W) is inside: continuous coordinates run to W.
    (val,) = read_manifest(out / "val.jsonl")
    assert val.points_array()[:, 0].max() == pytest.approx(79.0 * SIZE / 80, abs=1e-3)


@pytest.mark.parametrize("bad", sorted(BAD))
def test_fail_mode_raises_naming_the_file_and_reason(tmp_path, bad):
    root = write_fsc147(tmp_path / "FSC147", bad=(bad,))
    reason, _ = BAD[bad]
    with pytest.raises(PrepareError) as error:
        run_prepare(_params(root, on_error="fail"), tmp_path / "prepared")
    message = str(error.value)
    assert reason.replace("_", " ") in message
    assert bad in message or ANNOTATION_FILE in message or SPLIT_FILE in message
    assert not (tmp_path / "prepared").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["FSC147"]  # no temporary directory left


def test_malformed_annotation_files_are_errors_even_in_skip_mode(tmp_path):
    root = write_fsc147(tmp_path / "FSC147", bad=())
    annotation = root / ANNOTATION_FILE
    good = json.loads(annotation.read_text())

    annotation.write_text("{not json")
    with pytest.raises(PrepareError, match=f"{ANNOTATION_FILE}: .*not valid JSON"):
        run_prepare(_params(root), tmp_path / "out")

    broken = dict(good)
    broken["2.jpg"] = {k: v for k, v in good["2.jpg"].items() if k != "points"}
    annotation.write_text(json.dumps(broken))
    with pytest.raises(PrepareError, match=r"'2.jpg': missing required field 'points'"):
        run_prepare(_params(root), tmp_path / "out")

    broken["2.jpg"] = {**good["2.jpg"], "box_examples_coordinates": [[[1, 2], [3, 4]]]}
    annotation.write_text(json.dumps(broken))
    with pytest.raises(PrepareError, match=r"box_examples_coordinates\[0\]: expected 4 corner"):
        run_prepare(_params(root), tmp_path / "out")

    annotation.write_text(json.dumps(good))
    (root / SPLIT_FILE).write_text(json.dumps({"train": [], "test": []}))
    with pytest.raises(PrepareError, match=f"{SPLIT_FILE}: missing required field 'val'"):
        run_prepare(_params(root), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_root_names_the_layout(tmp_path):
    with pytest.raises(PrepareError, match=r"FSC-147 root not found.*images_384_VarV2"):
        run_prepare(_params(tmp_path / "nowhere"), tmp_path / "out")


def test_class_and_count_filters(tmp_path):
    root = write_fsc147(tmp_path / "FSC147", bad=())
    stats = run_prepare(_params(root, classes=("apples",)), tmp_path / "apples")
    assert stats["images"] == 2 and stats["filtered"] == {"class": 1}

    stats = run_prepare(_params(root, min_objects=3, max_objects=3), tmp_path / "three")
    assert stats["images"] == 1
    assert stats["filtered"] == {"too_few_objects": 1, "too_many_objects": 1}

    with pytest.raises(PrepareError, match=r"unknown \['pears'\]"):
        run_prepare(_params(root, classes=("pears",)), tmp_path / "pears")
