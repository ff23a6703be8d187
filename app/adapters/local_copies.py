"""Local copies of adapter versions on this machine's disk, bounded in bytes; the least recently used goes first.

    add(key, path)   a copy now on disk (the most recently used); copies past the bound are evicted at once
    touch(key)       a request used it (moves it to the most recently used end); False when it is not held
    hold(key)        while a reader (a merge, a streamed download) reads its files, it is never evicted
    forget(key)      it went away by other means (a delete)

Semantics: after every `add` the bytes of the copies held here are at most `max_bytes`, except for copies that
are in use: held (`hold`), being read into host memory by the engine (`in_use()`: the paths of its queued and
loading adapters), or the one just added (a single copy larger than the bound is kept while it is the newest).
A copy the engine already has in host memory may be evicted: the engine reads a version's files once, so that
only costs a new fetch on a later request that finds it gone (`touch` is False: the owner fetches it again).
`remove(key, path)` deletes an evicted copy; it is called without this object's lock held.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Hashable, Iterator

log = logging.getLogger("olora.adapters")

DEFAULT_MAX_BYTES = 10 << 30  # 10 GiB: ~200 rank-16 adapters of an 8B model (~50 MB each)


def folder_bytes(path: Path) -> int:
    """Bytes of the regular files under `path` (0 when it is gone)."""
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


@dataclass
class _Copy:
    path: Path
    size: int
    holds: int = 0  # readers holding it now


class LocalCopies:
    def __init__(self, max_bytes: int, remove: Callable[[Hashable, Path], None],
                 in_use: Callable[[], Collection[str]] | None = None):
        self.max_bytes = max_bytes
        self.remove = remove
        self.in_use = in_use  # -> paths (str) the engine is reading now; set once the engine exists
        self._copies: OrderedDict[Hashable, _Copy] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.evictions = 0

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(c.size for c in self._copies.values())

    def keys(self) -> list[Hashable]:
        """Least recently used first."""
        with self._lock:
            return list(self._copies)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._copies

    def add(self, key: Hashable, path: Path, size: int | None = None) -> list[Hashable]:
        """Record a copy (most recently used); returns the keys evicted to stay within the bound."""
        size = folder_bytes(path) if size is None else size
        with self._lock:
            copy = self._copies.get(key)
            if copy is None:
                self._copies[key] = _Copy(Path(path), size)
            else:
                copy.path, copy.size = Path(path), size
            self._copies.move_to_end(key)
        return self.evict(keep=key)

    def touch(self, key: Hashable) -> bool:
        with self._lock:
            if key not in self._copies:
                return False
            self._copies.move_to_end(key)
            return True

    def forget(self, key: Hashable) -> None:
        with self._lock:
            self._copies.pop(key, None)

    @contextlib.contextmanager
    def hold(self, key: Hashable) -> Iterator[bool]:
        """Keep `key` from eviction while the block runs; yields False when it is not here (nothing held)."""
        with self._lock:
            copy = self._copies.get(key)
            if copy is not None:
                copy.holds += 1
                self._copies.move_to_end(key)
        try:
            yield copy is not None
        finally:
            if copy is not None:
                with self._lock:
                    copy.holds -= 1

    def evict(self, keep: Hashable | None = None) -> list[Hashable]:
        """Remove least recently used copies until the bound holds (copies in use are skipped)."""
        busy = set(self.in_use() if self.in_use is not None else ())
        victims: list[tuple[Hashable, Path]] = []
        with self._lock:
            total = sum(c.size for c in self._copies.values())
            for key, copy in list(self._copies.items()):
                if total <= self.max_bytes:
                    break
                if key == keep or copy.holds or str(copy.path) in busy:
                    continue
                del self._copies[key]
                total -= copy.size
                victims.append((key, copy.path))
            self.evictions += len(victims)
        for key, path in victims:
            try:
                self.remove(key, path)
            except Exception as exc:  # no longer counted: the bound holds for what this process can remove
                log.warning("adapter cache: could not remove %s: %s", path, exc)
        return [key for key, _ in victims]
