"""What `Engine.submit` returns: a stream of `TokenEvent`s, usable from asyncio or blocking code.

The engine thread pushes events; an asyncio consumer is woken through `Wakeups` (one `loop.call_soon_threadsafe`
per event loop per engine step, not per token), a blocking one through a condition variable. Consume a handle one
way only (`async for`, `next_events()` or `result()`).

The handle owns the request's outcome (`finish_reason`, `error`, `done`, timings); the engine's `Sequence`
reads it. `TokenEvent` is the one token type from the engine to a response (the HTTP layer renders its pydantic
models from it), and `GenerationResult.add` the one accumulator of a generation's tokens.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    text: str  # new text this token completes ("" while a multi-byte character is incomplete, or for EOS)
    logprob: float | None  # log-probability under the distribution it was drawn from; None if not finite
    finish_reason: str | None = None  # set on the last token: "length" | "eos_token" | "stop_sequence"
    special: bool = False  # the tokenizer's special token (EOS, ...): TGI's `special`
    top_tokens: tuple[tuple[int, float], ...] = ()  # (id, logprob) of the most likely tokens, if asked
    prompt_logprobs: tuple[float, ...] | None = None  # first event only, if asked: prompt tokens 1..n-1


@dataclass
class GenerationResult:
    """The tokens and text of one generation, accumulated with `add` (by `RequestHandle.result()` and by the
    HTTP layer's streaming alike)."""

    request_id: str
    seed: int | None = None  # the seed a sampled request ran with (drawn by the engine if none was given)
    tokens: list[TokenEvent] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    prompt_logprobs: tuple[float, ...] | None = None  # prompt tokens 1..n-1, when asked
    time_to_first_token: float | None = None  # seconds from submit
    queue_seconds: float | None = None  # seconds from submit to admission into the batch (None: never admitted)
    total_seconds: float = 0.0

    def add(self, event: TokenEvent) -> None:
        self.tokens.append(event)
        self.text += event.text
        self.finish_reason = event.finish_reason
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs

    @property
    def token_ids(self) -> list[int]:
        return [t.token_id for t in self.tokens]

    @property
    def logprobs(self) -> list[float | None]:
        return [t.logprob for t in self.tokens]

    @property
    def logprob_sum(self) -> float:
        return sum(t.logprob or 0.0 for t in self.tokens)


class Wakeups:
    """The engine thread's wake-ups of asyncio consumers.

    Semantics: outside `batch()`, `wake(loop, event)` schedules `event.set()` on `loop` at once. Inside `batch()`,
    wake-ups asked for by the thread that opened it (the engine thread while it hands out one step's tokens) are
    collected, and scheduled when the batch ends with one `call_soon_threadsafe` per loop that sets them all: a
    step that gives B consumers on one loop a token costs one cross-thread hand-off (one self-pipe write, one loop
    wake-up) instead of B. Wake-ups asked for by other threads are never deferred."""

    def __init__(self) -> None:
        self._owner: int | None = None  # the thread holding the open batch (only it touches _pending)
        self._pending: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        self._owner = threading.get_ident()
        try:
            yield
        finally:
            self._owner = None
            pending, self._pending = self._pending, {}
            for loop, events in pending.items():
                _schedule_set(loop, events)

    def wake(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        if self._owner == threading.get_ident():
            self._pending.setdefault(loop, []).append(event)
        else:
            _schedule_set(loop, [event])


def _schedule_set(loop: asyncio.AbstractEventLoop, events: list[asyncio.Event]) -> None:
    try:
        loop.call_soon_threadsafe(_set_all, events)
    except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
        pass


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()


class RequestHandle:
    """Async iterator of TokenEvent. The stream ends after the last token; `finish_reason` then says why
    ("cancelled" ends it without a final token). Errors found after submit (e.g. the adapter failed to load)
    are raised by the iteration / `result()` as the engine's typed exceptions."""

    def __init__(self, request_id: str, cancel: Callable[[str], None], seed: int | None = None,
                 wakeups: Wakeups | None = None):
        self.request_id = request_id
        self.seed = seed  # the seed of a sampled request (given, or drawn by its RowSampler)
        self.submitted_at = time.perf_counter()
        self.finish_reason: str | None = None
        self.error: Exception | None = None
        self._cancel_cb = cancel
        self._events: deque[TokenEvent] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._wakeups = wakeups or Wakeups()  # the engine's: wake-ups of one step coalesced per loop
        self._first_token_at: float | None = None
        self._finished_at: float | None = None
        self.admitted_at: float | None = None  # set by the engine thread when the scheduler admits it

    def cancel(self) -> None:
        """Stop generating: the row, slot pin and KV row are freed at the engine's next step boundary."""
        self._cancel_cb(self.request_id)

    # ---- engine side -------------------------------------------------------------------------------------
    def admit(self) -> None:
        """Engine thread: the scheduler took the request off the waiting queue into the running batch."""
        self.admitted_at = time.perf_counter()

    def push(self, event: TokenEvent) -> None:
        """Engine thread: hand the consumer one token (ignored once the request is finished)."""
        self._update(event, None, None)

    def finish(self, reason: str, error: Exception | None = None) -> None:
        """Engine thread: end the stream; `reason` "error" comes with the typed `error` the consumer raises."""
        self._update(None, reason, error)

    def _update(self, event: TokenEvent | None, finish_reason: str | None, error: Exception | None) -> None:
        with self._cond:
            if self._closed:
                return
            now = time.perf_counter()
            if event is not None:
                self._events.append(event)
                if self._first_token_at is None:
                    self._first_token_at = now
            if finish_reason is not None:
                self.finish_reason = finish_reason
                self.error = error
                self._finished_at = now
                self._closed = True
            self._cond.notify_all()
            loop, wake = self._loop, self._wake
        if loop is not None:
            self._wakeups.wake(loop, wake)

    @property
    def time_to_first_token(self) -> float | None:
        return None if self._first_token_at is None else self._first_token_at - self.submitted_at

    @property
    def queue_seconds(self) -> float | None:
        """Time spent waiting for admission (submit -> admitted into the batch); None while (or if never) admitted."""
        return None if self.admitted_at is None else self.admitted_at - self.submitted_at

    @property
    def done(self) -> bool:
        return self._closed

    # ---- asyncio consumer --------------------------------------------------------------------------------
    def __aiter__(self) -> "RequestHandle":
        return self

    async def __anext__(self) -> TokenEvent:
        while True:
            with self._cond:
                if self._events:
                    return self._events.popleft()
                if self._closed:
                    if self.error is not None:
                        raise self.error
                    raise StopAsyncIteration
                self._arm()
            await self._wake.wait()

    async def next_events(self) -> list[TokenEvent]:
        """Every event pushed since the last call, in order; waits until there is at least one. [] once the stream
        has ended (its error, if any, is raised instead). One wake-up and one lock per engine step, not per token."""
        while True:
            with self._cond:
                if self._events:
                    events = list(self._events)
                    self._events.clear()
                    return events
                if self._closed:
                    if self.error is not None:
                        raise self.error
                    return []
                self._arm()
            await self._wake.wait()

    def _arm(self) -> None:
        """Under the lock, with nothing to read: make the next push wake this task's loop."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
        self._wake.clear()

    # ---- blocking consumer -------------------------------------------------------------------------------
    def result(self, timeout: float | None = None) -> GenerationResult:
        """Block until the request finishes; return all its tokens and text. Raises its error, if any."""
        out = GenerationResult(request_id=self.request_id, seed=self.seed)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                while self._events:
                    out.add(self._events.popleft())
                if self._closed:
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
                self._cond.wait(left)
        if self.error is not None:
            raise self.error
        out.finish_reason = self.finish_reason
        out.time_to_first_token = self.time_to_first_token
        out.queue_seconds = self.queue_seconds
        out.total_seconds = (self._finished_at or time.perf_counter()) - self.submitted_at
        return out
