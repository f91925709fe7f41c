"""The torch-free onnxruntime predictor: the loop, the coordinates, batching, loading."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_IMAGE_SIZE, exported_model, tiny_metadata, tiny_torch_model
from PIL import Image

from seqops import confidence, imaging
from seqops.predictor import Predictor, PredictorError, cuda_usable

ROOT = Path(__file__).resolve().parents[1]


def random_image(seed: int, size=(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)) -> Image.Image:
    rng = np.random.default_rng(seed)
    width, height = size
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def plain() -> Predictor:
    return Predictor(exported_model("plain")[0], device="cpu", threads=1)


def stop_step(done_probs: list[float], threshold: float, max_objects: int) -> int:
    """The count the loop should return for a done trajectory (no stop: ``max_objects``)."""
    for t, p in enumerate(done_probs):
        if p > threshold:
            return t
    return max_objects


def torch_rollout(model, pixels: np.ndarray, mask: np.ndarray | None, steps: int):
    """The loop in torch for ``steps`` steps, never stopping: ``(points in model px, done
    probabilities)``; a loop that stops stops on the same trajectory."""
    spec = model.spec
    points: list[np.ndarray] = []
    done: list[float] = []
    with torch.no_grad():
        exemplar_mask = None if mask is None else torch.from_numpy(mask)[None]
        features = model.encode(torch.from_numpy(pixels)[None], exemplar_mask)
        for _ in range(steps):
            marks = imaging.render_marks(np.asarray(points), spec.grid, spec.mark_sigma)
            out = model.step(features, torch.from_numpy(marks)[None, None])
            points.append(out.xy[0].numpy())
            done.append(float(torch.sigmoid(out.done_logit)[0]))
    return imaging.norm_to_pixels(np.asarray(points), TINY_IMAGE_SIZE), done


def test_loop_matches_a_torch_loop(plain: Predictor):
    """Torch/ONNX parity of the whole loop: encode once, step, mark, repeat."""
    image = random_image(1)
    pred = plain.predict([image], max_objects=6, done_threshold=0.99)[0]
    pixels, _ = imaging.resize_for_model(image, TINY_IMAGE_SIZE)
    pixels = imaging.normalize_pixels(pixels)
    expected, _ = torch_rollout(tiny_torch_model("plain"), pixels, None, 6)
    assert pred.count == 6
    np.testing.assert_allclose(np.asarray(pred.points_model), expected, atol=1e-2)
    # A peaked random head does not put every point in the same place.
    assert np.ptp(expected, axis=0).max() > 1.0


def test_loop_stops_on_done(plain: Predictor):
    image = random_image(2)
    probe = plain.predict([image], max_objects=12, done_threshold=0.999)[0]
    probs = probe.done_probs
    # A threshold between the running maximum and a later, larger done value stops the
    # loop exactly there (the trajectory does not depend on the threshold until it stops).
    k = next(t for t in range(1, len(probs)) if probs[t] > max(probs[:t]) + 1e-3)
    threshold = (probs[k] + max(probs[:k])) / 2
    pred = plain.predict([image], max_objects=12, done_threshold=threshold)[0]
    assert pred.stopped_by == "done"
    assert pred.count == k
    assert len(pred.done_probs) == k + 1  # the stopping step's done is reported too
    assert pred.done_probs[-1] > threshold >= max(pred.done_probs[:-1])
    np.testing.assert_allclose(pred.points_model, probe.points_model[:k], atol=1e-4)


def test_done_model_stops_at_once_on_an_image_with_no_objects():
    predictor = Predictor(exported_model("done")[0], device="cpu", threads=1)
    blank = Image.new("RGB", (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), (200, 200, 200))
    pred = predictor.predict([blank])[0]
    assert pred.count == 0
    assert pred.points == [] and pred.points_model == []
    assert pred.stopped_by == "done"
    assert pred.done_probs == [pytest.approx(1.0)]


def test_max_objects_guards_a_loop_that_never_says_done():
    predictor = Predictor(exported_model("never")[0], device="cpu", threads=1)
    pred = predictor.predict([random_image(3)], max_objects=7)[0]
    assert pred.count == 7
    assert pred.stopped_by == "max_objects"
    assert len(pred.done_probs) == 7
    assert max(pred.done_probs) < 1e-6
    default = predictor.predict([random_image(3)])[0]
    assert default.count == 200  # the default guard
    with pytest.raises(PredictorError, match="max_objects"):
        predictor.predict([random_image(3)], max_objects=0)


def test_points_map_back_to_original_pixels_for_non_square_images(plain: Predictor):
    image = random_image(4, size=(128, 32))  # stretched 2x narrower, 2x taller
    pred = plain.predict([image], max_objects=5, done_threshold=0.999)[0]
    # The same image resized by hand: its points are the model-pixel points.
    square = image.resize((TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), Image.Resampling.BILINEAR)
    ref = plain.predict([square], max_objects=5, done_threshold=0.999)[0]
    np.testing.assert_allclose(pred.points_model, ref.points_model, atol=1e-4)
    model_px = np.asarray(ref.points_model)
    expected = model_px * np.array([128 / TINY_IMAGE_SIZE, 32 / TINY_IMAGE_SIZE])
    np.testing.assert_allclose(pred.points, expected, atol=0.02)
    assert all(0 <= x <= 128 and 0 <= y <= 32 for x, y in pred.points)


def test_batched_results_equal_one_by_one(plain: Predictor):
    images = [random_image(10 + i) for i in range(4)]
    max_objects = 8
    probes = [
        plain.predict([im], max_objects=max_objects, done_threshold=0.999)[0].done_probs
        for im in images
    ]
    # Pick the threshold that makes the images stop after the most different counts, so
    # the batch really has images finishing at different steps.
    candidates = sorted({p - 1e-3 for probs in probes for p in probs})
    threshold = max(candidates, key=lambda t: len({stop_step(p, t, max_objects) for p in probes}))
    batched = plain.predict(images, max_objects=max_objects, done_threshold=threshold)
    singles = [
        plain.predict([im], max_objects=max_objects, done_threshold=threshold)[0] for im in images
    ]
    assert len({p.count for p in batched}) > 1, "images should stop at different steps"
    for b, s in zip(batched, singles, strict=True):
        assert b.count == s.count
        assert b.stopped_by == s.stopped_by
        np.testing.assert_allclose(b.points, s.points, atol=1e-3)
        np.testing.assert_allclose(b.done_probs, s.done_probs, atol=1e-4)


def test_prediction_reports_timings_and_json(plain: Predictor, tmp_path: Path):
    path = tmp_path / "image.png"
    random_image(5).save(path)
    pred = plain.predict([path, path.read_bytes()], max_objects=2)
    assert pred[0].points == pred[1].points  # a path and encoded bytes are the same image
    d = pred[0].to_dict()
    assert set(d["timings_ms"]) == {"prepare", "encode", "steps", "total"}
    assert d["timings_ms"]["total"] >= d["timings_ms"]["encode"] > 0
    json.dumps(d)
    assert plain.predict([]) == []


def test_metadata_says_how_to_feed_the_model(plain: Predictor):
    info = plain.info
    assert (info.image_size, info.grid) == (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE // 8)
    assert info.mean == imaging.MEAN and info.std == imaging.STD
    assert info.done_threshold == 0.5
    assert info.model_version == "test-plain"
    assert plain.provider == "CPUExecutionProvider"


def test_exemplars_are_refused_by_a_model_trained_without(plain: Predictor):
    with pytest.raises(PredictorError, match="trained without exemplars"):
        plain.predict([random_image(6)], exemplars=[[[1, 1, 10, 10]]])
    with pytest.raises(PredictorError, match="one entry per image"):
        plain.predict([random_image(6)], exemplars=[None, None])


@pytest.mark.slow  # exports a second full model (seconds)
def test_exemplars_are_required_and_checked_by_an_exemplar_model():
    image = random_image(6, size=(128, 96))
    predictor = Predictor(exported_model("exemplars")[0], device="cpu", threads=1)
    with pytest.raises(PredictorError, match="none were given"):
        predictor.predict([image])
    with pytest.raises(PredictorError, match="1-3 boxes"):
        predictor.predict([image], exemplars=[[[1, 1, 5, 5]] * 4])
    with pytest.raises(PredictorError, match="outside the 128x96 image"):
        predictor.predict([image], exemplars=[[[100, 10, 140, 20]]])
    with pytest.raises(PredictorError, match="empty"):
        predictor.predict([image], exemplars=[[[10, 10, 10, 20]]])
    box = [10, 10, 30, 30]
    pred = predictor.predict([image], exemplars=[[box]], max_objects=3)[0]
    prepared = predictor.prepare(image, [box])
    points, done = torch_rollout(
        tiny_torch_model("exemplars"), prepared.pixels, prepared.exemplar_mask, 3
    )
    assert pred.count == stop_step(done, predictor.info.done_threshold, 3)
    assert pred.stopped_by == ("max_objects" if pred.count == 3 else "done")
    np.testing.assert_allclose(pred.done_probs, done[: len(pred.done_probs)], atol=2e-4)
    np.testing.assert_allclose(
        np.asarray(pred.points_model).reshape(-1, 2), points[: pred.count], atol=1e-2
    )


@pytest.mark.slow  # exports a second full model (seconds)
def test_exemplar_model_matches_torch_with_the_mask():
    predictor = Predictor(exported_model("exemplars")[0], device="cpu", threads=1)
    model = tiny_torch_model("exemplars")
    image = random_image(7)
    box = [8.0, 8.0, 24.0, 20.0]
    prepared = predictor.prepare(image, [box])
    mask = imaging.render_exemplar_mask([box], TINY_IMAGE_SIZE, model.spec.grid)
    np.testing.assert_array_equal(prepared.exemplar_mask[0], mask)
    features = predictor.encode([prepared])
    with torch.no_grad():
        expected = model.encode(
            torch.from_numpy(prepared.pixels)[None], torch.from_numpy(mask)[None, None]
        )
    np.testing.assert_allclose(features, expected.numpy(), atol=1e-4)


def test_graphs_of_two_exports_are_refused(tmp_path: Path):
    import onnx

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(exported_model("plain")[0] / "encoder.onnx", mixed / "encoder.onnx")
    # The step graph of another export: same network, another export's metadata.
    step = onnx.load(exported_model("plain")[0] / "step.onnx")
    other = json.dumps(tiny_metadata("plain", model_version="another-export"), sort_keys=True)
    del step.metadata_props[:]
    onnx.helper.set_model_props(step, {"seqops": other})
    onnx.save(step, mixed / "step.onnx")
    with pytest.raises(PredictorError, match="different metadata"):
        Predictor(mixed, device="cpu")


def stop_log_prob(done_probs: list[float]) -> float:
    """log P(the loop stops exactly where it did), by hand."""
    *before, final = done_probs
    return float(np.log1p(-np.asarray(before)).sum() + np.log(final))


def test_count_confidence_without_a_calibration_is_the_stop_probability(plain: Predictor):
    assert plain.info.calibration is None and not plain.info.confidence_calibrated
    # This random head's done rises above 0.3 after a few steps, and never above 0.5.
    stopped = plain.predict([random_image(0)], max_objects=12, done_threshold=0.3)[0]
    guarded = plain.predict([random_image(0)], max_objects=12)[0]
    assert stopped.stopped_by == "done" and 0 < stopped.count < 12
    want = np.exp(stop_log_prob(stopped.done_probs))
    assert stopped.count_confidence == pytest.approx(want, abs=1e-3)
    assert stopped.to_dict()["count_confidence"] == stopped.count_confidence
    assert set(stopped.confidence_features) == set(confidence.FEATURES)
    assert guarded.stopped_by == "max_objects" and guarded.count_confidence == 0.0


def calibrated_copy(model_dir: Path, calibration: dict, dest: Path) -> Path:
    """A copy of an export whose two graphs carry ``calibration`` in their metadata."""
    from seqops.export import rewrite_metadata
    from seqops.predictor import read_metadata

    shutil.copytree(model_dir, dest)
    meta = read_metadata(dest / "encoder.onnx")
    rewrite_metadata(dest, {**meta, "count_calibration": calibration})
    return dest


def test_the_predictor_applies_the_calibration_its_graphs_carry(tmp_path: Path):
    calibration = {
        "features": ["stop_log_prob", "log_count"],
        "center": [-1.0, 0.0],
        "scale": [2.0, 1.0],
        "coef": [1.5, -0.5],
        "intercept": 0.3,
        "fit": {"images": 10, "exact_share": 0.5},
    }
    model_dir = calibrated_copy(exported_model("plain")[0], calibration, tmp_path / "m")
    predictor = Predictor(model_dir, device="cpu", threads=1)
    assert predictor.info.confidence_calibrated
    assert predictor.info.calibration.coef == (1.5, -0.5)
    pred = predictor.predict([random_image(0)], max_objects=12, done_threshold=0.3)[0]
    z = 0.3 + 1.5 * (stop_log_prob(pred.done_probs) + 1.0) / 2.0 - 0.5 * np.log1p(pred.count)
    assert pred.count_confidence == pytest.approx(1 / (1 + np.exp(-z)), abs=1e-3)
    # A calibration on a feature this code does not compute is refused at load.
    unknown = {**calibration, "features": ["stop_log_prob", "objects_left"]}
    with pytest.raises(PredictorError, match="objects_left"):
        Predictor(calibrated_copy(model_dir, unknown, tmp_path / "u"), device="cpu")


def test_load_refuses_a_directory_without_graphs(tmp_path: Path):
    with pytest.raises(PredictorError, match="not a model directory"):
        Predictor.load(tmp_path)


def test_device_cuda_is_refused_without_a_usable_gpu():
    if cuda_usable():
        pytest.skip("this host has a usable CUDA device")
    with pytest.raises(PredictorError, match="no usable CUDA"):
        Predictor(exported_model("plain")[0], device="cuda")
    with pytest.raises(PredictorError, match="expected auto, cuda or cpu"):
        Predictor(exported_model("plain")[0], device="gpu")


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORT_")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )


def test_predictor_import_does_not_import_torch():
    proc = _run_python(
        """
        import sys
        import seqops.predictor
        heavy = sorted(m for m in ("torch", "mlflow", "onnx", "scipy") if m in sys.modules)
        print(",".join(heavy) or "none")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "none"


def test_auto_device_picks_cpu_silently_on_a_cpu_host():
    if cuda_usable():
        pytest.skip("this host has a usable CUDA device")
    model_dir = exported_model("plain")[0]
    proc = _run_python(
        f"""
        import numpy as np
        from seqops.predictor import Predictor
        p = Predictor({str(model_dir)!r}, device="auto")
        image = np.zeros((40, 50, 3), np.uint8)
        from PIL import Image
        result = p.predict([Image.fromarray(image)], max_objects=2)[0]
        print("provider", p.provider, "count", result.count)
        """
    )
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    assert "provider CPUExecutionProvider count 2" in proc.stdout
    mentions = [
        line
        for line in output.splitlines()
        if ("cuda" in line.lower() or "libcu" in line.lower()) and "provider CPU" not in line
    ]
    assert not mentions, output


@pytest.mark.slow
def test_load_by_mlflow_alias(mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from seqops.registry import log_model_to_mlflow

    monkeypatch.chdir(tmp_path)
    model_dir, info = exported_model("plain")
    registered = log_model_to_mlflow(model_dir, None, info)
    predictor = Predictor.load("models:/seqops@candidate", device="cpu", threads=1)
    assert predictor.info.model_version == registered["registered_version"]
    assert (predictor.model_dir / "encoder.onnx").is_file()
    local = Predictor(model_dir, device="cpu", threads=1)
    image = random_image(8)
    a = predictor.predict([image], max_objects=3)[0]
    b = local.predict([image], max_objects=3)[0]
    assert a.points == b.points
    by_version = Predictor.load(f"models:/seqops/{registered['registered_version']}")
    assert by_version.info.model_version == registered["registered_version"]
    with pytest.raises(PredictorError, match="not found in the MLflow registry"):
        Predictor.load("models:/seqops@no-such-alias")
