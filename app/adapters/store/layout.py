"""Names and small readers of the adapter store's on-disk layout (app/adapters/store/adapter_store.py)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
METADATA_FILE = "metadata.json"
VERSION_RE = re.compile(r"v([0-9a-f]{1,20})-[0-9a-f]{8}")  # `put`'s version names: v<time_ns hex>-<8 hex>


@dataclass(frozen=True)
class StoreFinding:
    """An inconsistency `sweep` found in one adapter's folder: repaired (CURRENT re-pointed) or left as damage."""

    adapter_id: str
    message: str
    repaired: bool


def read_metadata(version_dir: Path) -> dict[str, Any] | None:
    """A version's metadata.json as a dict, or None when it is missing, unreadable or not a JSON object."""
    try:
        metadata = json.loads((version_dir / METADATA_FILE).read_bytes())
    except (OSError, ValueError):  # ValueError: JSON and UTF-8 decoding errors
        return None
    return metadata if isinstance(metadata, dict) else None


_UNREAD = object()


def version_problem(adapter_dir: Path, version: str, metadata: object = _UNREAD) -> str | None:
    """Why the version folder `version` (as CURRENT names it) cannot be served, or None when it is complete
    (`metadata`: its metadata.json as `read_metadata` returned it, when the caller has read it already)."""
    if not VERSION_RE.fullmatch(version):
        return f"CURRENT names no version ({version[:40]!r})"
    path = adapter_dir / version
    if not path.is_dir():
        return f"version {version} named by CURRENT is missing"
    for name in (*ADAPTER_FILES, METADATA_FILE):
        if not (path / name).is_file():
            return f"{name} of version {version} is missing"
    if (read_metadata(path) if metadata is _UNREAD else metadata) is None:
        return f"{METADATA_FILE} of version {version} is not a JSON object"
    return None


def complete_versions(adapter_dir: Path) -> list[str]:
    """The complete version folders of an adapter, newest first (`put`'s names carry their time)."""
    try:
        names = [c.name for c in adapter_dir.iterdir() if c.is_dir() and VERSION_RE.fullmatch(c.name)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    names.sort(key=lambda n: int(VERSION_RE.fullmatch(n)[1], 16), reverse=True)
    return [n for n in names if version_problem(adapter_dir, n) is None]
