"""Graceful drain on SIGTERM: stop taking generations, let the running ones finish, then let the server exit.

Semantics: `Drain.run(timeout_s)` marks the process as draining (`/ready` answers 503 and the generation routes
answer 503 + Retry-After from then on), waits until no request is in flight, and, when `timeout_s` passes first,
cuts the generations still running: each ends with an in-band error event (streams) or a 503 (plain requests),
never with a connection closed mid-response. The HTTP server is told to exit only after that (app/server/cli_serve.py).
No web framework types here: the middleware is plain ASGI.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from app.server.auth import send_error
from app.server.route_policy import policy_of

log = logging.getLogger("olora.server")

IDLE_POLL_S = 0.05
CUT_GRACE_S = 5.0  # after the drain timeout: time for cut generations to send their last event
RETRY_AFTER_S = 5  # what a refused client is told: a load balancer has moved it elsewhere by then


class Drain:
    """The drain state of one app: requests in flight, the generations that can be cut, and the flags."""

    def __init__(self) -> None:
        self.draining = False
        self.expired = False  # the drain timeout passed: the generations still running were cut
        self.in_flight = 0  # HTTP requests being answered (one event loop: no lock needed)
        self._cuts: dict[int, Callable[[], None]] = {}
        self._next_cut = 0

    def register(self, cut: Callable[[], None]) -> int:
        """A running generation's cancel function, called if the drain times out; returns the key to unregister."""
        self._next_cut += 1
        self._cuts[self._next_cut] = cut
        return self._next_cut

    def unregister(self, key: int) -> None:
        self._cuts.pop(key, None)

    async def _idle(self) -> None:
        while self.in_flight:
            await asyncio.sleep(IDLE_POLL_S)

    async def run(self, timeout_s: float) -> bool:
        """Drain; True when every request ended by itself within `timeout_s`."""
        self.draining = True
        started = time.monotonic()
        log.info("draining: %d requests in flight, waiting up to %g s", self.in_flight, timeout_s)
        try:
            await asyncio.wait_for(self._idle(), timeout=timeout_s)
            log.info("drained in %.1f s", time.monotonic() - started)
            return True
        except asyncio.TimeoutError:
            pass
        self.expired = True
        log.warning("drain timeout of %g s passed: cutting %d running generations", timeout_s, len(self._cuts))
        for cut in list(self._cuts.values()):
            cut()
        try:
            await asyncio.wait_for(self._idle(), timeout=CUT_GRACE_S)
        except asyncio.TimeoutError:
            log.warning("%d requests still in flight after the cut", self.in_flight)
        return False


class DrainMiddleware:
    """Counts the requests in flight (what the drain waits for) and, while draining, answers the routes that
    start generations (their route policy says so) 503 + Retry-After before they start."""

    def __init__(self, app, drain: Drain):
        self.app = app
        self.drain = drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.drain.draining and policy_of(scope).generation:
            return await send_error(send, scope, 503, "the server is shutting down; retry on another replica",
                                    [(b"retry-after", str(RETRY_AFTER_S).encode())])
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1
