"""`seqops predict`: JSON per image on stdout, annotated PNGs, exemplar arguments."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import exported_model
from PIL import Image

from seqops.cli import main
from seqops.confidence import EPS
from seqops.predict import parse_exemplars


def write_image(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_predict_prints_one_json_line_per_image_and_draws_them(tmp_path: Path, capsys):
    square = write_image(tmp_path / "square.png", (64, 64))
    wide = write_image(tmp_path / "wide.jpg", (200, 50), seed=1)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    out = tmp_path / "annotated"
    model = str(exported_model("never")[0])
    args = ["predict", str(square), str(broken), str(wide), "--model", model]
    code = main([*args, "--out", str(out), "--max-objects", "4", "--device", "cpu"])
    assert code == 1  # one image failed, the others were still counted
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_image = {Path(r["image"]).name: r for r in lines}
    assert set(by_image) == {"square.png", "broken.png", "wide.jpg"}
    assert "not a decodable image" in by_image["broken.png"]["error"]
    for name, (width, height) in (("square.png", (64, 64)), ("wide.jpg", (200, 50))):
        result = by_image[name]
        assert result["count"] == 4 and result["stopped_by"] == "max_objects"
        assert result["count_confidence"] == 0.0  # the guard stopped it: never trusted
        assert len(result["points"]) == 4 and len(result["done_probs"]) == 4
        assert all(0 <= x <= width and 0 <= y <= height for x, y in result["points"])
        picture = Image.open(result["annotated"])
        assert Path(result["annotated"]).parent == out
        # The image, enlarged by a whole factor when small (a label band may sit below).
        factor = picture.width / width
        assert factor == int(factor) >= 1 and picture.height >= factor * height
    assert sorted(p.name for p in out.iterdir()) == ["square.png", "wide.png"]


def test_predict_counts_an_image_with_nothing_in_it(tmp_path: Path, capsys):
    blank = tmp_path / "blank.png"
    Image.new("RGB", (90, 40), (255, 255, 255)).save(blank)
    assert main(["predict", str(blank), "--model", str(exported_model("done")[0])]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["count"] == 0 and result["points"] == [] and result["stopped_by"] == "done"
    # Done at once with probability ~1; a test export has no calibration.
    assert result["count_confidence"] == pytest.approx(1 - EPS)
    assert result["model"]["confidence_calibrated"] is False
    assert result["model"]["version"] == "test-done"


def test_parse_exemplars(tmp_path: Path):
    images = [Path("a/one.png"), Path("two.png")]
    assert parse_exemplars(None, images) is None
    boxes = [[1, 2, 10, 12]]
    assert parse_exemplars(json.dumps(boxes), images) == [boxes, boxes]
    mapping = {"one.png": boxes, "two.png": [[0, 0, 5, 5]]}
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps(mapping))
    assert parse_exemplars(str(path), images) == [boxes, [[0, 0, 5, 5]]]
    with pytest.raises(ValueError, match=r"no boxes for two\.png"):
        parse_exemplars(json.dumps({"one.png": boxes}), images)
    with pytest.raises(ValueError, match="not JSON"):
        parse_exemplars("[[1, 2", images)
    with pytest.raises(ValueError, match="expected a list of boxes"):
        parse_exemplars("3", images)


def test_exemplars_for_a_model_without_them_are_reported_per_image(tmp_path: Path, capsys):
    image = write_image(tmp_path / "im.png", (64, 64))
    model = str(exported_model("done")[0])
    code = main(["predict", str(image), "--model", model, "--exemplars", "[[1, 1, 9, 9]]"])
    assert code == 1
    assert "trained without exemplars" in json.loads(capsys.readouterr().out)["error"]


@pytest.mark.e2e
def test_the_console_script_counts_a_jpeg(tmp_path: Path):
    image = write_image(tmp_path / "photo.jpeg", (120, 80))
    seqops = Path(sys.executable).parent / "seqops"
    proc = subprocess.run(
        [str(seqops), "predict", str(image), "--model", str(exported_model("never")[0])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["count"] == 200 and result["stopped_by"] == "max_objects"


def test_without_a_model_the_error_says_what_was_tried_and_what_to_do(
    tmp_path: Path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # no mlflow.db, no models/onnx here
    monkeypatch.delenv("SEQOPS_MODEL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    image = write_image(tmp_path / "image.png", (32, 32))
    assert main(["predict", str(image)]) == 2
    err = capsys.readouterr().err
    assert "no model found: models/onnx: not a model directory" in err
    assert "pass --model, set SEQOPS_MODEL, or make one with `make demo`" in err
    # The registry is asked only where a store exists: asking would create an empty one.
    assert not (tmp_path / "mlflow.db").exists()
