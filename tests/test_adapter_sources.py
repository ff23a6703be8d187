"""Adapter sources: the repository interface's index (no store read on admission, a watcher that reads only
what changed), a read-only folder of PEFT saves loaded on demand through the upload path, vLLM's load/unload
routes."""
from __future__ import annotations

import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.adapters.index import AdapterIndex
from app.adapters.store import local_repository
from app.adapters.store.local_repository import LocalDirectoryRepository
from app.server.main import create_app
from app.server.settings import Settings
from helpers import save_random_lora, save_tiny_checkpoint, save_trained_olora
from http_helpers import tar_gz, upload

PROMPT = "hello world"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return Path(save_tiny_checkpoint(tmp_path_factory.mktemp("base") / "tiny", seed=0))


@pytest.fixture(scope="module")
def lora_dir(base_dir, tmp_path_factory) -> Path:
    return Path(save_random_lora(base_dir, tmp_path_factory.mktemp("loras") / "qv4", r=4, seed=1,
                                 task_type="CAUSAL_LM"))


def make_settings(tmp_path: Path, base_dir: Path, **overrides) -> Settings:
    values = dict(model=str(base_dir), adapter_dir=tmp_path / "store", demo_adapters=False, max_batch_size=4,
                  max_input_tokens=64, max_total_tokens=128, max_loras=2, max_cpu_adapters=4, max_rank=16)
    values.update(overrides)
    return Settings(**values)


def gen(client, adapter_id, prompt=PROMPT):
    return client.post("/generate", json={"inputs": prompt, "parameters": {"adapter_id": adapter_id,
                                                                          "max_new_tokens": 4}})


def _fake_adapter(folder: Path, text: str) -> Path:
    """Files the local store copies (its put does not look inside them)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_text(text)
    return folder


class CountingRepository:
    """Counts every call that reads the store (anything but `changes`, the watcher's one stat per poll)."""

    def __init__(self, inner: LocalDirectoryRepository):
        self.inner = inner
        self.reads: list[str] = []

    def __getattr__(self, name):
        value = getattr(self.inner, name)
        if callable(value) and name in ("resolve", "materialize", "get", "list", "list_stored"):
            def counted(*args, **kwargs):
                self.reads.append(name)
                return value(*args, **kwargs)
            return counted
        return value


# ---- the index and its watcher ------------------------------------------------------------------------------
def test_refresh_reads_only_the_changed_ids(tmp_path):
    """Replica B follows replica A's writes through the change journal: one resolve per changed id, whatever the
    number of adapters (50 here)."""
    replica_a = LocalDirectoryRepository(tmp_path / "store")
    for i in range(50):
        replica_a.put(f"a{i}", _fake_adapter(tmp_path / "src" / f"a{i}", f"w{i}"), {"sha256": f"{i}"})
    replica_b = CountingRepository(LocalDirectoryRepository(tmp_path / "store"))
    index = AdapterIndex(replica_b)
    index.rebuild()
    assert len(index) == 50
    replica_b.reads.clear()
    assert index.refresh() == [] and replica_b.reads == []  # nothing changed: nothing read

    replica_a.put("a7", _fake_adapter(tmp_path / "src" / "a7b", "w7b"), {"sha256": "7b"}, overwrite=True)
    replica_a.delete("a3")
    replica_a.put("new", _fake_adapter(tmp_path / "src" / "new", "n"), {"sha256": "n"})
    changed = {c.adapter_id: c.stored for c in index.refresh()}
    assert set(changed) == {"a7", "a3", "new"} and changed["a3"] is None
    assert changed["a7"].metadata["sha256"] == "7b" and index.get("a7").version == changed["a7"].version
    assert index.get("a3") is None and index.get("new") is not None and len(index) == 50
    assert sorted(replica_b.reads).count("resolve") == 3  # only the changed ids, not the 50


def test_a_rotated_journal_makes_followers_resync(tmp_path, monkeypatch):
    replica_a = LocalDirectoryRepository(tmp_path / "store")
    replica_a.put("x", _fake_adapter(tmp_path / "src" / "x", "1"), {})
    index = AdapterIndex(LocalDirectoryRepository(tmp_path / "store"))
    index.rebuild()
    monkeypatch.setattr(local_repository, "JOURNAL_MAX_BYTES", 1)  # the next append starts a new journal
    replica_a.put("y", _fake_adapter(tmp_path / "src" / "y", "2"), {})
    assert [c.adapter_id for c in index.refresh()] == ["y"]  # found by the resync (a new inode)
    replica_a.delete("x")
    assert [(c.adapter_id, c.stored) for c in index.refresh()] == [("x", None)]


def test_admission_of_a_known_adapter_reads_nothing_from_the_store(tmp_path, base_dir, lora_dir):
    settings = make_settings(tmp_path, base_dir, store_poll_s=0.05, store_rescan_s=3600)
    with TestClient(create_app(settings)) as c:
        assert upload(c, "known", tar_gz(lora_dir)).status_code == 201
        assert gen(c, "known").status_code == 200
        service = c.app.state.olora.adapters
        # the watcher re-reads the ids the journal names (the upload's): stop it, so only requests are counted
        c.portal.call(c.app.state.olora.watcher.cancel)
        counting = CountingRepository(service.repository)
        service.repository = service.index.repository = counting
        for _ in range(3):
            assert gen(c, "known").status_code == 200
        assert c.get("/v1/models").status_code == 200 and c.get("/adapters").status_code == 200
        assert counting.reads == []
        assert gen(c, "unknown-id").status_code == 404  # an id the index lacks is looked up once
        assert counting.reads == ["resolve"]
        service.repository = service.index.repository = counting.inner

        def model_ids():
            return [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert "known" in model_ids()  # the cached listing follows the index's changes
        assert c.delete("/adapters/known").status_code == 200
        assert "known" not in model_ids()
        assert upload(c, "again", tar_gz(lora_dir)).status_code == 201 and "again" in model_ids()


# ---- a folder of PEFT saves, loaded on demand ---------------------------------------------------------------
def test_on_demand_load_from_a_peft_folder(tmp_path, base_dir, lora_dir):
    peft = tmp_path / "peft"
    shutil.copytree(lora_dir, peft / "cust")
    settings = make_settings(tmp_path, base_dir, peft_dirs=[peft])
    with TestClient(create_app(settings)) as c:
        assert upload(c, "uploaded", tar_gz(lora_dir)).status_code == 201
        expected = gen(c, "uploaded").json()["generated_text"]
        with ThreadPoolExecutor(4) as pool:  # concurrent first requests share one load
            results = list(pool.map(lambda _: gen(c, "cust"), range(4)))
        assert [r.status_code for r in results] == [200] * 4
        assert {r.json()["generated_text"] for r in results} == {expected}
        assert c.app.state.olora.loader.loads == 1
        shown = c.get("/adapters/cust").json()
        assert shown["sha256"] == c.get("/adapters/uploaded").json()["sha256"]
        assert gen(c, "not-there").status_code == 404


def test_on_demand_refusals_are_the_uploads(tmp_path, base_dir, lora_dir):
    """The same bad adapter, uploaded and loaded on demand: the same status and error type."""
    peft = tmp_path / "peft"
    linked = shutil.copytree(lora_dir, peft / "linked")
    os.symlink("/etc/hostname", linked / "notes.txt")  # a link member: refused by the archive checks
    dora = shutil.copytree(lora_dir, peft / "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(dict(config, use_dora=True)))
    settings = make_settings(tmp_path, base_dir, peft_dirs=[peft])
    with TestClient(create_app(settings)) as c:
        for name in ("linked", "dora"):
            uploaded = upload(c, f"up-{name}", tar_gz(peft / name))
            on_demand = gen(c, name)
            assert uploaded.status_code == on_demand.status_code and uploaded.status_code in (413, 422)
            assert uploaded.json()["error_type"] == on_demand.json()["error_type"], on_demand.json()
            assert c.get(f"/adapters/{name}").status_code == 404  # nothing stored


def test_an_unreadable_source_is_503_for_its_adapter_only(tmp_path, base_dir, lora_dir):
    peft = tmp_path / "peft"
    peft.mkdir()
    os.symlink("loop", peft / "loop")  # ELOOP on every lookup below it: a source that cannot be read
    settings = make_settings(tmp_path, base_dir, peft_dirs=[peft])
    with TestClient(create_app(settings)) as c:
        assert upload(c, "fine", tar_gz(lora_dir)).status_code == 201
        r = gen(c, "loop")
        assert r.status_code == 503 and r.json()["error_type"] == "adapter_source_unavailable"
        assert gen(c, "fine").status_code == 200


def test_a_slow_load_is_504_and_then_served(tmp_path, base_dir, lora_dir):
    peft = tmp_path / "peft"
    shutil.copytree(lora_dir, peft / "slow")
    settings = make_settings(tmp_path, base_dir, peft_dirs=[peft], fetch_timeout_s=1e-6)
    with TestClient(create_app(settings)) as c:
        r = gen(c, "slow")
        assert r.status_code == 504 and r.json()["error_type"] == "adapter_source_timeout"
        loaded = threading.Event()
        for _ in range(300):
            if c.app.state.olora.adapters.index.get("slow") is not None:
                loaded.set()
                break
            threading.Event().wait(0.1)
        assert loaded.is_set()
        assert gen(c, "slow").status_code == 200  # indexed: no wait any more


# ---- vLLM's routes --------------------------------------------------------------------------------------------
def test_vllm_load_and_unload_routes(tmp_path, base_dir, lora_dir):
    peft = tmp_path / "peft"
    shutil.copytree(lora_dir, peft / "saves" / "one")
    outside = shutil.copytree(lora_dir, tmp_path / "outside")
    os.symlink(outside, peft / "escape")
    settings = make_settings(tmp_path, base_dir, peft_dirs=[peft], api_keys="user", admin_keys="admin")
    admin = {"Authorization": "Bearer admin"}
    with TestClient(create_app(settings)) as c:
        body = {"lora_name": "one", "lora_path": str(peft / "saves" / "one")}
        assert c.post("/v1/load_lora_adapter", json=body, headers={"Authorization": "Bearer user"}).status_code == 403
        r = c.post("/v1/load_lora_adapter", json=body, headers=admin)
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'one' added successfully."
        again = c.post("/v1/load_lora_adapter", json=body, headers=admin)
        assert again.status_code == 400 and "has already been loaded" in again.text
        assert c.post("/generate", headers={"Authorization": "Bearer user"},
                      json={"inputs": PROMPT, "parameters": {"adapter_id": "one", "max_new_tokens": 2}}
                      ).status_code == 200
        for path in (str(outside), str(peft / "escape"), str(peft / "saves" / ".." / ".." / "outside"),
                     "relative/one", str(peft)):
            r = c.post("/v1/load_lora_adapter", json={"lora_name": "two", "lora_path": path}, headers=admin)
            assert r.status_code == 400, (path, r.text)
        assert c.post("/v1/load_lora_adapter", json={"lora_name": "two"}, headers=admin).status_code == 400
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "two", "lora_path": f"file://{peft}/saves/one"},
                   headers=admin)
        assert r.status_code == 200
        r = c.post("/v1/unload_lora_adapter", json={"lora_name": "one"}, headers=admin)
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'one' removed successfully."
        assert c.get("/adapters/one", headers=admin).status_code == 404
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "one"}, headers=admin).status_code == 404


def test_an_olora_save_with_initial_beside_it_or_recomputed(tmp_path, base_dir):
    """`<dir>/<id>/` trained + `<dir>/<id>/initial/`: converted with its checkpoint (the provenance rule applies),
    reproducing PEFT's trained model; without `initial/`: its init recomputed from the served base."""
    peft = tmp_path / "peft"
    expected = save_trained_olora(base_dir, peft / "ol" / "initial", peft / "ol", PROMPT)
    shutil.copytree(peft / "ol", peft / "olr", ignore=shutil.ignore_patterns("initial"))
    with TestClient(create_app(make_settings(tmp_path, base_dir, peft_dirs=[peft]))) as c:
        for adapter_id in ("ol", "olr"):
            r = c.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": adapter_id,
                                                                          "max_new_tokens": 8}})
            assert r.status_code == 200, r.text
            assert r.json()["generated_text"] == expected
            shown = c.get(f"/adapters/{adapter_id}").json()
            assert shown["kind"] == "olora-converted" and shown["rank"] == 8


def test_periodic_sweeps_look_only_at_changed_ids(tmp_path, monkeypatch):
    """The watcher's sweep costs what changed: after the first (full) one, a sweep examines only the ids the
    journal named since, each until one sweep has run past its grace period; `full=True` examines all."""
    from app.adapters.store import adapter_store

    monkeypatch.setattr(adapter_store, "OLD_VERSION_GRACE_S", 0.0)
    examined: list[str] = []
    real = adapter_store.AdapterStore._repair_current
    monkeypatch.setattr(adapter_store.AdapterStore, "_repair_current",
                        lambda self, folder: (examined.append(folder.name), real(self, folder))[1])
    writer = LocalDirectoryRepository(tmp_path / "store")
    for i in range(50):
        writer.put(f"a{i}", _fake_adapter(tmp_path / "src" / f"a{i}", f"w{i}"), {})
    sweeper = LocalDirectoryRepository(tmp_path / "store")
    sweeper.sweep()
    assert len(examined) == 50  # the first sweep has no cursor: every adapter
    examined.clear()
    assert sweeper.sweep() == [] and examined == []  # nothing changed: nothing examined

    old_version = writer.resolve("a7").version
    writer.put("a7", _fake_adapter(tmp_path / "src" / "a7b", "w7b"), {}, overwrite=True)  # another replica
    sweeper.sweep()
    assert examined == ["a7"] and not (tmp_path / "store" / "a7" / old_version).exists()
    examined.clear()
    sweeper.sweep()
    sweeper.sweep()
    assert examined in (["a7"], [])  # once more at most (until a sweep ran past its grace), then never
    examined.clear()
    sweeper.sweep()
    assert examined == []
    sweeper.sweep(full=True)
    assert len(examined) == 50
