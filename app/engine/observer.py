"""The engine's hooks for metrics. The HTTP layer implements `EngineObserver` (e.g. Prometheus counters).

Callbacks run on engine threads (model loop, adapter loader): they must be quick and thread-safe, and must not
call back into the engine. Exceptions raised by an observer are swallowed and counted (`observer_errors`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class RequestStats:
    """Passed to `on_request_done` once per request, whatever the outcome."""

    request_id: str
    adapter_id: str | None
    finish_reason: str  # "length" | "eos_token" | "stop_sequence" | "cancelled" | "error"
    prompt_tokens: int
    generated_tokens: int
    queue_seconds: float  # submit -> admitted into the batch (or -> end if never admitted)
    time_to_first_token: float | None  # submit -> first token (None if no token)
    total_seconds: float  # submit -> finished
    error: str | None = None  # message of the typed error when finish_reason == "error"


@runtime_checkable
class EngineObserver(Protocol):
    def on_cache_event(self, tier: str, event: str, adapter_id: str) -> None:
        """tier: "device" | "host"; event: "hit" | "miss" | "eviction" | "load" | "load_error" | "invalidate"."""

    def on_adapter_load(self, tier: str, seconds: float) -> None:
        """A load finished: tier "host" = disk -> host memory (parse), "device" = host -> slot (copy)."""

    def on_step(self, running: int, waiting: int, prefill_tokens: int, decode_tokens: int) -> None:
        """One scheduler iteration ran (prefill_tokens counts the padded prompt tokens of newcomers)."""

    def on_request_done(self, stats: RequestStats) -> None:
        """A request finished (any reason, including errors)."""


class NullObserver:
    """Default observer: does nothing."""

    def on_cache_event(self, tier: str, event: str, adapter_id: str) -> None:
        return None

    def on_adapter_load(self, tier: str, seconds: float) -> None:
        return None

    def on_step(self, running: int, waiting: int, prefill_tokens: int, decode_tokens: int) -> None:
        return None

    def on_request_done(self, stats: RequestStats) -> None:
        return None


class SafeObserver:
    """Wraps a user observer so that its exceptions never break the engine loop."""

    def __init__(self, inner: EngineObserver | None):
        self.inner = inner if inner is not None else NullObserver()
        self.errors = 0

    def _call(self, name: str, *args) -> None:
        method = getattr(self.inner, name, None)  # an observer implements only the events it wants
        if method is None:
            return
        try:
            method(*args)
        except Exception:
            self.errors += 1

    def on_cache_event(self, tier: str, event: str, adapter_id: str) -> None:
        self._call("on_cache_event", tier, event, adapter_id)

    def on_adapter_load(self, tier: str, seconds: float) -> None:
        self._call("on_adapter_load", tier, seconds)

    def on_step(self, running: int, waiting: int, prefill_tokens: int, decode_tokens: int) -> None:
        self._call("on_step", running, waiting, prefill_tokens, decode_tokens)

    def on_request_done(self, stats: RequestStats) -> None:
        self._call("on_request_done", stats)
