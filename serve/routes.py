"""The simple API: ``/predict``, ``/predict/stream``, ``/next``, and health and metrics.

``health_router`` stays open (orchestrators probe it, Prometheus scrapes it, neither holds
the API key); ``router`` requires the key when one is set. Each route declares its
``response_model`` and returns a dict through it, so FastAPI validates every JSON answer and
``/docs`` shows its schema. Two answers are not JSON and cannot be validated that way: the
Prometheus text and the streamed records (those are built through their models instead).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from seqops import imaging
from seqops.contract import MAX_EXEMPLARS
from seqops.predictor import PreparedImage
from serve.batcher import Job
from serve.http_io import (
    API_KEY,
    ERROR_RESPONSES,
    ServiceDep,
    answer_head,
    image_body_doc,
    parse_options,
    read_image_request,
)
from serve.prometheus import PrometheusResponse
from serve.schemas import (
    Liveness,
    NextJSON,
    NextOptions,
    NextResponse,
    PageInfo,
    PredictJSON,
    PredictOptions,
    PredictResponse,
    Readiness,
    StreamDone,
    StreamError,
    StreamJSON,
    StreamOptions,
    StreamPoint,
    StreamRecord,
)
from serve.service import ServeError, Service, as_serve_error

health_router = APIRouter(tags=["health"])
router = APIRouter(tags=["predict"], dependencies=[API_KEY], responses=ERROR_RESPONSES)

# --- health and metrics -------------------------------------------------------------------


@health_router.get(
    "/healthz",
    summary="Liveness: the process answers",
    response_model=Liveness,
    response_model_exclude_unset=True,
    responses={503: {"model": Liveness, "description": "the model could not be loaded"}},
)
async def healthz(service: ServiceDep, response: Response) -> dict:
    """503 only when the model failed to load: a restart is then what helps."""
    if service.load_error:
        response.status_code = 503
        return {"live": False, "error": service.load_error}
    return {"live": True}


@health_router.get(
    "/readyz",
    summary="Readiness: model loaded and warmed up",
    response_model=Readiness,
    response_model_exclude_unset=True,
    responses={503: {"model": Readiness, "description": "loading, failed, or shutting down"}},
)
async def readyz(service: ServiceDep, response: Response) -> dict:
    """Turns 503 the moment SIGTERM arrives, while in-flight requests finish."""
    if not service.ready:
        response.status_code = 503
        why = "shutting down" if service.draining else service.load_error or "loading"
        return {"ready": False, "reason": why}
    return {"ready": True, "model": service.model_ref()}


# Prometheus text, not JSON: no response_model (the exposition format is prometheus_client's).
@health_router.get("/metrics", summary="Prometheus metrics", response_class=PrometheusResponse)
async def metrics(service: ServiceDep) -> PrometheusResponse:
    """Histograms and counters of this process (of all workers with ``--workers N``)."""
    return PrometheusResponse(service.metrics.render())


@router.get("/info", summary="What the page (and any client) needs first", response_model=PageInfo)
async def info(request: Request, service: ServiceDep) -> dict:
    """The served model, whether it takes exemplar boxes, the limits on points, and whether
    `POST /collect` saves (the server was started with `--collect DIR`)."""
    service.check_ready()
    s = service.settings
    return {
        "model": service.model_ref(),
        "exemplars": service.predictor.info.exemplars,
        "max_exemplars": MAX_EXEMPLARS,
        "max_objects": s.max_objects,
        "max_objects_limit": s.max_objects_limit,
        "max_body_bytes": s.max_body_bytes,
        "collect": request.app.state.collector is not None,
    }


# --- options given as query parameters ------------------------------------------------------

# Documented and type-checked by FastAPI; JSON and form fields may give the same options in
# the body (parse_options merges both and validates them with the options model).
_DONE_THRESHOLD = Query(None, gt=0, lt=1, description="stop when done exceeds it")
_EXEMPLARS = Query(None, description="JSON list of up to 3 [x1, y1, x2, y2] boxes")
_DEADLINE = Query(None, gt=0, description="seconds before giving up (504)")


def predict_query(
    max_objects: int | None = Query(None, ge=1, description="stop after this many objects"),
    done_threshold: float | None = _DONE_THRESHOLD,
    exemplars: str | None = _EXEMPLARS,
    deadline_s: float | None = _DEADLINE,
) -> dict:
    """The loop options of ``/predict`` given as query parameters."""
    return {
        "max_objects": max_objects,
        "done_threshold": done_threshold,
        "exemplars": exemplars,
        "deadline_s": deadline_s,
    }


def next_query(
    points: str | None = Query(None, description="JSON [[x, y], ...] already found"),
    done_threshold: float | None = _DONE_THRESHOLD,
    exemplars: str | None = _EXEMPLARS,
    deadline_s: float | None = _DEADLINE,
) -> dict:
    """The options of ``/next`` given as query parameters."""
    return {
        "points": points,
        "done_threshold": done_threshold,
        "exemplars": exemplars,
        "deadline_s": deadline_s,
    }


PredictQuery = Annotated[dict, Depends(predict_query)]


def stream_query(
    base: PredictQuery,
    points: str | None = Query(None, description="JSON [[x, y], ...] already found"),
) -> dict:
    """The options of ``/predict/stream`` given as query parameters."""
    return {**base, "points": points}


StreamQuery = Annotated[dict, Depends(stream_query)]
NextQuery = Annotated[dict, Depends(next_query)]

# --- counting -------------------------------------------------------------------------------


@router.post(
    "/predict",
    summary="Count the objects of one image",
    response_model=PredictResponse,
    openapi_extra=image_body_doc(PredictJSON),
)
async def predict(request: Request, service: ServiceDep, query: PredictQuery) -> dict:
    """The image as a raw body (`image/png`, `image/jpeg`, WebP, TIFF, BMP), a multipart
    `file`, or JSON `{"image": "<base64>"}`; options as query parameters or body/form fields.
    The image is counted as a viewer shows it: its EXIF orientation applied, so the points
    are in the pixels of the turned image."""
    job, t0 = await _start_count(service, request, query, stream=False)
    prediction = await service.wait(job, request.receive)
    timings = dict(prediction.timings_ms, total=_ms_since(t0))
    return {**prediction.to_dict(), "model": service.model_ref(), "timings_ms": timings}


# The body is streamed, so FastAPI validates nothing against a response_model here (it stays
# None): _stream_records builds every record through its model, and the 200 below documents
# the schema of one record.
_RECORD_SCHEMAS = [
    {"$ref": f"#/components/schemas/{model.__name__}"}
    for model in (StreamPoint, StreamDone, StreamError)
]
_STREAM_DOC = {
    "model": StreamRecord,  # registers the record schemas; the NDJSON schema of one line
    "description": "NDJSON (default) or SSE (`Accept: text/event-stream`): one StreamPoint"
    " per object, then one StreamDone, or a StreamError if the count fails midway",
    "content": {
        "application/x-ndjson": {"schema": {"type": "object"}},
        "text/event-stream": {
            "schema": {
                "type": "string",
                "description": "`event: <record event>` and `data: <record JSON>` per record",
                "contentMediaType": "application/json",
                "contentSchema": {"oneOf": _RECORD_SCHEMAS},
            }
        },
    },
}


class _NDJSONResponse(StreamingResponse):
    """A streamed body of JSON lines (the route's documented default media type)."""

    media_type = "application/x-ndjson"


@router.post(
    "/predict/stream",
    summary="Count, sending each object as it is found (NDJSON or server-sent events)",
    response_model=None,
    response_class=_NDJSONResponse,
    responses={200: _STREAM_DOC},
    openapi_extra=image_body_doc(StreamJSON),
)
async def predict_stream(
    request: Request, service: ServiceDep, query: StreamQuery
) -> StreamingResponse:
    """Same input as `/predict`, plus optional `points` already found (a count a person
    corrected continues from them: its records start at index `len(points)`). Errors found
    before the first record are answered as by `/predict`; a failure after it (e.g. the
    deadline) ends the stream with a StreamError."""
    sse = "text/event-stream" in request.headers.get("accept", "")
    job, t0 = await _start_count(service, request, query, stream=True)
    return StreamingResponse(
        _stream_records(request, service, job, t0, sse),
        media_type="text/event-stream" if sse else _NDJSONResponse.media_type,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post(
    "/next",
    summary="One step: the next object after the points already found",
    response_model=NextResponse,
    openapi_extra=image_body_doc(NextJSON),
)
async def next_point(request: Request, service: ServiceDep, query: NextQuery) -> dict:
    """Lets a person correct points and let the model continue from them. No
    count_confidence here: it reads the loop's own done probabilities from the first step,
    which a count continued from given (perhaps corrected) points does not have."""
    t0 = time.perf_counter()
    async with service.slot() as slot:  # admission before the body, as in /predict
        data, fields = await read_image_request(request, NextJSON)
        options = parse_options(NextOptions, query, fields)
        limit = service.settings.max_objects_limit
        if len(options.points) >= limit:
            raise ServeError(422, f"points: at most {limit - 1} here, got {len(options.points)}")
        threshold, _, deadline = service.loop_settings(options, 1)
        image, prepare_ms = await _prepare(service, data, options.exemplars)
        given = _points_to_norm(options.points, image, service.predictor.info.image_size)
        # Threshold 1.0: the step always yields its (x, y); `done` is reported beside it.
        job = Job(image, 1.0, len(given) + 1, deadline, given, prepare_ms=prepare_ms)
        slot.submit(job)
    prediction = await service.wait(job, request.receive)
    x, y = prediction.points[-1]
    done_prob = job.rollout.done_probs[-1]  # unrounded: compared with the threshold
    return {
        "x": x,
        "y": y,
        "done_prob": round(done_prob, 6),
        "done": done_prob > threshold,
        "index": len(given),
        "model": service.model_ref(),
        "timings_ms": dict(prediction.timings_ms, total=_ms_since(t0)),
    }


# --- helpers --------------------------------------------------------------------------------


async def _start_count(
    service: Service, request: Request, query: dict, stream: bool
) -> tuple[Job, float]:
    """Read and check a ``/predict`` request, prepare its image, hand it to the batcher."""
    t0 = time.perf_counter()
    # Admission before the body is read: a full queue answers 429 at once, and at most
    # max_queue bodies are being received and decoded at any time (bounded memory).
    async with service.slot() as slot:
        data, fields = await read_image_request(request, StreamJSON if stream else PredictJSON)
        options = parse_options(StreamOptions if stream else PredictOptions, query, fields)
        threshold, max_objects, deadline = service.loop_settings(options, options.max_objects)
        given = getattr(options, "points", [])
        if given and len(given) >= max_objects:
            raise ServeError(
                422, f"points: {len(given)} given, max_objects is {max_objects}: none left to find"
            )
        image, prepare_ms = await _prepare(service, data, options.exemplars)
        given_norm = _points_to_norm(given, image, service.predictor.info.image_size)
        queue = asyncio.Queue() if stream else None
        job = Job(image, threshold, max_objects, deadline, given_norm, queue, prepare_ms=prepare_ms)
        slot.submit(job)
    return job, t0


async def _prepare(service: Service, data: bytes, exemplars) -> tuple[PreparedImage, float]:
    """Decode and resize in the pool; the image and the milliseconds it took."""
    t = time.perf_counter()
    image = await service.in_pool(service.prepare_image, data, exemplars)
    return image, _ms_since(t)


def _ms_since(t0: float) -> float:
    """Milliseconds since ``t0`` (``time.perf_counter``), as the timings report them."""
    return round(1e3 * (time.perf_counter() - t0), 3)


def _points_to_norm(points: list, image: PreparedImage, size: int) -> list[tuple[float, float]]:
    """``/next``'s given points (original pixels) -> normalised model coordinates."""
    width, height = image.orig_size
    for x, y in points:
        if not (0 <= x <= width and 0 <= y <= height):
            raise ServeError(422, f"points: {[x, y]} is outside the {width}x{height} image")
    if not points:
        return []
    model_px = np.asarray(points, np.float32) * np.asarray(image.scale, np.float32)
    return [tuple(p) for p in imaging.pixels_to_norm(model_px, size).tolist()]


async def _stream_records(
    request: Request, service: Service, job: Job, t0: float, sse: bool
) -> AsyncIterator[bytes]:
    """The point records as the batcher pushes them, then the final (or error) record."""
    try:
        while (point := await job.stream.get()) is not None:
            yield _encode_record(StreamPoint(**point), sse)
        try:
            prediction = await job.future
        except Exception as exc:
            error = as_serve_error(exc)
            # The 200 went out with the first record: tell the metrics what this really was.
            request.state.outcome_status = error.status
            yield _encode_record(StreamError(status=error.status, detail=error.message), sse)
            return
        # A continued count's loop did not take the first steps its confidence reads.
        confidence = None if job.initial_points else prediction.count_confidence
        done = StreamDone(
            count=prediction.count,
            count_confidence=confidence,
            done_prob=prediction.done_probs[-1] if prediction.done_probs else None,
            stopped_by=prediction.stopped_by,
            model=service.model_ref(),
            timings_ms=dict(prediction.timings_ms, total=_ms_since(t0)),
        )
        yield _encode_record(done, sse)
    finally:
        if not job.future.done():  # the client went away: stop its loop between steps
            job.future.cancel()


def _encode_record(record: BaseModel, sse: bool) -> bytes:
    """One record as an NDJSON line or a server-sent event."""
    data = json.dumps(record.model_dump(mode="json"))
    if sse:
        return f"event: {record.event}\ndata: {data}\n\n".encode()
    return (data + "\n").encode()


answer_head(health_router)  # after every health route above
