"""Models and images for the serving tests: real exports of random-init networks.

The done head's final bias fixes the behaviour: -12 never says done (``max_objects`` then
sets the count exactly), and a ``done_threshold`` below sigmoid(-12) ~ 6e-6 makes the same
model say done at once. (Not -20: onnxruntime's Sigmoid returns exactly 0 below -18.)
Exporting costs seconds, so each model is exported once per test session into the
session's base temporary directory and shared by the test modules.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serve.app import create_app
from serve.settings import ServeSettings

IMAGE_SIZE = 64
NEVER_DONE_BIAS = -12.0
DONE_AT_ONCE_THRESHOLD = 1e-6  # below sigmoid(-12): the first step says done


def export_test_model(out_dir: Path, exemplars: bool = False, image_size: int = IMAGE_SIZE) -> Path:
    """Export a random-init tiny network (done never fires) with the export stage's code."""
    from seqops.export import build_metadata, export_model
    from seqops.model import ModelSpec
    from seqops.testing import make_untrained_model

    spec = ModelSpec.from_preset("tiny", image_size, exemplars)
    model = make_untrained_model(spec, seed=0, done_bias=NEVER_DONE_BIAS)
    metadata = build_metadata(spec, {}, 0.5, "test-1", None)
    export_model(model, out_dir, metadata, opset=18)
    return out_dir


def session_model(tmp_path_factory: pytest.TempPathFactory, exemplars: bool = False) -> Path:
    """The session's shared test model (exported on first use)."""
    out_dir = tmp_path_factory.getbasetemp() / ("serve_model_ex" if exemplars else "serve_model")
    if not (out_dir / "step.onnx").is_file():
        export_test_model(out_dir, exemplars)
    return out_dir


def make_png(width: int = 96, height: int = 64, seed: int = 0) -> bytes:
    """A noisy RGB PNG of the given size (non-square by default)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def png_pixels(png: bytes) -> np.ndarray:
    """The RGB pixels of a PNG, uint8 ``[H, W, 3]``."""
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


PNG = make_png(96, 64)
PNG_HEADERS = {"content-type": "image/png"}


def make_client(predictor, **settings) -> TestClient:
    """An in-process client of an app serving ``predictor`` (5 objects by default)."""
    base = {"model": str(predictor.model_dir), "max_objects": 5}
    return TestClient(create_app(ServeSettings(**(base | settings)), predictor=predictor))


def expected(predictor, png=PNG, max_objects=5, **kwargs):
    """What the library itself answers: the server must return the same."""
    return predictor.predict([png], max_objects=max_objects, **kwargs)[0]
