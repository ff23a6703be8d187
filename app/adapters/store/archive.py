"""Safe extraction of uploaded adapter archives (.tar.gz/.tgz/.tar/.zip).

Nothing in an archive is trusted: member names are checked before anything is written (no absolute paths,
no `..`, no links, devices or fifos, at most MAX_DEPTH components of at most MAX_COMPONENT_CHARS characters, no
member twice — `./x` and `x` are the same member — and no file where a folder is: `a` and `a/b`), sizes are
bounded both compressed and uncompressed (zip bombs), a `.json` member (the config) at MAX_CONFIG_BYTES while it
is extracted, the number of members is bounded, and extraction writes only regular files into a fresh directory
that the caller owns. A truncated or corrupt stream is a 422, never a 500. Weights are never opened here; pickle
refusal happens when the adapter is read. `tar czf a.tgz -C dir .` (a `.` member) is accepted.
"""
from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from olora_core.adapter_format import MAX_CONFIG_BYTES, short

MAX_DEPTH = 16  # path components of a member
MAX_COMPONENT_CHARS = 255  # NAME_MAX of common filesystems
# what a damaged stream raises inside tarfile/zipfile/gzip/zlib while members are read
CORRUPT_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError, RuntimeError, ValueError)


class ArchiveError(ValueError):
    """The uploaded archive is unusable; the message says why (becomes a 4xx)."""

    def __init__(self, message: str, status_code: int = 422):
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class ArchiveLimits:
    max_compressed_bytes: int = 512 * 1024 * 1024
    max_unpacked_bytes: int = 2 * 1024 * 1024 * 1024
    max_members: int = 256


def _safe_member_path(name: str, is_dir: bool = False) -> PurePosixPath | None:
    """Return the member's relative path (None for the root folder `.` itself), or raise if it could escape the
    extraction directory or cannot be created."""
    if not name or "\x00" in name:
        raise ArchiveError(f"archive member with an empty or NUL-containing name: {short(name)}")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"archive member has an absolute path: {short(name)}")
    path = PurePosixPath(name.replace("\\", "/"))
    if any(part == ".." for part in path.parts):
        raise ArchiveError(f"archive member path contains '..': {short(name)}")
    parts = [p for p in path.parts if p not in ("", ".")]
    if not parts:
        if is_dir:
            return None  # `tar czf a.tgz -C dir .` writes the root folder as `./`
        raise ArchiveError(f"archive member has no usable name: {short(name)}")
    if len(parts) > MAX_DEPTH:
        raise ArchiveError(f"archive member {short(name)} is {len(parts)} folders deep (at most {MAX_DEPTH})")
    if any(len(p) > MAX_COMPONENT_CHARS for p in parts):
        raise ArchiveError(f"archive member {short(name)} has a name part over {MAX_COMPONENT_CHARS} characters")
    return PurePosixPath(*parts)


class _Members:
    """The paths extracted so far: refuses a member twice and a file where a folder is (or the reverse)."""

    def __init__(self):
        self.kinds: dict[PurePosixPath, str] = {}

    def add(self, rel: PurePosixPath, kind: str, name: str) -> None:
        for parent in rel.parents:
            if self.kinds.get(parent) == "file":
                raise ArchiveError(f"archive member {short(name)} is inside {str(parent)!r}, which is a file")
        seen = self.kinds.get(rel)
        if seen == "file" or (seen is not None and seen != kind):
            raise ArchiveError(f"archive has {str(rel)!r} twice (or as a file and a folder); refused as ambiguous")
        self.kinds[rel] = kind
        for parent in rel.parents:
            self.kinds.setdefault(parent, "dir")


def _member_limit(rel: PurePosixPath, limits: "ArchiveLimits") -> int:
    return MAX_CONFIG_BYTES if rel.suffix == ".json" else limits.max_unpacked_bytes


def _copy_bounded(src, dst_path: Path, budget: list[int], limit: int, member_limit: int) -> None:
    written = 0
    with open(dst_path, "xb") as dst:
        while True:
            chunk = src.read(1 << 20)
            if not chunk:
                return
            budget[0] += len(chunk)
            written += len(chunk)
            if budget[0] > limit:
                raise ArchiveError(f"archive unpacks to more than {limit} bytes", status_code=413)
            if written > member_limit:
                raise ArchiveError(f"archive member {dst_path.name!r} is larger than {member_limit} bytes",
                                   status_code=413)
            dst.write(chunk)


def _extract_tar(archive: Path, dest: Path, limits: ArchiveLimits) -> None:
    try:
        tar = tarfile.open(archive, mode="r:*")
    except (tarfile.TarError, OSError) as exc:
        raise ArchiveError(f"not a readable tar archive ({type(exc).__name__})") from None
    unpacked, members = [0], _Members()
    with tar:
        count = 0
        for member in tar:
            count += 1
            if count > limits.max_members:
                raise ArchiveError(f"archive has more than {limits.max_members} members", status_code=413)
            rel = _safe_member_path(member.name, member.isdir())
            if rel is None:
                continue
            if member.isdir():
                members.add(rel, "dir", member.name)
                (dest / rel).mkdir(parents=True, exist_ok=True)
                continue
            if not member.isreg():
                kind = "link" if (member.issym() or member.islnk()) else "special file"
                raise ArchiveError(f"archive member {short(member.name)} is a {kind}; only regular files are accepted")
            if member.size > _member_limit(rel, limits):
                raise ArchiveError(f"archive member {short(member.name)} is too large", status_code=413)
            members.add(rel, "file", member.name)
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            if src is None:
                raise ArchiveError(f"archive member {short(member.name)} cannot be read")
            with src:
                _copy_bounded(src, target, unpacked, limits.max_unpacked_bytes, _member_limit(rel, limits))


def _extract_zip(archive: Path, dest: Path, limits: ArchiveLimits) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(f"not a readable zip archive ({type(exc).__name__})") from None
    unpacked, members = [0], _Members()
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            raise ArchiveError(f"archive has more than {limits.max_members} members", status_code=413)
        declared = sum(i.file_size for i in infos)
        if declared > limits.max_unpacked_bytes:
            raise ArchiveError(f"archive unpacks to more than {limits.max_unpacked_bytes} bytes", status_code=413)
        for info in infos:
            rel = _safe_member_path(info.filename, info.is_dir())
            if rel is None:
                continue
            file_type = stat.S_IFMT(info.external_attr >> 16)  # 0 when the creator stored no Unix mode
            if file_type and file_type not in (stat.S_IFREG, stat.S_IFDIR):
                raise ArchiveError(f"archive member {short(info.filename)} is a link or special file")
            if info.is_dir():
                members.add(rel, "dir", info.filename)
                (dest / rel).mkdir(parents=True, exist_ok=True)
                continue
            if info.file_size > _member_limit(rel, limits):
                raise ArchiveError(f"archive member {short(info.filename)} is too large", status_code=413)
            members.add(rel, "file", info.filename)
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src:  # actual bytes are counted too: declared sizes can lie
                    _copy_bounded(src, target, unpacked, limits.max_unpacked_bytes, _member_limit(rel, limits))
            except (zipfile.BadZipFile, RuntimeError, NotImplementedError) as exc:
                raise ArchiveError(f"cannot read archive member {short(info.filename)}: "
                                   f"{short(str(exc), 80)}") from None


def extract_archive(archive: Path, dest: Path, limits: ArchiveLimits = ArchiveLimits()) -> Path:
    """Extract `archive` into the empty directory `dest`; return the directory holding adapter_config.json.

    The adapter may sit at the archive's root or inside exactly one top-level folder (what `tar czf x.tgz dir/`
    writes). Raises ArchiveError (with a 4xx status code) and leaves `dest` empty on any problem.
    """
    size = archive.stat().st_size
    if size > limits.max_compressed_bytes:
        raise ArchiveError(f"archive is {size} bytes, over the limit of {limits.max_compressed_bytes}", 413)
    with open(archive, "rb") as fh:
        magic = fh.read(4)
    try:
        try:
            if magic.startswith(b"PK"):
                _extract_zip(archive, dest, limits)
            elif magic.startswith(b"\x1f\x8b") or tarfile.is_tarfile(archive):
                _extract_tar(archive, dest, limits)
            else:
                raise ArchiveError("upload is not a .tar.gz/.tgz/.tar or .zip archive")
        except ArchiveError:
            raise
        except CORRUPT_ERRORS as exc:  # a truncated gzip, half a tar, a damaged zip
            if isinstance(exc, OSError) and exc.errno is not None:
                raise  # ENOSPC, EROFS...: the server's problem, not the archive's
            raise ArchiveError(f"archive is truncated or corrupt ({type(exc).__name__})") from None
        return find_adapter_root(dest)
    except BaseException:
        for child in dest.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise


def find_adapter_root(dest: Path) -> Path:
    if (dest / "adapter_config.json").is_file():
        return dest
    children = [c for c in dest.iterdir() if not c.name.startswith(("__MACOSX", "."))]
    if len(children) == 1 and children[0].is_dir() and (children[0] / "adapter_config.json").is_file():
        return children[0]
    raise ArchiveError("archive holds no adapter_config.json (at its root or in a single top-level folder)")
