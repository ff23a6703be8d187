"""Start-up progress: what the lifespan is doing while the port is already open.

Semantics: `olora serve` binds its port at once and builds the state in the background (app/server/main.py);
meanwhile `/health` answers 200 with `status: loading` (alive: the startup probe waits) and `/ready` 503 with the
phase and the seconds spent so far. A start that fails marks itself failed (`/health` 503 with the reason) and
calls the `on_failure` callbacks (the CLI's server exits with status 1). Phases, in order: `store` (sweep of the
adapter store), `model` (the engine: weights, slots, warm-up), `self_check` (checks of the built engine, where
any run),
`adapters` (demo adapters, registered-adapter count), then `ready`.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, Iterator

log = logging.getLogger("olora.server")

PHASES = ("store", "model", "self_check", "adapters", "ready")


class Startup:
    def __init__(self) -> None:
        self.phase = "store"
        self.started = time.monotonic()
        self.phase_started = self.started
        self.error: str | None = None
        self.on_failure: list[Callable[[], None]] = []

    @contextlib.contextmanager
    def enter(self, phase: str) -> Iterator[None]:
        """Run one phase (one of PHASES); its time is logged."""
        assert phase in PHASES, phase
        self.phase, self.phase_started = phase, time.monotonic()
        yield
        log.info("start-up phase %s done in %.1f s", phase, time.monotonic() - self.phase_started)

    def done(self) -> None:
        self.phase = "ready"
        log.info("start-up done in %.1f s", time.monotonic() - self.started)

    def fail(self, exc: BaseException) -> None:
        self.error = f"{type(exc).__name__}: {exc}"[:400]
        log.error("start-up failed in phase %s: %s", self.phase, self.error, exc_info=exc)
        for callback in self.on_failure:
            callback()

    @property
    def loading(self) -> bool:
        return self.phase != "ready" and self.error is None

    def progress(self) -> dict:
        """The body of /ready (and /health) while not ready."""
        now = time.monotonic()
        body = {"status": "failed" if self.error else "loading", "phase": self.phase,
                "phases": list(PHASES), "phase_index": PHASES.index(self.phase),
                "elapsed_s": round(now - self.started, 1), "phase_elapsed_s": round(now - self.phase_started, 1)}
        if self.error:
            body["error"] = self.error
        return body
