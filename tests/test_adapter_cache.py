"""The byte-bounded LRU of adapters fetched on demand (app/adapters/local_copies.py): the bound holds after many
loads, least recently used goes first, copies in use survive, an evicted adapter is fetched again on its next
request. Object store: moto's S3-protocol server on loopback (tests/test_s3_store.py's fixtures); PEFT folder:
the local store."""
from __future__ import annotations

import shutil
from pathlib import Path

from fastapi.testclient import TestClient

from app.adapters.local_copies import LocalCopies, folder_bytes
from app.adapters.store import adapter_store
from app.adapters.store.s3_repository import S3Repository
from olora_core.default_model import sha256_of_file
from app.server.main import create_app
from test_adapter_sources import gen, make_settings
from test_s3_store import aws_env, base_dir, bucket, loras, replica, s3_server  # noqa: F401 (fixtures)
from http_helpers import tar_gz, upload


def cached_bytes(root: Path) -> int:
    """Bytes of the version folders in a cache (not its staging/lock folders)."""
    return sum(folder_bytes(p) for p in root.iterdir() if not p.name.startswith("."))


# ---- the LRU itself -------------------------------------------------------------------------------------------
def test_lru_order_bound_holds_and_in_use(tmp_path):
    removed = []
    loading: set[str] = set()
    copies = LocalCopies(300, lambda key, path: removed.append(key), in_use=lambda: loading)
    for name in "abc":
        copies.add(name, tmp_path / name, 100)
    assert removed == [] and copies.total_bytes == 300
    assert copies.touch("a")  # a is now the most recently used: b goes first
    copies.add("d", tmp_path / "d", 100)
    assert removed == ["b"] and copies.keys() == ["c", "a", "d"]
    with copies.hold("c") as holding:  # held (a merge reading it): skipped, the next least recent goes
        assert holding
        copies.add("e", tmp_path / "e", 100)
    assert removed == ["b", "a"] and copies.keys() == ["d", "c", "e"]  # holding it was a use
    loading.add(str(tmp_path / "c"))  # the engine has still to read it
    copies.add("f", tmp_path / "f", 100)
    assert removed == ["b", "a", "d"] and "c" in copies
    loading.clear()
    copies.add("big", tmp_path / "big", 1000)  # larger than the bound: kept while newest, everything else goes
    assert copies.keys() == ["big"] and not copies.touch("b")
    assert copies.evictions == 6


# ---- the object store's cache of downloads -------------------------------------------------------------------
def test_s3_cache_is_bounded_and_refetches(tmp_path, loras, s3_server, bucket):  # noqa: F811
    _, url = s3_server
    writer = S3Repository(bucket, "p", tmp_path / "writer", endpoint_url=url)
    for i in range(8):
        lora = loras["a" if i % 2 else "b"]
        writer.put(f"n{i}", lora, {"sha256": sha256_of_file(lora / "adapter_model.safetensors")})
    one = folder_bytes(writer.root / "n0" / writer.resolve("n0").version)
    bound = 3 * one + one // 2
    reader = S3Repository(bucket, "p", tmp_path / "reader", endpoint_url=url, cache_bytes=bound)
    downloads = []
    original = reader._s3.download_file
    reader._s3.download_file = lambda *a, **k: (downloads.append(a[1]), original(*a, **k))[1]

    def fetch(adapter_id):
        return reader.localize(reader.materialize(reader.resolve(adapter_id)))
    for i in range(8):
        assert (fetch(f"n{i}").path / "adapter_model.safetensors").is_file()
        assert cached_bytes(reader.root) <= bound
    assert [k[0] for k in reader.copies.keys()] == ["n5", "n6", "n7"]
    fetch("n5")  # used again: the most recent; n6 goes next
    fetch("n0")  # evicted before: downloaded again, transparently
    assert [k[0] for k in reader.copies.keys()] == ["n7", "n5", "n0"]
    assert sum(1 for key in downloads if key.startswith("p/n0/") and key.endswith(".safetensors")) == 2
    assert cached_bytes(reader.root) <= bound
    with reader.held("n7") as held:  # a merge reading n7: it survives the loads around it
        for i in range(1, 5):
            fetch(f"n{i}")
        assert (held.path / "adapter_model.safetensors").is_file() and ("n7", held.version) in reader.copies
    restarted = S3Repository(bucket, "p", tmp_path / "reader", endpoint_url=url, cache_bytes=2 * one)
    assert restarted.copies.total_bytes <= 2 * one and cached_bytes(restarted.root) <= 2 * one  # counted at start


def test_a_server_serves_more_adapters_than_its_cache_holds(tmp_path, base_dir, loras, s3_server,  # noqa: F811
                                                            bucket):  # noqa: F811
    _, url = s3_server
    with replica(tmp_path, "a", base_dir, url, bucket) as a:
        for i in range(4):
            assert upload(a, f"m{i}", tar_gz(loras["a"])).status_code == 201
        expected = gen(a, "m0").json()["generated_text"]
        one = folder_bytes(a.app.state.olora.adapters.stored("m0").path)
    with replica(tmp_path, "b", base_dir, url, bucket, adapter_cache_bytes=2 * one, max_cpu_adapters=1,
                 max_loras=1) as b:
        for _ in range(2):
            for i in range(4):
                r = gen(b, f"m{i}")
                assert r.status_code == 200 and r.json()["generated_text"] == expected
                assert cached_bytes(tmp_path / "b") <= 2 * one
        assert b.app.state.olora.adapters.repository.copies.evictions >= 6


# ---- adapters loaded from a PEFT folder into the local store -------------------------------------------------
def test_peft_folder_loads_are_bounded_and_loaded_again(tmp_path, base_dir, loras, monkeypatch):  # noqa: F811
    monkeypatch.setattr(adapter_store, "OLD_VERSION_GRACE_S", 0.0)  # retired versions swept at once
    peft = tmp_path / "peft"
    for i in range(5):
        shutil.copytree(loras["a"], peft / f"p{i}")
    bound = 5 * folder_bytes(loras["a"]) // 2  # a stored copy is a little larger (+ metadata.json): 2 fit
    settings = make_settings(tmp_path, base_dir, peft_dirs=[peft], adapter_cache_bytes=bound, store_poll_s=3600)
    with TestClient(create_app(settings)) as c:
        state = c.app.state.olora
        assert upload(c, "uploaded", tar_gz(loras["b"])).status_code == 201
        expected = gen(c, "p0").json()["generated_text"]
        for i in range(1, 5):
            assert gen(c, f"p{i}").json()["generated_text"] == expected
        one = folder_bytes(state.adapters.stored("p4").path)
        kept = bound // one
        assert kept >= 1 and state.loader.copies.total_bytes <= bound
        held = {s.adapter_id for s in state.adapters.index.all()}
        assert held == {"uploaded"} | {f"p{i}" for i in range(5 - kept, 5)}  # uploads are never evicted
        state.adapters.repository.sweep()  # the evicted versions' folders removed (retired, grace 0)
        on_disk = sum(folder_bytes(d) for d in (tmp_path / "store").glob("p*/*") if d.is_dir())
        assert on_disk <= bound
        assert gen(c, "p0").json()["generated_text"] == expected  # evicted: loaded from its folder again
        assert state.loader.loads == 6 and state.adapters.index.get("p0") is not None


def test_a_copy_being_read_survives_eviction(tmp_path):
    copies = LocalCopies(10, lambda key, path: shutil.rmtree(path))
    for name in ("read", "x", "y"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "w").write_bytes(b"0" * 10)
    copies.add("read", tmp_path / "read")
    with copies.hold("read"):
        copies.add("x", tmp_path / "x")
        copies.add("y", tmp_path / "y")  # x goes, not the held one
        assert (tmp_path / "read").is_dir() and not (tmp_path / "x").exists()
    copies.add("read", tmp_path / "read")  # used again: the newest; y goes
    assert not (tmp_path / "y").exists() and (tmp_path / "read").is_dir()
