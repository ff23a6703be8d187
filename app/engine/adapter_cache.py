"""Three adapter tiers: device slots (LRU among unpinned), host-memory LRU (parsed, scaled tensors), disk store.

* disk: every registered adapter, reached through the `AdapterSource` (`path_for(id)`).
* host: at most `max_cpu_adapters` parsed adapters (pinned memory on CUDA). Filled by a background loader thread,
  never on the model loop. An entry that a waiting request still needs is not evicted; when the tier is full of
  such entries the loader waits, so the bound is never exceeded.
* device: `max_loras` slots of the `LoRASlotBank`. A slot used by a running sequence is pinned (refcount) and never
  evicted; otherwise the least recently used slot is overwritten (one `copy_`).

Versions: an adapter is known by `AdapterKey(adapter_id, path, generation)`. `invalidate(id)` bumps the generation:
host copies go at once, unpinned slots are freed, pinned slots stay for the running sequences that use them and
are freed when released; later requests resolve the id again (new version, or AdapterNotFound).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from .adapter_files import AdapterSource, ParsedAdapter
from .errors import AdapterNotFound, EngineError
from .lora_layers import LoRASlotBank
from .observer import EngineObserver


class AdapterKey(NamedTuple):
    adapter_id: str
    path: str
    generation: int


@dataclass
class _HostEntry:
    parsed: ParsedAdapter
    nbytes: int


@dataclass
class _SlotEntry:
    key: AdapterKey
    refcount: int = 0


@dataclass
class TierCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    loads: int = 0
    load_seconds: list[float] = field(default_factory=list)  # last 1,000 loads


class AdapterCache:
    def __init__(self, source: AdapterSource, bank: LoRASlotBank, max_cpu_adapters: int,
                 parse: Callable[[Path], ParsedAdapter], observer: EngineObserver, pin_memory: bool = False,
                 on_change: Callable[[], None] = lambda: None):
        self.source = source
        self.bank = bank
        self.max_cpu_adapters = max_cpu_adapters
        self._parse = parse
        self._observer = observer
        self._pin_memory = pin_memory
        self._on_change = on_change  # wakes the engine loop (a load finished or failed)
        self._lock = threading.Condition()
        self._generation: dict[str, int] = {}
        self._host: OrderedDict[AdapterKey, _HostEntry] = OrderedDict()  # LRU: oldest first
        self._wanted: dict[AdapterKey, int] = {}  # key -> number of waiting requests needing it
        self._failed: dict[AdapterKey, EngineError] = {}
        self._pending: deque[AdapterKey] = deque()
        self._loading: AdapterKey | None = None
        self._slots: list[_SlotEntry | None] = [None] * (bank.n_slots + 1)  # index 0 unused (permanent zeros)
        self._slot_lru: OrderedDict[int, None] = OrderedDict()  # unpinned occupied slots, oldest first
        self.counters = {"device": TierCounters(), "host": TierCounters()}
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

    # ---- resolving and wanting (any thread) --------------------------------------------------------------
    def resolve(self, adapter_id: str) -> AdapterKey:
        """The current version of `adapter_id`; raises AdapterNotFound, or the cached load error of this version."""
        path = self.source.path_for(adapter_id)
        if path is None:
            raise AdapterNotFound(f"adapter {adapter_id!r} not found")
        with self._lock:
            key = AdapterKey(adapter_id, str(path), self._generation.get(adapter_id, 0))
            if key in self._failed:
                raise self._failed[key]
        return key

    def is_current(self, key: AdapterKey) -> bool:
        with self._lock:
            return self._generation.get(key.adapter_id, 0) == key.generation

    def want(self, key: AdapterKey) -> None:
        """A waiting request needs `key` in host memory: keep it there, or queue its load."""
        with self._lock:
            self._wanted[key] = self._wanted.get(key, 0) + 1
            if key in self._host:
                self._host.move_to_end(key)
            elif key != self._loading and key not in self._pending:
                self._pending.append(key)
                self._lock.notify_all()

    def unwant(self, key: AdapterKey) -> None:
        with self._lock:
            left = self._wanted.get(key, 0) - 1
            if left > 0:
                self._wanted[key] = left
            else:
                self._wanted.pop(key, None)
            self._lock.notify_all()

    def status(self, key: AdapterKey) -> str | EngineError:
        """"host" (ready for a slot), "device" (already in a slot), "loading", or the load error."""
        with self._lock:
            if key in self._failed:
                return self._failed[key]
            if any(e is not None and e.key == key for e in self._slots):
                return "device"
            return "host" if key in self._host else "loading"

    def invalidate(self, adapter_id: str, current_path: str | None = None) -> None:
        """Drop what is cached of `adapter_id`; later requests resolve it again. With `current_path` (the store's
        current version, as a store watcher sees it) nothing happens when every key this cache holds or waits
        for is already that version: e.g. an adapter this process has just uploaded and loaded."""
        with self._lock:
            if current_path is not None:
                held = [*self._host, *self._wanted, *self._pending, *self._failed,
                        *(e.key for e in self._slots if e is not None), *([self._loading] if self._loading else [])]
                if all(k.path == current_path for k in held if k.adapter_id == adapter_id):
                    return
            self._generation[adapter_id] = self._generation.get(adapter_id, 0) + 1
            for key in [k for k in self._host if k.adapter_id == adapter_id]:
                del self._host[key]
            for key in [k for k in self._failed if k.adapter_id == adapter_id]:
                del self._failed[key]
            for slot, entry in enumerate(self._slots):
                if entry is not None and entry.key.adapter_id == adapter_id and entry.refcount == 0:
                    self._free_slot(slot)
        self._observer.on_cache_event("host", "invalidate", adapter_id)

    # ---- device slots (engine thread only) ---------------------------------------------------------------
    def acquire_slot(self, key: AdapterKey) -> int | None:
        """Pin a slot holding `key`, copying it from host memory if needed; None if it must wait."""
        with self._lock:
            for slot, entry in enumerate(self._slots):
                if entry is not None and entry.key == key:
                    entry.refcount += 1
                    self._slot_lru.pop(slot, None)
                    self.counters["device"].hits += 1
                    event = "hit"
                    break
            else:
                host = self._host.get(key)
                if host is None:
                    return None
                slot = next((s for s in range(1, len(self._slots)) if self._slots[s] is None), None)
                evicted = None
                if slot is None:
                    if not self._slot_lru:
                        return None  # every slot is pinned: wait for a running sequence to finish
                    slot, _ = self._slot_lru.popitem(last=False)
                    evicted = self._slots[slot].key.adapter_id
                    self.counters["device"].evictions += 1
                self._slots[slot] = _SlotEntry(key, refcount=1)  # reserved: only this thread fills slots
                self._host.move_to_end(key)
                self.counters["device"].misses += 1
                self.counters["host"].hits += 1
                parsed, event = host.parsed, "miss"
        if event == "hit":
            self._observer.on_cache_event("device", "hit", key.adapter_id)
            return slot
        if evicted is not None:
            self._observer.on_cache_event("device", "eviction", evicted)
        self._observer.on_cache_event("device", "miss", key.adapter_id)
        self._observer.on_cache_event("host", "hit", key.adapter_id)
        start = time.perf_counter()
        if self.bank.meta.device.type == "cuda":
            self._load_on_side_stream(slot, parsed)
        else:
            self.bank.load(slot, parsed)
        self._record_load("device", key.adapter_id, time.perf_counter() - start)
        return slot

    def _load_on_side_stream(self, slot: int, parsed: ParsedAdapter) -> None:
        """CUDA: copy into the slot on a side stream; the compute stream waits on an event (no device-wide
        synchronize, the host does not block). The copy starts after the compute work already queued (which may
        still read the slot's old adapter), and the pinned host tensors are kept until the copy is done."""
        device = self.bank.meta.device
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
            entry = self._slots[slot]
            entry.refcount -= 1
            if entry.refcount == 0:
                if self._generation.get(entry.key.adapter_id, 0) != entry.key.generation:
                    self._free_slot(slot)
                else:
                    self._slot_lru[slot] = None
            self._lock.notify_all()

    def _free_slot(self, slot: int) -> None:  # lock held
        self._slots[slot] = None
        self._slot_lru.pop(slot, None)

    # ---- loader thread -----------------------------------------------------------------------------------
    def _evictable(self) -> AdapterKey | None:  # lock held; least recently used entry nobody waits for
        return next((k for k in self._host if self._wanted.get(k, 0) == 0), None)

    def _loader_loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._next_loadable():
                    self._lock.wait(timeout=1.0)
                if self._stop:
                    return
                key = self._pending.popleft()
                self._loading = key
            self._load(key)

    def _next_loadable(self) -> bool:  # lock held: drop stale/unwanted keys, check host capacity
        while self._pending:
            key = self._pending[0]
            if (self._generation.get(key.adapter_id, 0) != key.generation or key in self._host
                    or self._wanted.get(key, 0) == 0):
                self._pending.popleft()
                continue
            return len(self._host) < self.max_cpu_adapters or self._evictable() is not None
        return False

    def _load(self, key: AdapterKey) -> None:
        self.counters["host"].misses += 1
        self._observer.on_cache_event("host", "miss", key.adapter_id)
        start = time.perf_counter()
        error: EngineError | None = None
        parsed = None
        try:
            parsed = self._parse(Path(key.path))
            if self._pin_memory:
                parsed.modules = {n: (a.pin_memory(), b.pin_memory()) for n, (a, b) in parsed.modules.items()}
        except EngineError as exc:
            error = exc
        except Exception as exc:  # an unreadable directory, a vanished file...
            error = AdapterNotFound(f"adapter {key.adapter_id!r} could not be read ({type(exc).__name__}: {exc})")
        seconds = time.perf_counter() - start
        evicted = []
        with self._lock:
            self._loading = None
            if self._generation.get(key.adapter_id, 0) != key.generation:
                pass  # invalidated while loading: drop; waiting requests resolve the id again
            elif error is not None:
                self._failed[key] = error
            else:
                while len(self._host) >= self.max_cpu_adapters:
                    victim = self._evictable()
                    if victim is None:
                        break
                    del self._host[victim]
                    evicted.append(victim.adapter_id)
                    self.counters["host"].evictions += 1
                self._host[key] = _HostEntry(parsed, parsed.nbytes)
            self._lock.notify_all()
        for adapter_id in evicted:
            self._observer.on_cache_event("host", "eviction", adapter_id)
        if error is not None:
            self._observer.on_cache_event("host", "load_error", key.adapter_id)
        else:
            self._record_load("host", key.adapter_id, seconds)
        self._on_change()

    def _record_load(self, tier: str, adapter_id: str, seconds: float) -> None:
        counters = self.counters[tier]
        counters.loads += 1
        counters.load_seconds.append(seconds)
        del counters.load_seconds[:-1000]
        self._observer.on_cache_event(tier, "load", adapter_id)
        self._observer.on_adapter_load(tier, seconds)

    # ---- introspection -----------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        with self._lock:
            return {
                "slots": [None if e is None else (e.key.adapter_id, e.refcount) for e in self._slots[1:]],
                "host_adapters": [k.adapter_id for k in self._host],
                "host_bytes": sum(e.nbytes for e in self._host.values()),
                "pending_loads": len(self._pending) + (self._loading is not None),
            }
