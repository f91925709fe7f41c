"""``seqops serve``: resolve the model once, then run uvicorn (one or N worker processes)."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from seqops.predictor import PredictorError, resolve_model_dir
from serve.prometheus import MULTIPROC_ENV
from serve.settings import DEFAULT_MODEL_URI, MIB, SETTINGS_ENV, ServeSettings

log = logging.getLogger(__name__)

MODEL_ENV = "SEQOPS_MODEL"
LOCAL_MODEL_DIR = "models/onnx"  # where `dvc repro export` puts the model


def model_candidates(given: str | None) -> list[str]:
    """What to serve: ``--model``, else ``$SEQOPS_MODEL``, else the registry's champion (when
    a tracking store exists; asking would create an empty one) and then ``models/onnx``."""
    if given:
        return [given]
    if os.environ.get(MODEL_ENV):
        return [os.environ[MODEL_ENV]]
    have_store = bool(os.environ.get("MLFLOW_TRACKING_URI")) or Path("mlflow.db").is_file()
    return [DEFAULT_MODEL_URI, LOCAL_MODEL_DIR] if have_store else [LOCAL_MODEL_DIR]


def resolve_model(given: str | None) -> tuple[str, str | None]:
    """A local model directory and its registry version (downloaded once, in the parent, so
    N workers do not download N times)."""
    errors = []
    for candidate in model_candidates(given):
        try:
            model_dir, version = resolve_model_dir(candidate)
        except PredictorError as exc:
            errors.append(str(exc))
            continue
        log.info("serving %s (%s)", candidate, model_dir)
        return str(model_dir), version
    raise PredictorError("no model to serve: " + "; ".join(errors))


def settings_from_args(args: argparse.Namespace, model_dir: str, version: str | None):
    """The validated :class:`ServeSettings` of the command line."""
    return ServeSettings(
        model=model_dir,
        model_version=version,
        device=args.device,
        threads=args.threads,
        workers=args.workers,
        max_active=1 if args.no_batching else args.max_active,
        run_batch=args.run_batch,
        max_queue=args.max_queue,
        queue_full_status=args.queue_full_status,
        deadline_s=args.deadline,
        max_deadline_s=args.max_deadline,
        max_body_bytes=int(args.max_body_mb * MIB),
        max_pixels=args.max_pixels,
        max_objects=args.max_objects,
        max_objects_limit=args.max_objects_limit,
        api_key_env=args.api_key_env,
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
    if settings.api_key() is None:
        log.info("no API key: set %s to require a bearer token", settings.api_key_env)
    # uvicorn re-raises the signal it caught once it has shut down; exit 0 then, so that
    # an orchestrator's SIGTERM (e.g. `podman stop`) reads as the clean stop it is.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    common = {
        "host": args.host,
        "port": args.port,
        "timeout_graceful_shutdown": args.graceful_timeout,
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
