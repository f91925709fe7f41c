"""The prepared-dataset format, shared by every stage after ``prepare``.

A prepared dataset is a directory::

    dataset.json          image_size, order, row_height, source, splits
    stats.json            counts, objects-per-image histogram, done share, skipped items
    train.jsonl           one record per line (val.jsonl, test.jsonl likewise)
    images/<split>/<id>.png   RGB at the model input size (square)

Each record holds the points in canonical order, in model pixels (continuous
coordinates in ``[0, image_size]``), the exemplar boxes in model pixels, and the
original size and scale so that points map back to the original image.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """A prepared dataset is missing or malformed; the message names the file."""


@dataclass(frozen=True)
class Record:
    """One image of a prepared split."""

    id: str
    image: str  # path relative to the dataset directory
    points: tuple[tuple[float, float], ...]  # model px, canonical order
    exemplars: tuple[tuple[float, float, float, float], ...] = ()  # model px, x1 y1 x2 y2
    orig_size: tuple[int, int] = (0, 0)  # original (width, height)
    scale: tuple[float, float] = (1.0, 1.0)  # model px = original px * scale
    source: str = ""  # where the image came from (file name, or "synthetic")
    extra: dict = field(default_factory=dict)  # source-specific (class name, ...)

    @property
    def num_objects(self) -> int:
        return len(self.points)

    def points_array(self) -> np.ndarray:
        return np.asarray(self.points, np.float32).reshape(-1, 2)

    def exemplars_array(self) -> np.ndarray:
        return np.asarray(self.exemplars, np.float32).reshape(-1, 4)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict) -> Record:
        return cls(
            id=str(d["id"]),
            image=str(d["image"]),
            points=tuple((float(x), float(y)) for x, y in d["points"]),
            exemplars=tuple(tuple(float(v) for v in b) for b in d.get("exemplars", ())),
            orig_size=tuple(int(v) for v in d.get("orig_size", (0, 0))),
            scale=tuple(float(v) for v in d.get("scale", (1.0, 1.0))),
            source=str(d.get("source", "")),
            extra=dict(d.get("extra", {})),
        )


def manifest_path(dataset_dir: str | Path, split: str) -> Path:
    return Path(dataset_dir) / f"{split}.jsonl"


def write_manifest(path: str | Path, records: list[Record]) -> None:
    """Write records as JSON lines (the caller writes inside an atomic directory)."""
    with open(path, "w") as f:
        for record in records:
            f.write(record.to_json() + "\n")


def read_manifest(path: str | Path) -> list[Record]:
    """Read a split manifest; a malformed line is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: manifest not found (run `seqops prepare` first)")
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(Record.from_dict(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise DatasetError(f"{path}:{lineno}: malformed record ({exc})") from None
    return records


def read_dataset_info(dataset_dir: str | Path) -> dict:
    """Read ``dataset.json`` (image_size, order, ...) of a prepared dataset."""
    path = Path(dataset_dir) / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"{path}: not a prepared dataset (run `seqops prepare` first)")
    return json.loads(path.read_text())
