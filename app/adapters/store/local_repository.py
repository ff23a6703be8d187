"""The local directory store (app/adapters/store/adapter_store.py) as an AdapterRepository, with a change journal.

The store's layout and guarantees are unchanged (atomic CURRENT switch, striped cross-process locks, retired
versions swept after a grace period). Added here: `<root>/.changes/journal`, one line `<id>\n` appended after
every put/delete of any replica sharing the directory. A watcher follows it from its cursor (inode, offset), so
a poll costs one `stat` plus the lines written since, whatever the number of adapters. When the journal passes
JOURNAL_MAX_BYTES a writer starts a new one (os.replace: a new inode) and every follower resyncs once from
`list()`. An append is a single small O_APPEND write; on a network filesystem where two hosts' appends could
interleave, the watcher's periodic full resync (`store_rescan_s`) repairs a lost line.

Sweeping (retired versions removed after their grace period, damage repaired or reported) follows the same
journal: `sweep()` looks only at the ids written since the last sweep, each until one sweep has run past its
grace period, so its cost grows with the changes too; `sweep(full=True)` (at start, after a journal rotation, and
every `store_rescan_s` from the watcher) looks at every adapter, for what no journal line names (a version a
reader held past its grace period, damage from outside, a lost line).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

from olora_core.adapter_format import ADAPTER_ID_RE

from app.adapters.repository import Changes, VersionRef
from app.adapters.store import adapter_store
from app.adapters.store.adapter_store import AdapterMissing, AdapterStore, StoredAdapter
from app.adapters.store.layout import version_problem

JOURNAL_MAX_BYTES = 4 << 20  # about 100,000 changes between rotations


class LocalDirectoryRepository:
    """An AdapterRepository on a POSIX directory (a local disk, or a RWX volume shared by replicas)."""

    writable = True

    def __init__(self, root: Path):
        self.store = AdapterStore(root)  # removes crashed writers' staging folders
        self.root = self.store.root
        self.name = f"local:{self.root}"
        self._journal = self.root / ".changes" / "journal"
        self._sweep_cursor: object | None = None  # the journal as far as sweeps have followed it
        self._to_sweep: dict[str, float] = {}  # id -> when the journal last named it (time.monotonic())
        with contextlib.suppress(OSError):  # a read-only store has no journal to start: follow none
            self._journal.parent.mkdir(exist_ok=True)

    # ---- reading ---------------------------------------------------------------------------------------
    def resolve(self, adapter_id: str) -> VersionRef | None:
        stored = self.store.get(adapter_id)
        return None if stored is None else _ref(stored)

    def materialize(self, ref: VersionRef) -> StoredAdapter:
        """The version folder itself (already local). AdapterMissing once it has been swept."""
        path = self.root / ref.adapter_id / ref.version
        if not ADAPTER_ID_RE.fullmatch(ref.adapter_id) or not ADAPTER_ID_RE.fullmatch(ref.version):
            raise AdapterMissing(f"adapter {ref.adapter_id!r} version {ref.version!r} not found")
        try:
            metadata = json.loads((path / "metadata.json").read_text())
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            damaged = self.store.get(ref.adapter_id)  # shown with its problem, so it can be overwritten/deleted
            if damaged is not None and damaged.problem is not None and damaged.version == ref.version:
                return damaged
            raise AdapterMissing(f"adapter {ref.adapter_id!r} version {ref.version!r} not found") from None
        problem = version_problem(self.root / ref.adapter_id, ref.version, metadata)
        return StoredAdapter(ref.adapter_id, ref.version, path, metadata, problem)

    def localize(self, stored: StoredAdapter) -> StoredAdapter:
        """Already local: nothing to do (no I/O)."""
        return stored

    def get(self, adapter_id: str) -> StoredAdapter | None:
        """resolve + materialize in one read (the local store's version folder is the materialized one)."""
        return self.store.get(adapter_id)

    def list(self) -> list[VersionRef]:
        return [_ref(s) for s in self.store.list()]

    def list_stored(self) -> list[StoredAdapter]:
        return self.store.list()

    # ---- writing ---------------------------------------------------------------------------------------
    def put(self, adapter_id: str, source_dir: Path, metadata: dict[str, Any], *, overwrite: bool = False
            ) -> StoredAdapter:
        stored = self.store.put(adapter_id, source_dir, metadata, overwrite=overwrite)
        self._append(adapter_id)
        return stored

    def delete(self, adapter_id: str) -> StoredAdapter:
        stored = self.store.delete(adapter_id)
        self._append(adapter_id)
        return stored

    # ---- changes ---------------------------------------------------------------------------------------
    def _append(self, adapter_id: str) -> None:
        line = f"{adapter_id}\n".encode()
        try:
            if self._journal.stat().st_size > JOURNAL_MAX_BYTES:
                fresh = self._journal.with_name(f".journal.{os.getpid()}.{id(self)}")
                fresh.write_bytes(line)
                os.replace(fresh, self._journal)  # followers see a new inode: they resync once
                return
        except FileNotFoundError:
            pass
        fd = os.open(self._journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def changes(self, cursor: object | None) -> Changes:
        """Ids named in the journal since `cursor` = (inode, offset). One stat when nothing changed."""
        try:
            st = self._journal.stat()
        except FileNotFoundError:
            return Changes(cursor=(0, 0), resync=cursor is None or cursor != (0, 0))
        inode, offset = cursor if isinstance(cursor, tuple) else (None, 0)
        if inode == 0:  # there was no journal at the cursor: the new one holds every change since, from its start
            inode, offset = st.st_ino, 0
        if inode != st.st_ino or st.st_size < offset:
            return Changes(cursor=(st.st_ino, st.st_size), resync=True)
        if st.st_size == offset:
            return Changes(cursor=cursor)
        with open(self._journal, "rb") as fh:
            fh.seek(offset)
            data = fh.read(st.st_size - offset)
        complete = data.rfind(b"\n") + 1  # a line being written is read at the next poll
        ids = {line for line in data[:complete].decode("utf-8", "replace").split("\n")
               if ADAPTER_ID_RE.fullmatch(line)}
        return Changes(cursor=(inode, offset + complete), adapter_ids=frozenset(ids))

    # ---- the local store's own services (staging on the same filesystem, readers, sweeping) ------------
    def staging_dir(self) -> Path:
        return self.store.staging_dir()

    def process_dir(self, area: str) -> Path:
        return self.store.process_dir(area)

    def clean_process_dirs(self, area: str) -> None:
        self.store.clean_process_dirs(area)

    @contextlib.contextmanager
    def reading(self, stored: StoredAdapter) -> Iterator[Path]:
        with self.store.reading(stored) as path:
            yield path

    @contextlib.contextmanager
    def held(self, adapter_id: str) -> Iterator[StoredAdapter]:
        """The live version looked up and held under the id's lock (AdapterStore.held)."""
        with self.store.held(adapter_id) as stored:
            yield stored

    def sweep(self, full: bool = False) -> list:
        """Retired versions removed, damage repaired or reported: the store's findings (StoreFinding). Only the
        ids the journal named since the last sweep (each until a sweep past its grace period), unless `full` or
        the journal cannot be followed (a first call, a rotation): then every adapter."""
        changes = self.changes(self._sweep_cursor)
        self._sweep_cursor = changes.cursor
        now = time.monotonic()
        if full or changes.resync:
            self._to_sweep.clear()
            return self.store.sweep()
        for adapter_id in changes.adapter_ids:
            self._to_sweep[adapter_id] = now
        findings = self.store.sweep(list(self._to_sweep))
        for adapter_id, named in list(self._to_sweep.items()):
            if now - named > adapter_store.OLD_VERSION_GRACE_S:  # this sweep ran past its grace: its retired versions are gone
                del self._to_sweep[adapter_id]
        return findings


def _ref(stored: StoredAdapter) -> VersionRef:
    return VersionRef(stored.adapter_id, stored.version, str(stored.metadata.get("sha256", "")))
