"""Up before the model: a real `olora serve` binds its port at once; while the state is being built /health
answers 200 `loading` and /ready 503 with the phase, generations 503; then it serves. A start that fails exits 1
after /health said `failed`. The start is held in its first phase by holding the adapter store's write locks
(as another replica's writer would), so the test sees it without timing."""
from __future__ import annotations

import contextlib
import fcntl
import time
from pathlib import Path

import httpx

from app.adapters.store.adapter_store import LOCK_STRIPES
from helpers import save_tiny_checkpoint
from server_process import Replica

CONNECT_WAIT_S = 60


@contextlib.contextmanager
def store_locked(store: Path):
    """Every write-lock stripe of the store, held (the start's sweep waits for them); one adapter folder to sweep."""
    (store / "held").mkdir(parents=True)
    (store / ".locks").mkdir()
    handles = [open(store / ".locks" / f"{i:02d}.lock", "a+") for i in range(LOCK_STRIPES)]
    try:
        for fh in handles:
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield
    finally:
        for fh in handles:
            fh.close()  # releases the lock


def _first_answer(url: str) -> httpx.Response:
    deadline = time.monotonic() + CONNECT_WAIT_S
    while time.monotonic() < deadline:
        try:
            return httpx.get(url + "/health", timeout=2)
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"the port did not open within {CONNECT_WAIT_S} s")


def test_port_answers_while_loading_then_serves(tmp_path):
    base = Path(save_tiny_checkpoint(tmp_path / "base", seed=0))
    store = tmp_path / "store"
    with store_locked(store):
        replica = Replica("starting", base, store, tmp_path)
        try:
            health = _first_answer(replica.url)
            assert health.status_code == 200, health.text
            assert health.json()["status"] == "loading" and health.json()["phase"] == "store"
            ready = httpx.get(replica.url + "/ready", timeout=2)
            assert ready.status_code == 503
            progress = ready.json()
            assert progress["status"] == "loading" and progress["phase"] == "store"
            assert progress["phases"][progress["phase_index"]] == "store" and progress["elapsed_s"] >= 0
            gen = httpx.post(replica.url + "/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}},
                             timeout=5)
            assert gen.status_code == 503, gen.text
        except BaseException:
            replica.stop()
            raise
    try:
        replica.wait_ready()
        assert httpx.get(replica.url + "/health", timeout=2).json() == {"status": "ok"}
        gen = httpx.post(replica.url + "/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}},
                         timeout=30)
        assert gen.status_code == 200, gen.text
    finally:
        replica.stop()


def test_a_failed_start_says_so_and_exits_1(tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    replica = Replica("failing", broken, tmp_path / "store", tmp_path)
    try:
        assert replica.proc.wait(CONNECT_WAIT_S) == 1
        log = replica.log_path.read_text()
        assert "start-up failed in phase model" in log, log[-2000:]
    finally:
        replica.stop()
