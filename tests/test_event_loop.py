"""No blocking I/O on the event loop: while a route waits on a slow store (a read that takes seconds, as on a
loaded network filesystem), the same server still answers /health."""
from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient

from app.adapters.demo import DEMO_DIR
from app.adapters.store.adapter_store import AdapterStore
from app.server.main import create_app
from app.server.settings import Settings
from http_helpers import tar_gz

SLOW_S = 2.0
SLOWED = ("get", "staging_dir", "delete")


class SlowStore:
    """Makes the first call of one AdapterStore method, once armed, take SLOW_S seconds."""

    def __init__(self):
        self.armed: str | None = None
        self.entered = threading.Event()
        self.left = threading.Event()

    def arm(self, method: str) -> None:
        self.entered.clear()
        self.left.clear()
        self.armed = method

    def wrap(self, method: str, original):
        def slow(store, *args, **kwargs):
            if self.armed == method and not self.entered.is_set():
                self.entered.set()
                time.sleep(SLOW_S)  # blocking, as a slow disk read is
                self.left.set()
            return original(store, *args, **kwargs)
        return slow


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    gate = SlowStore()
    settings = Settings(adapter_dir=tmp_path_factory.mktemp("store"), store_poll_s=3600.0)  # embedded model + demos
    with pytest.MonkeyPatch.context() as mp:
        for method in SLOWED:
            mp.setattr(AdapterStore, method, gate.wrap(method, getattr(AdapterStore, method)))
        with TestClient(create_app(settings)) as client:
            yield client, gate


ONE_TOKEN = {"max_new_tokens": 1}
MERGE = {"ids": ["shout", "never-seen"], "weights": [0.5, 0.5], "merge_strategy": "linear"}
# Known adapters are admitted and listed from the in-memory index (no store read: tests/test_adapter_sources.py);
# the store is read for an id the index does not hold, and by uploads and deletes.
CASES = [  # (slowed store method, HTTP method, path, JSON body or None, expected status); run in this order
    ("get", "POST", "/generate", {"inputs": "hi", "parameters": {"adapter_id": "never-seen-1", **ONE_TOKEN}}, 404),
    ("get", "POST", "/generate_stream", {"inputs": "hi", "parameters": {"adapter_id": "never-seen-2", **ONE_TOKEN}},
     404),
    ("get", "POST", "/", {"inputs": "hi", "parameters": {"adapter_id": "never-seen-3", **ONE_TOKEN}}, 404),
    ("get", "POST", "/generate", {"inputs": "hi", "parameters": {"merged_adapters": MERGE, **ONE_TOKEN}}, 404),
    ("get", "POST", "/v1/completions", {"model": "never-seen-4", "prompt": "hi", "max_tokens": 1}, 404),
    ("get", "POST", "/v1/chat/completions",
     {"model": "never-seen-5", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}, 404),
    ("get", "GET", "/adapters/never-seen-6", None, 404),
    ("staging_dir", "UPLOAD", "/adapters", None, 201),
    ("delete", "DELETE", "/adapters/shout-copy", None, 200),
]


def _send(client, method: str, path: str, body):
    if method == "UPLOAD":
        files = {"archive": ("shout.tgz", tar_gz(DEMO_DIR / "shout"), "application/gzip")}
        return client.post(path, data={"adapter_id": "shout-copy"}, files=files)
    return client.request(method, path, json=body)


@pytest.mark.parametrize("slowed, method, path, body, status", CASES,
                         ids=[f"{m} {p} ({s})" for s, m, p, _, _ in CASES])
def test_health_answers_while_a_route_waits_on_the_store(slow_server, slowed, method, path, body, status):
    client, gate = slow_server
    responses = []
    gate.arm(slowed)
    worker = threading.Thread(target=lambda: responses.append(_send(client, method, path, body)))
    worker.start()
    try:
        assert gate.entered.wait(30), f"{method} {path} never called AdapterStore.{slowed}"
        started = time.monotonic()
        health = client.get("/health")
        answered_in = time.monotonic() - started
        store_still_busy = not gate.left.is_set()
    finally:
        worker.join(120)
        gate.armed = None
    assert health.status_code == 200
    assert store_still_busy, (f"/health waited {answered_in:.2f} s: {method} {path} blocked the event loop in "
                              f"AdapterStore.{slowed}")
    assert responses and responses[0].status_code == status, responses and responses[0].text[:300]


def test_a_request_cancelled_during_its_start_cancels_what_the_start_began():
    """start_off_loop: the route's task is cancelled (client gone) while the worker thread is still starting;
    the generations the thread then starts must not run on unobserved."""
    import asyncio

    from app.server.generation import start_off_loop

    class Handle:
        cancelled = False

        def cancel(self):
            self.cancelled = True

    started = [(Handle(), None), (Handle(), None)]
    in_thread = threading.Event()

    def slow_start():
        in_thread.set()
        time.sleep(0.5)
        return started

    async def scenario():
        task = asyncio.create_task(start_off_loop(slow_start))
        while not in_thread.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not any(h.cancelled for h, _ in started)  # the thread has not returned yet
        for _ in range(200):
            if all(h.cancelled for h, _ in started):
                return
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert all(h.cancelled for h, _ in started)
    assert asyncio.run(start_off_loop(lambda: [(Handle(), None)]))[0][0].cancelled is False  # not cancelled: kept
