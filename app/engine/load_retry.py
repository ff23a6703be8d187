"""Retrying a failed read of an adapter's files (app/engine/adapter_cache.py): with a doubling backoff, and at once
when the files change (an operator restored them, a replica rewrote them)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .errors import AdapterUnavailable

RETRY_FIRST_S = 1.0  # backoff of a failed read: 1 s, 2 s, 4 s ... at most RETRY_MAX_S
RETRY_MAX_S = 60.0


def files_stamp(path: str) -> tuple:
    """(name, size, mtime) of the files of an adapter folder: a failed read is retried at once when it changes."""
    try:
        return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(path).iterdir()))
    except OSError:
        return ()


@dataclass
class LoadRetry:
    """A failed read of an adapter's files: tried again after `due` (monotonic), or when the files change."""

    failures: int
    due: float
    stamp: tuple

    def ready(self, path: str) -> bool:
        return time.monotonic() >= self.due or files_stamp(path) != self.stamp


def unavailable(adapter_id: str, path: str, cause: object, previous: LoadRetry | None
                ) -> tuple[AdapterUnavailable, LoadRetry]:
    """A read failure of registered files as the client sees it (503) and when to try again (`previous`: the
    retry this load was, if any: the backoff doubles)."""
    failures = (previous.failures if previous is not None else 0) + 1
    delay = min(RETRY_FIRST_S * 2 ** (failures - 1), RETRY_MAX_S)
    error = AdapterUnavailable(f"adapter {adapter_id!r} cannot be read now ({cause}); retried in {delay:g} s")
    return error, LoadRetry(failures, time.monotonic() + delay, files_stamp(path))
