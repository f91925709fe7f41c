"""The exported model's contract: what export writes and the predictor, the registry and the
server read. Torch-free and onnxruntime-free, so every side imports it.

A model is a directory::

    encoder.onnx   image [B,3,S,S] (+ exemplar_mask [B,1,g,g]) -> features [B,C,g,g]
                   (+ mark_sigma [B] when the metadata's mark_extent > 0: each image's mark
                   radius in grid cells, following its objects' estimated extent)
    step.onnx      features [B,C,g,g], marks [B,1,g,g] -> xy [B,2] (normalised), done [B] (prob.)
    model.json     the metadata below plus export facts (opset, parity, file hashes)

Both graphs carry the metadata key ``seqops``: a JSON object with the input size, the grid,
the mark radius, the normalisation, the coordinate convention (:data:`COORDINATES`), the done
threshold, the order, the model version and the training run id. The batch axis is dynamic.

The metadata may also hold ``count_calibration`` (:class:`CountCalibration`): the logistic
model that turns a finished loop's signals into ``count_confidence``, the chance its count is
exact (``seqops.confidence``). Export fits it on the validation split; a model without it
(an older export) still loads, and its confidence is then the uncalibrated chance, under the
model's own done probabilities, that the loop stops exactly where it did
(``ModelInfo.confidence_calibrated`` is False).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENCODER_FILE = "encoder.onnx"
STEP_FILE = "step.onnx"
INFO_FILE = "model.json"
MODEL_FILES = (ENCODER_FILE, STEP_FILE, INFO_FILE)
METADATA_KEY = "seqops"
METADATA_FORMAT = 1
COORDINATES = (
    "x, y normalised to [-1, 1] at the model input: x_norm = 2 * x_px / image_size - 1, with"
    " continuous pixel coordinates (pixel i covers [i, i + 1)); the image is stretched to"
    " image_size x image_size"
)
CALIBRATION_KEY = "count_calibration"  # the metadata's optional confidence calibration
MODEL_NAME = "seqops"  # the metadata's name and the registered model's
MAX_EXEMPLARS = 3  # exemplar boxes a model takes, as in FSC-147
DEFAULT_MAX_OBJECTS = 200  # the loop's guard when a caller names none


@dataclass(frozen=True)
class GraphIO:
    """The names of one exported graph's inputs and outputs (the batch axis is dynamic)."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


STEP_IO = GraphIO(("features", "marks"), ("xy", "done"))


def encoder_io(exemplars: bool, mark_extent: bool = False) -> GraphIO:
    """The encoder's inputs and outputs: the exemplar mask only for a model trained with it,
    ``mark_sigma`` only for one whose marks follow the object's extent."""
    return GraphIO(
        ("image", "exemplar_mask") if exemplars else ("image",),
        ("features", "mark_sigma") if mark_extent else ("features",),
    )


class ContractError(ValueError):
    """A directory or a graph does not hold a seqops model; the message says which and why."""


def is_model_dir(path: Path) -> bool:
    """True when ``path`` holds both graphs of an export."""
    return (path / ENCODER_FILE).is_file() and (path / STEP_FILE).is_file()


def require_model_dir(path: Path) -> Path:
    """``path``, or a :class:`ContractError` naming what is missing."""
    if not is_model_dir(path):
        raise ContractError(f"{path}: not a model directory (needs {ENCODER_FILE} and {STEP_FILE})")
    return path


def parse_metadata(raw: str | None, source: str) -> dict[str, Any]:
    """The metadata object from the raw ``seqops`` property of a graph read from ``source``."""
    if raw is None:
        raise ContractError(f"{source}: no '{METADATA_KEY}' metadata (not a seqops export)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ContractError(f"{source}: metadata '{METADATA_KEY}' is not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ContractError(f"{source}: metadata '{METADATA_KEY}' is not a JSON object")
    return meta


@dataclass(frozen=True)
class CountCalibration:
    """The stored confidence calibration: ``P(exact) = sigmoid(intercept + sum_i coef_i *
    (x_i - center_i) / scale_i)`` over the named features of ``seqops.confidence``."""

    features: tuple[str, ...]
    center: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float

    @classmethod
    def from_metadata(cls, raw: Any, source: str) -> CountCalibration:
        """Read the ``count_calibration`` object; a malformed one is a ContractError."""
        where = f"{source}: metadata '{METADATA_KEY}.{CALIBRATION_KEY}'"
        try:
            calibration = cls(
                features=tuple(str(v) for v in raw["features"]),
                center=tuple(float(v) for v in raw["center"]),
                scale=tuple(float(v) for v in raw["scale"]),
                coef=tuple(float(v) for v in raw["coef"]),
                intercept=float(raw["intercept"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ContractError(f"{where} lacks or mistypes {exc}") from None
        c = calibration
        same_length = len({len(c.features), len(c.center), len(c.scale), len(c.coef)}) == 1
        if not same_length or min(c.scale, default=1.0) <= 0:
            raise ContractError(
                f"{where}: features, center, scale and coef need one entry each (scale > 0)"
            )
        return calibration


@dataclass(frozen=True)
class ModelInfo:
    """What the exported model says about itself (the ``seqops`` metadata)."""

    name: str
    image_size: int
    grid: int
    mark_sigma: float
    exemplars: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    done_threshold: float
    order: str
    preset: str
    model_version: str
    run_id: str | None
    calibration: CountCalibration | None = None  # None: an export without one
    # > 0: the encoder gives each image's mark radius (marks follow the object's extent);
    # 0 (and exports before it): every mark has radius mark_sigma.
    mark_extent: float = 0.0

    @property
    def encoder_io(self) -> GraphIO:
        """The encoder graph's inputs and outputs for this model."""
        return encoder_io(self.exemplars, self.mark_extent > 0)

    @property
    def confidence_calibrated(self) -> bool:
        """True when ``count_confidence`` comes from a fitted calibration."""
        return self.calibration is not None

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], source: str) -> ModelInfo:
        """Read the metadata of a graph from ``source``; a missing key is a ContractError."""
        raw_calibration = meta.get(CALIBRATION_KEY)
        calibration = (
            None
            if raw_calibration is None
            else CountCalibration.from_metadata(raw_calibration, source)
        )
        try:
            return cls(
                name=str(meta["name"]),
                image_size=int(meta["image_size"]),
                grid=int(meta["grid"]),
                mark_sigma=float(meta["mark_sigma"]),
                exemplars=bool(meta["exemplars"]),
                mean=tuple(float(v) for v in meta["mean"]),
                std=tuple(float(v) for v in meta["std"]),
                done_threshold=float(meta["done_threshold"]),
                order=str(meta["order"]),
                preset=str(meta["preset"]),
                model_version=str(meta["model_version"]),
                run_id=meta.get("run_id"),
                calibration=calibration,
                mark_extent=float(meta.get("mark_extent", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ContractError(f"{source}: metadata '{METADATA_KEY}' lacks {exc}") from None
