"""Persistent adapter store: one folder per adapter, atomic writes, safe across processes sharing the directory.

Layout (all names chosen by the server, never by a client):

    <root>/<adapter_id>/CURRENT          -> text: name of the live version folder
    <root>/<adapter_id>/<version>/       -> adapter_config.json, adapter_model.safetensors, metadata.json
    <root>/.staging/<host>-<pid>-<uuid>/ -> versions/uploads being written (same filesystem: rename is atomic)
    <root>/.locks/<stripe>.lock          -> fcntl lock serialising writers of the ids hashed to this stripe
                                            across processes (LOCK_STRIPES files at most, whatever the ids)

A version folder is complete before CURRENT names it (CURRENT is replaced with os.replace), so a reader sees
either the old adapter or the new one, never a torn one. Retired versions are removed after a grace period
(a replica still reading them is not cut off) and once no reader of this process holds them (`reading`), by
`sweep()` (run at start and periodically). Staging folders left by a crashed writer of this host (its pid is
gone) are removed at start; those of other hosts once older than STALE_STAGING_S.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from olora_core.adapter_format import ADAPTER_ID_RE
from olora_core.adapter_io import CONFIG_NAME, WEIGHTS_NAME, fsync_dir

ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)
OLD_VERSION_GRACE_S = 60.0
RETIRED_MARKER = ".retired"
LOCK_STRIPES = 64
_PROCESS_STARTED = time.time()  # (about) when this process started: staging folders older than it are debris
STALE_STAGING_S = 3600.0  # no upload or merge takes that long


class StoreError(ValueError):
    status_code = 422


class InvalidAdapterId(StoreError):
    status_code = 422


class AdapterExists(StoreError):
    status_code = 409


class AdapterMissing(StoreError):
    status_code = 404


@dataclass(frozen=True)
class StoredAdapter:
    adapter_id: str
    version: str
    path: Path  # the version folder: a PEFT adapter directory
    metadata: dict[str, Any]


def check_adapter_id(adapter_id: str) -> str:
    if not isinstance(adapter_id, str) or not ADAPTER_ID_RE.fullmatch(adapter_id):
        raise InvalidAdapterId(
            f"invalid adapter id {adapter_id!r}: it must match ^[A-Za-z0-9][A-Za-z0-9._-]{{0,127}}$")
    return adapter_id


class AdapterStore:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        for sub in (self.root, self.root / ".staging", self.root / ".locks"):
            sub.mkdir(parents=True, exist_ok=True)
        self._host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"
        self._readers: Counter[Path] = Counter()  # version folders this process is reading (not swept)
        self._readers_lock = threading.Lock()
        self._clean_staging()

    # ---- reading ---------------------------------------------------------------------------------------
    def _current_version(self, adapter_id: str) -> str | None:
        try:
            version = (self.root / adapter_id / "CURRENT").read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return version or None

    def get(self, adapter_id: str) -> StoredAdapter | None:
        if not ADAPTER_ID_RE.fullmatch(adapter_id or ""):
            return None
        version = self._current_version(adapter_id)
        if version is None:
            return None
        path = self.root / adapter_id / version
        try:
            metadata = json.loads((path / "metadata.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return StoredAdapter(adapter_id, version, path, metadata)

    def path_for(self, adapter_id: str) -> Path | None:
        """AdapterSource protocol for the engine."""
        stored = self.get(adapter_id)
        return stored.path if stored else None

    def list(self) -> list[StoredAdapter]:
        out = []
        for child in sorted(self.root.iterdir()):
            if child.name.startswith(".") or not child.is_dir():
                continue
            stored = self.get(child.name)
            if stored is not None:
                out.append(stored)
        return out

    def versions(self) -> dict[str, str]:
        """adapter id -> live version, for watchers that detect changes made by other processes."""
        out = {}
        for child in self.root.iterdir():
            if not child.name.startswith(".") and child.is_dir():
                version = self._current_version(child.name)
                if version:
                    out[child.name] = version
        return out

    # ---- writing ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, adapter_id: str) -> Iterator[None]:
        stripe = int.from_bytes(hashlib.sha256(adapter_id.encode()).digest()[:4], "big") % LOCK_STRIPES
        with open(self.root / ".locks" / f"{stripe:02d}.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def staging_dir(self) -> Path:
        """A fresh private directory on the store's filesystem for building a version."""
        return self.process_dir(".staging")

    def process_dir(self, area: str) -> Path:
        """A fresh directory `<root>/<area>/<host>-<pid>-<uuid>/` owned by this process (removed by
        `clean_process_dirs` once the process is gone)."""
        path = self.root / area / f"{self._host}-{os.getpid()}-{uuid.uuid4().hex}"
        path.mkdir(parents=True)
        return path

    def clean_process_dirs(self, area: str) -> None:
        """Remove what dead processes left in `<root>/<area>/`: this host's folders whose process is gone (or has
        our pid: a restarted container), and any folder untouched for STALE_STAGING_S (another host's crash)."""
        now = time.time()
        folder = self.root / area
        if not folder.is_dir():
            return
        for child in folder.iterdir():
            host, pid, _ = (child.name.split("-") + ["", ""])[:3]
            mine = host == self._host and pid.isdigit()
            try:
                mtime = child.stat().st_mtime
            except FileNotFoundError:
                continue
            stale = now - mtime > STALE_STAGING_S
            # our own pid on a folder older than this process: a restarted container (pid 1 again)
            earlier_me = mine and int(pid) == os.getpid() and mtime < _PROCESS_STARTED
            if stale or earlier_me or (mine and int(pid) != os.getpid() and not _pid_alive(int(pid))):
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)

    def _clean_staging(self) -> None:
        self.clean_process_dirs(".staging")

    @contextlib.contextmanager
    def reading(self, stored: StoredAdapter) -> Iterator[Path]:
        """Hold a version folder while reading it (a long stream): `sweep` leaves it alone meanwhile."""
        with self._readers_lock:
            self._readers[stored.path] += 1
        try:
            yield stored.path
        finally:
            with self._readers_lock:
                self._readers[stored.path] -= 1
                if self._readers[stored.path] <= 0:
                    del self._readers[stored.path]

    def sweep(self) -> None:
        """Remove retired versions past the grace period (unless this process still reads them) and the debris of
        crashed writers, for every adapter (not only at the next write to the same id)."""
        for child in self.root.iterdir():
            if child.name.startswith(".") or not child.is_dir() or not ADAPTER_ID_RE.fullmatch(child.name):
                continue
            try:
                with self._locked(child.name):
                    current = self._current_version(child.name)
                    if current is not None:
                        self._collect_old_versions(child, keep=current)
            except OSError:  # a read-only or vanishing store: nothing to sweep now
                continue

    def put(self, adapter_id: str, source_dir: Path, metadata: dict[str, Any], *, overwrite: bool = False
            ) -> StoredAdapter:
        """Copy the adapter files of `source_dir` into the store as `adapter_id` (atomically).

        Raises AdapterExists if the id is taken and `overwrite` is false; nothing is written then.
        """
        check_adapter_id(adapter_id)
        version = f"v{time.time_ns():x}-{uuid.uuid4().hex[:8]}"
        staged = self.staging_dir()
        try:
            for name in ADAPTER_FILES:
                shutil.copyfile(Path(source_dir) / name, staged / name)
            meta = dict(metadata, id=adapter_id, version=version)
            (staged / "metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
            for name in (*ADAPTER_FILES, "metadata.json"):
                with open(staged / name, "rb") as fh:
                    os.fsync(fh.fileno())
            with self._locked(adapter_id):
                previous = self._current_version(adapter_id)
                if previous is not None and not overwrite:
                    raise AdapterExists(f"adapter {adapter_id!r} already exists (use ?overwrite=true to replace it)")
                adapter_dir = self.root / adapter_id
                adapter_dir.mkdir(exist_ok=True)
                os.rename(staged, adapter_dir / version)
                pointer = adapter_dir / f".CURRENT.{uuid.uuid4().hex}"
                pointer.write_text(version)
                os.replace(pointer, adapter_dir / "CURRENT")
                fsync_dir(adapter_dir)
                if previous is not None:
                    (adapter_dir / previous / RETIRED_MARKER).write_text(str(time.time()))
                self._collect_old_versions(adapter_dir, keep=version)
            return StoredAdapter(adapter_id, version, adapter_dir / version, meta)
        finally:
            if staged.exists():
                shutil.rmtree(staged, ignore_errors=True)

    def delete(self, adapter_id: str) -> StoredAdapter:
        check_adapter_id(adapter_id)
        with self._locked(adapter_id):
            stored = self.get(adapter_id)
            if stored is None:
                raise AdapterMissing(f"adapter {adapter_id!r} not found")
            adapter_dir = self.root / adapter_id
            os.unlink(adapter_dir / "CURRENT")
            fsync_dir(adapter_dir)
            self._collect_old_versions(adapter_dir, keep=None)
        return stored

    def _collect_old_versions(self, adapter_dir: Path, keep: str | None) -> None:
        """Remove versions other than `keep` retired longer ago than the grace period (all of them if keep is None).

        A version folder without a retired marker and without CURRENT naming it is debris of a crashed writer.
        """
        now = time.time()
        for child in adapter_dir.iterdir():
            if child.name in ("CURRENT", keep) or child.name.startswith(".CURRENT") or not child.is_dir():
                continue
            try:
                retired_at = float((child / RETIRED_MARKER).read_text())
            except (FileNotFoundError, ValueError):
                retired_at = 0.0
            with self._readers_lock:
                read_here = self._readers.get(child, 0) > 0
            if keep is None or (now - retired_at > OLD_VERSION_GRACE_S and not read_here):
                shutil.rmtree(child, ignore_errors=True)
        if keep is None and not any(adapter_dir.iterdir()):
            with contextlib.suppress(OSError):
                adapter_dir.rmdir()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
