"""The engine's adapter source: the adapter index (live versions of the repository) plus this process's merges.

The engine knows adapters only through this (`AdapterSource.path_for(id)`, app/engine/adapter_files.py): ids
starting with `~merged-` are this process's merges (app/adapters/ephemeral.py), every other id is looked up in the
in-memory index (app/adapters/index.py: no repository read for a known adapter), then, for an id the index does
not hold, in the repository and the on-demand sources (`fetch`, app/adapters/on_demand.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from app.adapters.ephemeral import EPHEMERAL_PREFIX, EphemeralAdapters
from app.adapters.store.adapter_store import StoredAdapter


class ServedAdapters:
    """The engine's AdapterSource (a structural Protocol: nothing here imports the engine)."""

    def __init__(self, fetch: Callable[[str], StoredAdapter | None], ephemeral: EphemeralAdapters):
        self.fetch = fetch  # id -> the live version, materialized locally (None: no such adapter)
        self.ephemeral = ephemeral

    def path_for(self, adapter_id: str) -> Path | None:
        if adapter_id.startswith(EPHEMERAL_PREFIX):
            return self.ephemeral.path_for(adapter_id)
        stored = self.fetch(adapter_id)
        return None if stored is None else stored.path
