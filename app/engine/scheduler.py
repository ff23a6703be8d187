"""Continuous batching policy: the bounded waiting queue, admission into batch rows, and row compaction.

Running sequences occupy KV rows 0..B-1 in `running` order (running[i].row == i). Each scheduler iteration:
remove finished/cancelled rows (the last row moves into each hole), then admit waiting requests FIFO while
there are free rows and prefill-token budget. A request is admitted only when its adapter is in host memory and a
device slot can be pinned for it; otherwise it is skipped (it stays queued, its load runs on the loader thread)
and later requests may go first.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from .adapter_cache import AdapterCache, AdapterKey
from .config import EngineConfig
from .errors import AdapterNotFound, EngineError, QueueFull
from .handle import RequestHandle
from .kv_cache import RowKVCache
from .sampling import RowSampler, SamplingParams
from .text import IncrementalDetokenizer


@dataclass(eq=False)
class Sequence:
    """One request's state, owned by the engine thread once submitted (only `cancelled` is set elsewhere).
    Its outcome (finish reason, error, done, submit time) is the handle's: read through `handle`."""

    request_id: str
    prompt_ids: list[int]
    adapter_id: str | None
    key: AdapterKey | None  # None = base model (slot 0)
    params: SamplingParams
    sampler: RowSampler
    detok: IncrementalDetokenizer
    handle: RequestHandle
    generated: list[int] = field(default_factory=list)
    slot: int = 0
    admitted_at: float | None = None
    cancelled: bool = False
    prompt_logprobs: tuple[float, ...] | None = None  # set by the prefill when params.prompt_logprobs

    @property
    def cached_tokens(self) -> int:
        """Positions held in the KV row: the prompt and every generated token but the last (fed next step)."""
        return len(self.prompt_ids) + len(self.generated) - 1

    @property
    def done(self) -> bool:
        return self.handle.done


Dropped = tuple[Sequence, EngineError | None]  # a request that leaves the queue unrun: cancelled (None) or failed


class Scheduler:
    def __init__(self, config: EngineConfig, cache: AdapterCache, kv: RowKVCache):
        self.config = config  # max_batch_size, max_batch_tokens, max_waiting
        self.cache = cache
        self.kv = kv
        self.running: list[Sequence] = []  # engine thread only; index == KV row
        self._waiting: deque[Sequence] = deque()
        self._lock = threading.Lock()

    # ---- any thread --------------------------------------------------------------------------------------
    def enqueue(self, seq: Sequence) -> None:
        with self._lock:
            if len(self._waiting) >= self.config.max_waiting:
                raise QueueFull(f"waiting queue is full ({self.config.max_waiting} requests)")
            self._waiting.append(seq)
        if seq.key is not None:
            self.cache.want(seq.key)

    def waiting_snapshot(self) -> list[Sequence]:
        with self._lock:
            return list(self._waiting)

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    # ---- engine thread -----------------------------------------------------------------------------------
    def admit(self) -> tuple[list[Sequence], list[Dropped]]:
        """Pick newcomers for this iteration. Returns (admitted, dropped); dropped sequences were cancelled
        (error None) or failed while waiting (with their error) and must be finished by the caller."""
        admitted: list[Sequence] = []
        dropped: list[Dropped] = []
        free_rows = self.config.max_batch_size - len(self.running)
        longest = 0
        with self._lock:
            candidates = list(self._waiting)
        for seq in candidates:
            if seq.cancelled:
                dropped.append((seq, None))
                continue
            if free_rows <= len(admitted):
                continue
            error = self._refresh_key(seq) if seq.key is not None else None
            if error is not None:
                dropped.append((seq, error))
                continue
            longest_after = max(longest, len(seq.prompt_ids))
            if admitted and (len(admitted) + 1) * longest_after > self.config.max_batch_tokens:
                break  # padded prefill budget used up; FIFO order resumes next iteration
            slot = 0
            if seq.key is not None:
                status = self.cache.status(seq.key)
                if isinstance(status, EngineError):
                    dropped.append((seq, status))
                    continue
                if status == "loading":
                    continue
                slot = self.cache.acquire_slot(seq.key)
                if slot is None:
                    continue  # all slots pinned (or evicted from host meanwhile): stays queued
            seq.slot = slot
            seq.admitted_at = time.perf_counter()
            longest = longest_after
            admitted.append(seq)
        gone = admitted + [seq for seq, _ in dropped]
        if gone:
            with self._lock:
                ids = {id(s) for s in gone}
                self._waiting = deque(s for s in self._waiting if id(s) not in ids)
            for seq in gone:
                if seq.key is not None:
                    self.cache.unwant(seq.key)
        return admitted, dropped

    def _refresh_key(self, seq: Sequence) -> EngineError | None:
        """The adapter was invalidated while this request waited: move it to the current version. Returns the
        error that ends the request if there is none (admit() then unwants the key it wanted)."""
        if self.cache.is_current(seq.key):
            return None
        old = seq.key
        try:
            seq.key = self.cache.resolve(seq.adapter_id)
        except AdapterNotFound:
            return AdapterNotFound(f"adapter {seq.adapter_id!r} was deleted while the request waited")
        except EngineError as exc:
            return exc
        self.cache.want(seq.key)
        self.cache.unwant(old)
        return None

    def start_running(self, newcomers: list[Sequence]) -> None:
        self.running.extend(newcomers)

    def compact(self) -> None:
        """Remove finished rows, moving the last running row into each hole."""
        i = 0
        while i < len(self.running):
            if not self.running[i].done:
                i += 1
                continue
            finished = self.running[i]
            last = self.running.pop()
            if last is not finished:
                # `last` (row len(running)) moves into row i; its KV row is copied up to its cached length.
                self.kv.move_row(len(self.running), i, last.cached_tokens)
                self.running[i] = last
