"""The FastAPI app: ``/predict``, ``/predict/stream``, ``/next``, health, metrics, KServe v2.

``create_app(settings)`` builds one app; ``create_app_from_env()`` is the factory uvicorn's
workers import. Docs at ``/docs``, the schema at ``/openapi.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from seqops import __version__, imaging
from seqops.predictor import Predictor
from serve import kserve
from serve.batcher import Job
from serve.http_io import (
    ERROR_RESPONSES,
    BodyLimitMiddleware,
    image_body_doc,
    install_error_handlers,
    parse_options,
    read_image_request,
)
from serve.prometheus import RequestMetricsMiddleware, ServeMetrics
from serve.schemas import (
    NextJSON,
    NextOptions,
    NextResponse,
    PredictJSON,
    PredictOptions,
    PredictResponse,
    StreamDone,
    StreamPoint,
)
from serve.service import ServeError, Service, as_serve_error, require_api_key
from serve.settings import ServeSettings

log = logging.getLogger(__name__)

# --- the app -------------------------------------------------------------------------------


def create_app(settings: ServeSettings, predictor: Predictor | None = None) -> FastAPI:
    """Build the app; the model loads in the background at startup (or ``predictor`` is
    used as is), so liveness answers at once and readiness once it is warmed up."""
    metrics = ServeMetrics()
    service = Service(settings, metrics, predictor)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _stop_ready_on_sigterm(service)
        if predictor is not None:
            await service.start()
            loading = None
        else:
            loading = asyncio.create_task(service.start())
        yield
        if loading is not None and not loading.done():
            loading.cancel()
        await service.stop()

    app = FastAPI(
        title="seqops",
        version=__version__,
        summary="Counts objects one at a time; step-batched onnxruntime serving.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.metrics = metrics
    install_error_handlers(app)
    _add_routes(app, service)
    app.include_router(kserve.router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(
        RequestMetricsMiddleware,
        metrics=metrics,
        endpoints={"/predict": "predict", "/predict/stream": "predict_stream", "/next": "next"},
    )
    return app


def create_app_from_env() -> FastAPI:
    """Factory for uvicorn workers: the settings ``seqops serve`` put in the environment."""
    return create_app(ServeSettings.from_env())


def _stop_ready_on_sigterm(service: Service) -> None:
    """Readiness turns 503 the moment SIGTERM arrives, then uvicorn's own handler runs
    (stop accepting, let in-flight requests finish, shut down)."""
    if threading.current_thread() is not threading.main_thread():
        return  # in-process test clients run the app in another thread
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return

    def on_sigterm(signum, frame):
        service.draining = True
        log.info("SIGTERM: not ready any more; finishing in-flight requests")
        previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


# Query parameters (documented and type-checked by FastAPI); JSON and form fields may give
# the same options in the body.
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
NextQuery = Annotated[dict, Depends(next_query)]


def _add_routes(app: FastAPI, service: Service) -> None:
    auth = [Depends(require_api_key)]

    @app.get("/healthz", tags=["health"], summary="Liveness: the process answers")
    async def healthz() -> JSONResponse:
        if service.load_error:
            return JSONResponse({"live": False, "error": service.load_error}, 503)
        return JSONResponse({"live": True})

    @app.get("/readyz", tags=["health"], summary="Readiness: model loaded and warmed up")
    async def readyz() -> JSONResponse:
        if not service.ready:
            why = "shutting down" if service.draining else service.load_error or "loading"
            return JSONResponse({"ready": False, "reason": why}, 503)
        return JSONResponse({"ready": True, "model": service.model_ref()})

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics")
    async def metrics_endpoint() -> Response:
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    async def start_count(request: Request, query: dict, stream: bool) -> tuple[Job, float]:
        t0 = time.perf_counter()
        service.check_ready()
        data, fields = await read_image_request(request, PredictJSON)
        options = parse_options(PredictOptions, query, fields)
        threshold, max_objects, deadline = service.loop_settings(options, options.max_objects)
        async with service.slot() as slot:
            image, prepare_ms = await prepare(data, options.exemplars)
            job = Job(image, threshold, max_objects, deadline, prepare_ms=prepare_ms)
            job.stream = asyncio.Queue() if stream else None
            slot.submit(job)
        return job, t0

    async def prepare(data: bytes, exemplars) -> tuple[Any, float]:
        t = time.perf_counter()
        image = await service.in_pool(service.prepare_image, data, exemplars)
        return image, 1e3 * (time.perf_counter() - t)

    @app.post(
        "/predict",
        tags=["predict"],
        summary="Count the objects of one image",
        response_model=PredictResponse,
        responses=ERROR_RESPONSES,
        dependencies=auth,
        openapi_extra=image_body_doc(PredictJSON),
    )
    async def predict(request: Request, query: PredictQuery) -> JSONResponse:
        """The image as a raw body (`image/png`, `image/jpeg`), a multipart `file`, or JSON
        `{"image": "<base64>"}`; options as query parameters or body/form fields."""
        job, t0 = await start_count(request, query, stream=False)
        prediction = await service.wait(job)
        body = prediction.to_dict()
        body["model"] = service.model_ref()
        body["timings_ms"]["total"] = round(1e3 * (time.perf_counter() - t0), 3)
        return JSONResponse(body)

    @app.post(
        "/predict/stream",
        tags=["predict"],
        summary="Count, sending each object as it is found (NDJSON or server-sent events)",
        responses={
            200: {
                "description": "NDJSON (default) or SSE (Accept: text/event-stream): one"
                " StreamPoint per object, then one StreamDone (or an error record)",
                "content": {
                    "application/x-ndjson": {"schema": StreamPoint.model_json_schema()},
                    "text/event-stream": {"schema": StreamDone.model_json_schema()},
                },
            },
            **ERROR_RESPONSES,
        },
        dependencies=auth,
        openapi_extra=image_body_doc(PredictJSON),
    )
    async def predict_stream(request: Request, query: PredictQuery) -> StreamingResponse:
        """Same input as `/predict`."""
        sse = "text/event-stream" in request.headers.get("accept", "")
        job, t0 = await start_count(request, query, stream=True)
        return StreamingResponse(
            _stream_records(service, job, t0, sse),
            media_type="text/event-stream" if sse else "application/x-ndjson",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post(
        "/next",
        tags=["predict"],
        summary="One step: the next object after the points already found",
        response_model=NextResponse,
        responses=ERROR_RESPONSES,
        dependencies=auth,
        openapi_extra=image_body_doc(NextJSON),
    )
    async def next_point(request: Request, query: NextQuery) -> JSONResponse:
        """Lets a person correct points and let the model continue from them."""
        t0 = time.perf_counter()
        service.check_ready()
        data, fields = await read_image_request(request, NextJSON)
        options = parse_options(NextOptions, query, fields)
        limit = service.settings.max_objects_limit
        if len(options.points) >= limit:
            raise ServeError(422, f"points: at most {limit - 1} here, got {len(options.points)}")
        threshold, _, deadline = service.loop_settings(options, 1)
        async with service.slot() as slot:
            image, prepare_ms = await prepare(data, options.exemplars)
            given = _points_to_norm(options.points, image, service.predictor.info.image_size)
            # Threshold 1.0: the step always yields its (x, y); `done` is reported beside it.
            job = Job(image, 1.0, len(given) + 1, deadline, given, prepare_ms=prepare_ms)
            slot.submit(job)
        prediction = await service.wait(job)
        x, y = prediction.points[-1]
        done_prob = job.rollout.done_probs[-1]  # unrounded: compared with the threshold
        timings = prediction.timings_ms
        timings["total"] = round(1e3 * (time.perf_counter() - t0), 3)
        return JSONResponse(
            {
                "x": x,
                "y": y,
                "done_prob": round(done_prob, 6),
                "done": done_prob > threshold,
                "index": len(given),
                "model": service.model_ref(),
                "timings_ms": timings,
            }
        )


def _points_to_norm(points: list, image, size: int) -> list[tuple[float, float]]:
    width, height = image.orig_size
    for x, y in points:
        if not (0 <= x <= width and 0 <= y <= height):
            raise ServeError(422, f"points: {[x, y]} is outside the {width}x{height} image")
    if not points:
        return []
    model_px = np.asarray(points, np.float32) * np.asarray(image.scale, np.float32)
    return [tuple(p) for p in imaging.pixels_to_norm(model_px, size).tolist()]


async def _stream_records(service: Service, job: Job, t0: float, sse: bool):
    """The point records as the batcher pushes them, then the final (or error) record."""

    def encode(record: dict) -> bytes:
        data = json.dumps(record)
        if sse:
            return f"event: {record['event']}\ndata: {data}\n\n".encode()
        return (data + "\n").encode()

    try:
        while (record := await job.stream.get()) is not None:
            yield encode(record)
        try:
            prediction = await job.future
        except Exception as exc:
            error = as_serve_error(exc)
            yield encode({"event": "error", "status": error.status, "detail": error.message})
            return
        timings = dict(prediction.timings_ms, total=round(1e3 * (time.perf_counter() - t0), 3))
        yield encode(
            {
                "event": "done",
                "count": prediction.count,
                "done_prob": prediction.done_probs[-1] if prediction.done_probs else None,
                "stopped_by": prediction.stopped_by,
                "model": service.model_ref(),
                "timings_ms": timings,
            }
        )
    finally:
        if not job.future.done():  # the client went away: stop its loop between steps
            job.future.cancel()
