"""An S3-compatible object store as the adapter repository: replicas share a bucket, no filesystem.

Layout under `s3://<bucket>/<prefix>/`:

    <id>/versions/<version>/adapter_config.json, adapter_model.safetensors, metadata.json   immutable
    <id>/CURRENT              -> JSON {"version", "digest"}: the live version (absent: no such adapter)
    .changes/<time_ns>-<uuid> -> body: an id whose CURRENT was written or deleted

A version's objects are written first (version = the digest of its files: keyed by content, never rewritten);
then CURRENT is switched with a conditional write: `If-None-Match: *` for a new id (two replicas uploading the
same id: one wins, the other gets 409), `If-Match: <etag>` for an overwrite or a delete (a concurrent switch makes
it 412: the writer reads CURRENT again and retries), so two replicas cannot tear it; a write that is refused
(the id exists) or fails removes the version objects it wrote; versions replaced or deleted are removed by the
watchers' sweeps once no replica can still be reading them (s3_retired.py). Readers materialize a version
into a local cache folder (the weights' sha256 checked against the digest: a corrupt or missing object is a 503
naming the adapter, never served); the cache is bounded in bytes, least recently used copies evicted first
(app/adapters/local_copies.py: a copy being read is kept; an evicted one is downloaded again when next needed).
`changes` lists the change objects after its cursor (a look-back of
CLOCK_SKEW_S covers replicas whose clocks disagree): its cost grows with the changes, not with the adapters.

Client: boto3 (why: app/adapters/store/s3_client.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from olora_core.adapter_format import ADAPTER_ID_RE

from app.adapters.local_copies import DEFAULT_MAX_BYTES, LocalCopies
from app.adapters.repository import Changes, RepositoryUnavailable, VersionRef
from app.adapters.store.s3_client import error_code, make_client, talking
from app.adapters.store.s3_retired import RetiredVersions
from app.adapters.store.adapter_store import ADAPTER_FILES, AdapterExists, AdapterMissing, AdapterStore, StoredAdapter

CLOCK_SKEW_S = 30.0  # change objects written up to this much "in the past" by another replica are still seen
CHANGE_RETENTION_S = 3600.0  # change objects older than this are removed by writers (followers resync past it)
SWITCH_RETRIES = 8


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class S3Repository:
    """An AdapterRepository on an S3-compatible bucket, with a local cache of materialized versions."""

    writable = True

    def __init__(self, bucket: str, prefix: str, cache_dir: Path, *, endpoint_url: str | None = None,
                 timeout_s: float = 10.0, cache_bytes: int = DEFAULT_MAX_BYTES):
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.name = f"s3://{bucket}/{self.prefix}"
        self.cache = AdapterStore(cache_dir)  # staging and per-process folders on the local disk
        self.root = self.cache.root
        self._s3 = make_client(endpoint_url, timeout_s)
        self._materialize_lock = threading.Lock()
        self._metadata: dict[tuple[str, str], dict] = {}  # (id, version) -> metadata, from the pointers read
        self.copies = LocalCopies(cache_bytes, self._remove_copy)  # (id, version) -> its local folder
        self.retired = RetiredVersions(self._s3, bucket, self.prefix, self._live_version, self.changes, self._talking)
        self._scan_cache()

    def _scan_cache(self) -> None:
        """Count the copies an earlier run left in the cache folder, oldest use first (evicting past the bound)."""
        found = []
        for version_dir in self.root.glob("*/*"):
            adapter_id, version = version_dir.parent.name, version_dir.name
            if ADAPTER_ID_RE.fullmatch(adapter_id) and ADAPTER_ID_RE.fullmatch(version):
                with contextlib.suppress(OSError):
                    found.append(((version_dir / "metadata.json").stat().st_mtime, adapter_id, version, version_dir))
        for _, adapter_id, version, version_dir in sorted(found):
            self.copies.add((adapter_id, version), version_dir)

    def _remove_copy(self, key: tuple[str, str], path: Path) -> None:
        """An evicted copy: moved out of the way atomically (a request checking it sees all or nothing), then
        deleted."""
        trash = self.cache.staging_dir()
        with self._materialize_lock:
            with contextlib.suppress(FileNotFoundError):
                path.rename(trash / "evicted")
        shutil.rmtree(trash, ignore_errors=True)

    # ---- errors ----------------------------------------------------------------------------------------
    def _talking(self, what: str):
        return talking(self.name, what)

    @staticmethod
    def _code(exc: Exception) -> str:
        return error_code(exc)

    def _key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    # ---- reading ---------------------------------------------------------------------------------------
    def _pointer(self, adapter_id: str) -> tuple[dict, str] | None:
        """CURRENT's body and etag, None when the id has none."""
        from botocore.exceptions import ClientError

        try:
            with self._talking(f"adapter {adapter_id!r}"):
                obj = self._s3.get_object(Bucket=self.bucket, Key=self._key(adapter_id, "CURRENT"))
                body = obj["Body"].read()
        except ClientError as exc:
            if self._code(exc) in ("NoSuchKey", "404"):
                return None
            raise RepositoryUnavailable(f"adapter {adapter_id!r}: {self.name} answered {self._code(exc)}") from None
        try:
            pointer = json.loads(body)
            if not ADAPTER_ID_RE.fullmatch(str(pointer["version"])):
                raise ValueError(pointer["version"])
        except (ValueError, KeyError, TypeError):
            raise RepositoryUnavailable(f"adapter {adapter_id!r}: its live-version object in {self.name} is "
                                        "damaged") from None
        return pointer, obj["ETag"]

    def _live_version(self, adapter_id: str) -> str | None:
        found = self._pointer(adapter_id)
        return None if found is None else str(found[0]["version"])

    def resolve(self, adapter_id: str) -> VersionRef | None:
        if not isinstance(adapter_id, str) or not ADAPTER_ID_RE.fullmatch(adapter_id):
            return None
        found = self._pointer(adapter_id)
        if found is None:
            return None
        pointer, _ = found
        if isinstance(pointer.get("metadata"), dict):
            self._metadata[(adapter_id, str(pointer["version"]))] = pointer["metadata"]
        return VersionRef(adapter_id, str(pointer["version"]), str(pointer.get("digest", "")))

    def materialize(self, ref: VersionRef) -> StoredAdapter:
        """The version with its metadata; its files are downloaded by `localize` (on the first request that
        needs them), so indexing 10,000 adapters downloads nothing."""
        from botocore.exceptions import ClientError

        metadata = self._metadata.get((ref.adapter_id, ref.version))
        if metadata is None:
            try:
                with self._talking(f"adapter {ref.adapter_id!r}"):
                    body = self._s3.get_object(Bucket=self.bucket, Key=self._key(
                        ref.adapter_id, "versions", ref.version, "metadata.json"))["Body"].read()
            except ClientError:
                raise AdapterMissing(f"adapter {ref.adapter_id!r} version {ref.version!r} not found") from None
            metadata = json.loads(body)
        return StoredAdapter(ref.adapter_id, ref.version, self.root / ref.adapter_id / ref.version, metadata)

    def localize(self, stored: StoredAdapter) -> StoredAdapter:
        """Download the version's files into the local cache once; the weights' sha256 must match the digest
        recorded at upload (a corrupt or missing object is a 503 naming the adapter, never served)."""
        from botocore.exceptions import ClientError

        local, key = stored.path, (stored.adapter_id, stored.version)
        with self._materialize_lock:  # against an eviction moving it away between the check and the touch
            present = (local / "metadata.json").is_file()
            counted = present and self.copies.touch(key)
        if present:
            if not counted:
                self.copies.add(key, local)
            return stored
        staged = self.cache.staging_dir()
        try:
            for name in (*ADAPTER_FILES, "metadata.json"):
                try:
                    with self._talking(f"adapter {stored.adapter_id!r}"):
                        self._s3.download_file(self.bucket, self._key(stored.adapter_id, "versions", stored.version,
                                                                      name), str(staged / name))
                except ClientError as exc:
                    if self._code(exc) in ("NoSuchKey", "404"):
                        raise RepositoryUnavailable(f"adapter {stored.adapter_id!r}: object {name} of version "
                                                    f"{stored.version} is missing from {self.name}") from None
                    raise RepositoryUnavailable(f"adapter {stored.adapter_id!r}: {self.name} answered "
                                                f"{self._code(exc)}") from None
            digest = stored.metadata.get("sha256")
            if not digest or _sha256(staged / "adapter_model.safetensors") != digest:
                raise RepositoryUnavailable(f"adapter {stored.adapter_id!r}: the weights of version {stored.version} "
                                            f"in {self.name} do not match their digest (a corrupt object)")
            with self._materialize_lock:
                local.parent.mkdir(parents=True, exist_ok=True)
                if not local.exists():
                    staged.rename(local)
            self.copies.add(key, local)
            return stored
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def get(self, adapter_id: str) -> StoredAdapter | None:
        ref = self.resolve(adapter_id)
        return None if ref is None else self.localize(self.materialize(ref))

    def list(self) -> list[VersionRef]:
        refs = []
        with self._talking("listing adapters"):
            pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    rest = obj["Key"][len(self.prefix):]
                    adapter_id, _, leaf = rest.partition("/")
                    if leaf == "CURRENT" and ADAPTER_ID_RE.fullmatch(adapter_id):
                        ref = self.resolve(adapter_id)
                        if ref is not None:
                            refs.append(ref)
        return refs

    # ---- writing ---------------------------------------------------------------------------------------
    def put(self, adapter_id: str, source_dir: Path, metadata: dict[str, Any], *, overwrite: bool = False
            ) -> StoredAdapter:
        digest = _sha256(Path(source_dir) / "adapter_model.safetensors")
        config_digest = _sha256(Path(source_dir) / "adapter_config.json")
        version = "s" + hashlib.sha256(f"{digest}:{config_digest}:{time.time_ns()}".encode()).hexdigest()[:32]
        meta = dict(metadata, id=adapter_id, version=version)
        if not overwrite and self._pointer(adapter_id) is not None:  # refused before anything is written
            raise AdapterExists(f"adapter {adapter_id!r} already exists (use ?overwrite=true to replace it)")
        try:
            self._upload_version(adapter_id, version, source_dir, meta)
            self._switch(adapter_id, version, digest, meta, overwrite)
        except BaseException:
            self._drop_version(adapter_id, version)  # a refused or failed write leaves no objects behind
            raise
        self._note_change(adapter_id)
        self._metadata[(adapter_id, version)] = meta
        local = self.root / adapter_id / version
        if not local.exists():  # this replica serves what it wrote without downloading it again
            staged = self.cache.staging_dir()
            for name in ADAPTER_FILES:
                shutil.copyfile(Path(source_dir) / name, staged / name)
            (staged / "metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
            local.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                staged.rename(local)
            shutil.rmtree(staged, ignore_errors=True)
        self.copies.add((adapter_id, version), local)
        return StoredAdapter(adapter_id, version, local, meta)

    def _upload_version(self, adapter_id: str, version: str, source_dir: Path, meta: dict) -> None:
        with self._talking(f"adapter {adapter_id!r}"):
            for name in ADAPTER_FILES:
                self._s3.upload_file(str(Path(source_dir) / name), self.bucket,
                                     self._key(adapter_id, "versions", version, name))
            self._s3.put_object(Bucket=self.bucket, Key=self._key(adapter_id, "versions", version, "metadata.json"),
                                Body=json.dumps(meta, indent=2, sort_keys=True).encode())

    def _switch(self, adapter_id: str, version: str, digest: str, meta: dict, overwrite: bool) -> None:
        """Point CURRENT at `version` with a conditional write (module docstring); AdapterExists when another
        writer created the id first and this one may not overwrite."""
        from botocore.exceptions import ClientError

        pointer = json.dumps({"version": version, "digest": digest, "metadata": meta}).encode()
        for _ in range(SWITCH_RETRIES):
            current = self._pointer(adapter_id)
            if current is not None and not overwrite:
                raise AdapterExists(f"adapter {adapter_id!r} already exists (use ?overwrite=true to replace it)")
            condition = {"IfNoneMatch": "*"} if current is None else {"IfMatch": current[1]}
            try:
                with self._talking(f"adapter {adapter_id!r}"):
                    self._s3.put_object(Bucket=self.bucket, Key=self._key(adapter_id, "CURRENT"), Body=pointer,
                                        ContentType="application/json", **condition)
                return
            except ClientError as exc:
                if self._code(exc) not in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    raise RepositoryUnavailable(f"adapter {adapter_id!r}: {self.name} answered "
                                                f"{self._code(exc)}") from None
                if not overwrite and current is None:  # another replica created it first
                    raise AdapterExists(f"adapter {adapter_id!r} already exists (use ?overwrite=true to replace "
                                        "it)") from None
        raise RepositoryUnavailable(f"adapter {adapter_id!r}: its live version kept changing under this write")

    def _drop_version(self, adapter_id: str, version: str) -> None:
        """Best effort: remove the objects of a version CURRENT never pointed at (what is left, if the store is
        unreachable now, is unreferenced and never served)."""
        with contextlib.suppress(Exception):
            self._s3.delete_objects(Bucket=self.bucket, Delete={"Objects": [
                {"Key": self._key(adapter_id, "versions", version, name)}
                for name in (*ADAPTER_FILES, "metadata.json")], "Quiet": True})

    def delete(self, adapter_id: str) -> StoredAdapter:
        from botocore.exceptions import ClientError

        for _ in range(SWITCH_RETRIES):
            current = self._pointer(adapter_id)
            if current is None:
                raise AdapterMissing(f"adapter {adapter_id!r} not found")
            ref = VersionRef(adapter_id, str(current[0]["version"]), str(current[0].get("digest", "")))
            try:
                with self._talking(f"adapter {adapter_id!r}"):
                    self._s3.delete_object(Bucket=self.bucket, Key=self._key(adapter_id, "CURRENT"),
                                           IfMatch=current[1])
                break
            except ClientError as exc:
                if self._code(exc) not in ("PreconditionFailed", "412"):
                    raise RepositoryUnavailable(f"adapter {adapter_id!r}: {self.name} answered "
                                                f"{self._code(exc)}") from None
        else:
            raise RepositoryUnavailable(f"adapter {adapter_id!r}: its live version kept changing under this delete")
        self._note_change(adapter_id)
        local = self.root / adapter_id / ref.version
        metadata = json.loads((local / "metadata.json").read_text()) if (local / "metadata.json").is_file() else {}
        return StoredAdapter(adapter_id, ref.version, local, metadata)

    # ---- changes ---------------------------------------------------------------------------------------
    def _note_change(self, adapter_id: str) -> None:
        key = self._key(".changes", f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}")
        with self._talking(f"adapter {adapter_id!r}"):
            self._s3.put_object(Bucket=self.bucket, Key=key, Body=adapter_id.encode())

    def changes(self, cursor: object | None) -> Changes:
        """Change objects written since the cursor = (newest time seen, keys seen within CLOCK_SKEW_S of it)."""
        newest, seen = cursor if isinstance(cursor, tuple) else (time.time_ns(), frozenset())
        start = self._key(".changes", f"{max(0, newest - int(CLOCK_SKEW_S * 1e9)):020d}")
        ids, keys, latest = set(), set(), newest
        with self._talking("following changes"):
            pages = self._s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(".changes", ""), StartAfter=start)
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    stamp = key.rsplit("/", 1)[-1].split("-", 1)[0]
                    keys.add(key)
                    if key in seen or not stamp.isdigit():
                        continue
                    body = self._s3.get_object(Bucket=self.bucket, Key=key)["Body"].read().decode("utf-8", "replace")
                    if ADAPTER_ID_RE.fullmatch(body):
                        ids.add(body)
                    latest = max(latest, int(stamp))
        window = latest - int(CLOCK_SKEW_S * 1e9)
        kept = frozenset(k for k in keys if int(k.rsplit("/", 1)[-1].split("-", 1)[0]) >= window)
        return Changes(cursor=(latest, kept), adapter_ids=frozenset(ids), resync=cursor is None)

    # ---- the local side (staging, per-process folders) ---------------------------------------------------
    def staging_dir(self) -> Path:
        return self.cache.staging_dir()

    def process_dir(self, area: str) -> Path:
        return self.cache.process_dir(area)

    def clean_process_dirs(self, area: str) -> None:
        self.cache.clean_process_dirs(area)

    @contextlib.contextmanager
    def reading(self, stored: StoredAdapter) -> Iterator[Path]:
        # not evicted while read (`stored` was just localized: the most recently used copy)
        with self.copies.hold((stored.adapter_id, stored.version)):
            yield stored.path

    @contextlib.contextmanager
    def held(self, adapter_id: str) -> Iterator[StoredAdapter]:
        """The live version, downloaded and held (versions are immutable: the only removal to keep off is the
        cache's eviction)."""
        ref = self.resolve(adapter_id)
        if ref is None:
            raise AdapterMissing(f"adapter {adapter_id!r} not found")
        stored, key = self.materialize(ref), (ref.adapter_id, ref.version)
        for _ in range(3):  # an eviction between the download and the hold: download again
            stored = self.localize(stored)
            with self.copies.hold(key) as holding:
                if holding and (stored.path / "metadata.json").is_file():
                    yield stored
                    return
        raise RepositoryUnavailable(f"adapter {adapter_id!r}: the local cache is too small to hold it while read")

    def sweep(self, full: bool = False) -> list:
        """Retired versions removed from the bucket after their grace (s3_retired.py); no findings to report (a
        damaged object is a 503 when read). The local cache is bounded by `copies`."""
        self.retired.sweep(full)
        return []
