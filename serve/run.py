"""``seqops serve``: resolve the model once, then run uvicorn (one or N worker processes)."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile

from seqops.predict import LOCAL_MODEL_DIR, MODEL_ENV
from seqops.predict import resolve_model as resolve_default_model
from serve.prometheus import MULTIPROC_ENV
from serve.settings import DEFAULT_MODEL_URI, MIB, SETTINGS_ENV, ServeSettings

log = logging.getLogger(__name__)


def resolve_model(given: str | None) -> tuple[str, str | None]:
    """A local model directory and its registry version (downloaded once, in the parent, so
    N workers do not download N times); the default is `seqops predict`'s (the champion,
    else models/onnx)."""
    source, model_dir, version = resolve_default_model(given)
    log.info("serving %s (%s)", source, model_dir)
    return str(model_dir), version


# The flags that set a ServeSettings field of the same meaning: flag -> (field, type, help).
# Each default is the field's, so the settings stay the one place defaults are written.
SETTINGS_FLAGS = {
    "--workers": ("workers", int, "server processes"),
    "--device": ("device", str, "auto (CUDA only where it really works) | cpu | cuda"),
    "--threads": ("threads", int, "onnxruntime threads; 0: cores / workers / run threads"),
    "--max-active": ("max_active", int, "images looping together"),
    "--run-batch": ("run_batch", int, "images per onnxruntime run; 0: measured on CPU, 64 CUDA"),
    "--encode-share": (
        "encode_share", float,
        "share of an encoding charged to a request, in steps (fair share; 0: short first)",
    ),
    "--run-threads": (
        "run_threads", int, "onnxruntime runs at once; 0: cores / workers on CPU, 1 on CUDA"
    ),
    "--max-queue": ("max_queue", int, "waiting requests before 429"),
    "--queue-full-status": ("queue_full_status", int, "429 or 503, when the queue is full"),
    "--deadline": ("deadline_s", float, "default request deadline, s"),
    "--max-deadline": ("max_deadline_s", float, "largest deadline a request may ask, s"),
    "--body-timeout": ("body_timeout_s", float, "headers, then the whole body, within, s (408)"),
    "--graceful-timeout": ("graceful_timeout_s", float, "shutdown wait, s (> max deadline + 2)"),
    "--max-connections": ("max_connections", int, "open connections before 503"),
    "--keep-alive": ("keep_alive_s", float, "idle connection timeout, s"),
    "--max-pixels": ("max_pixels", int, "decoded image limit (width x height)"),
    "--min-image-side": ("min_image_side", int, "smallest image side, px (422 below)"),
    "--max-objects": ("max_objects", int, "default loop guard"),
    "--max-objects-limit": ("max_objects_limit", int, "largest guard a request may ask"),
    "--collect": ("collect_dir", str, "folder POST /collect saves images + points to; off"),
    "--collect-max-mb": ("collect_max_mb", float, "the collect folder's size cap, MiB"),
    "--api-key-env": (
        "api_key_env", str,
        "environment variable holding the bearer token; unset/empty: no key needed",
    ),
}  # fmt: skip


def build_parser(prog: str = "python -m serve.run") -> argparse.ArgumentParser:
    """The command line of ``seqops serve``."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Serve a model directory or an MLflow model (default: "
        f"{DEFAULT_MODEL_URI} when a champion exists, else {LOCAL_MODEL_DIR}) with step-level "
        "batching: POST /predict, /predict/stream, /next, the KServe v2 endpoints under /v2, "
        "/healthz, /readyz, /metrics; the counting page at /, docs at /docs. SIGTERM: finish "
        "in-flight requests, exit.",
    )
    p.add_argument("--model", help=f"model directory or MLflow URI (env {MODEL_ENV})")
    p.add_argument(
        "--host", default="127.0.0.1", help="bind address; 0.0.0.0: all interfaces (%(default)s)"
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (%(default)s)")
    fields = ServeSettings.model_fields
    for flag, (field, kind, help_text) in SETTINGS_FLAGS.items():
        default = fields[field].default
        p.add_argument(
            flag, dest=field, type=kind, default=default, help=f"{help_text} ({default})"
        )
    max_mb = fields["max_body_bytes"].default / MIB
    p.add_argument("--max-body-mb", type=float, default=max_mb, help=f"body limit, MiB ({max_mb})")
    p.add_argument("--no-batching", action="store_true", help="one request at a time")
    p.add_argument("--no-access-log", action="store_true", help="no line per request")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m serve.run") -> int:
    """Parse the command line and serve (``seqops serve`` calls this with its own name)."""
    return run_server(build_parser(prog).parse_args(argv))


def settings_from_args(args: argparse.Namespace, model_dir: str, version: str | None):
    """The validated :class:`ServeSettings` of the command line."""
    values = {field: getattr(args, field) for field, _, _ in SETTINGS_FLAGS.values()}
    if args.no_batching:
        values["max_active"] = 1
    if values["collect_dir"]:  # workers and logs see the folder the command meant
        values["collect_dir"] = os.path.abspath(values["collect_dir"])
    return ServeSettings(
        model=model_dir,
        model_version=version,
        max_body_bytes=int(args.max_body_mb * MIB),
        **values,
    )


def run_server(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; returns 0 after a graceful shutdown."""
    import uvicorn
    from pydantic import ValidationError

    model_dir, version = resolve_model(args.model)
    try:
        settings = settings_from_args(args, model_dir, version)
    except ValidationError as exc:
        raise ValueError(f"serve settings: {exc}") from None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: reachable from other hosts", args.host)
    if settings.collect_dir:
        log.info(
            "POST /collect saves to %s (cap %g MiB)", settings.collect_dir, settings.collect_max_mb
        )
    if settings.api_key() is None:
        log.info("no API key: set %s to require a bearer token", settings.api_key_env)
    else:  # say it either way, so a reader of the log knows which one is running
        log.info("API key from %s: a bearer token is required", settings.api_key_env)
    # uvicorn re-raises the signal it caught once it has shut down; exit 0 then, so that
    # an orchestrator's SIGTERM (e.g. `podman stop`) reads as the clean stop it is.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    common = {
        "host": args.host,
        "port": args.port,
        "timeout_graceful_shutdown": settings.graceful_timeout_s,
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": settings.keep_alive_s,
        "http": "serve.protocol:HTTPProtocol",
        "access_log": not args.no_access_log,
        "log_level": "info",
    }
    if settings.workers == 1:
        from serve.app import create_app

        uvicorn.run(create_app(settings), **common)
        return 0
    # Workers import the app factory; the settings and a shared metrics directory reach
    # them through the environment.
    os.environ[SETTINGS_ENV] = settings.to_env()
    own_metrics_dir = None
    if not os.environ.get(MULTIPROC_ENV):
        own_metrics_dir = tempfile.mkdtemp(prefix="seqops-metrics-")
        os.environ[MULTIPROC_ENV] = own_metrics_dir
    try:
        uvicorn.run(
            "serve.app:create_app_from_env",
            factory=True,
            workers=settings.workers,
            **common,
        )
    finally:
        if own_metrics_dir:
            shutil.rmtree(own_metrics_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sys.exit(main())
