import json
import multiprocessing as mp
from pathlib import Path

import pytest

from app.adapters.store import adapter_store
from app.adapters.store.adapter_store import AdapterExists, AdapterMissing, AdapterStore, InvalidAdapterId


def _src(tmp_path: Path, payload: bytes = b"weights") -> Path:
    d = tmp_path / f"src-{payload.hex()[:8]}"
    d.mkdir(exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (d / "adapter_model.safetensors").write_bytes(payload)
    return d


def test_put_get_list_delete_and_restart(tmp_path):
    store = AdapterStore(tmp_path / "store")
    stored = store.put("a1", _src(tmp_path), {"kind": "lora"})
    assert stored.path.is_dir() and stored.metadata["kind"] == "lora"
    assert store.path_for("a1") == stored.path
    assert [s.adapter_id for s in AdapterStore(tmp_path / "store").list()] == ["a1"]  # survives a "restart"
    with pytest.raises(AdapterExists):
        store.put("a1", _src(tmp_path, b"other"), {"kind": "lora"})
    assert (store.path_for("a1") / "adapter_model.safetensors").read_bytes() == b"weights"
    new = store.put("a1", _src(tmp_path, b"other"), {"kind": "lora"}, overwrite=True)
    assert new.version != stored.version
    assert (store.path_for("a1") / "adapter_model.safetensors").read_bytes() == b"other"
    store.delete("a1")
    assert store.get("a1") is None and store.list() == []
    with pytest.raises(AdapterMissing):
        store.delete("a1")
    assert list((tmp_path / "store" / ".staging").iterdir()) == []


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "-x", "a" * 129, "a b", "é"])
def test_invalid_ids(tmp_path, bad):
    store = AdapterStore(tmp_path / "store")
    with pytest.raises(InvalidAdapterId):
        store.put(bad, _src(tmp_path), {})
    assert store.get(bad) is None


def test_failed_copy_leaves_nothing(tmp_path):
    store = AdapterStore(tmp_path / "store")
    src = _src(tmp_path)
    (src / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError):
        store.put("a1", src, {})
    assert store.list() == [] and list((tmp_path / "store" / ".staging").iterdir()) == []


def test_old_version_kept_for_grace_period(tmp_path, monkeypatch):
    store = AdapterStore(tmp_path / "store")
    first = store.put("a1", _src(tmp_path), {})
    store.put("a1", _src(tmp_path, b"v2"), {}, overwrite=True)
    assert first.path.exists()  # a replica still loading v1 is not cut off
    monkeypatch.setattr(adapter_store, "OLD_VERSION_GRACE_S", -1.0)
    store.put("a1", _src(tmp_path, b"v3"), {}, overwrite=True)
    assert not first.path.exists()


def _racer(root: str, src: str, barrier, results) -> None:
    store = AdapterStore(Path(root))
    barrier.wait()
    try:
        store.put("same", Path(src), {"writer": src})
        results.put("won")
    except AdapterExists:
        results.put("409")


def test_concurrent_uploads_of_one_id_exactly_one_wins(tmp_path):
    root = tmp_path / "store"
    AdapterStore(root)
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    srcs = [_src(tmp_path, bytes([i]) * 1000) for i in range(4)]
    procs = [ctx.Process(target=_racer, args=(str(root), str(s), barrier, results)) for s in srcs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert outcomes == ["409", "409", "409", "won"]
    stored = AdapterStore(root).get("same")
    writer = Path(stored.metadata["writer"])
    assert (stored.path / "adapter_model.safetensors").read_bytes() == (writer / "adapter_model.safetensors").read_bytes()


def _dead_pid() -> int:
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_crashed_writers_staging_is_removed_at_start(tmp_path):
    """10.7: what a kill -9 left in .staging does not outlive the next start; live writers' folders stay."""
    import os
    import time

    store = AdapterStore(tmp_path / "store")
    staging = tmp_path / "store" / ".staging"
    crashed = staging / f"{store._host}-{_dead_pid()}-deadbeef"
    crashed.mkdir()
    (crashed / "trained.archive").write_bytes(b"x" * 100_000)
    earlier_me = staging / f"{store._host}-{os.getpid()}-feed"  # a restarted container gets its old pid again
    earlier_me.mkdir()
    os.utime(earlier_me, (adapter_store._PROCESS_STARTED - 5,) * 2)
    busy = store.staging_dir()  # this process is writing there right now
    alive = staging / f"{store._host}-{os.getppid()}-cafe"  # a live process of this host is writing
    alive.mkdir()
    other_host_fresh = staging / "otherhost-1-abcd"
    other_host_fresh.mkdir()
    other_host_stale = staging / "otherhost-2-abcd"
    other_host_stale.mkdir()
    old = time.time() - adapter_store.STALE_STAGING_S - 10
    os.utime(other_host_stale, (old, old))
    AdapterStore(tmp_path / "store")  # a restart
    assert sorted(p.name for p in staging.iterdir()) == sorted([alive.name, other_host_fresh.name, busy.name])


def test_retired_versions_are_swept_without_a_new_write(tmp_path, monkeypatch):
    store = AdapterStore(tmp_path / "store")
    first = store.put("a1", _src(tmp_path), {})
    held = store.put("b1", _src(tmp_path), {})
    store.put("a1", _src(tmp_path, b"v2"), {}, overwrite=True)
    store.put("b1", _src(tmp_path, b"v2"), {}, overwrite=True)
    store.sweep()
    assert first.path.exists() and held.path.exists()  # inside the grace period
    monkeypatch.setattr(adapter_store, "OLD_VERSION_GRACE_S", -1.0)
    with store.reading(held):
        store.sweep()
        assert not first.path.exists()  # past the grace period, nobody reads it
        assert held.path.exists()  # a stream of this process still reads it
    store.sweep()
    assert not held.path.exists()
    assert [s.version for s in store.list()] == [store.get("a1").version, store.get("b1").version]


def test_lock_files_are_bounded(tmp_path):
    store = AdapterStore(tmp_path / "store")
    for i in range(adapter_store.LOCK_STRIPES + 16):  # more ids than stripes
        store.put(f"id-{i}", _src(tmp_path), {})
        store.delete(f"id-{i}")
    assert len(list((tmp_path / "store" / ".locks").iterdir())) <= adapter_store.LOCK_STRIPES


def test_replicas_keep_their_own_per_request_merges(tmp_path):
    """Replicas share the store: a second process starting must not wipe the first one's merges (it did: one shared
    `.ephemeral` was removed at every start); what a dead process left is removed."""
    from app.adapters.ephemeral import EphemeralAdapters

    store = AdapterStore(tmp_path)
    dead = tmp_path / ".ephemeral" / f"{store._host}-999999999-deadbeef"  # no such pid
    dead.mkdir(parents=True)
    first = EphemeralAdapters(store)
    (first.root / "k").mkdir()
    second = EphemeralAdapters(AdapterStore(tmp_path))  # another replica (same host: same pid here, fresh folder)
    assert (first.root / "k").is_dir() and second.root != first.root
    assert not dead.exists()
