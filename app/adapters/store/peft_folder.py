"""A read-only folder of plain PEFT saves as an adapter source (like vLLM's `--lora-modules` and its filesystem
LoRA resolver): `<root>/<id>/adapter_config.json` + `adapter_model.safetensors` (a save with `adapter_model.bin` instead is found and
refused, unopened, as its upload is), an OLoRA/PiSSA adapter with its
untrained checkpoint in `<root>/<id>/initial/` (converted with it) or without one (its init recomputed from the
served base).

Nothing here is served as it lies: `archives()` packs the folder into tar archives exactly as a client would
upload them (symbolic links become link members, which the upload path refuses; sizes are bounded by the upload
limits), and the on-demand loader (app/adapters/on_demand.py) sends them through the upload path. A version is
named by the sizes and modification times of the files, so a save rewritten in place is a new version.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import stat
import tarfile
from pathlib import Path
from typing import Iterator

from olora_core.adapter_format import ADAPTER_ID_RE, MAX_CONFIG_BYTES
from olora_core.adapter_io import MUTATED_INIT_KINDS, adapter_kind

from app.adapters.repository import Changes, RepositoryUnavailable, VersionRef
from app.adapters.store.adapter_store import AdapterMissing, StoreError, StoredAdapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"  # a save with safe_serialization=False: found, and refused as uploads are
INITIAL_DIR = "initial"


class ReadOnlyRepository(StoreError):
    """A write to a read-only source (422, as every store refusal)."""


class ReadOnlySource:
    """What every read-only adapter source answers to writes and change queries (`name` set by the subclass)."""

    writable = False
    name: str

    def put(self, adapter_id, source_dir, metadata, *, overwrite=False):
        raise ReadOnlyRepository(f"adapter source {self.name} is read-only")

    def delete(self, adapter_id):
        raise ReadOnlyRepository(f"adapter source {self.name} is read-only")

    def changes(self, cursor: object | None) -> Changes:
        """No change log: nothing is reported (on-demand loads resolve it each time)."""
        return Changes(cursor=cursor if cursor is not None else 0)


class PeftFolderRepository(ReadOnlySource):
    """An AdapterRepository over `<root>/<id>/` PEFT saves; read-only."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.name = f"peft:{self.root}"

    def folder_of(self, adapter_id: str) -> Path | None:
        if not isinstance(adapter_id, str) or not ADAPTER_ID_RE.fullmatch(adapter_id):
            return None
        return self.root / adapter_id

    def resolve(self, adapter_id: str) -> VersionRef | None:
        folder = self.folder_of(adapter_id)
        if folder is None:
            return None
        version = folder_version(folder)
        return None if version is None else VersionRef(adapter_id, version, "")

    @contextlib.contextmanager
    def local_folder(self, adapter_id: str, work: Path) -> Iterator[Path]:
        """The save's folder itself (already local: `work` is not used). Not validated: the caller sends it
        through the upload path."""
        folder = self.folder_of(adapter_id)
        if folder is None:
            raise AdapterMissing(f"adapter {adapter_id!r} not found in {self.name}")
        yield folder

    def materialize(self, ref: VersionRef) -> StoredAdapter:
        """The folder as it lies (NOT validated: serve it only through the on-demand loader)."""
        folder = self.folder_of(ref.adapter_id)
        if folder is None or folder_version(folder) != ref.version:
            raise AdapterMissing(f"adapter {ref.adapter_id!r} version {ref.version!r} not found in {self.name}")
        return StoredAdapter(ref.adapter_id, ref.version, folder, {"source": self.name})

    def list(self) -> list[VersionRef]:
        try:
            children = sorted(self.root.iterdir())
        except OSError as exc:
            raise RepositoryUnavailable(f"adapter source {self.name} cannot be read: {exc.strerror}") from None
        return [ref for ref in (self.resolve(c.name) for c in children) if ref is not None]


def folder_version(folder: Path) -> str | None:
    """A version name from (size, mtime) of the save's regular files; None when it is not a PEFT save.
    Raises RepositoryUnavailable when the folder cannot be read (a mount that went away)."""
    try:
        config, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        pickled = folder / PICKLE_WEIGHTS_FILE
        if not (_regular(config) and (_regular(weights) or _regular(pickled))):
            return None
        files = [config, weights, pickled]
        initial = folder / INITIAL_DIR
        if _regular(initial / CONFIG_FILE):
            files += [initial / CONFIG_FILE, initial / WEIGHTS_FILE]
        digest = hashlib.sha256()
        for path in files:
            st = path.lstat() if path.exists() else None
            digest.update(f"{path.name}:{st and st.st_size}:{st and st.st_mtime_ns};".encode())
        return "f" + digest.hexdigest()[:24]
    except PermissionError as exc:
        raise RepositoryUnavailable(f"adapter folder {folder} cannot be read: {exc.strerror}") from None
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
            return None
        raise RepositoryUnavailable(f"adapter folder {folder} cannot be read: {exc.strerror}") from None


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


def folder_archives(folder: Path, work: Path) -> tuple[Path, Path | None, bool]:
    """Pack a PEFT save as an upload would carry it: (adapter archive, initial archive or None, recompute_init).

    Every entry of the folder (but `initial/`) goes into the adapter archive as it is (links stay links: the
    upload path refuses them). recompute_init is true for an OLoRA/PiSSA save without `initial/`."""
    trained = work / "trained.tar"
    with tarfile.open(trained, "w") as tar:
        for child in sorted(folder.iterdir()):
            if child.name != INITIAL_DIR:
                tar.add(child, arcname=child.name, recursive=True)
    initial_dir = folder / INITIAL_DIR
    initial = None
    if initial_dir.is_dir() and not initial_dir.is_symlink():
        initial = work / "initial.tar"
        with tarfile.open(initial, "w") as tar:
            for child in sorted(initial_dir.iterdir()):
                tar.add(child, arcname=child.name, recursive=True)
    recompute = initial is None and _declared_kind(folder / CONFIG_FILE) in MUTATED_INIT_KINDS
    return trained, initial, recompute


def _declared_kind(config_path: Path) -> str:
    """The kind the config declares (bounded read; an unreadable config is left to the upload path's refusal)."""
    try:
        if config_path.lstat().st_size > MAX_CONFIG_BYTES:
            return "lora"
        config = json.loads(config_path.read_text())
        return adapter_kind(config) if isinstance(config, dict) else "lora"
    except (OSError, ValueError, RecursionError):  # RecursionError: a config nested too deep for json
        return "lora"
