import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from app.adapters.store.archive import ArchiveError, ArchiveLimits, extract_archive


def _adapter_files(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (d / "adapter_model.safetensors").write_bytes(b"x" * 100)
    return d


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(name: str, data: bytes = b"", type_=tarfile.REGTYPE, linkname: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.size = len(data) if type_ == tarfile.REGTYPE else 0
    info.linkname = linkname
    return info, (data if type_ == tarfile.REGTYPE else None)


def test_tgz_with_top_level_folder(tmp_path):
    src = _adapter_files(tmp_path / "src" / "my-adapter")
    archive = tmp_path / "a.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="my-adapter")
    dest = tmp_path / "out"
    dest.mkdir()
    root = extract_archive(archive, dest)
    assert root == dest / "my-adapter"
    assert (root / "adapter_model.safetensors").read_bytes() == b"x" * 100


def test_zip_at_root(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("adapter_config.json", "{}")
        zf.writestr("adapter_model.safetensors", b"abc")
    dest = tmp_path / "out"
    dest.mkdir()
    assert extract_archive(archive, dest) == dest


@pytest.mark.parametrize("member", [
    _info("/etc/passwd", b"x"),
    _info("../evil", b"x"),
    _info("a/../../evil", b"x"),
    _info("link", type_=tarfile.SYMTYPE, linkname="/etc/passwd"),
    _info("hard", type_=tarfile.LNKTYPE, linkname="adapter_config.json"),
    _info("dev", type_=tarfile.CHRTYPE),
    _info("fifo", type_=tarfile.FIFOTYPE),
])
def test_tar_refuses_escaping_or_special_members(tmp_path, member):
    archive = _tar(tmp_path / "a.tgz", [_info("adapter_config.json", b"{}"), member])
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(ArchiveError):
        extract_archive(archive, dest)
    assert list(dest.iterdir()) == []  # nothing half-written
    assert not (tmp_path / "evil").exists()


def test_zip_refuses_traversal_and_symlink(tmp_path):
    for name, attr in (("../evil", 0o100644), ("link", 0o120777)):
        archive = tmp_path / f"{name.strip('./')}.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("adapter_config.json", "{}")
            info = zipfile.ZipInfo(name)
            info.external_attr = attr << 16
            zf.writestr(info, "/etc/passwd")
        dest = tmp_path / f"out-{archive.stem}"
        dest.mkdir()
        with pytest.raises(ArchiveError):
            extract_archive(archive, dest)
        assert list(dest.iterdir()) == []


def test_zip_bomb_is_refused_by_unpacked_size(tmp_path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("adapter_config.json", "{}")
        zf.writestr("adapter_model.safetensors", b"\0" * (8 * 1024 * 1024))
    assert archive.stat().st_size < 100_000
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(ArchiveError) as err:
        extract_archive(archive, dest, ArchiveLimits(max_unpacked_bytes=1024 * 1024))
    assert err.value.status_code == 413
    assert list(dest.iterdir()) == []


def test_tar_bomb_is_refused_by_unpacked_size(tmp_path):
    archive = _tar(tmp_path / "bomb.tgz", [_info("adapter_config.json", b"{}"),
                                           _info("adapter_model.safetensors", b"\0" * (4 * 1024 * 1024))])
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(ArchiveError) as err:
        extract_archive(archive, dest, ArchiveLimits(max_unpacked_bytes=1024 * 1024))
    assert err.value.status_code == 413


def test_compressed_size_limit_and_not_an_archive(tmp_path):
    junk = tmp_path / "junk.tgz"
    junk.write_bytes(b"this is not an archive at all")
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(ArchiveError, match="not a"):
        extract_archive(junk, dest)
    with pytest.raises(ArchiveError) as err:
        extract_archive(junk, dest, ArchiveLimits(max_compressed_bytes=10))
    assert err.value.status_code == 413


def test_archive_without_adapter_config(tmp_path):
    archive = _tar(tmp_path / "a.tgz", [_info("readme.txt", b"hi")])
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(ArchiveError, match="adapter_config.json"):
        extract_archive(archive, dest)
