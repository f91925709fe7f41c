"""The counting page at ``/`` in real browsers: Debian's headless Chromium (Selenium and
chromedriver) and Firefox ESR (WebDriver BiDi), against a real ``seqops serve --collect DIR``.

What a person does: drop an image, watch the count reach the model's answer (the same as
``/predict`` gives), remove a point and add one and see the model continue (the same as
``/predict/stream`` gives from those points), undo and redo, correct with the keyboard alone,
zoom, resize the window, export CSV and JSON, save to the dataset and read the folder back
with ``seqops prepare``. ``scripts/browser.sh install`` puts both browsers on the machine (apt);
``browsers.py`` drives them.

The served model is the tiny test one whose done never fires: ``--max-objects`` sets every
count, so each step of the story has an exact expected answer.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from browsers import BROWSERS, Page, browser_paths, open_browser
from PIL import Image, ImageDraw
from selenium.webdriver.common.keys import Keys
from serve_fixtures import Server, png_pixels, seqops_command, serve_model

pytestmark = [pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
MAX_OBJECTS = 6  # the server's loop guard: the model's answer for every fresh count
WINDOW = (1280, 860)


def make_scene(width: int, height: int, seed: int = 0) -> tuple[bytes, np.ndarray]:
    """A light PNG with 12 dark discs (what the page would be given), non-square, and the
    discs' centres (what a person clicks)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(200, 6, size=(height, width, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(base)
    draw = ImageDraw.Draw(image)
    centres = rng.uniform([20, 20], [width - 20, height - 20], size=(12, 2)).round(1)
    for x, y in centres:
        draw.ellipse((x - 9, y - 9, x + 9, y + 9), fill=(40, 60, 160))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue(), centres


def twice_marked(points: list) -> tuple[int, int] | None:
    """Two points closer than 1 px (one object marked twice: a save refuses them), or None."""
    if len(points) < 2:
        return None
    xy = np.asarray(points)
    distance = np.hypot(*(xy[:, None] - xy[None]).transpose(2, 0, 1))
    np.fill_diagonal(distance, np.inf)
    i, j = np.unravel_index(distance.argmin(), distance.shape)
    return (int(i), int(j)) if distance[i, j] < 1 else None


def remove_twice_marked(page: Page) -> list[list[float]]:
    """Without auto-continue, click away every second mark of an object; the points left."""
    if page.js("return document.getElementById('auto').checked"):
        page.click("auto")
    while (pair := twice_marked(page.points())) is not None:
        count = len(page.points())
        page.click_image(*page.points()[pair[1]])
        page.wait(lambda n=count: len(page.points()) == n - 1, what="a removed mark")
    return page.points()


def stream_from(base: str, image: bytes, points: list, max_objects: int) -> list[list[float]]:
    """What ``/predict/stream`` finds after ``points``: the expected continuation."""
    files = {"file": ("a.png", image, "image/png")}
    data = {"points": json.dumps(points), "max_objects": str(max_objects)}
    response = httpx.post(f"{base}/predict/stream", files=files, data=data, timeout=30)
    assert response.status_code == 200, response.text
    records = [json.loads(line) for line in response.text.splitlines()]
    assert records[-1]["event"] == "done", records[-1]
    return [[r["x"], r["y"]] for r in records[:-1]]


@pytest.fixture(scope="module")
def paths():
    try:
        return browser_paths()
    except PermissionError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def collected(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("page") / "collected"


@pytest.fixture(scope="module")
def server(collected, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("page_server") / "server.log"
    with Server(
        serve_model(), log_path, "--collect", str(collected), "--max-objects", str(MAX_OBJECTS),
        "--max-objects-limit", "60",
    ) as srv:  # fmt: skip
        yield srv


@pytest.fixture(scope="module", params=BROWSERS)
def browser(request, paths, tmp_path_factory):
    """One browser of each kind for the module; its downloads go to ``browser.downloads``."""
    downloads = tmp_path_factory.mktemp(f"downloads-{request.param}")
    opened = open_browser(request.param, paths, downloads, WINDOW)
    opened.downloads = downloads
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def page(browser, server):
    browser.set_size(*WINDOW)
    page = Page(browser, server.base)
    page.open()
    return page


def downloaded(page: Page, name: str, timeout: float = 15.0) -> Path:
    """The file the page's export saved in the browser's download folder."""
    folder = page.browser.downloads
    path = folder / name
    stop_at = time.monotonic() + timeout
    while time.monotonic() < stop_at:
        partial = [*folder.glob("*.crdownload"), *folder.glob("*.part")]
        if path.is_file() and path.stat().st_size and not partial:
            return path
        time.sleep(0.05)
    raise AssertionError(f"{name} was not downloaded; {folder} holds {os.listdir(folder)}")


# --- the story ------------------------------------------------------------------------------


def layout(page: Page) -> list:
    """Where the page's regions and their buttons are: nothing may move while points come."""
    return page.js(
        """return [...document.querySelectorAll('header, nav, nav button, #view, aside, aside p')]
            .filter((e) => e.offsetParent !== null)
            .map((e) => e.getBoundingClientRect())
            .map((r) => [r.x, r.y, r.width, r.height]);"""
    )


def test_count_correct_export_and_save(page, server, collected, tmp_path):
    image, _ = make_scene(360, 240)
    before = layout(page)
    page.drop(image, "cells.png")
    found = page.settled(MAX_OBJECTS)
    assert layout(page) == before  # no layout jump from the points, the count, the status
    timings = page.js("return seqops.timings")
    drop_to_count_ms = timings["firstDone"] - timings["opened"]
    answer = httpx.post(f"{server.base}/predict", content=image,
                        headers={"content-type": "image/png"}, timeout=30).json()  # fmt: skip
    assert np.allclose(found, answer["points"], atol=0.01)  # the model's own answer
    assert page.js("return document.getElementById('count-value').textContent") == "6"
    confidence = page.js("return document.getElementById('confidence').textContent")
    assert confidence == f"{round(answer['count_confidence'] * 100)}%"
    # The marks are drawn where the points are: numbered, on the image.
    for (sx, sy), (x, y) in zip(page.mark_centres(), found, strict=True):
        assert np.allclose((sx, sy), page.screen_of(x, y), atol=1.0)
    page.browser.screenshot(tmp_path / "counted.png")

    # Remove the third point: the model continues from the five left (guard: 5 + 6).
    page.click_image(*found[2])
    kept = found[:2] + found[3:]
    continued = page.settled(11)
    assert np.allclose(continued[:5], kept, atol=0.01)
    assert np.allclose(continued[5:], stream_from(server.base, image, kept, 11), atol=0.01)
    assert page.js("return document.getElementById('confidence').textContent") == "–"

    # Add a missed object where no point is: the model continues from those 12.
    spot = next(
        (x, y) for x, y in [(8.0, 8.0), (350.0, 8.0), (8.0, 230.0), (350.0, 230.0)]
        if min(np.hypot(px - x, py - y) for px, py in continued) > 15
    )  # fmt: skip
    page.click_image(*spot)
    added = page.settled(18)
    assert np.allclose(added[11], spot, atol=0.6)  # one screen pixel at this zoom
    given = added[:12]
    assert np.allclose(added[12:], stream_from(server.base, image, given, 18), atol=0.01)

    # Undo the continuation, then the added point; redo both.
    page.chord(Keys.CONTROL, "z")
    page.wait(lambda: page.js("return seqops.points.length") == 12, what="undo")
    page.chord(Keys.CONTROL, "z")
    page.wait(lambda: page.js("return seqops.points.length") == 11, what="second undo")
    assert np.allclose(page.points(), continued, atol=0.01)
    page.chord(Keys.CONTROL, "y")
    page.chord(Keys.CONTROL, "y")
    page.wait(lambda: page.js("return seqops.points.length") == 18, what="redo")
    final = page.points()

    # Export: the files hold the points in the image's own pixels.
    page.click("export-csv")
    page.click("export-json")
    rows = list(csv.DictReader(downloaded(page, "cells.points.csv").open()))
    assert [r["image"] for r in rows] == ["cells.png"] * 18
    assert np.allclose([[float(r["x"]), float(r["y"])] for r in rows], final, atol=1e-9)
    exported = json.loads(downloaded(page, "cells.points.json").read_text())
    assert (exported["width"], exported["height"], exported["count"]) == (360, 240, 18)
    assert np.allclose(exported["points"], final, atol=1e-9)

    # Save to the dataset. The untrained test model marks some objects twice, which the
    # server refuses (prepare would skip the record), naming them; the person removes them.
    if twice_marked(final):
        before = sorted(collected.glob("*")) if collected.exists() else []
        page.click("save")
        page.wait(lambda: page.state() == "error", what="a refused save")
        status = page.js("return document.getElementById('status').textContent")
        assert "are one object twice" in status and status.startswith("Not saved: 422")
        assert (sorted(collected.glob("*")) if collected.exists() else []) == before
        final = remove_twice_marked(page)
    # One LabelMe record, the image's pixels beside it.
    page.click("save")
    record_id = page.wait(lambda: page.js("return document.body.dataset.saved"), what="save")
    record = json.loads((collected / f"{record_id}.json").read_text())
    assert record["imagePath"] == f"{record_id}.png" and record["imageData"] is None
    assert (record["imageWidth"], record["imageHeight"]) == (360, 240)
    assert all(s["shape_type"] == "point" and s["label"] == "object" for s in record["shapes"])
    assert np.allclose([s["points"][0] for s in record["shapes"]], final, atol=1e-9)
    saved = png_pixels((collected / f"{record_id}.png").read_bytes())
    assert np.array_equal(saved, png_pixels(image))
    page.browser.screenshot(tmp_path / "saved.png")
    (tmp_path / "timing.json").write_text(json.dumps({"drop_to_count_ms": drop_to_count_ms}))
    print(f"drop image -> final count: {drop_to_count_ms:.0f} ms (tiny test model)")


def test_a_pasted_image_is_corrected_with_the_keyboard_alone(page, server):
    image, _ = make_scene(300, 200, seed=1)
    if page.browser.name == "firefox":  # a script-made paste event carries no files there
        page.drop(image, "image.png")
    else:
        page.paste(image)
    found = page.settled(MAX_OBJECTS)
    assert page.focused() == "view"  # the image has the focus
    page.keys("]", "]", Keys.DELETE)  # select point 2, remove it
    kept = [found[0], *found[2:]]
    continued = page.settled(11)
    assert np.allclose(continued[:5], kept, atol=0.01)
    # The cursor is on the removed point; move it (Shift: faster) clear of every point and
    # add one there with Space.
    for _ in range(12):
        cursor = page.js("return [seqops.cursor.x, seqops.cursor.y]")
        if min(np.hypot(x - cursor[0], y - cursor[1]) for x, y in continued) > 20:
            break
        page.chord(Keys.SHIFT, Keys.DOWN if cursor[1] < 150 else Keys.RIGHT)
    page.keys(Keys.SPACE)
    added = page.settled(18)
    assert np.allclose(added[11], cursor, atol=0.01)
    page.chord(Keys.SHIFT, "c")  # export CSV
    rows = list(csv.DictReader(downloaded(page, "image.points.csv").open()))
    assert len(rows) == 18


def test_points_stay_on_their_objects_through_zoom_and_resize(page, server):
    page.drop(make_scene(360, 240, seed=2)[0], "zoom.png")
    found = page.settled(MAX_OBJECTS)

    def on_image():
        """Each mark's centre, as a fraction of the drawn image, equals its point's."""
        box = page.js("return document.getElementById('image').getBoundingClientRect().toJSON()")
        for (sx, sy), (x, y) in zip(page.mark_centres(), found, strict=True):
            fx, fy = (sx - box["left"]) / box["width"], (sy - box["top"]) / box["height"]
            assert np.allclose((fx, fy), (x / 360, y / 240), atol=0.004)
        return box["width"]

    fitted = on_image()
    page.keys("+", "+")
    assert on_image() > fitted * 1.5
    page.browser.set_size(900, 700)
    page.wait(lambda: page.js("return document.getElementById('view').clientWidth") < 700)
    on_image()
    page.keys("0")  # fit again, in the smaller window
    assert on_image() < fitted


def test_the_image_is_shown_as_the_camera_took_it(page, server, tmp_path):
    """EXIF orientation 6: the stored 120x80 JPEG is shown 80x120, the frame of the points."""
    stored = np.full((80, 120, 3), 200, np.uint8)
    stored[:, :20] = 30  # a dark band on the stored image's left: on top once turned
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, "JPEG", quality=95, exif=exif)
    jpeg = buffer.getvalue()
    photo = tmp_path / "turned.jpg"
    photo.write_bytes(jpeg)
    page.browser.set_files("file", photo)  # the Open dialog's input
    found = page.settled(MAX_OBJECTS)
    size = page.js("return [seqops.width, seqops.height]")
    assert size == [80, 120]
    answer = httpx.post(f"{page.base}/predict", content=jpeg,
                        headers={"content-type": "image/jpeg"}, timeout=30).json()  # fmt: skip
    assert np.allclose(found, answer["points"], atol=0.01)
    # The band is drawn on top: sample the rendered image through a canvas.
    top, bottom = page.js(
        """const img = document.getElementById('image');
        const c = document.createElement('canvas'); c.width = 80; c.height = 120;
        const g = c.getContext('2d'); g.drawImage(img, 0, 0);
        return [g.getImageData(40, 5, 1, 1).data[0], g.getImageData(40, 100, 1, 1).data[0]];"""
    )
    assert top < 80 and bottom > 150


def test_a_saved_folder_is_a_dataset_for_prepare(page, server, collected, tmp_path):
    """The loop closed: what the page saved, ``seqops prepare`` reads as ``points``."""
    if not (ROOT / "seqops" / "data" / "points.py").is_file():
        pytest.skip("prepare.source: points is not in this tree yet (seqops/data/points.py)")
    for seed in (3, 4):
        image, centres = make_scene(200, 160, seed=seed)
        page.drop(image, f"scene{seed}.png")
        page.settled(MAX_OBJECTS)
        marked = remove_twice_marked(page)  # auto-continue is off from here
        for x, y in marked:  # the person removes the marks on no disc ...
            if min(np.hypot(cx - x, cy - y) for cx, cy in centres) > 9:
                count = len(page.points())
                page.click_image(x, y)
                page.wait(lambda n=count: len(page.points()) == n - 1, what="a removed mark")
        marked = page.points() or [[-99.0, -99.0]]
        for x, y in centres:  # ... and marks the discs the model missed
            if min(np.hypot(px - x, py - y) for px, py in marked) > 9:
                count = len(page.points())
                page.click_image(x, y)
                page.wait(lambda n=count: len(page.points()) == n + 1, what="an added mark")
                marked = page.points()
        assert len(marked) == len(centres)  # one mark on each disc
        before = page.js("return document.body.dataset.saved || ''")
        page.click("save")
        page.wait(lambda b=before: page.js("return document.body.dataset.saved") != b)
    records = sorted(collected.glob("*.json"))
    assert len(records) >= 2
    out = tmp_path / "prepared"
    command = [*seqops_command(), "prepare", "--params", str(ROOT / "params.yaml"),
               "--set", "prepare.source=points", "--set", f"prepare.points.root={collected}",
               "--out", str(out), "--json"]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stats = json.loads(proc.stdout)
    assert stats["source"] == "points", stats
    assert stats["skipped_total"] == 0, json.dumps(stats)  # every saved record reads
    objects = [len(json.loads(r.read_text())["shapes"]) for r in records]
    filtered = sum(stats.get("filtered", {}).values())
    assert stats["images"] + filtered == len(records) and stats["images"] >= 2, stats
    assert stats["objects"] == sum(objects), stats  # every saved point is a training object
    print(f"prepare on {len(records)} saved records: {json.dumps(stats)[:400]}", file=sys.stderr)


def test_exemplar_boxes_are_drawn_before_the_count(browser, tmp_path):
    """A model that counts what exemplar boxes show: the page asks for a box first, the box
    is dragged on the image, and Enter counts with it (as /predict does with that box)."""
    srv = Server(serve_model(exemplars=True), tmp_path / "server.log",
                 "--max-objects", str(MAX_OBJECTS))  # fmt: skip
    try:
        srv.wait_ready()
        browser.set_size(*WINDOW)
        page = Page(browser, srv.base)
        page.open()
        assert page.shown("exemplar-mode")
        assert not page.shown("save")  # no --collect here
        image, _ = make_scene(360, 240, seed=5)
        page.drop(image, "boxes.png")
        page.wait(lambda: page.js("return seqops.exemplarMode"), what="exemplar mode")
        assert page.js("return seqops.points.length") == 0  # nothing counted without a box
        page.drag_image((40, 50), (90, 100))
        boxes = page.wait(lambda: page.js("return seqops.boxes"), what="a box")
        assert np.allclose(boxes, [[40, 50, 90, 100]], atol=0.6)
        # A second box with the keyboard: B at one corner, move the cursor, B at the other.
        start = page.js("return [seqops.cursor.x, seqops.cursor.y]")
        page.keys("b")
        page.chord(Keys.SHIFT, Keys.RIGHT)
        page.chord(Keys.SHIFT, Keys.DOWN)
        page.keys("b")
        boxes = page.wait(lambda: len(page.js("return seqops.boxes")) == 2
                          and page.js("return seqops.boxes"), what="a second box")  # fmt: skip
        end = page.js("return [seqops.cursor.x, seqops.cursor.y]")
        assert np.allclose(boxes[1], [*start, *end], atol=0.01) and end[0] > start[0] + 3
        page.keys(Keys.ENTER)
        found = page.settled(MAX_OBJECTS)
        exemplars = {"exemplars": json.dumps(boxes)}
        answer = httpx.post(f"{srv.base}/predict", params=exemplars, content=image,
                            headers={"content-type": "image/png"}).json()  # fmt: skip
        assert np.allclose(found, answer["points"], atol=0.01)
    finally:
        srv.stop()


def _demo_model() -> Path | None:
    """The model ``make demo`` exported (or the one SEQOPS_PAGE_MODEL names)."""
    given = os.environ.get("SEQOPS_PAGE_MODEL")
    model_dir = Path(given) if given else ROOT / "models" / "onnx"
    return model_dir if (model_dir / "model.json").is_file() else None


@pytest.mark.slow
def test_drop_to_final_count_on_the_demo_model(browser, tmp_path):
    """The time from dropping examples/scene.png to its final count, on the demo's model (the
    test model before `make demo` has made one): the page's own clock (performance.now at
    the drop, at the last record). Five drops, median."""
    model_dir, limit = _demo_model(), []
    if model_dir is None:  # a fresh clone before `make demo`: the test model, MAX_OBJECTS points
        model_dir, limit = serve_model(), ["--max-objects", str(MAX_OBJECTS)]
    srv = Server(
        model_dir, tmp_path / "server.log", "--collect", str(tmp_path / "collected"), *limit
    )
    try:
        srv.wait_ready()
        browser.set_size(*WINDOW)
        page = Page(browser, srv.base)
        page.open()
        image = (ROOT / "examples" / "scene.png").read_bytes()
        answer = httpx.post(f"{srv.base}/predict", content=image,
                            headers={"content-type": "image/png"}, timeout=60).json()  # fmt: skip
        times = []
        for _ in range(5):
            page.drop(image, "scene.png")
            page.wait(lambda: page.js("return seqops.timings.firstDone > 0"), 60, "the count")
            found = page.settled(answer["count"])
            timings = page.js("return seqops.timings")
            times.append(timings["firstDone"] - timings["opened"])
        assert np.allclose(found, answer["points"], atol=0.01)
        if answer["count_confidence"] is not None:
            shown = page.js("return document.getElementById('confidence').textContent")
            assert shown == f"{round(answer['count_confidence'] * 100)}%"
        browser.screenshot(tmp_path / "demo.png")
        median = float(np.median(times))
        print(
            f"{browser.name}, {model_dir}: drop -> final count ({answer['count']} objects):"
            f" median {median:.0f} ms,"
            f" all {[round(t) for t in times]} ms; screenshot {tmp_path / 'demo.png'}"
        )
        assert median < 10_000
    finally:
        srv.stop()


def test_the_page_asks_for_the_api_key_and_saves_with_it(browser, tmp_path, monkeypatch):
    monkeypatch.setenv("SEQOPS_PAGE_KEY", "s3cret")  # the server process inherits it
    collected = tmp_path / "collected"
    srv = Server(serve_model(), tmp_path / "server.log", "--api-key-env", "SEQOPS_PAGE_KEY",
                 "--collect", str(collected), "--max-objects", str(MAX_OBJECTS))  # fmt: skip
    try:
        srv.wait_ready()
        browser.set_size(*WINDOW)
        page = Page(browser, srv.base)
        page.load()
        page.wait(lambda: page.shown("key"), what="the key field")
        assert page.focused() == "key"
        page.keys(*"s3cret", Keys.ENTER)
        page.wait(lambda: page.js("return document.body.dataset.ready === 'true'"), what="/info")
        assert not page.shown("key")
        page.drop(make_scene(200, 160, seed=6)[0], "keyed.png")
        page.settled(MAX_OBJECTS)
        found = remove_twice_marked(page)
        page.click("save")
        record_id = page.wait(lambda: page.js("return document.body.dataset.saved"), what="save")
        record = json.loads((collected / f"{record_id}.json").read_text())
        assert np.allclose([s["points"][0] for s in record["shapes"]], found, atol=1e-9)
    finally:
        srv.stop()


CONTRAST = """
const linear = (v) => (v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
const luminance = (colour) => {
  const [r, g, b] = colour.match(/[\\d.]+/g).slice(0, 3).map(Number).map(linear);
  return 0.2126 * r + 0.7152 * g + 0.0722 * b;
};
const background = (e) => {
  for (; e; e = e.parentElement) {
    const c = getComputedStyle(e).backgroundColor;
    if (c !== "transparent" && !/, 0\\)$/.test(c)) return c;
  }
  return "rgb(255, 255, 255)";
};
const texts = [...document.querySelectorAll("h1, h1 span, p, button, label, kbd, summary, dt, dd")]
  .filter((e) => e.offsetParent !== null && e.textContent.trim());
return texts.map((e) => {
  const a = luminance(getComputedStyle(e).color), b = luminance(background(e));
  return [e.id || e.className || e.tagName, (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05)];
});
"""


def test_every_text_has_readable_contrast(page):
    """WCAG AA (4.5:1) for every visible text, before an image and after a count (enabled
    and disabled buttons, the hint on the dark image area, the keys list)."""
    ratios = page.js(CONTRAST)
    page.click("keys-summary")
    page.drop(make_scene(200, 160, seed=7)[0], "contrast.png")
    page.settled(MAX_OBJECTS)
    ratios += page.js(CONTRAST)
    assert len(ratios) > 30
    low = [(name, round(ratio, 2)) for name, ratio in ratios if ratio < 4.5]
    assert not low, low
