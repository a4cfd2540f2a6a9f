"""uvicorn's HTTP/1.1 protocol with a deadline on a request's headers.

uvicorn times out idle keep-alive connections, but not a connection that sends
half a request line and then trickles (slowloris): each would hold a socket
forever. Here a connection must finish its headers within
ACCORDION_HEADER_TIMEOUT seconds (default 10, like a Go server's
ReadHeaderTimeout) of its first byte, or of connecting; then it is closed.
"""

from __future__ import annotations

import asyncio
import os

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def header_timeout() -> float:
    return float(os.environ.get("ACCORDION_HEADER_TIMEOUT", "10"))


class DeadlineH11Protocol(H11Protocol):
    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # the bytes of a new request's head
            self._arm()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # its headers are complete
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(header_timeout(), self._expire)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _expire(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()
