"""Continuous batching: the bounded waiting queue, admission into batch rows, and row compaction.

Running sequences occupy KV rows 0..B-1 in `running` order (running[i].row == i). Each scheduler iteration:
remove finished/cancelled rows (the last row moves into each hole), then admit waiting requests. What to admit is
decided by the pure policy of admission.py from a `QueueView` (rows, slots, prefill budget, each candidate's adapter
residency); this module gathers the view (resolving invalidated adapters, reading the cache's states) and carries
the plan out (pins slots, copying adapters into them). The queue itself is waiting_queue.py: a request of many
sequences enters whole or not at all, and a cancelled sequence leaves it at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .adapter_cache import AdapterCache, AdapterKey
from .admission import Candidate, QueueView, plan_admission
from .config import EngineConfig
from .errors import AdapterNotFound, EngineError
from .handle import RequestHandle
from .kv_cache import RowKVCache
from .sampling import RowSampler, SamplingParams
from .text import IncrementalDetokenizer
from .waiting_queue import WaitingQueue


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
    cancelled: bool = False
    prompt_logprobs: tuple[float, ...] | None = None  # set by the prefill when params.prompt_logprobs
    dequeued: bool = False  # admit() took it off the waiting queue (admitted or dropped); engine thread only
    bypassed: int = 0  # admission rounds that admitted a later arrival while this one was ready (admission.py)

    @property
    def admitted_at(self) -> float | None:
        return self.handle.admitted_at

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
        self.queue: WaitingQueue[Sequence] = WaitingQueue(config.max_waiting)

    # ---- any thread --------------------------------------------------------------------------------------
    def enqueue(self, seqs: list[Sequence]) -> None:
        """Queue the sequences of one request, all or none (QueueFull)."""
        self.queue.put_all(seqs)
        for seq in seqs:
            if seq.key is not None:
                self.cache.want(seq.key)

    def withdraw(self, seq: Sequence) -> None:
        """A cancelled sequence leaves the waiting queue now (it no longer counts against max_waiting); the next
        admit() hands it back as dropped so the engine thread finishes it."""
        self.queue.withdraw(seq)

    def waiting_snapshot(self) -> list[Sequence]:
        return self.queue.snapshot_all()

    @property
    def n_waiting(self) -> int:
        return len(self.queue)

    # ---- engine thread -----------------------------------------------------------------------------------
    def admit(self) -> tuple[list[Sequence], list[Dropped]]:
        """Pick newcomers for this iteration. Returns (admitted, dropped); dropped sequences were cancelled
        (error None) or failed while waiting (with their error) and must be finished by the caller."""
        # a sequence withdrawn after a previous admit() took it (admitted: the step ends it; dropped) is done here
        dropped: list[Dropped] = [(seq, None) for seq in self.queue.drain_withdrawn() if not seq.dequeued]
        candidates: list[Sequence] = []
        views: list[Candidate] = []
        for seq in self.queue.snapshot():
            if seq.cancelled:
                dropped.append((seq, None))
                continue
            error = self._refresh_key(seq) if seq.key is not None else None
            residency = "pinned"
            if error is None and seq.key is not None:
                status = self.cache.residency(seq.key)
                error = status if isinstance(status, EngineError) else None
                residency = status if error is None else residency
            if error is not None:
                dropped.append((seq, error))
                continue
            candidates.append(seq)
            views.append(Candidate(len(seq.prompt_ids), seq.key, residency, seq.bypassed))
        admitted: list[Sequence] = []
        free_rows = self.config.max_batch_size - len(self.running)
        if candidates and free_rows > 0:
            plan = plan_admission(QueueView(tuple(views), free_rows, self.cache.free_slots(),
                                            self.config.max_batch_tokens))
            for i in plan.bypassed:
                candidates[i].bypassed += 1
            for i in plan.admit:
                seq = candidates[i]
                slot = 0 if seq.key is None else self.cache.acquire_slot(seq.key, plan.needed)
                if slot is None:
                    continue  # evicted from host memory since the view was taken: stays queued
                seq.slot = slot
                seq.handle.admit()
                admitted.append(seq)
        gone = admitted + [seq for seq, _ in dropped]
        self.queue.remove(gone)
        for seq in gone:
            seq.dequeued = True
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
