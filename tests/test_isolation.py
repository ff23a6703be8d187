"""What one client can do to the others: store I/O and merges filling the loop's default executor cannot hold up a
generation's start; per-request merges take one metrics label (`~merged`), never the adapters' label slots, and
their ids are shown in /cache to admin keys only; a non-ASCII request id is replaced, not echoed re-encoded; a
merge racing the deletion of its source is served from the held version."""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.adapters import service
from app.server.main import create_app
from helpers import save_random_lora
from http_helpers import tar_gz, upload
from test_http_api import base_dir, make_settings  # noqa: F401 - base_dir is a fixture

PROMPT = "Return the number of items"
USER, ADMIN = {"Authorization": "Bearer user-key"}, {"Authorization": "Bearer admin-key"}


@pytest.fixture(scope="module")
def lora(base_dir, tmp_path_factory) -> Path:
    return Path(save_random_lora(base_dir, tmp_path_factory.mktemp("loras") / "qv4", r=4, seed=1,
                                 task_type="CAUSAL_LM"))


def test_starts_do_not_wait_for_a_full_default_executor(tmp_path, base_dir):
    """Every thread of the loop's default executor is busy (slow store reads, merges, uploads): a 1-token request
    still starts, on the starts' own pool."""
    with TestClient(create_app(make_settings(tmp_path, base_dir)), raise_server_exceptions=False) as c:
        release = threading.Event()

        async def occupy_default_executor() -> None:
            loop = asyncio.get_running_loop()
            for _ in range(64):  # more than any default executor's max_workers here
                loop.run_in_executor(None, release.wait)

        c.portal.call(occupy_default_executor)
        answer: list = []
        request = threading.Thread(target=lambda: answer.append(c.post("/generate", json={
            "inputs": PROMPT, "parameters": {"max_new_tokens": 1}})), daemon=True)
        try:
            request.start()
            request.join(timeout=60)  # not a speed bound: without its own pool it waits until `release`
            started_while_busy = bool(answer)
        finally:
            release.set()
            request.join(timeout=60)
        assert started_while_busy and answer[0].status_code == 200, answer


def test_merges_take_one_metrics_label_and_hide_from_non_admins(tmp_path, base_dir, lora):
    settings = make_settings(tmp_path, base_dir, api_keys="user-key", admin_keys="admin-key",
                             metrics_max_adapter_labels=2)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        for adapter_id in ("x", "y"):
            assert upload(c, adapter_id, tar_gz(lora), headers=ADMIN).status_code == 201
        for weight in (0.1, 0.2, 0.3):  # three different merges: three per-request ids
            r = c.post("/generate", headers=USER, json={"inputs": PROMPT, "parameters": {
                "max_new_tokens": 1, "merged_adapters": {"ids": ["x", "y"], "weights": [weight, 1 - weight]}}})
            assert r.status_code == 200, r.text
        for adapter_id in ("x", "y"):  # uploaded before, first used after the merges: still labels of their own
            r = c.post("/generate", headers=USER, json={"inputs": PROMPT, "parameters": {
                "max_new_tokens": 1, "adapter_id": adapter_id}})
            assert r.status_code == 200
        metrics = c.get("/metrics").text
        assert 'olora_adapter_requests_total{adapter="~merged"} 3.0' in metrics
        assert 'adapter="x"' in metrics and 'adapter="y"' in metrics and 'adapter="__other__"' not in metrics
        assert "~merged-" not in metrics
        seen_by_user = c.get("/cache", headers=USER).json()
        seen_by_admin = c.get("/cache", headers=ADMIN).json()
        listed = [a for a in seen_by_user["host_cache"] + seen_by_user["device_slots"] if a]
        assert "~merged" in listed and not any(a.startswith("~merged-") for a in listed)
        assert any(a and a.startswith("~merged-") for a in seen_by_admin["host_cache"])


def _echoed_request_id(sent: bytes) -> bytes:
    """The X-Request-Id the access-log middleware answers to a request carrying `sent` (raw header bytes, as a
    real server hands them over: the test client would re-encode them)."""
    from app.server.metrics import ServerMetrics
    from app.server.middleware import AccessLogMiddleware

    async def plain_app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    sent_messages: list[dict] = []

    async def send(message):
        sent_messages.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "method": "GET", "path": "/health", "raw_path": b"/health", "query_string": b"",
             "headers": [(b"x-request-id", sent)], "app": None}
    asyncio.run(AccessLogMiddleware(plain_app, metrics=ServerMetrics())(scope, receive, send))
    [value] = [v for k, v in sent_messages[0]["headers"] if k == b"x-request-id"]
    return value


def test_request_id_is_ascii_or_fresh():
    assert _echoed_request_id(b"abc-123") == b"abc-123"
    echoed = _echoed_request_id("caf\xe9-1".encode("latin-1"))  # é: alphanumeric to Python, not ASCII
    assert echoed.isascii() and len(echoed) == 32 and echoed != "caf\xe9-1".encode()  # a fresh id


def test_merge_racing_the_deletion_of_its_source(tmp_path, base_dir, lora, monkeypatch):
    """The source is deleted while the merge reads it: the merge is served from the version it holds (was 422
    'not a readable safetensors file'); afterwards the source is gone (404) and its folder swept."""
    with TestClient(create_app(make_settings(tmp_path, base_dir)), raise_server_exceptions=False) as c:
        state = c.app.state.olora
        for adapter_id in ("keep", "doomed"):
            assert upload(c, adapter_id, tar_gz(lora)).status_code == 201
        doomed_dir = state.adapters.repository.get("doomed").path
        real_load = service.load_adapter_dir

        def load_while_deleted(path, *args, **kwargs):
            if Path(path) == doomed_dir and state.adapters.repository.get("doomed") is not None:
                state.adapters.delete("doomed")  # another client's DELETE lands mid-merge
            return real_load(path, *args, **kwargs)

        monkeypatch.setattr(service, "load_adapter_dir", load_while_deleted)
        r = c.post("/adapters/merge", json={"adapter_id": "m", "sources": [{"id": "keep"}, {"id": "doomed"}]})
        assert r.status_code == 201, r.text
        assert c.get("/adapters/doomed").status_code == 404
        state.adapters.repository.sweep()
        assert not doomed_dir.exists()
        r = c.post("/adapters/merge", json={"adapter_id": "m2", "sources": [{"id": "keep"}, {"id": "doomed"}]})
        assert r.status_code == 404, r.text
