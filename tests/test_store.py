import json
import multiprocessing as mp
from pathlib import Path

import pytest

from app.store import adapter_store
from app.store.adapter_store import AdapterExists, AdapterMissing, AdapterStore, InvalidAdapterId


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
