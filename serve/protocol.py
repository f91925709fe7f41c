"""The HTTP protocol uvicorn runs: its own (httptools when installed, else h11), plus a
timeout for connections that open and never send a request, and one for requests whose
headers trickle in.

uvicorn starts its keep-alive timer only after a response, so a socket that connects and
stays silent is held for ever (300 of them stayed open in the reliability tests), each one
counting against ``--max-connections``. Starting the same timer when the connection opens
closes such sockets after ``--keep-alive`` seconds; any byte received cancels it, exactly as
for a kept-alive connection between requests.

Past ``--max-connections`` (uvicorn's ``limit_concurrency``) uvicorn answers 503 with the
plain text "Service Unavailable"; here that answer is the API's JSON error, naming the limit,
with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi.responses import JSONResponse
from uvicorn.protocols.http.flow_control import service_unavailable

from serve.http_io import error_response

try:  # the fast parser (the serve extra installs it); h11 is uvicorn's pure-Python fallback
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Base
except ImportError:  # pragma: no cover - httptools missing
    from uvicorn.protocols.http.h11_impl import H11Protocol as _Base

_BODY = json.dumps({"detail": "request headers did not arrive in time"}).encode()
HEADERS_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY
)


class HTTPProtocol(_Base):
    """uvicorn's HTTP protocol with the keep-alive timeout applied from the first byte, a
    request's headers due within :attr:`headers_timeout_s` of its first byte (408), and the
    refusal past ``--max-connections`` in JSON (503).

    uvicorn has no header timeout: a client that sends a request line and then a header
    byte every few seconds (a slowloris) holds its connection, and a place under
    ``--max-connections``, for as long as it likes. ``create_app`` sets the timeout from
    ``--body-timeout`` (the body has its own deadline in the app). The parser callbacks
    and the task hook used are httptools'; with h11 (no httptools) only the idle timeout
    applies.
    """

    headers_timeout_s: float = 30.0
    _headers_timer: asyncio.TimerHandle | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """uvicorn's protocol, with ``--max-connections`` N meaning N connections served.

        uvicorn refuses once the open connections, the asking one included, reach its
        ``limit_concurrency``: N served N - 1. One more gives the N the flag says (and the
        in-flight requests uvicorn also counts, one per connection, stay within it)."""
        super().__init__(*args, **kwargs)
        self.max_connections: int | None = self.limit_concurrency
        if self.limit_concurrency is not None:
            self.limit_concurrency += 1

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the idle timer at once: a request's first byte cancels it."""
        super().connection_made(transport)
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def on_message_begin(self) -> None:
        """A request's first byte: its headers are due within :attr:`headers_timeout_s`."""
        super().on_message_begin()
        self._cancel_headers_timer()
        self._headers_timer = self.loop.call_later(self.headers_timeout_s, self._headers_late)

    def on_headers_complete(self) -> None:
        """Every header arrived in time: the app takes over (and times the body)."""
        self._cancel_headers_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        """The client went: no timer may fire on a closed transport."""
        self._cancel_headers_timer()
        super().connection_lost(exc)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        """Run the request, or our refusal where uvicorn chose its own (the connection limit
        is reached): uvicorn picks ``service_unavailable`` in the middle of its header
        callback, and this is the one place after it that sees the choice."""
        if app is service_unavailable:
            app = self._too_many_connections(cycle.scope["path"])
        super()._start_asgi_task(cycle, app)

    def _too_many_connections(self, path: str) -> JSONResponse:
        """503 in the API's error format, naming the limit; the connection closes after it
        (the point is to have fewer), and 1 s is as good a wait as any other 503's."""
        per_worker = " per worker" if (self.config.workers or 1) > 1 else ""
        message = (
            f"too many connections: the server holds at most {self.max_connections}"
            f"{per_worker} (--max-connections); retry later"
        )
        headers = {"Retry-After": "1", "Connection": "close"}
        return error_response(path, 503, message, headers)

    def _headers_late(self) -> None:
        """Answer 408 (JSON, as every refusal) and close the connection."""
        self._headers_timer = None
        if not self.transport.is_closing():
            self.transport.write(HEADERS_TIMEOUT_RESPONSE)
            self.transport.close()

    def _cancel_headers_timer(self) -> None:
        if self._headers_timer is not None:
            self._headers_timer.cancel()
            self._headers_timer = None
