"""Helpers of the serving tests: an in-process client and what the library itself answers.

The models are ``conftest.exported_model``'s (a tiny network whose done never fires, so
``max_objects`` sets the count exactly, and ``DONE_AT_ONCE_THRESHOLD`` makes it stop at once).
"""

from __future__ import annotations

from pathlib import Path

from conftest import DONE_AT_ONCE_THRESHOLD, exported_model, make_png, png_pixels
from fastapi.testclient import TestClient

from serve.app import create_app
from serve.settings import ServeSettings

__all__ = ["DONE_AT_ONCE_THRESHOLD", "make_png", "png_pixels"]  # the serving tests' helpers

MODEL_VERSION = "test-never"  # the served model's version, as /predict and KServe report it
PNG = make_png(96, 64)
PNG_HEADERS = {"content-type": "image/png"}


def serve_model(exemplars: bool = False) -> Path:
    """The directory of the served test model (done never fires)."""
    return exported_model("exemplars-never" if exemplars else "never")[0]


def make_client(predictor, **settings) -> TestClient:
    """An in-process client of an app serving ``predictor`` (5 objects by default)."""
    base = {"model": str(predictor.model_dir), "max_objects": 5}
    return TestClient(create_app(ServeSettings(**(base | settings)), predictor=predictor))


def expected(predictor, png=PNG, max_objects=5, **kwargs):
    """What the library itself answers: the server must return the same."""
    return predictor.predict([png], max_objects=max_objects, **kwargs)[0]
