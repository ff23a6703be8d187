"""The adapter repository: the one interface through which everything above the engine reaches stored adapters.

    resolve(id)        -> VersionRef | None   the live version of an id: (id, version, digest), immutable
    materialize(ref)   -> StoredAdapter       that version: its metadata and the local folder it has or will have
    localize(stored)   -> StoredAdapter       its files present in that folder (downloaded once, digest checked)
    list()             -> [VersionRef]        every live adapter
    put(id, dir, meta) -> StoredAdapter       a new version, made live atomically (AdapterExists unless overwrite)
    delete(id)         -> StoredAdapter       the id stops resolving
    changes(cursor)    -> Changes             ids whose live version may have changed since `cursor`

Semantics: a VersionRef never changes meaning: the version it names is never rewritten, so what was materialized
for it stays right. `changes` costs what changed since the cursor, not what is stored (a watcher polls it);
`Changes.resync` asks the caller to rebuild from `list()` (a first call, a journal that was rotated or lost).
The engine sees only VersionRefs and local paths (app/adapters/served.py), never a repository's layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


class RepositoryUnavailable(RuntimeError):
    """The repository could not be reached or answered wrongly (503 for the adapter asked; the rest serves)."""

    status_code = 503


class RepositoryTimeout(RepositoryUnavailable):
    """The repository did not answer in time (504 for the adapter asked)."""

    status_code = 504


@dataclass(frozen=True)
class VersionRef:
    adapter_id: str
    version: str  # chosen by the repository; unique per id
    digest: str  # sha256 of the adapter's weights ("" where the repository does not know it before materializing)


@dataclass(frozen=True)
class Changes:
    cursor: object  # opaque: hand it back to the next `changes` call
    adapter_ids: frozenset[str] = field(default_factory=frozenset)  # ids to resolve again
    resync: bool = False  # the cursor could not be followed: rebuild from list()


@runtime_checkable
class AdapterRepository(Protocol):
    writable: bool
    name: str  # for logs and `source` in metadata: "local:<root>", "peft:<root>", "s3://bucket/prefix"

    def resolve(self, adapter_id: str) -> VersionRef | None: ...

    def materialize(self, ref: VersionRef) -> Any: ...  # StoredAdapter (app/adapters/store/adapter_store.py)

    def localize(self, stored: Any) -> Any: ...

    def list(self) -> list[VersionRef]: ...

    def put(self, adapter_id: str, source_dir: Path, metadata: dict[str, Any], *, overwrite: bool = False
            ) -> Any: ...

    def delete(self, adapter_id: str) -> Any: ...

    def changes(self, cursor: object | None) -> Changes: ...
