"""The HTTP protocol uvicorn runs: its own (httptools when installed, else h11), plus a
timeout for connections that open and never send a request.

uvicorn starts its keep-alive timer only after a response, so a socket that connects and
stays silent is held for ever (300 of them stayed open in the reliability tests), each one
counting against ``--max-connections``. Starting the same timer when the connection opens
closes such sockets after ``--keep-alive`` seconds; any byte received cancels it, exactly as
for a kept-alive connection between requests.
"""

from __future__ import annotations

import asyncio

try:  # the fast parser (the serve extra installs it); h11 is uvicorn's pure-Python fallback
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Base
except ImportError:  # pragma: no cover - httptools missing
    from uvicorn.protocols.http.h11_impl import H11Protocol as _Base


class HTTPProtocol(_Base):
    """uvicorn's HTTP protocol with the keep-alive timeout applied from the first byte."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the idle timer at once: a request's first byte cancels it."""
        super().connection_made(transport)
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )
