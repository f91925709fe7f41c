"""The FastAPI app: the routers of ``serve.routes`` (``/predict``, ``/predict/stream``,
``/next``, ``/info``, health, metrics), ``serve.kserve`` (KServe v2) and ``serve.collect``
(``/collect``), the service behind them, and the counting page at ``/`` (``serve/static``).

``create_app(settings)`` builds one app; ``create_app_from_env()`` is the factory uvicorn's
workers import. Docs at ``/docs``, the schema at ``/openapi.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from seqops import __version__
from seqops.predictor import Predictor
from serve import collect, kserve, routes
from serve.docs import install_docs
from serve.http_io import BodyLimitMiddleware, RefuseWhenFull, install_error_handlers
from serve.prometheus import RequestMetricsMiddleware, ServeMetrics
from serve.protocol import HTTPProtocol
from serve.service import Service
from serve.settings import SHUTDOWN_MARGIN_S, ServeSettings

log = logging.getLogger(__name__)
PAGE_DIR = Path(__file__).parent / "static"  # index.html, app.js, app.css: no build step


def create_app(settings: ServeSettings, predictor: Predictor | None = None) -> FastAPI:
    """Build the app; the model loads in the background at startup (or ``predictor`` is
    used as is), so liveness answers at once and readiness once it is warmed up."""
    metrics = ServeMetrics()
    service = Service(settings, metrics, predictor)
    # The connection-level half of --body-timeout: headers (uvicorn builds one protocol
    # per connection from this class, in this process).
    HTTPProtocol.headers_timeout_s = settings.body_timeout_s

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
        docs_url=None,  # serve/docs.py: the same pages, assets from the package
        redoc_url=None,
    )
    install_docs(app)
    install_page(app)
    app.state.service = service
    app.state.collector = (
        collect.Collector(settings.collect_dir, settings.collect_max_mb)
        if settings.collect_dir
        else None
    )
    install_error_handlers(app)
    routers = (routes.health_router, routes.router, collect.router, kserve.health_router)
    for router in (*routers, kserve.router):
        app.include_router(router)
    app.add_middleware(RefuseWhenFull, service=service)  # inside the body limit and metrics
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        timeout_s=settings.body_timeout_s,
    )
    app.add_middleware(
        RequestMetricsMiddleware,
        metrics=metrics,
        endpoints={"/predict": "predict", "/predict/stream": "predict_stream", "/next": "next"},
    )
    return app


def install_page(app: FastAPI) -> None:
    """The counting page at ``/`` and its assets under ``/page``: open, like ``/docs`` (they
    hold no data; the page asks for the API key when a request answers 401)."""
    app.mount("/page", StaticFiles(directory=PAGE_DIR), name="page")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def create_app_from_env() -> FastAPI:
    """Factory for uvicorn workers: the settings ``seqops serve`` put in the environment."""
    return create_app(ServeSettings.from_env())


def _stop_ready_on_sigterm(service: Service) -> None:
    """Readiness turns 503 the moment SIGTERM arrives, then uvicorn's own handler runs
    (stop accepting, let in-flight requests finish, shut down); requests still running
    near the end of the graceful timeout are answered 503 with their points so far."""
    if threading.current_thread() is not threading.main_thread():
        return  # in-process test clients run the app in another thread
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return

    loop = asyncio.get_running_loop()
    cut_after = max(service.settings.graceful_timeout_s - SHUTDOWN_MARGIN_S, 0.0)

    def on_sigterm(signum, frame):
        if not service.draining:
            service.draining = True
            log.info("SIGTERM: not ready any more; finishing in-flight requests")
            # Before uvicorn's graceful timeout cancels what is left (a bare 500), answer
            # it ourselves: 503 with the points found so far.
            loop.call_soon_threadsafe(loop.call_later, cut_after, service.cut_in_flight)
        previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
