"""``POST /collect`` (``--collect DIR``), ``/info`` and ``/predict/stream`` continued from given
points: the server side of the counting page, in-process against the tiny test model.

A record is ``<id>.png`` + ``<id>.json`` (LabelMe points); every bad save is a 4xx that names
the problem and leaves the folder byte for byte as it was.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from serve_fixtures import PNG, PNG_HEADERS, make_client, make_png, png_pixels, serve_model

from seqops.predictor import Predictor
from serve.collect import ID_HEX_DIGITS


@pytest.fixture(scope="module")
def predictor():
    return Predictor.load(serve_model(), device="cpu", threads=1)


@pytest.fixture
def folder(tmp_path):
    return tmp_path / "collected"


@pytest.fixture
def client(predictor, folder):
    with make_client(predictor, collect_dir=str(folder), max_objects_limit=8) as c:
        yield c


def save(client, image: bytes, points, content_type: str = "image/png", headers=None):
    """A multipart save of ``image`` with ``points`` (a list, or text sent as it is)."""
    text = points if isinstance(points, str) else json.dumps(points)
    files = {"file": ("photo", image, content_type)}
    return client.post("/collect", files=files, data={"points": text}, headers=headers)


def snapshot(folder) -> dict[str, bytes]:
    """Every file under the folder and its bytes (hidden temporary files included)."""
    return {p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


# --- saving --------------------------------------------------------------------------------


def test_a_save_writes_the_image_and_a_labelme_record_named_by_the_pixels(client, folder):
    points = [[10.5, 20.25], [0, 0], [96, 64]]  # the corners belong to the image
    response = save(client, PNG, points)
    assert response.status_code == 201, response.text
    body = response.json()
    pixels = png_pixels(PNG)
    digest = hashlib.sha256(pixels.tobytes() + b"64x96x3").hexdigest()
    assert body == {
        "id": digest[:ID_HEX_DIGITS],
        "count": 3,
        "path": f"{digest[:ID_HEX_DIGITS]}.json",
        "replaced": False,
    }
    assert sorted(snapshot(folder)) == sorted([f"{body['id']}.png", body["path"]])
    assert np.array_equal(png_pixels((folder / f"{body['id']}.png").read_bytes()), pixels)
    record = json.loads((folder / body["path"]).read_text())
    assert record == {
        "version": "5.0.1",
        "flags": {},
        "shapes": [
            {"label": "object", "points": [p], "group_id": None, "shape_type": "point",
             "flags": {}}
            for p in [[10.5, 20.25], [0.0, 0.0], [96.0, 64.0]]
        ],
        "imagePath": f"{body['id']}.png",
        "imageData": None,
        "imageHeight": 64,
        "imageWidth": 96,
    }  # fmt: skip


def test_saving_the_same_image_again_replaces_only_its_own_record(client, folder):
    first = save(client, PNG, [[1, 2]]).json()
    other = save(client, make_png(96, 64, seed=1), [[3, 4], [5, 6]]).json()
    assert first["id"] != other["id"]
    again = save(client, PNG, [[7, 8], [9, 10]])
    assert again.status_code == 201
    assert again.json() == {**first, "count": 2, "replaced": True}
    files = snapshot(folder)
    assert len(files) == 4  # two records, no temporary file left behind
    shapes = json.loads(files[first["path"]])["shapes"]
    assert [s["points"] for s in shapes] == [[[7.0, 8.0]], [[9.0, 10.0]]]
    assert len(json.loads(files[other["path"]])["shapes"]) == 2  # untouched


def test_an_image_without_objects_is_a_record_too(client, folder):
    response = save(client, PNG, [])
    assert response.status_code == 201 and response.json()["count"] == 0
    assert json.loads((folder / response.json()["path"]).read_text())["shapes"] == []


def test_an_object_marked_twice_is_refused(client, folder):
    """prepare's points reader would skip such a record (its own check decides here)."""
    twice = save(client, PNG, [[10, 10], [30, 30], [10.4, 10.3]])
    assert twice.status_code == 422
    assert "points 0 and 2 at (10, 10) are one object twice" in twice.json()["detail"]
    assert not folder.exists() or snapshot(folder) == {}
    assert save(client, PNG, [[10, 10], [11.2, 10]]).status_code == 201  # 1.2 px apart: two


def test_the_record_holds_the_image_as_the_camera_showed_it(client, folder):
    """EXIF orientation 6 (turned 90° clockwise): the stored 80x48 JPEG is shown 48x80, and
    the points and the saved PNG are in that frame."""
    stored = np.zeros((48, 80, 3), np.uint8)
    stored[:, :10] = 255  # a white band on the left of the stored image ...
    exif = Image.Exif()
    exif[0x0112] = 6
    jpeg = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif)
    assert save(client, jpeg, [[40, 70]], "image/jpeg").status_code == 201  # inside 48x80 only
    (png_path,) = folder.glob("*.png")
    shown = png_pixels(png_path.read_bytes())
    assert shown.shape == (80, 48, 3)
    assert shown[:10].mean() > 200 and shown[20:].mean() < 50  # ... is on top once shown
    record = json.loads(png_path.with_suffix(".json").read_text())
    assert (record["imageWidth"], record["imageHeight"]) == (48, 80)
    outside = save(client, jpeg, [[70, 40]], "image/jpeg")  # inside the stored frame only
    assert outside.status_code == 422 and "outside the 48x80 image" in outside.text


def test_json_bodies_save_too(client, folder):
    body = {"image": base64.b64encode(PNG).decode(), "points": [[1, 1]]}
    response = client.post("/collect", json=body)
    assert response.status_code == 201 and response.json()["count"] == 1
    assert len(snapshot(folder)) == 2


def _gif() -> bytes:
    return encode(Image.new("RGB", (32, 32)), "GIF")


@pytest.mark.parametrize(
    ("image", "points", "status", "named"),
    [
        (PNG, [[97, 10]], 422, "points[0]: [97.0, 10.0] is outside the 96x64 image"),
        (PNG, [[10, 10], [-0.5, 3]], 422, "points[1]"),
        (PNG, "[[NaN, 3]]", 422, "points[0]: [nan, 3.0] is not a pair of finite numbers"),
        (PNG, "[[Infinity, 3]]", 422, "not a pair of finite numbers"),
        (PNG, [[1, 1]] * 9, 422, "points: at most 8 here, got 9"),
        (PNG, [[1, 2, 3]], 422, "points"),
        (PNG, "[[1, 2]", 422, "expected a JSON list"),
        (PNG, {"x": 1}, 422, "points"),
        (b"not an image", [[1, 1]], 400, "image: not a decodable image"),
        (b"", [[1, 1]], 400, "image: the body is empty"),
        ("gif", [[1, 1]], 415, "GIF images are not taken"),
        (make_png(8, 8), [[1, 1]], 422, "smaller than 16 px"),
    ],
)
def test_a_bad_save_names_the_problem_and_leaves_the_folder_as_it_was(
    client, folder, image, points, status, named
):
    assert save(client, make_png(40, 40, seed=3), [[1, 1]]).status_code == 201  # a record first
    before = snapshot(folder)
    response = save(client, _gif() if image == "gif" else image, points)
    assert response.status_code == status, response.text
    assert named in json.dumps(response.json()["detail"]) or named in response.json()["detail"]
    assert snapshot(folder) == before


def test_missing_fields_and_unknown_fields_are_named(client, folder):
    files = {"file": ("a.png", PNG, "image/png")}
    missing = client.post("/collect", files=files)
    assert missing.status_code == 422
    assert missing.json()["detail"][0]["loc"] == ["options", "points"]
    extra = client.post("/collect", files=files, data={"points": "[]", "label": "cells"})
    assert extra.status_code == 422 and extra.json()["detail"][0]["loc"] == ["options", "label"]
    no_file = client.post("/collect", data={"points": "[]"}, files={"other": ("a", b"x")})
    assert no_file.status_code == 422 and "file" in no_file.json()["detail"]
    assert not folder.exists() or snapshot(folder) == {}


def test_the_folder_cap_refuses_a_save_and_writes_nothing(predictor, tmp_path):
    folder = tmp_path / "capped"
    big = make_png(256, 256, seed=5)  # noise: ~200 kB as PNG, over a 0.1 MiB cap
    with make_client(predictor, collect_dir=str(folder), collect_max_mb=0.1) as c:
        assert save(c, make_png(32, 32), [[1, 1]]).status_code == 201
        before = snapshot(folder)
        response = save(c, big, [[1, 1]])
        assert response.status_code == 507
        assert "over its cap of 0.1 MiB (--collect-max-mb)" in response.json()["detail"]
        assert snapshot(folder) == before
        # Saving an image already there again only replaces its record: no room needed.
        assert save(c, make_png(32, 32), [[2, 2]]).status_code == 201


def test_collect_is_off_by_default(predictor):
    with make_client(predictor) as c:
        response = save(c, PNG, [[1, 1]])
        assert response.status_code == 404 and "--collect DIR" in response.json()["detail"]
        assert c.get("/info").json()["collect"] is False


def test_collect_and_info_need_the_api_key_when_one_is_set(predictor, folder, monkeypatch):
    monkeypatch.setenv("SEQOPS_TEST_KEY", "s3cret")
    settings = {"collect_dir": str(folder), "api_key_env": "SEQOPS_TEST_KEY"}
    with make_client(predictor, **settings) as c:
        assert save(c, PNG, [[1, 1]]).status_code == 401
        assert c.get("/info").status_code == 401
        assert snapshot(folder) == {}
        key = {"authorization": "Bearer s3cret"}
        assert save(c, PNG, [[1, 1]], headers=key).status_code == 201
        assert c.get("/info", headers=key).json()["collect"] is True
        # The page itself holds no data: open, like /docs.
        assert c.get("/").status_code == 200 and c.get("/page/app.js").status_code == 200


# --- what the page reads first, and a count continued from corrected points -----------------


def test_info_says_what_the_page_needs(client, predictor):
    info = client.get("/info").json()
    assert info["exemplars"] is False and info["max_exemplars"] == 3
    assert (info["max_objects"], info["max_objects_limit"]) == (5, 8)
    assert info["collect"] is True and info["model"]["name"] == predictor.info.name


def test_the_page_and_its_assets_are_served_from_the_package(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in ("/page/app.js", "/page/app.css"):
        assert asset in page.text
        assert client.get(asset).status_code == 200
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN
    for module in ("/page/state.js", "/page/view.js"):  # app.js's imports (ES modules)
        answer = client.get(module)
        assert answer.status_code == 200 and "javascript" in answer.headers["content-type"]


def stream(client, points=None, **params):
    """The records of ``/predict/stream`` for PNG (points given as a form field)."""
    data = {} if points is None else {"points": json.dumps(points)}
    files = {"file": ("a.png", PNG, "image/png")}
    response = client.post("/predict/stream", files=files, data=data, params=params)
    return response, [json.loads(line) for line in response.text.splitlines() if line]


def test_a_stream_continues_from_given_points(client):
    full = client.post("/predict", content=PNG, headers=PNG_HEADERS).json()  # 5 objects
    given = [full["points"][0], [50.0, 30.0]]  # one kept, one a person added
    response, records = stream(client, given)
    assert response.status_code == 200
    assert [r["index"] for r in records[:-1]] == [2, 3, 4]
    done = records[-1]
    assert (done["event"], done["count"], done["stopped_by"]) == ("done", 5, "max_objects")
    assert done["count_confidence"] is None  # its loop did not take the first steps
    step = client.post("/next", json={"image": base64.b64encode(PNG).decode(), "points": given})
    first = [records[0]["x"], records[0]["y"]]
    assert np.allclose(first, [step.json()["x"], step.json()["y"]], atol=0.05)
    # Nothing given: the same records as a plain count, with its confidence.
    _, plain = stream(client, [])
    assert [[r["x"], r["y"]] for r in plain[:-1]] == full["points"]
    assert plain[-1]["count_confidence"] == full["count_confidence"]


def test_a_stream_refuses_given_points_it_cannot_continue_from(client):
    outside, _ = stream(client, [[10, 10], [500, 10]])
    assert outside.status_code == 422 and "outside the 96x64 image" in outside.text
    full, _ = stream(client, [[1, 1]] * 5)
    assert full.status_code == 422 and "5 given, max_objects is 5" in full.text
    over, _ = stream(client, [[1, 1]] * 9, max_objects=8)
    assert over.status_code == 422


def test_a_failed_write_leaves_no_half_record(client, folder, monkeypatch):
    """The disk fills between the PNG and the JSON: the new PNG goes again, the folder is
    as it was, and the answer says which file could not be written."""
    assert save(client, make_png(40, 40, seed=3), [[1, 1]]).status_code == 201
    before = snapshot(folder)
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(src, dst)

    monkeypatch.setattr("serve.collect.os.replace", replace)
    response = save(client, PNG, [[1, 1]])
    assert response.status_code == 507 and ".json (No space left on device)" in response.text
    assert snapshot(folder) == before
