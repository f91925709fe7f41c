"""Shared fixtures and helpers (``from conftest import ...`` in any test directory).

- The real ``params.yaml`` shrunk for tests, as in lightning-hydra-template: 64 px images,
  two epochs, four images per batch, the tiny preset, CPU; outputs go to ``tmp_path``.
- ``make_tiny_dataset``: a prepared dataset in the format of ``seqops.data.manifest``
  (dataset.json, <split>.jsonl, images/<split>/<id>.png) with a few dark discs per image, so
  training tests need neither the data stage nor a trained network.
- ``exported_model(kind)``: real ONNX exports of random-init tiny networks whose done head
  is fixed (:data:`TINY_MODELS`), exported once per session.
- ``free_port``, ``make_png``: a loopback port for a server under test, a test image.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from seqops.config import Params, load_params
from seqops.data.manifest import Record, manifest_path, write_manifest
from seqops.data.ordering import order_points
from seqops.io import free_port

__all__ = ["free_port"]  # re-exported: tests take every helper from conftest

ROOT = Path(__file__).resolve().parents[1]

# Tests run tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP threads
# spinning against each other (measured: a 64 px tiny forward+backward takes 10 ms with one
# thread, up to seconds with two under load). Set before torch is first imported; CI may
# override it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Overrides that make the real params train in seconds on a CPU.
TINY_OVERRIDES = (
    "prepare.image_size=64",
    "prepare.min_objects=1",
    "prepare.max_objects=4",
    "prepare.row_height=16",
    "model.preset=tiny",
    "model.exemplars=false",
    "sampling.steps_per_image=4",
    "train.epochs=2",
    "train.batch_size=4",
    "train.device=cpu",
    "train.num_workers=0",
    "train.rollout_images=2",
    "train.picture_samples=2",
    "train.max_minutes=0",
)


def draw_disc_scene(
    rng: np.random.Generator, size: int, count: int, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """A light, slightly noisy canvas with ``count`` dark discs that do not touch.

    Returns:
        ``(pixels uint8 [size, size, 3], centres [count, 2] in model px)``.
    """
    centres: list[tuple[float, float]] = []
    margin, gap = radius + 2, 2.5 * radius
    while len(centres) < count:
        c = rng.uniform(margin, size - margin, size=2)
        if all(np.hypot(*(c - np.asarray(o))) > gap for o in centres):
            centres.append((float(c[0]), float(c[1])))
    base = rng.normal(200, 6, size=(size, size, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(base)
    draw = ImageDraw.Draw(image)
    for x, y in centres:
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=(40, 60, 160))
    return np.asarray(image), np.asarray(centres, np.float32).reshape(-1, 2)


def make_tiny_dataset(
    root: Path,
    num_train: int = 12,
    num_val: int = 4,
    num_test: int = 0,
    image_size: int = 64,
    min_objects: int = 1,
    max_objects: int = 4,
    radius: float = 3.5,
    row_height: float = 16.0,
    seed: int = 0,
) -> Path:
    """Write a prepared dataset of disc scenes under ``root``; returns ``root``."""
    rng = np.random.default_rng(seed)
    splits = {"train": num_train, "val": num_val, "test": num_test}
    root.mkdir(parents=True, exist_ok=True)
    for split, count in splits.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        records = []
        for i in range(count):
            pixels, points = draw_disc_scene(
                rng, image_size, int(rng.integers(min_objects, max_objects + 1)), radius
            )
            points = order_points(points, "reading_order", row_height)
            rel = f"images/{split}/{split}_{i:04d}.png"
            Image.fromarray(pixels).save(root / rel)
            boxes = [(x - radius, y - radius, x + radius, y + radius) for x, y in points[:3]]
            records.append(
                Record(
                    id=f"{split}_{i:04d}",
                    image=rel,
                    points=tuple((float(x), float(y)) for x, y in points),
                    exemplars=tuple(tuple(map(float, b)) for b in boxes),
                    orig_size=(image_size, image_size),
                    source="synthetic",
                )
            )
        write_manifest(manifest_path(root, split), records)
    info = {
        "image_size": image_size,
        "order": "reading_order",
        "row_height": row_height,
        "source": "synthetic",
        "splits": splits,
    }
    (root / "dataset.json").write_text(json.dumps(info, indent=2))
    return root


def shrink_params(*overrides: str | tuple[str, object]) -> Params:
    """The real ``params.yaml`` with :data:`TINY_OVERRIDES` and then ``overrides`` applied."""
    return load_params(ROOT / "params.yaml", (*TINY_OVERRIDES, *overrides))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared dataset (12 train, 4 val images at 64 px, 1-4 discs each); read-only."""
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny_dataset") / "prepared")


@pytest.fixture
def tiny_params() -> Params:
    """The real params shrunk for tests: 64 px, 2 epochs, batch 4, tiny preset, CPU."""
    return shrink_params()


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory for one SQLite MLflow store shared by the session's tests.

    Creating a store runs MLflow's schema migrations (seconds on this machine), so tests that
    log runs share one; runs keep them apart.
    """
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def mlflow_uri(monkeypatch: pytest.MonkeyPatch, mlflow_store: Path) -> str:
    """Point ``MLFLOW_TRACKING_URI`` at the shared test store; returns the URI."""
    uri = f"sqlite:///{mlflow_store}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(autouse=True)
def _isolated_mlflow(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every test logs to its own SQLite store in ``tmp_path``, never to ./mlflow.db."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("SEQOPS_PARENT_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


# --- tiny exported models ------------------------------------------------------------------

TINY_IMAGE_SIZE = 64
OPSET = 18
# The done head's final bias fixes a model's behaviour: +20 says done at once; -12 never does
# (max_objects then sets the count exactly), while a done_threshold below sigmoid(-12) ~ 6e-6
# makes the same model say done at once. Not -20: onnxruntime's Sigmoid returns exactly 0
# below about -18, and no threshold could then make it stop. ``None`` keeps the random,
# image-dependent done head.
NEVER_DONE_BIAS = -12.0
DONE_AT_ONCE_THRESHOLD = 1e-6
# kind -> (exemplars, done bias)
TINY_MODELS = {
    "plain": (False, None),
    "done": (False, 20.0),
    "never": (False, NEVER_DONE_BIAS),
    "exemplars": (True, None),
    "exemplars-never": (True, NEVER_DONE_BIAS),
}


@cache
def _models_root() -> Path:
    """Where the exports are kept between test runs: a folder named by a hash of everything
    an export depends on (the library's source, params.yaml, this file, the exporter's
    versions), so a change to any of them exports anew (``SEQOPS_TEST_CACHE`` moves it)."""
    from importlib.metadata import version

    digest = hashlib.sha256()
    for path in [*sorted((ROOT / "seqops").rglob("*.py")), ROOT / "params.yaml", Path(__file__)]:
        digest.update(path.read_bytes())
    for package in ("torch", "onnx", "onnxscript", "onnxruntime"):
        digest.update(version(package).encode())
    base = os.environ.get("SEQOPS_TEST_CACHE") or Path.home() / ".cache" / "seqops-tests"
    return Path(base) / f"models-{digest.hexdigest()[:16]}"


def tiny_spec(exemplars: bool = False, image_size: int = TINY_IMAGE_SIZE):
    from seqops.model import ModelSpec

    return ModelSpec.from_preset("tiny", image_size, exemplars)


def tiny_metadata(kind: str, model_version: str | None = None) -> dict:
    """The export metadata of ``kind`` (model version ``test-<kind>`` unless given)."""
    from seqops.export import build_metadata

    params = shrink_params()
    return build_metadata(
        tiny_spec(TINY_MODELS[kind][0]), params.model_dump(mode="json"),
        done_threshold=params.evaluate.done_threshold,
        model_version=model_version or f"test-{kind}", run_id=None,
    )  # fmt: skip


def tiny_torch_model(kind: str):
    """The torch network the ``kind`` export came from (same seed, same weights)."""
    from seqops.testing import make_untrained_model

    exemplars, done_bias = TINY_MODELS[kind]
    return make_untrained_model(tiny_spec(exemplars), seed=0, done_bias=done_bias)


@cache
def exported_model(kind: str) -> tuple[Path, dict]:
    """``(model_dir, model.json content)`` of a 64 px tiny model of ``kind``; read-only.

    Exporting takes seconds, so each kind is exported once and kept (see
    :func:`_models_root`); a new export is written beside and renamed into place, so
    concurrent test runs never see half an export.
    """
    from seqops.export import export_model

    model_dir = _models_root() / kind
    if not (model_dir / "model.json").is_file():
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        spec = tiny_spec(TINY_MODELS[kind][0])
        with tempfile.TemporaryDirectory(dir=model_dir.parent) as tmp:
            export_model(
                tiny_torch_model(kind), Path(tmp) / kind, tiny_metadata(kind),
                shrink_params(f"export.opset={OPSET}").export,
                extra_info={"model_spec": spec.to_dict()},
            )  # fmt: skip
            with contextlib.suppress(OSError):  # another run renamed its own export first
                (Path(tmp) / kind).rename(model_dir)
    return model_dir, json.loads((model_dir / "model.json").read_text())


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
