"""Safe extraction of uploaded adapter archives (.tar.gz/.tgz/.tar/.zip).

Nothing in an archive is trusted: member names are checked before anything is written (no absolute paths,
no `..`, no links, devices or fifos), sizes are bounded both compressed and uncompressed (zip bombs), the
number of members is bounded, and extraction writes only regular files into a fresh directory that the
caller owns. Weights are never opened here; pickle refusal happens when the adapter is read.
"""
from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath


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


def _safe_member_path(name: str) -> PurePosixPath:
    """Return the member's relative path, or raise if it could escape the extraction directory."""
    if not name or "\x00" in name:
        raise ArchiveError(f"archive member with an empty or NUL-containing name: {name!r}")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"archive member has an absolute path: {name!r}")
    path = PurePosixPath(name.replace("\\", "/"))
    if any(part == ".." for part in path.parts):
        raise ArchiveError(f"archive member path contains '..': {name!r}")
    parts = [p for p in path.parts if p not in ("", ".")]
    if not parts:
        raise ArchiveError(f"archive member has no usable name: {name!r}")
    return PurePosixPath(*parts)


def _copy_bounded(src, dst_path: Path, budget: list[int], limit: int) -> None:
    with open(dst_path, "xb") as dst:
        while True:
            chunk = src.read(1 << 20)
            if not chunk:
                return
            budget[0] += len(chunk)
            if budget[0] > limit:
                raise ArchiveError(f"archive unpacks to more than {limit} bytes", status_code=413)
            dst.write(chunk)


def _extract_tar(archive: Path, dest: Path, limits: ArchiveLimits) -> None:
    try:
        tar = tarfile.open(archive, mode="r:*")
    except (tarfile.TarError, OSError) as exc:
        raise ArchiveError(f"not a readable tar archive: {exc}") from None
    unpacked = [0]
    with tar:
        count = 0
        for member in tar:
            count += 1
            if count > limits.max_members:
                raise ArchiveError(f"archive has more than {limits.max_members} members", status_code=413)
            rel = _safe_member_path(member.name)
            if member.isdir():
                (dest / rel).mkdir(parents=True, exist_ok=True)
                continue
            if not member.isreg():
                kind = "link" if (member.issym() or member.islnk()) else "special file"
                raise ArchiveError(f"archive member {member.name!r} is a {kind}; only regular files are accepted")
            if member.size > limits.max_unpacked_bytes:
                raise ArchiveError(f"archive member {member.name!r} is too large", status_code=413)
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            if src is None:
                raise ArchiveError(f"archive member {member.name!r} cannot be read")
            with src:
                _copy_bounded(src, target, unpacked, limits.max_unpacked_bytes)


def _extract_zip(archive: Path, dest: Path, limits: ArchiveLimits) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(f"not a readable zip archive: {exc}") from None
    unpacked = [0]
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            raise ArchiveError(f"archive has more than {limits.max_members} members", status_code=413)
        declared = sum(i.file_size for i in infos)
        if declared > limits.max_unpacked_bytes:
            raise ArchiveError(f"archive unpacks to more than {limits.max_unpacked_bytes} bytes", status_code=413)
        for info in infos:
            rel = _safe_member_path(info.filename)
            file_type = stat.S_IFMT(info.external_attr >> 16)  # 0 when the creator stored no Unix mode
            if file_type and file_type not in (stat.S_IFREG, stat.S_IFDIR):
                raise ArchiveError(f"archive member {info.filename!r} is a link or special file")
            if info.is_dir():
                (dest / rel).mkdir(parents=True, exist_ok=True)
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src:  # actual bytes are counted too: declared sizes can lie
                    _copy_bounded(src, target, unpacked, limits.max_unpacked_bytes)
            except (zipfile.BadZipFile, RuntimeError, NotImplementedError) as exc:
                raise ArchiveError(f"cannot read archive member {info.filename!r}: {exc}") from None


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
        if magic.startswith(b"PK"):
            _extract_zip(archive, dest, limits)
        elif magic.startswith(b"\x1f\x8b") or tarfile.is_tarfile(archive):
            _extract_tar(archive, dest, limits)
        else:
            raise ArchiveError("upload is not a .tar.gz/.tgz/.tar or .zip archive")
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
