"""Versions of a bucket that no CURRENT points at any more, removed once nobody can still be reading them.

Semantics (S3Repository.sweep): a version object under `<id>/versions/<version>/` is removed when the id's CURRENT
names another version (or the id was deleted) and the object was last written more than RETIRED_GRACE_S ago, by
the bucket's clock. The grace covers a replica that resolved the old version just before the switch and is still
downloading it (a download takes seconds), a writer between its version upload and its CURRENT switch, and the
replicas' clock skew against the bucket's. Periodic sweeps look only at the ids the change objects named since
the last sweep and those with retired objects still inside their grace; a full sweep lists the whole prefix.
Every replica sweeps: the deletes are idempotent.
"""
from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timezone
from typing import Callable, ContextManager

from app.adapters.repository import Changes
from app.adapters.store.adapter_store import OLD_VERSION_GRACE_S

RETIRED_GRACE_S = OLD_VERSION_GRACE_S + 30.0  # the local store's grace plus CLOCK_SKEW_S


class RetiredVersions:
    def __init__(self, client, bucket: str, prefix: str, live_version: Callable[[str], str | None],
                 changes: Callable[[object | None], Changes], talking: Callable[[str], ContextManager]):
        """`prefix`: the repository's key prefix ("" or ending in "/"); `live_version(id)`: what its CURRENT names
        (None: deleted); `changes`: S3Repository.changes; `talking(what)`: maps the client's errors."""
        self.client, self.bucket, self.prefix = client, bucket, prefix
        self.live_version, self.changes, self.talking = live_version, changes, talking
        self._cursor: object | None = None
        self._pending: set[str] = set()  # ids with retired objects still inside their grace

    def sweep(self, full: bool = False) -> int:
        """Remove retired version objects; returns how many objects were removed."""
        changes = self.changes(self._cursor)
        self._cursor = changes.cursor
        if full or changes.resync:
            listed = self._listed(self.prefix)
        else:
            listed = {}
            for adapter_id in sorted(self._pending | changes.adapter_ids):
                listed.update(self._listed(f"{self.prefix}{adapter_id}/versions/"))
        removed, self._pending = self._collect(listed)
        return removed

    def _listed(self, prefix: str) -> dict[str, list[dict]]:
        """id -> its version objects under `prefix` (keys `<prefix of the repo><id>/versions/<version>/<file>`)."""
        found = defaultdict(list)
        with self.talking("sweeping retired versions"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    parts = obj["Key"][len(self.prefix):].split("/")
                    if len(parts) == 4 and parts[1] == "versions":
                        found[parts[0]].append(obj)
        return found

    def _collect(self, listed: dict[str, list[dict]]) -> tuple[int, set[str]]:
        """Removes what is retired and past its grace; returns (objects removed, ids with retired objects still
        inside it: looked at again by the next periodic sweep)."""
        removed, pending = 0, set()
        cutoff = datetime.now(timezone.utc).timestamp() - RETIRED_GRACE_S
        for adapter_id, objects in listed.items():
            live = self.live_version(adapter_id)
            retired = [o for o in objects if o["Key"].split("/")[-2] != live]
            old = [{"Key": o["Key"]} for o in retired if o["LastModified"].timestamp() < cutoff]
            if len(old) < len(retired):
                pending.add(adapter_id)
            for start in range(0, len(old), 1000):  # DeleteObjects takes at most 1,000 keys
                with self.talking(f"adapter {adapter_id!r}"):
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": old[start:start + 1000],
                                                                           "Quiet": True})
            removed += len(old)
        return removed, pending
