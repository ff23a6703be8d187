"""Connection limits, so that no client can hold the server's connections or upload slots by being slow.

Semantics (defaults in app/server/settings.py and the README):
* header timeout: a connection must complete a request's headers within `header_timeout` seconds of opening,
  and of its previous response (uvicorn's h11 protocol has no such timer: `HeaderTimeoutH11Protocol` adds it);
  past it the connection is closed. Idle keep-alive connections are closed after `keep_alive_timeout` (uvicorn).
* body timeout: while a request body is incomplete, each read may wait at most `body_timeout` seconds
  (`BodyTimeoutMiddleware`); past it the request ends with 408 + `Connection: close`, so a stalled upload leaves
  its upload slot. Reads after the body (disconnect watching of streams) are not timed.
* at most `max_connections` connections and requests at once (uvicorn's `limit_concurrency`: 503 past it).
"""
from __future__ import annotations

import asyncio

from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol


class BodyStalled(HTTPException):
    def __init__(self, seconds: float):
        super().__init__(408, f"the request body stalled for {seconds:g} s", headers={"Connection": "close"})


class BodyTimeoutMiddleware:
    def __init__(self, app, body_timeout: float):
        self.app = app
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body_done = False

        async def timed_receive():
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout=self.body_timeout)
            except asyncio.TimeoutError:
                raise BodyStalled(self.body_timeout) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, timed_receive, send)


def header_timeout_protocol(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a timer from the connection's start (and from each response's end) to the next
    request's headers; a connection still without them when it fires is closed."""

    class HeaderTimeoutH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()

        def connection_lost(self, exc) -> None:
            self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            if getattr(self, "_header_timer", None) is not None:
                self._header_timer.cancel()
            waiting_after = self.cycle  # a new request replaces it once its headers are parsed
            self._header_timer = self.loop.call_later(header_timeout, self._headers_overdue, waiting_after)

        def _headers_overdue(self, waiting_after) -> None:
            if self.cycle is waiting_after and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutH11Protocol
