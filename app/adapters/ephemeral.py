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

from olora_core.adapter_io import load_adapter_dir, save_adapter_dir
from olora_core.errors import OutputExistsError

from app.adapters.merge_plan import MergeLimits, plan_merge
from app.engine.errors import AdapterUnavailable
from app.adapters.store.adapter_store import AdapterMissing, AdapterStore

EPHEMERAL_PREFIX = "~merged-"


class EphemeralAdapters:
    def __init__(self, store: AdapterStore, max_entries: int = 32, limits: MergeLimits | None = None):
        self.store = store
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

    def _rank_of(self, adapter_id: str) -> int:
        stored = self.store.get(adapter_id)
        if stored is None:
            raise AdapterMissing(f"merged_adapters: adapter {adapter_id!r} not found")
        return int(stored.metadata.get("rank", 0))

    def adapter_id_for(self, ids: list[str], weights: list[float], strategy: str, density: float | None,
                       majority_sign_method: str) -> str:
        """Build (or reuse) the merged adapter and return the id to submit to the engine. The bounds
        (app/adapters/merge_plan.py) are checked on the store's metadata before anything is loaded; the sources
        are held while they are read."""
        from olora_core.merge import merge_adapters

        # LoRAX's `linear` is the weighted sum of the adapters' deltas: PEFT's exact form of it is `cat`.
        method = "cat" if strategy == "linear" else strategy
        plan = list(zip(ids, weights))
        if self.limits is not None:
            plan = plan_merge(plan, method, None, self.limits, self._rank_of)
        with contextlib.ExitStack() as held:
            sources = [(held.enter_context(self.store.held(adapter_id)), w) for adapter_id, w in plan]
            for stored, _ in sources:
                if stored.problem is not None:
                    raise AdapterUnavailable(f"merged_adapters: adapter {stored.adapter_id!r} is damaged in the "
                                             f"store ({stored.problem})")
            spec = json.dumps([[s.adapter_id, s.version, w] for s, w in sources] + [strategy, density,
                                                                                   majority_sign_method])
            key = hashlib.sha256(spec.encode()).hexdigest()[:24]
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
