"""The hostile campaign's categories, kept as tests: a bounded soak of mixed traffic against a real server process
(no 5xx, every body and SSE event strict JSON, file descriptors flat) and races between writers and readers of
one adapter (overwrite, delete, merges reading it, generations using it, sweeps) that end in defined answers.
The 5-minute soak with RSS numbers is bench/soak.py (docs/benchmarks.md)."""
from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.server.main import create_app
from helpers import save_random_lora
from http_helpers import tar_gz, upload
from test_http_api import base_dir, make_settings  # noqa: F401 - base_dir is a fixture

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from soak import SoakServer, adapter_archive, run_traffic, strict_json, summary  # noqa: E402

PROMPT = "Return the number of items"
SOAK_SECONDS = 20.0
FD_SLACK = 16  # connections in flight at a sample (workers x keep-alive) and the loader's files: not a leak


@pytest.fixture(scope="module")
def loras(base_dir, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("loras")
    return [Path(save_random_lora(base_dir, root / f"l{i}", r=4, seed=i + 1, task_type="CAUSAL_LM"))
            for i in range(3)]


def test_bounded_soak_of_mixed_traffic(tmp_path, base_dir, loras):
    server = SoakServer(base_dir, loras, tmp_path)
    try:
        report = run_traffic(server.url, SOAK_SECONDS, 3, server.adapters, adapter_archive(loras[0]),
                             server.proc.pid)
    finally:
        server.stop()
    numbers = summary(report, warmup_s=SOAK_SECONDS / 4)
    assert report.failures == [], numbers
    assert report.requests >= 20 and numbers["samples"] >= 10, numbers
    assert numbers["fds_last"] <= numbers["fds_first"] + FD_SLACK, numbers


def test_races_on_one_adapter_end_in_defined_answers(tmp_path, base_dir, loras):
    """Threads overwrite, delete and re-upload one id while others merge it (both merge paths), generate with it
    and sweep the store: every answer is one of the defined ones, in strict JSON; afterwards the server serves."""
    allowed = {200, 201, 404, 409, 429}
    answers: list[tuple[str, int, str]] = []
    lock = threading.Lock()
    with TestClient(create_app(make_settings(tmp_path, base_dir)), raise_server_exceptions=False) as c:
        state = c.app.state.olora
        assert upload(c, "stable", tar_gz(loras[1])).status_code == 201
        archive = tar_gz(loras[0])

        def writer():
            for i in range(6):
                record("upload", upload(c, "hot", archive, overwrite=True))
                if i % 2:
                    record("delete", c.delete("/adapters/hot"))

        def merger():
            for _ in range(6):
                record("merge", c.post("/adapters/merge", json={
                    "adapter_id": "merged", "overwrite": True, "sources": [{"id": "stable"}, {"id": "hot"}]}))
                record("per-request merge", c.post("/generate", json={"inputs": PROMPT, "parameters": {
                    "max_new_tokens": 2, "merged_adapters": {"ids": ["stable", "hot"], "weights": [0.5, 0.5]}}}))

        def generator():
            for _ in range(8):
                record("generate", c.post("/generate", json={"inputs": PROMPT, "parameters": {
                    "adapter_id": "hot", "max_new_tokens": 2}}))

        def sweeper():
            for _ in range(8):
                state.adapters.repository.sweep()

        def record(what: str, response) -> None:
            with lock:
                answers.append((what, response.status_code, response.text))

        threads = [threading.Thread(target=f) for f in (writer, merger, generator, sweeper)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads)
        bad = [(w, s, t[:200]) for w, s, t in answers if s not in allowed]
        assert bad == [], bad
        for _, _, text in answers:
            strict_json(text)
        assert upload(c, "hot", archive, overwrite=True).status_code == 201
        r = c.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "hot", "max_new_tokens": 2}})
        assert r.status_code == 200 and json.loads(r.text)["generated_text"]
        assert state.adapters.repository.sweep() == []  # the races left no damage behind
