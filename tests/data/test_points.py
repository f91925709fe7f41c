"""The points source on small folders of generated images with CSV and LabelMe annotations."""

import json

import numpy as np
import pytest
from conftest import ROOT, shrink_params
from PIL import Image

from seqops.cli import main
from seqops.data.coco import split_of
from seqops.data.manifest import SPLITS, read_dataset_info, read_manifest
from seqops.data.points import record_names, relative_image_path
from seqops.data.prepare import run_prepare
from seqops.data.sources import PrepareError

SIZE = 64
EXIF_ORIENTATION = 0x0112


def _image(path, width, height, seed=0):
    """Random pixels of ``width x height`` saved to ``path`` (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _labelme(path, image_path, width, height, points, **extra):
    """A LabelMe file with one ``point`` shape per point, then ``extra`` top-level keys."""
    shapes = [{"label": "object", "points": [[x, y]], "group_id": None, "shape_type": "point",
               "flags": {}} for x, y in points]  # fmt: skip
    raw = {"version": "5.0.1", "flags": {}, "shapes": shapes, "imagePath": image_path,
           "imageData": None, "imageHeight": height, "imageWidth": width, **extra}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(raw))
    return raw


def _params(root, labels=(), val_share=0.0, test_share=0.0, **prepare):
    """The real params reading ``root`` at 64 px, 0-50 objects, seed 0, then ``prepare``."""
    points = {"root": str(root), "labels": list(labels), "val_share": val_share,
              "test_share": test_share}  # fmt: skip
    settings = {"source": "points", "seed": 0, "order": "left_to_right", "row_height": 16.0,
                "on_error": "skip", "min_objects": 0, "max_objects": 50, "image_size": SIZE,
                **prepare}  # fmt: skip
    return shrink_params(
        *[(f"prepare.{key}", value) for key, value in settings.items()],
        *[(f"prepare.points.{key}", value) for key, value in points.items()],
    )


def _records(out):
    """``{source image path: (split, record)}`` of a prepared dataset."""
    return {r.source: (split, r) for split in SPLITS for r in read_manifest(out / f"{split}.jsonl")}


def _good_folder(root):
    """One good image, ``good.png`` (40x20) with two points, named by ``good.csv``."""
    _image(root / "good.png", 40, 20)
    (root / "good.csv").write_text("image,x,y\ngood.png,5,5\ngood.png,30,15\n")


def test_csv_with_and_without_split(tmp_path):
    root = tmp_path / "points"
    _image(root / "a.png", 100, 50, 1)
    _image(root / "photos" / "b.jpg", 60, 90, 2)
    _image(root / "empty.png", 30, 30, 3)
    _image(root / "c.png", 32, 32, 4)
    (root / "with_split.csv").write_text(
        "image,x,y,split\n"
        "a.png,10,10,val\n"
        "a.png,90.5,40,val\n"
        "photos/b.jpg,30,45,\n"
        "empty.png,,,test\n"
    )
    # No split column, spaces around cells, the byte order mark Excel writes.
    (root / "no_split.csv").write_text("\ufeffimage , x , y\n ./c.png , 1 , 2 \nc.png,16,16\n")
    out = tmp_path / "prepared"
    stats = run_prepare(_params(root), out)
    records = _records(out)
    assert sorted(records) == ["a.png", "c.png", "empty.png", "photos/b.jpg"]
    split, a = records["a.png"]
    assert split == "val" and a.id == "a" and a.image == "images/val/a.png"
    assert a.orig_size == (100, 50) and a.scale == pytest.approx((SIZE / 100, SIZE / 50))
    np.testing.assert_allclose(a.points_array(), [[6.4, 12.8], [57.92, 51.2]], atol=1e-3)
    assert a.extra == {"annotation": "with_split.csv"}
    assert records["empty.png"][0] == "test" and records["empty.png"][1].points == ()
    for name in ("photos/b.jpg", "c.png"):  # no split given: the hash decides
        assert records[name][0] == split_of(name, 0, 0.0, 0.0) == "train"
    assert records["photos/b.jpg"][1].id == "photos_b"
    np.testing.assert_allclose(records["c.png"][1].points_array(), [[2, 4], [32, 32]])
    assert stats["source"] == "points" and stats["images"] == 4 and stats["objects"] == 5
    assert stats["skipped_total"] == 0 and stats["ignored"] == {}
    with Image.open(out / a.image) as image:
        assert image.size == (SIZE, SIZE)


def test_labelme_files_anywhere_under_the_root(tmp_path):
    root = tmp_path / "points"
    _image(root / "images" / "x.png", 50, 40, 1)
    _image(root / "deep" / "er" / "y.png", 20, 20, 2)
    raw = _labelme(root / "labels" / "x.json", "../images/x.png", 50, 40, [(10, 10), (40, 30)])
    raw["shapes"] += [
        {"label": "object", "points": [[1, 1], [5, 5]], "shape_type": "rectangle"},
        {"label": "object", "points": [[1, 1], [5, 1], [5, 5]]},  # no shape_type: a polygon
        {"label": "cat", "points": [[20, 20]], "shape_type": "point"},
    ]
    (root / "labels" / "x.json").write_text(json.dumps(raw))
    _labelme(root / "deep" / "er" / "y.json", "y.png", 20, 20, [(3, 4)], split="val")
    _labelme(root / ".hidden" / "z.json", "../nowhere.png", 9, 9, [(1, 1)])  # not read
    out = tmp_path / "prepared"
    stats = run_prepare(_params(root), out)
    records = _records(out)
    assert sorted(records) == ["deep/er/y.png", "images/x.png"]
    assert records["deep/er/y.png"][0] == "val"
    assert records["images/x.png"][1].num_objects == 3  # every label counts
    assert records["images/x.png"][1].extra == {"annotation": "labels/x.json"}
    assert stats["ignored"] == {"polygon_shape": 1, "rectangle_shape": 1}
    assert stats["skipped_total"] == 0

    stats = run_prepare(_params(root, labels=["cat"]), tmp_path / "cats")
    x = _records(tmp_path / "cats")["images/x.png"][1]
    np.testing.assert_allclose(x.points_array(), [[20 * SIZE / 50, 20 * SIZE / 40]])
    assert stats["ignored"]["other_label"] == 3  # two objects in x, one in y
    with pytest.raises(PrepareError, match=r"labels: none of \['dog'\].*found: cat, object"):
        run_prepare(_params(root, labels=["dog"]), tmp_path / "dogs")


def test_the_pages_collect_folder_is_read_as_saved(tmp_path):
    """The layout ``seqops serve --collect DIR`` writes: ``<id>.png`` and a LabelMe
    ``<id>.json`` per image, the id 20 hex digits, the points in the image's pixels."""
    root = tmp_path / "collected"
    saved = {"0123456789abcdef0123": (120, 80, [(10.5, 20.25), (100, 70), (60, 40)]),
             "fedcba9876543210fedc": (64, 96, [(32, 48)]),
             "00000000000000000000": (50, 50, [])}  # fmt: skip
    for record_id, (width, height, points) in saved.items():
        _image(root / f"{record_id}.png", width, height, len(points))
        _labelme(root / f"{record_id}.json", f"{record_id}.png", width, height, points)
    (root / ".0123456789abcdef0123.json.k2j3.tmp").write_text("{")  # a save under way
    out = tmp_path / "prepared"
    stats = run_prepare(_params(root, min_objects=1, val_share=0.3), out)
    assert stats["skipped_total"] == 0 and stats["filtered"] == {"too_few_objects": 1}
    assert stats["images"] == 2 and stats["objects"] == 4
    records = _records(out)
    for record_id, (width, height, points) in saved.items():
        if not points:
            continue
        split, record = records[f"{record_id}.png"]
        assert record.id == record_id and record.image == f"images/{split}/{record_id}.png"
        assert split == split_of(f"{record_id}.png", 0, 0.3, 0.0)
        assert record.orig_size == (width, height)
        expected = sorted((x * SIZE / width, y * SIZE / height) for x, y in points)
        np.testing.assert_allclose(record.points_array(), expected, atol=1e-3)  # left to right


def test_points_of_an_exif_rotated_photo_are_where_the_viewer_shows_them(tmp_path):
    root = tmp_path / "points"
    root.mkdir()
    # As shown: 30 wide, 60 high, black with a white square around (8, 45).
    shown = np.zeros((60, 30, 3), np.uint8)
    shown[40:50, 3:13] = 255
    # Stored turned a quarter to the left, with EXIF orientation 6: "turn right to show".
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90).save(
        root / "photo.jpg", exif=exif, quality=95
    )
    with Image.open(root / "photo.jpg") as stored:
        assert stored.size == (60, 30)
    _labelme(root / "photo.json", "photo.jpg", 30, 60, [(8, 45)])
    out = tmp_path / "prepared"
    stats = run_prepare(_params(root, image_size=60), out)
    assert stats["skipped_total"] == 0
    _, record = _records(out)["photo.jpg"]
    assert record.orig_size == (30, 60)
    (x, y), = record.points  # fmt: skip
    assert (x, y) == pytest.approx((16, 45))
    with Image.open(out / record.image) as image:
        pixels = np.asarray(image)
    assert pixels[int(y), int(x)].min() > 200 and pixels[int(y), 50].max() < 50

    # The size the stored file has is a mismatch: the annotation is of another picture.
    _labelme(root / "photo.json", "photo.jpg", 60, 30, [(8, 25)])
    with pytest.raises(PrepareError, match=r"photo.json: size mismatch.*60x30.*is 30x60"):
        run_prepare(_params(root, image_size=60, on_error="fail"), tmp_path / "again")


def _traversal(root):
    (root / "bad.csv").write_text("image,x,y\n../outside.png,1,1\n")


def _absolute(root):
    (root / "bad.csv").write_text(f"image,x,y\n{root / 'good.png'},1,1\n")


def _outside(root):
    _image(root / "b.png", 10, 10)
    (root / "bad.csv").write_text("image,x,y\nb.png,5,5\nb.png,10.5,5\n")


def _nan(root):
    _image(root / "b.png", 10, 10)
    (root / "bad.csv").write_text("image,x,y\nb.png,5,5\nb.png,nan,5\n")


def _not_a_number(root):
    _image(root / "b.png", 10, 10)
    (root / "bad.csv").write_text("image,x,y\nb.png,5,five\n")


def _labelme_infinite(root):
    _image(root / "b.png", 10, 10)
    (root / "bad.json").write_text(
        '{"shapes": [{"label": "o", "points": [[Infinity, 1]], "shape_type": "point"}],'
        ' "imagePath": "b.png", "imageHeight": 10, "imageWidth": 10}'
    )


def _missing(root):
    _labelme(root / "bad.json", "b.png", 10, 10, [(1, 1)])


def _corrupt(root):
    (root / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "bad.csv").write_text("image,x,y\nb.png,1,1\n")


def _not_labelme(root):
    (root / "bad.json").write_text('{"images": [], "annotations": []}')


def _invalid_json(root):
    (root / "bad.json").write_text('{"shapes": [')


def _no_image_size(root):
    _image(root / "b.png", 10, 10)
    (root / "bad.json").write_text('{"shapes": [], "imagePath": "b.png", "imageWidth": 10}')


def _split_disagreement(root):
    _image(root / "b.png", 10, 10)
    (root / "bad.csv").write_text("image,x,y,split\nb.png,1,1,train\nb.png,5,5,test\n")


def _bad_split(root):
    _image(root / "b.png", 10, 10)
    _labelme(root / "bad.json", "b.png", 10, 10, [(1, 1)], split="holdout")


def _named_twice(root):
    _image(root / "b.png", 10, 10)
    (root / "bad.csv").write_text("image,x,y\nb.png,1,1\n")
    _labelme(root / "sub" / "bad.json", "../b.png", 10, 10, [(1, 1)])


def _size_mismatch(root):
    _image(root / "b.png", 10, 12)
    _labelme(root / "bad.json", "b.png", 12, 10, [(1, 1)])


def _duplicate_points(root):
    _image(root / "b.png", 10, 10)
    _labelme(root / "bad.json", "b.png", 10, 10, [(1, 1), (5, 5), (1.2, 1.3)])


def _short_row(root):
    _image(root / "b.png", 10, 10)
    (root / "bad.csv").write_text("image,x,y\nb.png,1\n")


# (folder builder, reason counted under skip, what the error names under fail)
BAD_INPUTS = {
    "path traversal": (
        _traversal,
        "bad_image_path",
        r"bad.csv: bad image path \(line 2: .*'../outside.png' leaves prepare.points.root",
    ),
    "absolute path": (
        _absolute,
        "bad_image_path",
        r"bad.csv: bad image path \(line 2: .*good.png' is absolute",
    ),
    "point outside": (
        _outside,
        "point_outside_image",
        r"bad.csv: point outside image \(b.png: point 1 \(10.5, 5\) outside 10x10",
    ),
    "NaN": (
        _nan,
        "bad_coordinates",
        r"bad.csv: bad coordinates \(line 3: b.png: x='nan', y='5'",
    ),
    "not a number": (
        _not_a_number,
        "bad_coordinates",
        r"bad.csv: bad coordinates \(line 2: b.png: x='5', y='five'",
    ),
    "infinite in LabelMe": (
        _labelme_infinite,
        "bad_coordinates",
        r"bad.json: bad coordinates \(shapes\[0\].points",
    ),
    "missing image": (
        _missing,
        "missing_image",
        r"bad.json: missing image \(b.png: file not found",
    ),
    "corrupt image": (
        _corrupt,
        "corrupt_image",
        r"b.png: corrupt image",
    ),
    "not LabelMe": (
        _not_labelme,
        "not_labelme",
        r"bad.json: not labelme \(no 'shapes'",
    ),
    "invalid JSON": (
        _invalid_json,
        "not_labelme",
        r"bad.json: not labelme \(not valid JSON",
    ),
    "LabelMe without imageHeight": (
        _no_image_size,
        "malformed_labelme",
        r"bad.json: malformed labelme \(imageHeight: expected an integer, got None",
    ),
    "split disagreement": (
        _split_disagreement,
        "split_disagreement",
        r"bad.csv: split disagreement \(b.png: its rows give test, train",
    ),
    "unknown split": (
        _bad_split,
        "bad_split",
        r"bad.json: bad split \(split 'holdout' is not one of train, val, test",
    ),
    "image named twice": (
        _named_twice,
        "image_named_twice",
        r"b.png: image named twice \(in bad.csv, sub/bad.json",
    ),
    "size mismatch": (
        _size_mismatch,
        "size_mismatch",
        r"bad.json: size mismatch \(imageWidth x imageHeight is 12x10, but b.png is 10x12",
    ),
    "duplicate points": (
        _duplicate_points,
        "duplicate_points",
        r"bad.json: duplicate points \(b.png: points 0 and 2",
    ),
    "short row": (
        _short_row,
        "malformed_row",
        r"bad.csv: malformed row \(line 2: not one cell per column",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_named_then_skipped_or_fatal(tmp_path, case):
    build, reason, message = BAD_INPUTS[case]
    root = tmp_path / "points"
    _good_folder(root)
    build(root)
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "kept.txt").write_text("a previous dataset")
    with pytest.raises(PrepareError, match=message):
        run_prepare(_params(root, on_error="fail"), out)
    assert (out / "kept.txt").read_text() == "a previous dataset"  # nothing written is lost

    stats = run_prepare(_params(root), out)
    assert stats["skipped"] == {reason: 1}, stats["skipped_items"]
    assert stats["skipped_items"][0]["reason"] == reason
    assert "good.png" in _records(out)  # the rest goes on


def test_a_csv_without_its_columns_stops_prepare_under_skip_too(tmp_path):
    root = tmp_path / "points"
    _good_folder(root)
    (root / "counts.csv").write_text("file,count\ngood.png,2\n")
    with pytest.raises(
        PrepareError, match=r"counts.csv: expected the columns image,x,y .*got file,count"
    ):
        run_prepare(_params(root), tmp_path / "prepared")  # fmt: skip


def test_an_empty_or_missing_root_is_an_error_naming_it(tmp_path):
    with pytest.raises(PrepareError, match=r"nowhere: points folder not found"):
        run_prepare(_params(tmp_path / "nowhere"), tmp_path / "prepared")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareError, match=r"empty: no \*.csv or LabelMe \*.json files"):
        run_prepare(_params(tmp_path / "empty"), tmp_path / "prepared")


def test_splits_are_stable_when_images_are_added(tmp_path):
    root = tmp_path / "points"
    rows = ["image,x,y"]
    for i in range(30):
        _image(root / f"im{i:02d}.png", 16, 16, i)
        rows.append(f"im{i:02d}.png,8,8")
    (root / "first.csv").write_text("\n".join(rows) + "\n")
    run_prepare(_params(root, val_share=0.3, test_share=0.3), tmp_path / "first")
    first = {name: split for name, (split, _) in _records(tmp_path / "first").items()}
    assert set(first.values()) == set(SPLITS)  # 30 images reach every split
    for i in range(30, 45):
        _labelme(root / "more" / f"im{i}.json", f"../im{i}.png", 16, 16, [(4, 4)])
        _image(root / f"im{i}.png", 16, 16, i)
    run_prepare(_params(root, val_share=0.3, test_share=0.3), tmp_path / "second")
    second = {name: split for name, (split, _) in _records(tmp_path / "second").items()}
    assert len(second) == 45
    assert {name: second[name] for name in first} == first
    assert all(split == split_of(name, 0, 0.3, 0.3) for name, split in second.items())


def test_same_folder_gives_byte_identical_datasets(tmp_path):
    root = tmp_path / "points"
    _good_folder(root)
    _image(root / "z.png", 20, 20, 5)
    _labelme(root / "z.json", "z.png", 20, 20, [(15, 3), (2, 17), (9, 9)])
    run_prepare(_params(root, val_share=0.5), tmp_path / "a")
    run_prepare(_params(root, val_share=0.5), tmp_path / "b")
    for split in SPLITS:
        path = f"{split}.jsonl"
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes()


def test_image_paths_and_record_names():
    assert relative_image_path("a/./b.png") == ("a/b.png", "")
    assert relative_image_path("..\\img\\c.png", "labels") == ("img/c.png", "")
    assert relative_image_path("x/../../c.png")[1].endswith("leaves prepare.points.root")
    assert "absolute" in relative_image_path("C:/data/c.png")[1]
    assert "empty" in relative_image_path("  ")[1]
    names = record_names(["a/b.png", "a_b.jpg", "c.png"])
    assert names["c.png"] == "c"
    assert names["a/b.png"].startswith("a_b-") and names["a_b.jpg"].startswith("a_b-")
    assert names["a/b.png"] != names["a_b.jpg"]


def test_cli_prepares_a_points_folder_that_data_stats_reads(tmp_path, capsys):
    root = tmp_path / "collected"
    for i, record_id in enumerate(("0123456789abcdef0123", "abcdefabcdefabcdef01")):
        _image(root / f"{record_id}.png", 48, 32, i)
        _labelme(root / f"{record_id}.json", f"{record_id}.png", 48, 32, [(4, 4), (40, 20)])
    (root / "notes.json").write_text('{"who": "a person"}')
    (root / "sketch.json").write_text(json.dumps({
        "shapes": [{"label": "object", "points": [[1, 1], [2, 2]], "shape_type": "line"}],
        "imagePath": "0123456789abcdef0123.png", "imageHeight": 32, "imageWidth": 48,
    }))  # fmt: skip
    out = tmp_path / "prepared"
    code = main(["prepare", "--params", str(ROOT / "params.yaml"),
                 "--set", "prepare.source=points", "--set", f"prepare.points.root={root}",
                 "--set", f"prepare.image_size={SIZE}", "--set", "prepare.min_objects=1",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    capsys.readouterr()
    assert read_dataset_info(out)["source"] == "points"
    assert main(["data", "stats", str(out)]) == 0
    text = capsys.readouterr().out
    assert "source points" in text.splitlines()[0]
    assert "skipped: 2 (image_named_twice: 1, not_labelme: 1)" in text
    assert "ignored: line_shape: 1" in text
    stats = json.loads((out / "stats.json").read_text())
    assert stats["images"] == 1 and stats["objects"] == 2  # the twice-named image left out
