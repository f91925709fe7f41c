"""Prometheus metrics of the service: histograms, so p50/p99 come out of Prometheus.

Each app has its own registry (several apps in one test process do not collide). With
``--workers N`` the CLI sets ``PROMETHEUS_MULTIPROC_DIR`` and a scrape of any worker
reports the sum over all of them (prometheus_client's multiprocess mode).
"""

from __future__ import annotations

import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Request latencies span a few ms (one step) to tens of seconds (hundreds of objects).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
_STEPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# Status code -> the reason label of seqops_requests_total.
_REASONS = {
    200: "ok",
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    408: "body_timeout",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "queue_full",
    499: "client_closed",
    503: "unavailable",
    504: "deadline",
}


def reason_for(status: int) -> str:
    """The ``reason`` label for an HTTP status."""
    return _REASONS.get(status, "error" if status >= 500 else "client_error")


# The service's metrics: attribute -> (kind, name, help, options). Durations are histograms
# so that p50/p99 come out of Prometheus; gauges add up over workers in multiprocess mode.
_METRICS = {
    "request_seconds": (
        Histogram,
        "seqops_request_duration_seconds",
        "Time from request start to the last byte of the response.",
        {"labelnames": ["endpoint"], "buckets": _LATENCY_BUCKETS},
    ),
    "requests": (
        Counter,
        "seqops_requests",  # exposed as seqops_requests_total
        "Finished requests by endpoint and outcome (ok or the failure reason).",
        {"labelnames": ["endpoint", "reason"]},
    ),
    "inflight": (
        Gauge,
        "seqops_inflight_requests",
        "Requests being handled now.",
        {"multiprocess_mode": "livesum"},
    ),
    "queue_seconds": (
        Histogram,
        "seqops_queue_seconds",
        "Time from admission to the start of the image's encoding.",
        {"buckets": _LATENCY_BUCKETS},
    ),
    "queue_depth": (
        Gauge,
        "seqops_queue_depth",
        "Requests admitted and not yet stepping (decoding or waiting).",
        {"multiprocess_mode": "livesum"},
    ),
    "encode_seconds": (
        Histogram,
        "seqops_encode_seconds",
        "One batched encoder run.",
        {"buckets": _STEP_BUCKETS},
    ),
    "step_seconds": (
        Histogram,
        "seqops_step_seconds",
        "One batched step run (all active images together).",
        {"buckets": _STEP_BUCKETS},
    ),
    "batch_size": (
        Histogram,
        "seqops_batch_size",
        "Images in one step run.",
        {"buckets": _BATCH_BUCKETS},
    ),
    "steps_per_request": (
        Histogram,
        "seqops_steps_per_request",
        "Steps run for one image (objects found + the final done step).",
        {"buckets": _STEPS_BUCKETS},
    ),
    "run_batch": (
        Gauge,
        "seqops_run_batch",
        "Images per step run: as set, else measured at start (the cheapest per image).",
        {"multiprocess_mode": "max"},
    ),
    "model_info": (
        Gauge,
        "seqops_model_info",
        "The served model: 1 with its name, version, preset and execution provider.",
        {"labelnames": ["name", "version", "preset", "provider"], "multiprocess_mode": "max"},
    ),
}


class ServeMetrics:
    """The service's metrics (:data:`_METRICS`), registered in a registry of their own."""

    request_seconds: Histogram
    requests: Counter
    inflight: Gauge
    queue_seconds: Histogram
    queue_depth: Gauge
    encode_seconds: Histogram
    step_seconds: Histogram
    batch_size: Histogram
    steps_per_request: Histogram
    run_batch: Gauge
    model_info: Gauge

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        for attribute, (kind, name, documentation, options) in _METRICS.items():
            setattr(self, attribute, kind(name, documentation, registry=self.registry, **options))

    def set_model(self, name: str, version: str, preset: str, provider: str) -> None:
        """Publish the loaded model's identity."""
        self.model_info.labels(name, version, preset, provider).set(1)

    def render(self) -> bytes:
        """The exposition text (of all workers in multiprocess mode)."""
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


class PrometheusResponse(Response):
    """The exposition text with its content type."""

    media_type = CONTENT_TYPE_LATEST


class RequestMetricsMiddleware:
    """Duration, in-flight count and outcome of the model endpoints (pure ASGI, so a
    streamed response is timed to its last byte)."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics, endpoints: dict[str, str]) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints  # path -> endpoint label; /v2/.../infer matched by suffix

    def _label(self, path: str) -> str | None:
        """The endpoint label of a path, or None for paths not measured."""
        if path in self.endpoints:
            return self.endpoints[path]
        if path.startswith("/v2/models/") and path.endswith("/infer"):
            return "kserve_infer"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        label = self._label(scope["path"]) if scope["type"] == "http" else None
        if label is None:
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.inflight.dec()
            self.metrics.request_seconds.labels(label).observe(time.perf_counter() - start)
            # A stream that failed after its 200 records its real outcome in the state.
            status = scope.get("state", {}).get("outcome_status", status)
            self.metrics.requests.labels(label, reason_for(status)).inc()
