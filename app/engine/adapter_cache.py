"""Three adapter tiers: device slots (LRU among unpinned), host-memory LRU (parsed, scaled tensors), disk store.

* disk: every registered adapter, reached through the `AdapterSource` (`path_for(id)`).
* host: at most `max_cpu_adapters` parsed adapters (pinned memory on CUDA). Filled by a background loader thread,
  never on the model loop. An entry that a waiting request still needs is not evicted; when the tier is full of
  such entries the loader waits, so the bound is never exceeded.
* device: `max_loras` slots of the `LoRASlotBank`. A slot used by a running sequence is pinned (refcount) and never
  evicted; otherwise the least recently used slot is overwritten (one `copy_`).

State: one `_Entry` per adapter version (`AdapterKey(adapter_id, path, generation)`) holds all of it: its host
tier (queued / loading / ready with its tensors / failed with its error), how many waiting requests want it, its
device slot and pins, and when each tier last used it. An entry holding nothing is dropped. `snapshot()` gives a
typed, frozen view. The cache never calls into the engine: it parses with an `AdapterParser` object and sets the
engine's `wake` event when a load finished or failed; counting hits and misses is the observer's job.

Failed loads: an adapter whose files cannot be read now (missing, truncated: they passed the engine's check when
they were registered) fails as AdapterUnavailable (503), retried after a backoff or as soon as its files change
(`LoadRetry`); a rejection of the adapter itself (rank, targets, base) stays a 422 until the id is invalidated.

Versions: `invalidate(id)` bumps the generation: host copies go at once, unpinned slots are freed, pinned slots
stay for the running sequences that use them and are freed when released; later requests resolve the id again
(new version, or AdapterNotFound).
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Literal, NamedTuple, Sequence

import torch

from .adapter_files import AdapterParser, AdapterSource, ParsedAdapter
from .errors import AdapterFilesUnreadable, AdapterNotFound, EngineError
from .load_retry import LoadRetry, unavailable
from .lora_layers import LoRASlotBank
from .observer import EngineObserver


class AdapterKey(NamedTuple):
    adapter_id: str
    path: str
    generation: int


HostState = Literal["absent", "queued", "loading", "ready", "failed"]


@dataclass(eq=False)
class _Entry:
    """Everything the cache knows of one adapter version."""

    key: AdapterKey
    host: HostState = "absent"
    parsed: ParsedAdapter | None = None  # host tensors when host == "ready"
    error: EngineError | None = None  # the load error when host == "failed"
    retry: LoadRetry | None = None  # when a failed read may be tried again (AdapterUnavailable only)
    wanted: int = 0  # waiting requests that need it in host memory
    slot: int = 0  # device slot holding it; 0 = none (slot 0 is the permanent zeros of the base rows)
    pins: int = 0  # running sequences using its slot
    host_used: int = 0  # tick of the last host use (LRU) or of queueing (FIFO loads)
    slot_used: int = 0  # tick of the last unpin (slot LRU)

    @property
    def holds_nothing(self) -> bool:
        return self.host == "absent" and self.wanted == 0 and self.slot == 0


def _victim(unpinned: list[_Entry], needed: Sequence[Hashable]) -> _Entry:
    """The slot to overwrite: LRU among those nobody waiting needs, else the one needed last (Belady's rule on
    the queue's known future)."""
    order = {key: i for i, key in reversed(list(enumerate(needed)))}  # first position of each key
    spare = [e for e in unpinned if e.key not in order]
    if spare:
        return min(spare, key=lambda e: e.slot_used)
    return max(unpinned, key=lambda e: (order[e.key], -e.slot_used))


@dataclass(frozen=True)
class SlotView:
    adapter_id: str
    pins: int  # running sequences using the slot (0 = evictable)


@dataclass(frozen=True)
class CacheSnapshot:
    slots: tuple[SlotView | None, ...]  # per device slot 1..max_loras
    host_adapter_ids: tuple[str, ...]  # host-memory tier, least recently used first
    host_bytes: int
    pending_loads: int  # queued or loading disk -> host


class AdapterCache:
    def __init__(self, source: AdapterSource, bank: LoRASlotBank, max_cpu_adapters: int, parser: AdapterParser,
                 observer: EngineObserver, wake: threading.Event, pin_memory: bool = False):
        self.source = source
        self.bank = bank
        self.max_cpu_adapters = max_cpu_adapters
        self.parser = parser
        self._observer = observer
        self._wake = wake  # set when a load finished or failed: the engine loop waits on it
        self._pin_memory = pin_memory
        self._lock = threading.Condition()
        self._generation: dict[str, int] = {}  # adapter id -> current version number
        self._entries: dict[AdapterKey, _Entry] = {}
        self._ticks = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stop = False
        self._copy_stream = None  # CUDA side stream for slot loads (created on first use)
        self._copies_in_flight: list[tuple[object, ParsedAdapter]] = []  # (event, host tensors it reads)

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._stop = False
            self._thread = threading.Thread(target=self._loader_loop, name="olora-adapter-loader", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=30)

    # ---- entries (lock held) -----------------------------------------------------------------------------
    def _entry(self, key: AdapterKey) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(key)
        return entry

    def _prune(self, entry: _Entry) -> None:
        if entry.holds_nothing:
            self._entries.pop(entry.key, None)

    def _is_current(self, key: AdapterKey) -> bool:
        return self._generation.get(key.adapter_id, 0) == key.generation

    def _in_host(self) -> list[_Entry]:
        return [e for e in self._entries.values() if e.host == "ready"]

    def _touch_host(self, entry: _Entry) -> None:
        entry.host_used = next(self._ticks)

    # ---- resolving and wanting (any thread) --------------------------------------------------------------
    def resolve(self, adapter_id: str) -> AdapterKey:
        """The current version of `adapter_id`; raises AdapterNotFound, or the cached load error of this version."""
        path = self.source.path_for(adapter_id)
        if path is None:
            raise AdapterNotFound(f"adapter {adapter_id!r} not found")
        with self._lock:
            key = AdapterKey(adapter_id, str(path), self._generation.get(adapter_id, 0))
            entry = self._entries.get(key)
            if entry is not None and entry.host == "failed":
                if entry.retry is None or not entry.retry.ready(key.path):
                    raise entry.error
                entry.host, entry.error = "absent", None  # due for another read: the next want() queues it
        return key

    def load_error(self, adapter_id: str) -> EngineError | None:
        """The error of the last load of the current version of `adapter_id`, while it stands (for GET)."""
        with self._lock:
            generation = self._generation.get(adapter_id, 0)
            return next((e.error for e in self._entries.values() if e.key.adapter_id == adapter_id
                         and e.key.generation == generation and e.host == "failed"), None)

    def loading_paths(self) -> set[str]:  # version folders queued or being read (their files must stay till read)
        with self._lock:
            return {e.key.path for e in self._entries.values() if e.host in ("queued", "loading")}

    def is_current(self, key: AdapterKey) -> bool:
        with self._lock:
            return self._is_current(key)

    def want(self, key: AdapterKey) -> None:
        """A waiting request needs `key` in host memory: keep it there, or queue its load."""
        with self._lock:
            entry = self._entry(key)
            entry.wanted += 1
            if entry.host == "ready":
                self._touch_host(entry)
            elif entry.host == "absent":
                entry.host = "queued"
                self._touch_host(entry)
                self._lock.notify_all()

    def unwant(self, key: AdapterKey) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.wanted = max(0, entry.wanted - 1)
                self._prune(entry)
            self._lock.notify_all()

    def status(self, key: AdapterKey) -> str | EngineError:
        """"host" (ready for a slot), "device" (already in a slot), "loading", or the load error."""
        where = self.residency(key)
        return "device" if where in ("pinned", "slot") else where

    def residency(self, key: AdapterKey) -> str | EngineError:
        """Where `key` is, as the admission policy sees it: "pinned" (in a slot running rows use), "slot" (in a
        slot nobody uses), "host" (host memory only), "loading", or the load error."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return "loading"
            if entry.host == "failed":
                return entry.error
            if entry.slot:
                return "pinned" if entry.pins else "slot"
            return "host" if entry.host == "ready" else "loading"

    def free_slots(self) -> int:
        """Slots an adapter could take now: empty, or holding an adapter no running row uses."""
        with self._lock:
            pinned = sum(1 for e in self._entries.values() if e.slot and e.pins)
            return self.bank.n_slots - pinned

    def invalidate(self, adapter_id: str, current_path: str | None = None) -> None:
        """Drop what is cached of `adapter_id`; later requests resolve it again. With `current_path` (the store's
        current version, as a store watcher sees it) nothing happens when every key this cache holds or waits
        for is already that version: e.g. an adapter this process has just uploaded and loaded."""
        with self._lock:
            mine = [e for e in self._entries.values() if e.key.adapter_id == adapter_id]
            if current_path is not None and all(e.key.path == current_path for e in mine):
                return
            self._generation[adapter_id] = self._generation.get(adapter_id, 0) + 1
            for entry in mine:
                if entry.host in ("ready", "failed"):  # a queued/loading one is dropped by the loader
                    entry.host, entry.parsed, entry.error, entry.retry = "absent", None, None, None
                if entry.slot and entry.pins == 0:
                    entry.slot = 0
                self._prune(entry)
        self._observer.on_cache_event("host", "invalidate", adapter_id)

    # ---- device slots (engine thread only) ---------------------------------------------------------------
    def acquire_slot(self, key: AdapterKey, needed: Sequence[Hashable] = ()) -> int | None:
        """Pin a slot holding `key`, copying it from host memory if needed; None if it must wait. A slot to
        overwrite is an empty one, else the least recently used of the unpinned slots whose adapter is not in
        `needed` (the waiting queue's adapters, first needed first), else the unpinned one needed last."""
        evicted = None
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.slot:
                entry.pins += 1
                slot, hit = entry.slot, True
            elif entry is None or entry.host != "ready":
                return None
            else:
                hit = False
                used = {e.slot for e in self._entries.values() if e.slot}
                slot = next((s for s in range(1, self.bank.n_slots + 1) if s not in used), None)
                if slot is None:
                    unpinned = [e for e in self._entries.values() if e.slot and e.pins == 0]
                    if not unpinned:
                        return None  # every slot is pinned: wait for a running sequence to finish
                    victim = _victim(unpinned, needed)
                    slot, victim.slot = victim.slot, 0
                    evicted = victim.key.adapter_id
                    self._prune(victim)
                entry.slot, entry.pins = slot, 1  # reserved: only this thread fills slots
                self._touch_host(entry)
                parsed = entry.parsed
        if hit:
            self._observer.on_cache_event("device", "hit", key.adapter_id)
            return slot
        if evicted is not None:
            self._observer.on_cache_event("device", "eviction", evicted)
        self._observer.on_cache_event("device", "miss", key.adapter_id)
        self._observer.on_cache_event("host", "hit", key.adapter_id)
        start = time.perf_counter()
        if self.bank.device.type == "cuda":
            self._load_on_side_stream(slot, parsed)
        else:
            self.bank.load(slot, parsed)
        self._record_load("device", time.perf_counter() - start, key.adapter_id)
        return slot

    def _load_on_side_stream(self, slot: int, parsed: ParsedAdapter) -> None:
        """CUDA: copy into the slot on a side stream; the compute stream waits on an event (no device-wide
        synchronize, the host does not block). The copy starts after the compute work already queued (which may
        still read the slot's old adapter), and the pinned host tensors are kept until the copy is done."""
        device = self.bank.device
        compute = torch.cuda.current_stream(device)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device)
        self._copy_stream.wait_stream(compute)
        with torch.cuda.stream(self._copy_stream):
            self.bank.load(slot, parsed)
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        compute.wait_event(done)
        self._copies_in_flight = [(e, p) for e, p in self._copies_in_flight if not e.query()] + [(done, parsed)]

    def release_slot(self, slot: int) -> None:
        if slot == 0:
            return
        with self._lock:
            entry = next(e for e in self._entries.values() if e.slot == slot)
            entry.pins -= 1
            if entry.pins == 0:
                if self._is_current(entry.key):
                    entry.slot_used = next(self._ticks)
                else:
                    entry.slot = 0
                    self._prune(entry)
            self._lock.notify_all()

    # ---- loader thread -----------------------------------------------------------------------------------
    def _evictable(self) -> _Entry | None:  # lock held; least recently used host entry nobody waits for
        idle = [e for e in self._in_host() if e.wanted == 0]
        return min(idle, key=lambda e: e.host_used) if idle else None

    def _loader_loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and (entry := self._next_loadable()) is None:
                    self._lock.wait(timeout=1.0)
                if self._stop:
                    return
                entry.host = "loading"
            self._load(entry)

    def _next_loadable(self) -> _Entry | None:  # lock held: drop stale/unwanted loads, check host capacity
        while queued := [e for e in self._entries.values() if e.host == "queued"]:
            entry = min(queued, key=lambda e: e.host_used)  # FIFO: queued longest ago
            if not self._is_current(entry.key) or entry.wanted == 0:
                entry.host = "absent"
                self._prune(entry)
                continue
            room = len(self._in_host()) < self.max_cpu_adapters or self._evictable() is not None
            return entry if room else None
        return None

    def _load(self, entry: _Entry) -> None:
        key = entry.key
        self._observer.on_cache_event("host", "miss", key.adapter_id)
        start = time.perf_counter()
        error: EngineError | None = None
        parsed = None
        retry = None
        try:
            parsed = self.parser.parse(Path(key.path))
            if self._pin_memory:
                parsed.modules = {n: (a.pin_memory(), b.pin_memory()) for n, (a, b) in parsed.modules.items()}
        except AdapterFilesUnreadable as exc:  # registered files that cannot be read now: the server's fault
            error, retry = unavailable(key.adapter_id, key.path, exc, entry.retry)
        except EngineError as exc:  # the adapter itself is refused (rank, targets, base): the client's 422
            error = exc
        except Exception as exc:  # an unreadable directory, a vanished file...
            error, retry = unavailable(key.adapter_id, key.path, type(exc).__name__, entry.retry)
        seconds = time.perf_counter() - start
        evicted = []
        with self._lock:
            entry.host = "absent"
            if not self._is_current(key):
                pass  # invalidated while loading: drop; waiting requests resolve the id again
            elif error is not None:
                entry.host, entry.error, entry.retry = "failed", error, retry
            else:
                while len(self._in_host()) >= self.max_cpu_adapters:
                    victim = self._evictable()
                    if victim is None:
                        break
                    victim.host, victim.parsed = "absent", None
                    evicted.append(victim.key.adapter_id)
                    self._prune(victim)
                entry.host, entry.parsed, entry.retry = "ready", parsed, None
                self._touch_host(entry)
            self._prune(entry)
            self._lock.notify_all()
        for adapter_id in evicted:
            self._observer.on_cache_event("host", "eviction", adapter_id)
        if error is not None:
            self._observer.on_cache_event("host", "load_error", key.adapter_id)
        else:
            self._record_load("host", seconds, key.adapter_id)
        self._wake.set()

    def _record_load(self, tier: str, seconds: float, adapter_id: str) -> None:
        self._observer.on_cache_event(tier, "load", adapter_id)
        self._observer.on_adapter_load(tier, seconds)

    # ---- introspection -----------------------------------------------------------------------------------
    def snapshot(self) -> CacheSnapshot:
        with self._lock:
            by_slot = {e.slot: e for e in self._entries.values() if e.slot}
            host = sorted(self._in_host(), key=lambda e: e.host_used)
            return CacheSnapshot(
                slots=tuple(SlotView(by_slot[s].key.adapter_id, by_slot[s].pins) if s in by_slot else None
                            for s in range(1, self.bank.n_slots + 1)),
                host_adapter_ids=tuple(e.key.adapter_id for e in host),
                host_bytes=sum(e.parsed.nbytes for e in host),
                pending_loads=sum(e.host in ("queued", "loading") for e in self._entries.values()))
