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

Damage (a CURRENT naming a missing or incomplete version, a missing CURRENT beside complete versions, a corrupt
metadata.json) never leads to deletion: `sweep` repairs CURRENT to the newest complete version when there is one
(`_repair_current`), and otherwise leaves the files alone and reports the id (`StoreFinding`); `get` returns a
damaged adapter with its `problem`, so it can be shown, overwritten and deleted. A store that cannot be written
(read-only mount) still serves what it holds; its writes fail with the OSError the HTTP layer maps to 503.
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
from typing import Any, Iterable, Iterator

from olora_core.adapter_format import ADAPTER_ID_RE
from olora_core.adapter_io import CONFIG_NAME, WEIGHTS_NAME, fsync_dir

from app.adapters.store.layout import (ADAPTER_FILES, METADATA_FILE, VERSION_RE, StoreFinding,
                                       complete_versions, read_metadata, version_problem)

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
    problem: str | None = None  # store damage: why this adapter cannot be served (None: complete)


def check_adapter_id(adapter_id: str) -> str:
    if not isinstance(adapter_id, str) or not ADAPTER_ID_RE.fullmatch(adapter_id):
        raise InvalidAdapterId(
            f"invalid adapter id {adapter_id!r}: it must match ^[A-Za-z0-9][A-Za-z0-9._-]{{0,127}}$")
    return adapter_id


class AdapterStore:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in (self.root / ".staging", self.root / ".locks"):
            with contextlib.suppress(OSError):  # a read-only store serves what it holds; writes fail then
                sub.mkdir(exist_ok=True)
        self._host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"
        self._readers: Counter[Path] = Counter()  # version folders this process is reading (not swept)
        self._readers_lock = threading.Lock()
        self._clean_staging()

    # ---- reading ---------------------------------------------------------------------------------------
    def _current_version(self, adapter_id: str) -> str | None:
        """What CURRENT says (None: no CURRENT, i.e. no adapter); damaged text comes back as it is, and
        `version_problem` names it."""
        try:
            return (self.root / adapter_id / "CURRENT").read_bytes().decode("utf-8", "replace").strip()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def get(self, adapter_id: str) -> StoredAdapter | None:
        """The adapter CURRENT names; a damaged one comes back with its `problem` (and the metadata it has)."""
        if not ADAPTER_ID_RE.fullmatch(adapter_id or ""):
            return None
        version = self._current_version(adapter_id)
        if version is None:
            return None
        adapter_dir = self.root / adapter_id
        named = VERSION_RE.fullmatch(version) is not None
        metadata = read_metadata(adapter_dir / version) if named else None
        problem = version_problem(adapter_dir, version, metadata)
        path = adapter_dir / (version if named else "damaged")
        return StoredAdapter(adapter_id, version if named else "damaged", path, metadata or {}, problem)

    def path_for(self, adapter_id: str) -> Path | None:
        """AdapterSource protocol for the engine: a damaged adapter's folder too (its load fails as unreadable,
        a server-side fault, until the store is repaired or the id overwritten)."""
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
            if not child.name.startswith(".") and child.is_dir() and ADAPTER_ID_RE.fullmatch(child.name):
                version = self._current_version(child.name)
                if version is not None:
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
        self._count_reader(stored.path, 1)
        try:
            yield stored.path
        finally:
            self._count_reader(stored.path, -1)

    def _count_reader(self, path: Path, step: int) -> None:
        with self._readers_lock:
            self._readers[path] += step
            if self._readers[path] <= 0:
                del self._readers[path]

    @contextlib.contextmanager
    def held(self, adapter_id: str) -> Iterator[StoredAdapter]:
        """The current version of `adapter_id`, looked up and held (`reading`) under the id's lock: a delete or
        overwrite racing the reader (a merge reading its sources) cannot remove it in between (AdapterMissing)."""
        try:
            lock = self._locked(adapter_id)
            lock.__enter__()
        except OSError:  # a read-only store: no writer of this process can remove anything meanwhile
            lock = contextlib.nullcontext()
        try:
            stored = self.get(adapter_id)
            if stored is None:
                raise AdapterMissing(f"adapter {adapter_id!r} not found")
            self._count_reader(stored.path, 1)
        finally:
            lock.__exit__(None, None, None)
        try:
            yield stored
        finally:
            self._count_reader(stored.path, -1)

    def sweep(self, adapter_ids: Iterable[str] | None = None) -> list[StoreFinding]:
        """Remove retired versions past the grace period (unless this process still reads them) and the debris of
        crashed writers, for every adapter (not only at the next write to the same id), or only for `adapter_ids`;
        repair or report damage. Nothing is removed from an adapter whose CURRENT does not name a complete
        version: the only readable version is never deleted. Returns what was found (the caller logs it)."""
        findings = []
        children = self.root.iterdir() if adapter_ids is None else (
            self.root / i for i in sorted(set(adapter_ids)) if ADAPTER_ID_RE.fullmatch(i))
        for child in children:
            if child.name.startswith(".") or not child.is_dir() or not ADAPTER_ID_RE.fullmatch(child.name):
                continue
            try:
                with self._locked(child.name):
                    finding = self._repair_current(child)
                    current = self._current_version(child.name)
                    if current is None:
                        self._collect_old_versions(child, keep=None)  # a deleted adapter's held leftovers
                    elif version_problem(child, current) is None:
                        self._collect_old_versions(child, keep=current)
            except OSError as exc:  # a read-only or vanishing store: nothing to sweep or repair now
                finding = self.damage(child.name)
                if finding is not None:
                    finding = StoreFinding(child.name, f"{finding.message} (not repaired: {exc.strerror})", False)
            if finding is not None:
                findings.append(finding)
        return findings

    def damage(self, adapter_id: str) -> StoreFinding | None:
        """The damage of one adapter as `get` sees it, without changing anything (None: sound or absent)."""
        stored = self.get(adapter_id)
        if stored is None or stored.problem is None:
            return None
        return StoreFinding(adapter_id, stored.problem, False)

    def _repair_current(self, adapter_dir: Path) -> StoreFinding | None:
        """(Lock held.) A CURRENT that names no complete version is pointed at the newest complete version, whose
        retired marker goes; a folder of versions with no CURRENT and no retired marker (a writer that died between
        its rename and CURRENT, or a lost CURRENT) gets one the same way. Without a complete version nothing
        changes and the damage is reported."""
        adapter_id = adapter_dir.name
        current = self._current_version(adapter_id)
        if current is None:
            unretired = [v for v in complete_versions(adapter_dir)
                         if not (adapter_dir / v / RETIRED_MARKER).exists()]
            if not unretired:
                return None  # deleted (its versions are retired) or empty
            problem, candidates = "no CURRENT beside complete versions", unretired
        else:
            problem = version_problem(adapter_dir, current)
            if problem is None:
                return None
            candidates = complete_versions(adapter_dir)
        if not candidates:
            return StoreFinding(adapter_id, f"{problem}; no complete version to repair it with", False)
        version = candidates[0]
        (adapter_dir / version / RETIRED_MARKER).unlink(missing_ok=True)
        self._point_current(adapter_dir, version)
        return StoreFinding(adapter_id, f"{problem}; CURRENT repaired to {version}, the newest complete version",
                            True)

    def _point_current(self, adapter_dir: Path, version: str) -> None:
        pointer = adapter_dir / f".CURRENT.{uuid.uuid4().hex}"
        pointer.write_text(version)
        os.replace(pointer, adapter_dir / "CURRENT")
        fsync_dir(adapter_dir)

    def _retire(self, adapter_dir: Path, version: str) -> None:
        """Mark a version retired now; a missing or damaged version folder has nothing to mark."""
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            (adapter_dir / version / RETIRED_MARKER).write_text(str(time.time()))

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
            (staged / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
            for name in (*ADAPTER_FILES, METADATA_FILE):
                with open(staged / name, "rb") as fh:
                    os.fsync(fh.fileno())
            with self._locked(adapter_id):
                previous = self._current_version(adapter_id)
                if previous is not None and not overwrite:
                    raise AdapterExists(f"adapter {adapter_id!r} already exists (use ?overwrite=true to replace it)")
                adapter_dir = self.root / adapter_id
                adapter_dir.mkdir(exist_ok=True)
                os.rename(staged, adapter_dir / version)
                self._point_current(adapter_dir, version)
                if previous is not None and VERSION_RE.fullmatch(previous):
                    self._retire(adapter_dir, previous)  # a damaged CURRENT may name a missing folder
                self._collect_old_versions(adapter_dir, keep=version)
            return StoredAdapter(adapter_id, version, adapter_dir / version, meta)
        finally:
            if staged.exists():
                shutil.rmtree(staged, ignore_errors=True)

    def delete(self, adapter_id: str) -> StoredAdapter:
        """Remove an adapter (a damaged one too). Its versions are marked retired before CURRENT goes, so a crash
        in between leaves a deleted adapter, not one `sweep` would restore; a version a reader of this process
        holds stays until the reader is done (the next sweep removes it)."""
        check_adapter_id(adapter_id)
        with self._locked(adapter_id):
            stored = self.get(adapter_id)
            if stored is None:
                raise AdapterMissing(f"adapter {adapter_id!r} not found")
            adapter_dir = self.root / adapter_id
            for child in adapter_dir.iterdir():
                if VERSION_RE.fullmatch(child.name):
                    self._retire(adapter_dir, child.name)
            os.unlink(adapter_dir / "CURRENT")
            fsync_dir(adapter_dir)
            self._collect_old_versions(adapter_dir, keep=None)
        return stored

    def _collect_old_versions(self, adapter_dir: Path, keep: str | None) -> None:
        """Remove versions other than `keep` retired longer ago than the grace period (all of them if keep is None:
        a deleted adapter), except those a reader of this process holds. Callers pass a `keep` that names a
        complete version (or None after a delete), so the only readable version is never removed here.

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
            if not read_here and (keep is None or now - retired_at > OLD_VERSION_GRACE_S):
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
