"""The gateway's HTTP protocol: uvicorn's own, with a deadline for a request's head.

uvicorn closes a connection that sits idle between requests (its keep-alive timeout) but waits
forever for a request whose head has begun to arrive (the first bytes cancel the keep-alive timer),
so a client sending half its headers would hold a connection for good. Here a request's head must
be complete within ``header_timeout`` of the connection opening, or of the request's first bytes
on a kept-alive connection.
"""

import asyncio
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol


def with_header_timeout(header_timeout: float) -> type[asyncio.Protocol]:
    class HeaderTimeoutProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _header_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            # The first bytes of a kept-alive connection's next request start its clock.
            if self._header_deadline is None and self._waiting_for_a_head():
                self._arm()
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # Idle until the next request begins: the keep-alive timeout's business.
            self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _waiting_for_a_head(self) -> bool:
            # A request whose head arrived has a cycle that has not yet completed its response.
            return self.cycle is None or bool(self.cycle.response_complete)

        def _arm(self) -> None:
            self._disarm()
            self._header_deadline = self.loop.call_later(header_timeout, self._head_overdue)

        def _disarm(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _head_overdue(self) -> None:
            self._header_deadline = None
            if self._waiting_for_a_head() and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol
