"""In-memory index of the live adapters (id -> materialized version), so that admitting a request for a known
adapter and listing adapters read nothing from the repository.

Kept current three ways: this process's own puts/deletes update it at once (`note`/`forget`); a watcher calls
`refresh()`, which asks the repository what changed since its cursor and resolves only those ids (its cost grows
with changes, not with adapters); `rebuild()` reads everything (at start, when the repository asks for a resync,
and every `store_rescan_s` as a repair). An id missing from the index is looked up in the repository once
(`lookup`): an adapter another replica has just uploaded is served before the watcher's next poll.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from app.adapters.repository import VersionRef
from app.adapters.store.adapter_store import StoredAdapter


@dataclass(frozen=True)
class IndexChange:
    adapter_id: str
    stored: StoredAdapter | None  # None: deleted


class AdapterIndex:
    def __init__(self, repository):
        self.repository = repository
        self._entries: dict[str, StoredAdapter] = {}
        self._lock = threading.Lock()
        self._cursor: object | None = None
        self.generation = 0  # bumped at every change of the entries (listings cached on it)

    # ---- reading (no repository I/O) ---------------------------------------------------------------------
    def get(self, adapter_id: str) -> StoredAdapter | None:
        return self._entries.get(adapter_id)

    def all(self) -> list[StoredAdapter]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda s: s.adapter_id)

    def versions(self) -> dict[str, str]:
        with self._lock:
            return {i: s.version for i, s in self._entries.items()}

    def __len__(self) -> int:
        return len(self._entries)

    # ---- this process's writes ------------------------------------------------------------------------------
    def note(self, stored: StoredAdapter) -> None:
        with self._lock:
            self._entries[stored.adapter_id] = stored
            self.generation += 1

    def forget(self, adapter_id: str) -> None:
        with self._lock:
            self._entries.pop(adapter_id, None)
            self.generation += 1

    # ---- following the repository (blocking: call it from a worker thread) -------------------------------------
    def lookup(self, adapter_id: str) -> StoredAdapter | None:
        """The index's entry, or the repository's live version of an id the index does not hold (then indexed)."""
        stored = self._entries.get(adapter_id)
        if stored is not None:
            return stored
        ref = self.repository.resolve(adapter_id)
        if ref is None:
            return None
        stored = self._materialize(ref)
        if stored is not None:
            self.note(stored)
        return stored

    def rebuild(self) -> list[IndexChange]:
        changes = self.repository.changes(None)  # the cursor first: what changes while listing is seen again
        entries = {}
        for ref in self.repository.list():
            stored = self._materialize(ref)
            if stored is not None:
                entries[ref.adapter_id] = stored
        with self._lock:
            old, self._entries = self._entries, entries
            self._cursor = changes.cursor
            self.generation += 1
        return [IndexChange(i, entries.get(i)) for i in set(old) | set(entries)
                if _version(old.get(i)) != _version(entries.get(i))]

    def refresh(self) -> list[IndexChange]:
        """Apply what changed since the last call; returns the ids whose live version changed."""
        changes = self.repository.changes(self._cursor)
        if changes.resync:
            return self.rebuild()
        out = self.recheck(sorted(changes.adapter_ids))
        self._cursor = changes.cursor
        return out

    def recheck(self, adapter_ids) -> list[IndexChange]:
        """Read the live version of each id again (named by the journal, or repaired by a sweep); returns those
        whose version changed."""
        out = []
        for adapter_id in adapter_ids:
            ref = self.repository.resolve(adapter_id)
            stored = None if ref is None else self._materialize(ref)
            with self._lock:
                before = self._entries.get(adapter_id)
                if stored is None:
                    self._entries.pop(adapter_id, None)
                else:
                    self._entries[adapter_id] = stored
                if _version(before) != _version(stored):
                    self.generation += 1
            if _version(before) != _version(stored):
                out.append(IndexChange(adapter_id, stored))
        return out

    def _materialize(self, ref: VersionRef) -> StoredAdapter | None:
        from app.adapters.store.adapter_store import AdapterMissing

        try:
            return self.repository.materialize(ref)
        except AdapterMissing:  # replaced or deleted meanwhile: the next change names it again
            return None


def _version(stored: StoredAdapter | None) -> str | None:
    return None if stored is None else stored.version
