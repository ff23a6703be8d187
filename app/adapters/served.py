"""The engine's adapter source: the persistent store plus this process's per-request merges.

The engine knows adapters only through this (`AdapterSource.path_for(id)`, app/engine/adapter_files.py): ids
starting with `~merged-` are this process's merges (app/adapters/ephemeral.py), every other id is the store's.
"""
from __future__ import annotations

from pathlib import Path

from app.adapters.ephemeral import EPHEMERAL_PREFIX, EphemeralAdapters
from app.adapters.store.adapter_store import AdapterStore


class ServedAdapters:
    """The engine's AdapterSource (a structural Protocol: nothing here imports the engine)."""

    def __init__(self, store: AdapterStore, ephemeral: EphemeralAdapters):
        self.store = store
        self.ephemeral = ephemeral

    def path_for(self, adapter_id: str) -> Path | None:
        if adapter_id.startswith(EPHEMERAL_PREFIX):
            return self.ephemeral.path_for(adapter_id)
        return self.store.path_for(adapter_id)
