"""Store damage and failed loads over HTTP (TestClient, the real app and lifespan): damaged ids are logged at start
and shown in GET /adapters/{id} (servable: false, problem), overwrite and delete work on them; a read failure of
registered files is a 503 `adapter_unavailable`, retried and cleared when the files change, while an adapter this
server refuses stays 422 and shows why; a read-only store starts, serves and refuses writes with 503."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.engine.load_retry import LoadRetry, files_stamp
from app.server.main import create_app
from helpers import save_random_lora
from http_helpers import remount_read_only, tar_gz, tmpfs_store, upload
from test_http_api import base_dir, make_settings  # noqa: F401 - base_dir is a fixture

PROMPT = "Return the number of items"


@pytest.fixture(scope="module")
def lora(base_dir, tmp_path_factory) -> Path:
    return Path(save_random_lora(base_dir, tmp_path_factory.mktemp("loras") / "qv8", r=8, seed=1,
                                 task_type="CAUSAL_LM"))


def _gen(client, adapter_id: str):
    return client.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": adapter_id,
                                                                          "max_new_tokens": 2}})


def _version_dir(client, adapter_id: str) -> Path:
    return client.app.state.olora.adapters.repository.get(adapter_id).path


def test_damage_is_logged_at_start_and_shown(tmp_path, base_dir, lora, caplog):
    settings = make_settings(tmp_path, base_dir)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        for adapter_id in ("lost", "meta", "fine"):
            assert upload(c, adapter_id, tar_gz(lora)).status_code == 201
        lost, meta = _version_dir(c, "lost"), _version_dir(c, "meta")
    (lost / "adapter_model.safetensors").unlink()  # no complete version left: reported, not repaired
    (meta / "metadata.json").write_text("{torn")
    caplog.set_level(logging.WARNING, logger="olora.server")
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        logged = " ".join(r.getMessage() for r in caplog.records)
        assert "'lost'" in logged and "'meta'" in logged and "'fine'" not in logged
        for adapter_id, file in (("lost", "adapter_model.safetensors"), ("meta", "metadata.json")):
            r = c.get(f"/adapters/{adapter_id}")
            assert r.status_code == 200, r.text
            assert r.json()["servable"] is False and file in r.json()["problem"]
        assert c.get("/adapters/fine").json()["servable"] is True
        assert {a["id"] for a in c.get("/adapters").json()["adapters"]} == {"lost", "meta", "fine"}
        r = _gen(c, "lost")
        assert r.status_code == 503 and r.json()["error_type"] == "adapter_unavailable", r.text
        assert upload(c, "meta", tar_gz(lora)).status_code == 409  # taken, as GET says
        assert upload(c, "meta", tar_gz(lora), overwrite=True).status_code == 201
        assert c.get("/adapters/meta").json()["servable"] is True and _gen(c, "meta").status_code == 200
        assert c.delete("/adapters/lost").status_code == 200
        assert c.get("/adapters/lost").status_code == 404


def test_read_failure_is_503_and_clears_when_the_files_come_back(tmp_path, base_dir, lora):
    with TestClient(create_app(make_settings(tmp_path, base_dir)), raise_server_exceptions=False) as c:
        assert upload(c, "a", tar_gz(lora)).status_code == 201
        weights = _version_dir(c, "a") / "adapter_model.safetensors"
        good = weights.read_bytes()
        weights.write_bytes(good[: len(good) // 2])  # briefly truncated (a restore in progress, a bad disk)
        for _ in range(2):  # failed once, then the cached failure until its retry is due
            r = _gen(c, "a")
            assert r.status_code == 503 and r.json()["error_type"] == "adapter_unavailable", r.text
        shown = c.get("/adapters/a").json()
        assert shown["servable"] is False and "cannot be read" in shown["problem"]
        weights.write_bytes(good)  # the files change: retried at once, not after the backoff
        r = _gen(c, "a")
        assert r.status_code == 200, r.text
        assert c.get("/adapters/a").json()["servable"] is True


def test_an_adapter_this_server_refuses_stays_422(tmp_path, base_dir, lora):
    settings = make_settings(tmp_path, base_dir)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        assert upload(c, "r8", tar_gz(lora)).status_code == 201
    smaller = make_settings(tmp_path, base_dir, max_rank=4)  # restarted with smaller slots: rank 8 does not fit
    with TestClient(create_app(smaller), raise_server_exceptions=False) as c:
        r = _gen(c, "r8")
        assert r.status_code == 422 and r.json()["error_type"] == "adapter_rejected", r.text
        shown = c.get("/adapters/r8").json()
        assert shown["servable"] is False and "max_rank" in shown["problem"]


def test_load_retry_backoff_and_file_change(tmp_path):
    (tmp_path / "w").write_bytes(b"12")
    retry = LoadRetry(failures=1, due=float("inf"), stamp=files_stamp(str(tmp_path)))
    assert not retry.ready(str(tmp_path))
    (tmp_path / "w").write_bytes(b"123")
    assert retry.ready(str(tmp_path))
    assert LoadRetry(1, 0.0, files_stamp(str(tmp_path))).ready(str(tmp_path))  # due


def test_read_only_store_starts_serves_and_refuses_writes(tmp_path, base_dir, lora):
    with tmpfs_store(tmp_path / "store", "16m") as store:
        settings = make_settings(tmp_path, base_dir, adapter_dir=store)
        with TestClient(create_app(settings), raise_server_exceptions=False) as c:
            assert upload(c, "a", tar_gz(lora)).status_code == 201
        assert remount_read_only(store)
        with TestClient(create_app(settings), raise_server_exceptions=False) as c:
            assert c.get("/ready").status_code == 200
            assert c.get("/adapters/a").json()["servable"] is True
            assert _gen(c, "a").status_code == 200
            r = c.post("/generate", json={"inputs": PROMPT, "parameters": {
                "max_new_tokens": 2, "merged_adapters": {"ids": ["a", "a"], "weights": [0.5, 0.5]}}})
            assert r.status_code == 200, r.text  # per-request merges live outside a read-only store
            r = upload(c, "b", tar_gz(lora))
            assert r.status_code == 503 and r.json()["error_type"] == "store_read_only", r.text
            r = c.delete("/adapters/a")
            assert r.status_code == 503 and r.json()["error_type"] == "store_read_only", r.text
