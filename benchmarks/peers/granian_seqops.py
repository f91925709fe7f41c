"""seqops' own app under granian (a Rust HTTP server, ASGI interface) instead of uvicorn.

Not a peer model server: the same app as ``seqops serve`` (``serve.app.create_app``, the
same settings from the same flags), only the HTTP server differs, so bench_serve.py can set
the two side by side. granian runs an app in worker processes that import it: like
``seqops serve --workers N``, the settings reach the worker as JSON in the environment and
the worker builds the app with ``serve.app:create_app_from_env`` (one worker here, so the
parent process only supervises).

Lifespan (the model loads at startup), ``/predict/stream`` and the SIGTERM drain (the app's
handler runs, the listener closes, in-flight requests are answered, exit 0) work as under
uvicorn. What does not carry over is ``serve/protocol.py``, a uvicorn protocol class
(checked with ``--keep-alive 2 --body-timeout 2 --max-connections 8``): ``--max-connections``
(20 requests on 20 connections at once were all served; uvicorn answered them 503), the idle
timeout for a connection that never sends a byte (``--keep-alive``), and the JSON 408 for
late headers (granian's ``header_read_timeout``, set here from ``--body-timeout``, at most
60 s, closes the connection without an answer). granian's own task implementation
(``--task-impl rust``) does not run the app at all: anyio's ``to_thread`` (how FastAPI calls
a sync dependency such as ``get_service``) walks ``asyncio.all_tasks()``, and granian's Rust
tasks raise "Future object is not initialized" there.

    .venv/bin/python benchmarks/peers/granian_seqops.py --model DIR --port 8003 --device cpu
"""

from __future__ import annotations

import logging
import os
import sys

from granian import Granian
from granian.constants import Interfaces, TaskImpl
from granian.http import HTTP1Settings

from serve.run import build_parser, resolve_model, settings_from_args
from serve.settings import SETTINGS_ENV

MAX_HEADER_TIMEOUT_MS = 60_000  # granian's upper limit for header_read_timeout


def main(argv: list[str] | None = None) -> int:
    """Parse ``seqops serve``'s flags and serve the app under granian until SIGTERM/SIGINT."""
    parser = build_parser("benchmarks/peers/granian_seqops.py")
    parser.add_argument(
        "--task-impl", choices=["asyncio", "rust"], default="asyncio",
        help="granian's task implementation: asyncio's, or its own in Rust (%(default)s)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    model_dir, version = resolve_model(args.model)
    settings = settings_from_args(args, model_dir, version)
    if settings.workers != 1:
        parser.error("--workers: one granian worker here (the comparison is one process each)")
    os.environ[SETTINGS_ENV] = settings.to_env()
    header_ms = min(int(settings.body_timeout_s * 1000), MAX_HEADER_TIMEOUT_MS)
    Granian(
        "serve.app:create_app_from_env",
        factory=True,
        address=args.host,
        port=args.port,
        interface=Interfaces.ASGI,  # with lifespan: the model loads at startup, as under uvicorn
        workers=1,
        task_impl=TaskImpl(args.task_impl),
        http1_settings=HTTP1Settings(header_read_timeout=header_ms),
        log_access=not args.no_access_log,
        log_level="warning",
    ).serve()
    return 0


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sys.exit(main())
