"""Shared fixtures: the real ``params.yaml`` shrunk for tests, and tiny prepared datasets.

As in lightning-hydra-template: the real config is loaded once and shrunk (64 px images,
two epochs, four images per batch, the tiny preset, CPU); outputs go to ``tmp_path``.
``make_tiny_dataset`` writes a prepared dataset in the format of
``seqops.data.manifest`` (dataset.json, <split>.jsonl, images/<split>/<id>.png) with a
few dark discs per image, so training tests need neither the data stage nor the network.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from seqops.config import Params, load_params
from seqops.data.manifest import Record, manifest_path, write_manifest
from seqops.data.ordering import order_points

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


def shrink_params(*overrides: str) -> Params:
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
