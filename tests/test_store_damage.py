"""Store damage never loses an adapter: a CURRENT naming nothing is repaired to the newest complete version (or the
adapter reported as damaged), never swept; damaged ids are shown, overwritable and deletable; readers hold the
versions they read, a delete racing them included (unit level: the HTTP side is in test_store_damage_http.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.adapters.store import adapter_store
from app.adapters.store.adapter_store import AdapterMissing, AdapterStore


def _src(tmp_path: Path, payload: bytes = b"weights") -> Path:
    d = tmp_path / f"src-{payload.hex()[:8]}"
    d.mkdir(exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (d / "adapter_model.safetensors").write_bytes(payload)
    return d


def _versions(store: AdapterStore, adapter_id: str) -> set[str]:
    return {c.name for c in (store.root / adapter_id).iterdir() if c.is_dir()}


@pytest.fixture()
def no_grace(monkeypatch):
    monkeypatch.setattr(adapter_store, "OLD_VERSION_GRACE_S", -1.0)  # every retired version is due at once


def test_current_naming_a_missing_folder_is_repaired_not_swept(tmp_path, no_grace):
    """The campaign's data loss: CURRENT names a missing version; sweep deleted the only real one."""
    store = AdapterStore(tmp_path / "store")
    only = store.put("a1", _src(tmp_path), {})
    (store.root / "a1" / "CURRENT").write_text("v1234-deadbeef")  # names nothing
    assert store.get("a1").problem == "version v1234-deadbeef named by CURRENT is missing"
    findings = store.sweep()
    assert only.path.is_dir() and (only.path / "adapter_model.safetensors").read_bytes() == b"weights"
    assert [(f.adapter_id, f.repaired) for f in findings] == [("a1", True)]
    assert store.get("a1").version == only.version and store.get("a1").problem is None
    assert store.sweep() == []  # repaired once


def test_repair_picks_the_newest_complete_version_and_unretires_it(tmp_path, no_grace):
    store = AdapterStore(tmp_path / "store")
    store.put("a1", _src(tmp_path, b"v1"), {})
    second = store.put("a1", _src(tmp_path, b"v2"), {}, overwrite=True)
    third_dir = store.root / "a1" / "v7fffffffffffffff-00000000"  # the newest name, but incomplete
    third_dir.mkdir()
    (third_dir / "adapter_config.json").write_text("{}")
    (store.root / "a1" / "CURRENT").write_text(third_dir.name)
    (second.path / adapter_store.RETIRED_MARKER).write_text("0")  # as if an overwrite had retired it
    findings = store.sweep()
    assert findings[0].repaired and second.version in findings[0].message
    assert store.get("a1").version == second.version
    assert not (second.path / adapter_store.RETIRED_MARKER).exists()
    store.sweep()
    assert second.path.is_dir()  # the repaired version is current: never swept


def test_damage_without_a_complete_version_is_reported_and_left_alone(tmp_path, no_grace):
    store = AdapterStore(tmp_path / "store")
    stored = store.put("a1", _src(tmp_path), {})
    (stored.path / "adapter_model.safetensors").unlink()
    before = _versions(store, "a1")
    for _ in range(2):
        [finding] = store.sweep()
        assert finding.adapter_id == "a1" and not finding.repaired and "adapter_model.safetensors" in finding.message
    assert _versions(store, "a1") == before and (stored.path / "adapter_config.json").is_file()
    assert store.get("a1").problem is not None


def test_corrupt_metadata_is_shown_deletable_and_overwritable(tmp_path, no_grace):
    store = AdapterStore(tmp_path / "store")
    stored = store.put("a1", _src(tmp_path), {})
    (stored.path / "metadata.json").write_bytes(b"{not json\xff")
    damaged = store.get("a1")
    assert damaged is not None and "metadata.json" in damaged.problem and damaged.metadata == {}
    assert [s.adapter_id for s in store.list()] == ["a1"]
    fresh = store.put("a1", _src(tmp_path, b"new"), {"kind": "lora"}, overwrite=True)
    assert store.get("a1").problem is None and store.get("a1").version == fresh.version
    (fresh.path / "metadata.json").write_text("[1, 2]")  # valid JSON, not an object
    assert store.delete("a1").problem is not None
    assert store.get("a1") is None


def test_overwrite_of_an_id_whose_current_names_nothing(tmp_path, no_grace):
    """The campaign's 500: the `.retired` marker of the missing folder could not be written."""
    store = AdapterStore(tmp_path / "store")
    store.put("a1", _src(tmp_path), {})
    (store.root / "a1" / "CURRENT").write_text("v1-00000000")
    new = store.put("a1", _src(tmp_path, b"v2"), {}, overwrite=True)
    assert store.get("a1").version == new.version and store.get("a1").problem is None


def test_lost_current_is_restored_but_a_deleted_adapter_stays_deleted(tmp_path, no_grace):
    store = AdapterStore(tmp_path / "store")
    kept = store.put("kept", _src(tmp_path), {})
    (store.root / "kept" / "CURRENT").unlink()  # lost (or a writer died between its rename and CURRENT)
    gone = store.put("gone", _src(tmp_path), {})
    with store.reading(gone):  # a stream still reads the deleted adapter's version
        store.delete("gone")
        assert gone.path.is_dir()
        findings = store.sweep()
        assert gone.path.is_dir()
    assert [(f.adapter_id, f.repaired) for f in findings] == [("kept", True)]
    assert store.get("kept").version == kept.version
    store.sweep()
    assert store.get("gone") is None and not (store.root / "gone").exists()


def test_garbage_current_is_damage_not_a_path(tmp_path):
    store = AdapterStore(tmp_path / "store")
    store.put("a1", _src(tmp_path), {})
    (store.root / "a1" / "CURRENT").write_bytes(b"../../etc\xff")
    damaged = store.get("a1")
    assert damaged.problem.startswith("CURRENT names no version") and damaged.path == store.root / "a1" / "damaged"
    assert store.sweep()[0].repaired and store.get("a1").problem is None


def test_held_source_survives_a_racing_delete(tmp_path, no_grace):
    store = AdapterStore(tmp_path / "store")
    store.put("src", _src(tmp_path), {})
    with store.held("src") as stored:
        store.delete("src")  # the merge reading it is not cut off
        assert (stored.path / "adapter_model.safetensors").read_bytes() == b"weights"
    store.sweep()
    assert not stored.path.exists()
    with pytest.raises(AdapterMissing):
        with store.held("src"):
            pass
