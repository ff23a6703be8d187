"""A bucket prefix of plain PEFT saves as an adapter source: app/adapters/store/peft_folder.py's folder, in an
S3-compatible object store. `s3://<bucket>/<prefix>/<id>/adapter_config.json` + `adapter_model.safetensors`, an
OLoRA/PiSSA adapter with its untrained checkpoint under `<id>/initial/` (converted with it) or without one (its
init recomputed from the served base); read-only.

Nothing here is served as it lies: `local_folder(id)` downloads the save's objects into a private folder (its
keys checked first: a key with an empty, `.` or `..` part, more objects or more bytes than an upload may unpack
are refused as the upload's archive checks refuse them, before anything is downloaded), and the on-demand loader
(app/adapters/on_demand.py) packs that folder and sends it through the upload path, exactly as for a folder on
disk. A version is named by the keys, sizes and ETags of the save's objects (one listing), so a save rewritten
in place is a new version.
"""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path, PurePosixPath
from typing import Iterator
from urllib.parse import urlsplit

from olora_core.adapter_format import ADAPTER_ID_RE

from app.adapters.repository import RepositoryUnavailable, VersionRef
from app.adapters.store.adapter_store import AdapterMissing, StoredAdapter
from app.adapters.store.archive import ArchiveError, ArchiveLimits
from app.adapters.store.peft_folder import CONFIG_FILE, PICKLE_WEIGHTS_FILE, WEIGHTS_FILE, ReadOnlySource
from app.adapters.store.s3_client import error_code, make_client, talking


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, prefix without surrounding slashes) of `s3://bucket/prefix`; ValueError otherwise."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"not an s3://bucket/prefix URI: {uri!r}")
    return parts.netloc, parts.path.strip("/")


class S3PeftFolderRepository(ReadOnlySource):
    """An AdapterRepository over `s3://<bucket>/<prefix>/<id>/` PEFT saves; read-only."""

    def __init__(self, uri: str, *, endpoint_url: str | None = None, timeout_s: float = 10.0,
                 limits: ArchiveLimits | None = None):
        self.bucket, prefix = parse_s3_uri(uri)
        self.prefix = prefix + "/" if prefix else ""
        self.name = f"s3://{self.bucket}/{self.prefix}"
        self.limits = limits or ArchiveLimits()
        self._s3 = make_client(endpoint_url, timeout_s)

    def id_of_uri(self, uri: str) -> str | None:
        """The id `s3://<bucket>/<prefix>/<id>` names when it lies directly inside this source, else None."""
        try:
            bucket, key = parse_s3_uri(uri)
        except ValueError:
            return None
        if bucket != self.bucket or not (key + "/").startswith(self.prefix):
            return None
        rest = key[len(self.prefix):]
        return rest if ADAPTER_ID_RE.fullmatch(rest) else None

    def _objects(self, adapter_id: str) -> list[dict]:
        """Every object under `<prefix>/<id>/` (one listing; RepositoryUnavailable/Timeout when unreachable)."""
        from botocore.exceptions import ClientError

        what = f"adapter {adapter_id!r}"
        objects = []
        try:
            with talking(self.name, what):
                pages = self._s3.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=f"{self.prefix}{adapter_id}/")
                for page in pages:
                    objects += page.get("Contents", [])
                    if len(objects) > self.limits.max_members:
                        break
        except ClientError as exc:
            raise RepositoryUnavailable(f"{what}: {self.name} answered {error_code(exc)}") from None
        return objects

    def resolve(self, adapter_id: str) -> VersionRef | None:
        if not isinstance(adapter_id, str) or not ADAPTER_ID_RE.fullmatch(adapter_id):
            return None
        objects = self._objects(adapter_id)
        names = {obj["Key"][len(self.prefix) + len(adapter_id) + 1:] for obj in objects}
        if CONFIG_FILE not in names or not names & {WEIGHTS_FILE, PICKLE_WEIGHTS_FILE}:
            return None
        digest = hashlib.sha256()
        for obj in sorted(objects, key=lambda o: o["Key"]):
            digest.update(f"{obj['Key']}:{obj['Size']}:{obj.get('ETag', '')};".encode())
        return VersionRef(adapter_id, "o" + digest.hexdigest()[:24], "")

    def materialize(self, ref: VersionRef) -> StoredAdapter:
        raise AdapterMissing(f"adapter {ref.adapter_id!r}: {self.name} is a source, served through the on-demand "
                             "loader only")

    def localize(self, stored: StoredAdapter) -> StoredAdapter:
        return stored

    @contextlib.contextmanager
    def local_folder(self, adapter_id: str, work: Path) -> Iterator[Path]:
        """The save's objects downloaded into `work/<id>/` (a private folder the caller removes; not validated:
        the caller sends it through the upload path)."""
        objects = self._objects(adapter_id)
        base = f"{self.prefix}{adapter_id}/"
        if len(objects) > self.limits.max_members:
            raise ArchiveError(f"archive has more than {self.limits.max_members} members", status_code=413)
        if sum(int(o["Size"]) for o in objects) > self.limits.max_unpacked_bytes:
            raise ArchiveError(f"archive unpacks to more than {self.limits.max_unpacked_bytes} bytes",
                               status_code=413)
        relative = []
        for obj in objects:
            rest = obj["Key"][len(base):]
            parts = rest.split("/")
            if rest.endswith("/") and int(obj["Size"]) == 0:  # a "folder" marker object
                continue
            if any(part in ("", ".", "..") or "\x00" in part for part in parts):
                raise ArchiveError(f"archive member path is not a plain relative path: {rest[:120]!r}")
            relative.append((obj["Key"], PurePosixPath(*parts)))
        folder = Path(work) / adapter_id
        folder.mkdir(parents=True)
        for key, rel in relative:
            target = folder.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with talking(self.name, f"adapter {adapter_id!r}"):
                    self._s3.download_file(self.bucket, key, str(target))
            except Exception as exc:
                if error_code(exc) in ("NoSuchKey", "404"):  # removed after the listing: the save is changing
                    raise RepositoryUnavailable(f"adapter {adapter_id!r}: object {rel} vanished from "
                                                f"{self.name} while being read") from None
                raise
        yield folder

    def list(self) -> list[VersionRef]:
        ids = set()
        with talking(self.name, "listing adapters"):
            pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix,
                                                                       Delimiter="/")
            for page in pages:
                for common in page.get("CommonPrefixes", []):
                    ids.add(common["Prefix"][len(self.prefix):].rstrip("/"))
        return [ref for ref in (self.resolve(i) for i in sorted(ids)) if ref is not None]
