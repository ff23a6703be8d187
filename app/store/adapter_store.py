"""Persistent adapter store: one folder per adapter, atomic writes, safe across processes sharing the directory.

Layout (all names chosen by the server, never by a client):

    <root>/<adapter_id>/CURRENT          -> text: name of the live version folder
    <root>/<adapter_id>/<version>/       -> adapter_config.json, adapter_model.safetensors, metadata.json
    <root>/.staging/<uuid>/              -> versions being written (same filesystem, so rename is atomic)
    <root>/.locks/<adapter_id>.lock      -> fcntl lock serialising writers of one id across processes

A version folder is complete before CURRENT names it (CURRENT is replaced with os.replace), so a reader sees
either the old adapter or the new one, never a torn one. Old versions are removed after a grace period so
a replica still reading them is not cut off.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from olora_core.adapter_format import ADAPTER_ID_RE
from olora_core.adapter_io import fsync_dir
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
OLD_VERSION_GRACE_S = 60.0
RETIRED_MARKER = ".retired"


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

    def version_of(self, adapter_id: str) -> str | None:
        return self._current_version(adapter_id) if ADAPTER_ID_RE.fullmatch(adapter_id or "") else None

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
        with open(self.root / ".locks" / f"{adapter_id}.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def staging_dir(self) -> Path:
        """A fresh private directory on the store's filesystem for building a version."""
        path = self.root / ".staging" / uuid.uuid4().hex
        path.mkdir()
        return path

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
            if keep is None or now - retired_at > OLD_VERSION_GRACE_S:
                shutil.rmtree(child, ignore_errors=True)
        if keep is None and not any(adapter_dir.iterdir()):
            with contextlib.suppress(OSError):
                adapter_dir.rmdir()
