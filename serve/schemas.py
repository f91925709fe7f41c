"""Request and response models: validation with clear 422s, and the OpenAPI schema for free."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from seqops.contract import MAX_EXEMPLARS

Box = Annotated[list[float], Field(min_length=4, max_length=4)]
Point = Annotated[list[float], Field(min_length=2, max_length=2)]


def _parse_json_text(value: Any) -> Any:
    """Query strings and form fields carry lists as JSON text: ``[[10, 20, 40, 60]]``."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"expected a JSON list, got {value[:80]!r}") from None
        except RecursionError:  # "[[[[..." thousands deep: the parser's own limit
            raise ValueError("JSON list nested too deeply") from None
    return value


class LoopOptions(BaseModel):
    """Settings of one request's loop; any left out take the server's defaults."""

    model_config = ConfigDict(extra="forbid")

    done_threshold: float | None = Field(
        None, gt=0, lt=1, description="stop when done exceeds it (default: the model's, 0.5)"
    )
    exemplars: list[Box] | None = Field(
        None,
        max_length=MAX_EXEMPLARS,
        description="up to three [x1, y1, x2, y2] boxes (original pixels) around examples of"
        " what to count; only for models trained with exemplars",
    )
    deadline_s: float | None = Field(
        None, gt=0, description="give up (504) after this many seconds (default: the server's)"
    )

    _json_lists = field_validator("exemplars", mode="before")(_parse_json_text)


class PredictOptions(LoopOptions):
    """Options of ``/predict`` and ``/predict/stream``."""

    max_objects: int | None = Field(
        None, ge=1, description="stop after this many objects (default: the server's, 200)"
    )


class StreamOptions(PredictOptions):
    """Options of ``/predict/stream``: optionally the objects already found, so a count a
    person corrected continues from the corrected points (one encoding, as a fresh count)."""

    points: list[Point] = Field(
        default_factory=list,
        description="objects already found, [[x, y], ...] original pixels; the stream's"
        " records then start at index len(points), and max_objects counts them too",
    )

    _json_points = field_validator("points", mode="before")(_parse_json_text)


class NextOptions(LoopOptions):
    """Options of ``/next``: the objects already found (original pixels)."""

    points: list[Point] = Field(
        default_factory=list, description="objects already found, [[x, y], ...] original pixels"
    )

    _json_points = field_validator("points", mode="before")(_parse_json_text)


class PredictJSON(PredictOptions):
    """``application/json`` body of ``/predict`` (the image base64-encoded)."""

    image: str = Field(description="the PNG/JPEG file, base64-encoded")


class StreamJSON(StreamOptions):
    """``application/json`` body of ``/predict/stream``."""

    image: str = Field(description="the PNG/JPEG file, base64-encoded")


class NextJSON(NextOptions):
    """``application/json`` body of ``/next``."""

    image: str = Field(description="the PNG/JPEG file, base64-encoded")


class ModelRef(BaseModel):
    """Which model answered."""

    name: str
    version: str
    provider: str = Field(description="onnxruntime execution provider")
    confidence_calibrated: bool = Field(
        description="count_confidence comes from a calibration fitted at export; false for an"
        " export without one (the confidence is then the model's own, uncalibrated chance"
        " that the loop stops where it did)"
    )


_COUNT_CONFIDENCE = Field(
    ge=0,
    le=1,
    description="how likely the count is exact, from the loop's own signals (calibrated on"
    " validation images at export); 0 when the loop stopped without saying done",
)


class PredictResponse(BaseModel):
    """The count of one image."""

    count: int
    count_confidence: float = _COUNT_CONFIDENCE
    points: list[list[float]] = Field(description="[[x, y], ...] in original image pixels")
    done_probs: list[float] = Field(description="done probability at each step")
    stopped_by: Literal["done", "max_objects", "deadline"]
    model: ModelRef
    timings_ms: dict[str, float]


class NextResponse(BaseModel):
    """One step: the next object after the given ones."""

    x: float = Field(description="original image pixels")
    y: float
    done_prob: float = Field(description="probability that no object is left")
    done: bool = Field(description="done_prob > done_threshold: (x, y) is then not an object")
    index: int = Field(description="the number of points given, i.e. this object's index")
    model: ModelRef
    timings_ms: dict[str, float]


class StreamPoint(BaseModel):
    """One record of ``/predict/stream``: an object as the loop finds it."""

    event: Literal["point"] = "point"
    index: int
    x: float
    y: float
    done_prob: float


class StreamDone(BaseModel):
    """The last record of ``/predict/stream``."""

    event: Literal["done"] = "done"
    count: int = Field(description="every object, the given points included")
    count_confidence: float | None = Field(
        ge=0,
        le=1,
        description="how likely the count is exact (as /predict's); null for a count continued"
        " from given points, whose first steps the loop did not take",
    )
    done_prob: float | None
    stopped_by: str
    model: ModelRef
    timings_ms: dict[str, float]


class StreamError(BaseModel):
    """The last record of ``/predict/stream`` when the count fails after the stream began
    (the status it would have had, e.g. 504 for a deadline)."""

    event: Literal["error"] = "error"
    status: int
    detail: str


# One line of NDJSON, or the data of one server-sent event.
StreamRecord = Annotated[StreamPoint | StreamDone | StreamError, Field(discriminator="event")]


class Liveness(BaseModel):
    """``/healthz``: the process answers (503 with the reason once the model failed to load)."""

    live: bool
    error: str | None = Field(None, description="why the model could not be loaded")


class Readiness(BaseModel):
    """``/readyz``: the model is loaded and warmed up, and the server is not stopping."""

    ready: bool
    model: ModelRef | None = Field(None, description="the served model, when ready")
    reason: str | None = Field(
        None, description="when not ready: loading, shutting down, or the load error"
    )


class PageInfo(BaseModel):
    """``/info``: what a client such as the page at ``/`` needs before its first request."""

    model: ModelRef
    exemplars: bool = Field(description="the model counts what 1-3 exemplar boxes show")
    max_exemplars: int
    max_objects: int = Field(description="the server's default loop guard")
    max_objects_limit: int = Field(description="the most points a request may give or ask for")
    max_body_bytes: int
    collect: bool = Field(description="POST /collect saves images and points (--collect)")


class CollectOptions(BaseModel):
    """The form fields of ``POST /collect`` besides the image ``file``."""

    model_config = ConfigDict(extra="forbid")

    points: list[Point] = Field(
        description="every object of the image, [[x, y], ...] in original pixels of the image"
        " as shown (EXIF orientation applied), none closer than 1 px to another; [] for an"
        " image with nothing to count"
    )

    _json_points = field_validator("points", mode="before")(_parse_json_text)


class CollectJSON(CollectOptions):
    """``application/json`` body of ``/collect``."""

    image: str = Field(description="the PNG/JPEG file, base64-encoded")


class CollectResponse(BaseModel):
    """A saved record: ``<id>.png`` and ``<id>.json`` (LabelMe points) in the collect folder."""

    id: str = Field(description="first 20 hex digits of the SHA-256 of the image's RGB pixels")
    count: int
    path: str = Field(description="the record's LabelMe file, relative to the collect folder")
    replaced: bool = Field(description="the same image had been saved before; its record is new")


class Partial(BaseModel):
    """What a loop stopped early (504 deadline, 503 shutdown) had found by then."""

    count: int
    points: list[list[float]] = Field(description="[[x, y], ...] in original image pixels")


class ErrorResponse(BaseModel):
    """An error of the simple API: ``detail`` names the field or value and what was wrong."""

    detail: str | list
    partial: Partial | None = Field(
        None, description="504/503 after the loop began: the objects found before it stopped"
    )


# --- KServe v2 / Open Inference Protocol ------------------------------------------------


class TensorMetadata(BaseModel):
    """A tensor the model takes or gives (-1: any size)."""

    name: str
    datatype: str
    shape: list[int]


class ServerLive(BaseModel):
    """``/v2/health/live``."""

    live: bool


class ServerReady(BaseModel):
    """``/v2/health/ready`` (503 with ``error`` while not ready)."""

    ready: bool
    error: str | None = None


class ModelReady(BaseModel):
    """``/v2/models/{name}/ready``."""

    name: str
    ready: bool


class ServerMetadata(BaseModel):
    """``/v2``: the server and the protocol extensions it supports."""

    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    """``/v2/models/{name}``: the model's versions, inputs and outputs."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class InferInputTensor(BaseModel):
    """An input tensor: ``data`` in JSON, or ``parameters.binary_data_size`` bytes after the
    JSON header (Triton's binary tensor extension, what ``tritonclient`` sends by default)."""

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = None


class InferRequestedOutput(BaseModel):
    """An output the request asks for (all of them when none are named)."""

    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    """``POST /v2/models/{name}/infer`` body; loop settings go in ``parameters``
    (``max_objects``, ``done_threshold``, ``deadline_s``; Triton's ``timeout`` in µs)."""

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferInputTensor]
    outputs: list[InferRequestedOutput] | None = None


class InferOutputTensor(BaseModel):
    """An output tensor: JSON ``data``, or (asked for as binary) ``parameters.binary_data_size``
    bytes after the JSON header."""

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list | None = None


class InferResponse(BaseModel):
    """``infer``'s answer: ``parameters`` hold the loop's outcome, ``id`` is the request's."""

    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    outputs: list[InferOutputTensor]


class KServeError(BaseModel):
    """An error of the KServe v2 routes."""

    error: str
    partial: Partial | None = None
