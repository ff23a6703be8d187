"""Three concurrent OpenAI requests of 16 prompts x n=8 where two fit in the waiting queue: two are served, the
third is refused whole (429), and nothing is left counted once they are done."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers import save_tiny_checkpoint

from app.server.main import create_app
from app.server.settings import Settings


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return Path(save_tiny_checkpoint(tmp_path_factory.mktemp("base") / "tiny", seed=0))


def test_big_requests_are_admitted_whole_or_refused_whole(tmp_path, base_dir, monkeypatch):
    settings = Settings(model=str(base_dir), adapter_dir=tmp_path / "store", demo_adapters=False, max_batch_size=8,
                        max_input_tokens=32, max_total_tokens=64, max_loras=2, max_rank=8, max_waiting=256)
    with TestClient(create_app(settings)) as c:
        engine = c.app.state.olora.engine
        decode = engine.runner.decode  # slowed so the queue barely drains while the three requests start
        monkeypatch.setattr(engine.runner, "decode", lambda *a, **k: (time.sleep(0.003), decode(*a, **k))[1])
        codes: list[int] = []
        lock = threading.Lock()
        barrier = threading.Barrier(3)

        def one(i: int) -> None:
            barrier.wait()
            r = c.post("/v1/completions", json={"model": "base", "prompt": [f"prompt {i} {j}" for j in range(16)],
                                                "n": 8, "max_tokens": 2, "temperature": 0})
            with lock:
                codes.append(r.status_code)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(codes) in ([200, 200, 200], [200, 200, 429]), codes  # two fit in 256 (+ 8 rows)
        stats = engine.stats()
        assert stats.waiting == 0 and stats.running == 0
