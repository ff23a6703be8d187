"""The bounded waiting queue: requests of many sequences enter whole or not at all, and a withdrawn (cancelled)
sequence stops counting against the bound at once.

Semantics:
    put_all(items)   all items enter (FIFO, in order) iff live + len(items) <= max_waiting, else QueueFull and none
    withdraw(item)   a cancelled item leaves the live queue now; `drain_withdrawn()` hands it to the engine thread,
                     which finishes it (so its handle still ends with "cancelled" on that thread)
    remove(items)    admitted or dropped items leave the queue
Any thread may call put_all/withdraw/snapshot; the engine thread calls drain_withdrawn/remove.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Generic, Iterable, TypeVar

from .errors import QueueFull

T = TypeVar("T")


class WaitingQueue(Generic[T]):
    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self._items: deque[T] = deque()
        self._withdrawn: list[T] = []
        self._lock = threading.Lock()

    def put_all(self, items: list[T]) -> None:
        with self._lock:
            if len(self._items) + len(items) > self.max_waiting:
                free = self.max_waiting - len(self._items)
                what = "request" if len(items) == 1 else f"request of {len(items)} sequences"
                raise QueueFull(f"waiting queue is full ({self.max_waiting} sequences, {free} free): the {what} "
                                f"was refused whole")
            self._items.extend(items)

    def withdraw(self, item: T) -> bool:
        """Take a cancelled item out of the live queue; False when it was not waiting (running, or gone)."""
        with self._lock:
            try:
                self._items.remove(item)
            except ValueError:
                return False
            self._withdrawn.append(item)
            return True

    def drain_withdrawn(self) -> list[T]:
        with self._lock:
            items, self._withdrawn = self._withdrawn, []
            return items

    def remove(self, items: Iterable[T]) -> None:
        ids = {id(item) for item in items}
        if ids:
            with self._lock:
                self._items = deque(item for item in self._items if id(item) not in ids)

    def snapshot(self) -> list[T]:
        """The live items, FIFO."""
        with self._lock:
            return list(self._items)

    def snapshot_all(self) -> list[T]:
        """Live and withdrawn-but-not-yet-finished items (shutdown finishes them all)."""
        with self._lock:
            return list(self._items) + list(self._withdrawn)

    def __len__(self) -> int:
        return len(self._items)
