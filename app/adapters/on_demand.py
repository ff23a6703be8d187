"""On-demand loading: a request for an id this server has never seen, held by a configured source (a folder of
PEFT saves on disk or in a bucket), is fetched, validated exactly as an upload is, written to the local store and served.

    fetch(id): index hit                       -> the local version (no I/O)
               the store has it (another replica) -> indexed, served
               a source has it                  -> one load per id at a time (concurrent first requests wait on
                                                   the same one), at most `timeout_s` of waiting: 504 after it
                                                   (the load goes on and the next request finds it); a source
                                                   that cannot be read: 503; every other refusal is the upload's.

A load packs the source's files as upload archives (app/adapters/store/peft_folder.py) and calls
`AdapterService.upload`: the same archive checks, OLoRA/PiSSA conversion and provenance rule, engine check and
refusals as a client's upload; the stored metadata says where it came from (`origin`).

Adapters loaded from a source are a cache, bounded in bytes (`cache_bytes`, least recently requested evicted
first, app/adapters/local_copies.py): in the object store the repository's own cache of downloads bounds them;
in the local directory store this loader does, deleting an evicted one from the store (it is loaded from its
source again on its next request). Uploads and `/v1/load_lora_adapter` registrations are never evicted.
"""
from __future__ import annotations

import concurrent.futures
import logging
import shutil
import threading
from pathlib import Path

from app.adapters.local_copies import DEFAULT_MAX_BYTES, LocalCopies, folder_bytes
from app.adapters.repository import RepositoryTimeout, VersionRef
from app.adapters.store.adapter_store import AdapterExists, StoredAdapter
from app.adapters.store.peft_folder import PeftFolderRepository, folder_archives
from app.adapters.store.s3_peft_folder import S3PeftFolderRepository

PeftSource = PeftFolderRepository | S3PeftFolderRepository  # a folder of PEFT saves, on disk or in a bucket

log = logging.getLogger("olora.adapters")


class OnDemandLoader:
    def __init__(self, service, sources: list[PeftSource], timeout_s: float = 30.0, workers: int = 2,
                 cache_bytes: int = DEFAULT_MAX_BYTES):
        self.service = service
        self.sources = list(sources)
        self.timeout_s = timeout_s
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="adapter-fetch")
        self._inflight: dict[str, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self.loads = 0  # loads started (each id once however many requests wait on it)
        # (id, version) of the adapters loaded from a source into a store that keeps no bounded cache of its own
        self.copies: LocalCopies | None = None
        if self.sources and getattr(service.repository, "copies", None) is None:
            self.copies = LocalCopies(cache_bytes, self._evict)
            loaded = [s for s in service.index.all() if (s.metadata.get("origin") or {}).get("source")]
            for stored in sorted(loaded, key=lambda s: float(s.metadata.get("created", 0))):
                self.copies.add((stored.adapter_id, stored.version), stored.path)

    def fetch(self, adapter_id: str) -> StoredAdapter | None:
        """The live local version of `adapter_id`, loading it from a source when only a source holds it."""
        stored = self.service.index.lookup(adapter_id)
        if stored is not None:
            if self.copies is not None:
                self.copies.touch((stored.adapter_id, stored.version))
            return self.service.repository.localize(stored)  # local store: no I/O; object store: download once
        if not self.sources:
            return None
        found = self._find(adapter_id)
        if found is None:
            return None
        source, ref = found
        with self._lock:
            future = self._inflight.get(adapter_id)
            done = None if future is not None else self.service.index.get(adapter_id)
            if future is None and done is None:
                self.loads += 1
                future = self._pool.submit(self._load, source, ref)
                self._inflight[adapter_id] = future
                future.add_done_callback(lambda _f, i=adapter_id: self._done(i))
        if done is not None:  # a load that finished while the source was being asked
            return self.service.repository.localize(done)
        try:
            return future.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            raise RepositoryTimeout(f"adapter {adapter_id!r} is still being loaded from {source.name} after "
                                    f"{self.timeout_s:g} s; retry shortly") from None

    def load_folder(self, adapter_id: str, folder: Path, *, overwrite: bool = False,
                    origin: dict | None = None) -> StoredAdapter:
        """Validate and store the PEFT save at `folder` (inside a configured root) as `adapter_id`."""
        work = self.service.staging_dir()
        try:
            trained, initial, recompute = folder_archives(folder, work)
            self.service.upload(adapter_id, trained, initial, overwrite=overwrite, recompute_init=recompute,
                                origin=origin or {"path": str(folder)})
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return self.service.stored(adapter_id)

    def _find(self, adapter_id: str) -> tuple[PeftSource, VersionRef] | None:
        for source in self.sources:
            ref = source.resolve(adapter_id)  # RepositoryUnavailable (503) when the source cannot be read
            if ref is not None:
                return source, ref
        return None

    def load_source(self, adapter_id: str, source: PeftSource, source_id: str, *, overwrite: bool = False,
                    origin: dict | None = None) -> StoredAdapter:
        """Validate and store the save `source` holds under `source_id` as `adapter_id` (a bucket's save is
        downloaded into a private folder first)."""
        work = self.service.staging_dir()
        try:
            with source.local_folder(source_id, work) as folder:
                return self.load_folder(adapter_id, folder, overwrite=overwrite, origin=origin)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _load(self, source: PeftSource, ref: VersionRef) -> StoredAdapter:
        origin = {"source": source.name, "version": ref.version}
        try:
            stored = self.load_source(ref.adapter_id, source, ref.adapter_id, origin=origin)
        except AdapterExists:  # another replica (or an upload) stored it meanwhile: serve that one
            stored = self.service.stored(ref.adapter_id)
        if self.copies is not None and (stored.metadata.get("origin") or {}).get("source"):
            self.copies.add((stored.adapter_id, stored.version), stored.path, folder_bytes(stored.path))
        log.info("loaded adapter %s on demand from %s", ref.adapter_id, source.name)
        return stored

    def _evict(self, key: tuple[str, str], path: Path) -> None:
        """Delete an evicted source-loaded adapter from the store, unless it was replaced meanwhile. The engine
        keeps what it read (it does not open the files again); the next request loads it from its source."""
        adapter_id, version = key
        current = self.service.index.get(adapter_id)
        if current is None or current.version != version:
            return
        self.service.repository.delete(adapter_id)
        self.service.index.forget(adapter_id)
        log.info("evicted adapter %s (loaded from a source) from the local store: the cache is full", adapter_id)

    def _done(self, adapter_id: str) -> None:
        with self._lock:
            self._inflight.pop(adapter_id, None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
