"""Per-request merged adapters (LoRAX `parameters.merged_adapters`), served through app/adapters/served.py.

A merge request is turned into a plain LoRA once, written under `<store>/.ephemeral/<key>/`, and served like any
other adapter under the id `~merged-<key>` (a `~` never starts a stored id, so the namespaces cannot collide).
The key hashes the sources' ids *and versions*, weights and strategy: overwriting a source gives a new key.
At most `max_entries` merges are kept on disk (least recently used are removed). A new merge is checked by
`validate` (the engine's adapter check: finite scaled weights within the magnitude bound) before its id is handed
out, so a merge with weights like 1e20 is refused (422) instead of reaching the sampler. The number of sources
and the merged rank are bounded before any source is read (app/adapters/merge_plan.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from app.adapters.store.adapter_store import StoredAdapter

from olora_core.adapter_io import load_adapter_dir, save_adapter_dir
from olora_core.errors import OutputExistsError

from app.adapters.merge_plan import MergeLimits, plan_merge
from app.engine.errors import AdapterUnavailable
from app.adapters.store.adapter_store import AdapterMissing, AdapterStore

EPHEMERAL_PREFIX = "~merged-"


class EphemeralAdapters:
    def __init__(self, store: AdapterStore, max_entries: int = 32, limits: MergeLimits | None = None,
                 lookup: Callable[[str], StoredAdapter | None] | None = None,
                 held: Callable[[str], contextlib.AbstractContextManager[StoredAdapter]] | None = None):
        """`store`: where this process's merge folder lives (anything with `process_dir`/`clean_process_dirs`);
        `lookup`: how a source id is found (the adapter index: no store read; `store.get` when not given);
        `held`: the source's live version with its files held while a merge reads them (`store.held`)."""
        self.store = store
        self.lookup = lookup or store.get
        self.held = held or store.held
        # Merges do not outlive the process. Replicas share the store: each process keeps its own folder and
        # removes only what dead processes left (a shared `.ephemeral` wiped at start cut off the other replicas).
        # A read-only store keeps them in a private temporary folder instead.
        store.clean_process_dirs(".ephemeral")
        try:
            self.root = store.process_dir(".ephemeral")
        except OSError:
            self.root = Path(tempfile.mkdtemp(prefix="olora-merges-"))
        self.max_entries = max_entries
        self.limits = limits  # source count and rank bounds (set once the engine's max_rank is known)
        self._lru: OrderedDict[str, Path] = OrderedDict()
        self._lock = threading.Lock()
        self.validate: Callable[[Path], object] | None = None  # set to Engine.validate_adapter once it exists

    def close(self) -> None:
        """Remove this process's merges (at shutdown)."""
        shutil.rmtree(self.root, ignore_errors=True)

    def _live(self, adapter_id: str) -> StoredAdapter:
        stored = self.lookup(adapter_id)
        if stored is None:
            raise AdapterMissing(f"merged_adapters: adapter {adapter_id!r} not found")
        if stored.problem is not None:
            raise AdapterUnavailable(f"merged_adapters: adapter {adapter_id!r} is damaged in the store "
                                     f"({stored.problem})")
        return stored

    def _rank_of(self, adapter_id: str) -> int:
        return int(self._live(adapter_id).metadata.get("rank", 0))

    def adapter_id_for(self, ids: list[str], weights: list[float], strategy: str, density: float | None,
                       majority_sign_method: str) -> str:
        """Build (or reuse) the merged adapter and return the id to submit to the engine. The bounds
        (app/adapters/merge_plan.py) are checked on the sources' metadata before anything is loaded; a merge
        already built is found from the index alone; the sources of a new one are held while they are read."""
        from olora_core.merge import merge_adapters

        # LoRAX's `linear` is the weighted sum of the adapters' deltas: PEFT's exact form of it is `cat`.
        method = "cat" if strategy == "linear" else strategy
        plan = list(zip(ids, weights))
        if self.limits is not None:
            plan = plan_merge(plan, method, None, self.limits, self._rank_of)

        def key_of(sources: list[tuple[StoredAdapter, float]]) -> str:
            spec = json.dumps([[s.adapter_id, s.version, w] for s, w in sources] + [strategy, density,
                                                                                   majority_sign_method])
            return hashlib.sha256(spec.encode()).hexdigest()[:24]

        key = key_of([(self._live(adapter_id), w) for adapter_id, w in plan])
        with self._lock:
            if key in self._lru and self._lru[key].is_dir():
                self._lru.move_to_end(key)
                return EPHEMERAL_PREFIX + key
        with contextlib.ExitStack() as held:
            sources = []
            for adapter_id, w in plan:
                try:
                    stored = held.enter_context(self.held(adapter_id))
                except AdapterMissing:
                    raise AdapterMissing(f"merged_adapters: adapter {adapter_id!r} not found") from None
                if stored.problem is not None:
                    raise AdapterUnavailable(f"merged_adapters: adapter {adapter_id!r} is damaged in the store "
                                             f"({stored.problem})")
                sources.append((stored, w))
            key = key_of(sources)  # the versions actually read (one may have changed since the lookup)
            with self._lock:
                if key in self._lru and self._lru[key].is_dir():
                    self._lru.move_to_end(key)
                    return EPHEMERAL_PREFIX + key
                self._lru.pop(key, None)  # removed behind our back (another host's start-up clean): build it again
            self.root.mkdir(parents=True, exist_ok=True)
            config, tensors = merge_adapters([(load_adapter_dir(s.path), w) for s, w in sources], method,
                                             density=density, majority_sign_method=majority_sign_method, seed=0)
        try:
            save_adapter_dir(self.root / key, config, tensors)
        except OutputExistsError:
            pass  # another request built the same merge meanwhile
        if self.validate is not None:
            try:
                self.validate(self.root / key)
            except Exception:
                shutil.rmtree(self.root / key, ignore_errors=True)
                raise
        with self._lock:
            self._lru[key] = self.root / key
            self._lru.move_to_end(key)
            while len(self._lru) > self.max_entries:
                _, old = self._lru.popitem(last=False)
                shutil.rmtree(old, ignore_errors=True)
        return EPHEMERAL_PREFIX + key

    def path_for(self, adapter_id: str) -> Path | None:
        if not adapter_id.startswith(EPHEMERAL_PREFIX):
            return None
        with self._lock:
            return self._lru.get(adapter_id[len(EPHEMERAL_PREFIX):])
