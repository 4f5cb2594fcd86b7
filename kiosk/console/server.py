"""The console's HTTP server side: uvicorn's h11 protocol with a deadline for each request to arrive whole.

uvicorn has no header or body timeout of its own. Its `timeout_keep_alive` covers only the quiet between two
requests and is cancelled by the first byte of the next one; after that, h11 buffers a header section that never
ends (up to `h11_max_incomplete_event_size`, 16 KiB) and the app waits for a body that never comes, for ever: a
few hundred such connections, a byte now and then, hold the console's sockets and memory. `TimedH11Protocol`
closes a connection whose request, headers and body, is not in whole `request_timeout_s` after the server
started waiting for it (the connection made, or the previous response sent). It is one deadline per request,
not per read, so a client that sends a byte every second gains nothing. A request that is in whole is no longer
timed (a long server-sent event stream is a response, not a request).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"


class SparseLog:
    """One log line per `every_s` at most for a kind of event a client can cause at will, with how many were
    left out in between: a flood of refused requests must not become a flood of log lines."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0) -> None:
        self.logger = logger
        self.every_s = every_s
        self._last = float("-inf")
        self._quiet = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            self._quiet += 1
            return
        more = f" (and {self._quiet} more like it since the last line)" if self._quiet else ""
        self.logger.warning(message + "%s", *args, more)
        self._last, self._quiet = now, 0


_timeouts = SparseLog(log)


class TimedH11Protocol(H11Protocol):
    """H11Protocol plus the request deadline (see the module docstring); `timed_protocol` sets the timeout."""

    request_timeout_s = 5.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):  # the request is in (or the peer is done)
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request (unless a pipelined one is already in whole)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if (
            self._deadline is None
            and not self.transport.is_closing()
            and self.conn.their_state in (h11.IDLE, h11.SEND_BODY)
        ):
            self._deadline = self.loop.call_later(self.request_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            return
        partial_head = self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0])
        if partial_head or self.conn.their_state is h11.SEND_BODY:
            client = self.client[0] if self.client else "?"
            _timeouts.warning(
                "console: closed a connection from %s: its request was not in whole within %g s (%s)",
                client,
                self.request_timeout_s,
                "headers unfinished" if partial_head else "body unfinished",
            )
        if partial_head:  # no response begun: say why (a response underway is the app's to end)
            self.transport.write(TIMEOUT_RESPONSE)
        self.transport.close()  # an idle connection: closed as uvicorn's keep-alive timeout would


def timed_protocol(request_timeout_s: float) -> type[TimedH11Protocol]:
    """The protocol class for `uvicorn.Config(http=...)` with this deadline."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"request_timeout_s": request_timeout_s})
