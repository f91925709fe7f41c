"""The HTTP protocol uvicorn runs: its own (httptools when installed, else h11), plus a
timeout for connections that open and never send a request, and one for requests whose
headers trickle in.

uvicorn starts its keep-alive timer only after a response, so a socket that connects and
stays silent is held for ever (300 of them stayed open in the reliability tests), each one
counting against ``--max-connections``. Starting the same timer when the connection opens
closes such sockets after ``--keep-alive`` seconds; any byte received cancels it, exactly as
for a kept-alive connection between requests.

``--max-connections`` N (uvicorn's ``limit_concurrency``) means here: the first N
connections to send a request are served, until they close; a request on any other gets 503,
the API's JSON error naming the limit, with ``Retry-After``. uvicorn's own rule refuses a
request whenever N connections are *open*, counting the refused ones and those that have not
sent a byte yet, so a burst of 20 connections at once under ``--max-connections 8`` was
refused entirely (20 of 20 answered 503), and so were N - 1 of N.
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
        """uvicorn's protocol, with ``--max-connections`` N meaning N connections served
        (:meth:`_admit`); uvicorn's own count is switched off."""
        super().__init__(*args, **kwargs)
        self.max_connections: int | None = self.limit_concurrency
        self.limit_concurrency = None

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
        """The client went: no timer may fire on a closed transport; its place is free."""
        self._cancel_headers_timer()
        _admitted(self.server_state).discard(self)
        super().connection_lost(exc)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        """Run the request, or the JSON refusal when the connection limit is reached (the
        one place after uvicorn's header callback that gets the request's app)."""
        if app is service_unavailable or not self._admit():
            app = self._too_many_connections(cycle.scope["path"])
        super()._start_asgi_task(cycle, app)

    def _admit(self) -> bool:
        """True when this connection may be served: it already is, or fewer than
        ``--max-connections`` are. A connection admitted keeps its place until it closes
        (kept alive, it is closed after ``--keep-alive`` idle seconds), so at most N
        requests run at once, one per admitted connection."""
        if self.max_connections is None:
            return True
        admitted = _admitted(self.server_state)
        if self in admitted:
            return True
        if len(admitted) >= self.max_connections:
            return False
        admitted.add(self)
        return True

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


def _admitted(server_state: Any) -> set:
    """The connections admitted under ``--max-connections``, one set per server (uvicorn
    shares its ``ServerState`` between the connections of one server)."""
    admitted = getattr(server_state, "seqops_admitted", None)
    if admitted is None:
        admitted = server_state.seqops_admitted = set()
    return admitted
