"""End to end: the real `olora serve` process on loopback, driven over HTTP with httpx."""
from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import save_random_lora, save_tiny_checkpoint
from http_helpers import tar_gz
from server_process import Replica

PROMPTS = ["Return the number", "Open the file and", "Create a new", "If the value is"]


def start_server(base_dir: Path, store: Path, log_dir: Path) -> Replica:
    server = Replica("server", base_dir, store, log_dir)
    server.wait_ready()
    return server


def metric_samples(url: str) -> dict:
    text = httpx.get(url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    base = Path(save_tiny_checkpoint(root / "base", seed=0))
    loras = {f"ad{i}": Path(save_random_lora(base, root / f"ad{i}", r=4 + 2 * (i % 2), seed=10 + i,
                                             task_type="CAUSAL_LM")) for i in range(3)}
    return base, loras, root


def test_real_server_end_to_end(setup):
    base, loras, root = setup
    store = root / "store"
    server = start_server(base, store, root)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for adapter_id, path in loras.items():
                r = http.post("/adapters", data={"adapter_id": adapter_id},
                              files={"archive": ("a.tgz", tar_gz(path), "application/gzip")})
                assert r.status_code == 201, r.text

            jobs = [(p, a) for p in PROMPTS for a in [None, *loras]]

            def one(job):
                prompt, adapter = job
                r = http.post("/generate", json={"inputs": prompt, "parameters": {"adapter_id": adapter,
                                                                                  "max_new_tokens": 12}})
                assert r.status_code == 200, r.text
                return r.json()["generated_text"]

            singles = [one(job) for job in jobs]  # one at a time
            with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
                together = list(pool.map(one, jobs))  # all at once: mixed adapters in the same batches
            assert together == singles
            assert len(set(singles)) > len(PROMPTS)  # adapters change outputs

            with http.stream("POST", "/generate_stream", json={"inputs": PROMPTS[0], "parameters": {
                    "adapter_id": "ad1", "max_new_tokens": 12}}) as r:
                events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
            assert events[-1]["generated_text"] == singles[jobs.index((PROMPTS[0], "ad1"))]

            # a client that disconnects cancels its generation
            before = metric_samples(server.url).get(("olora_generations_finished_total", (("reason", "cancelled"),)), 0)
            with pytest.raises(httpx.ReadTimeout):
                http.post("/generate", json={"inputs": PROMPTS[0], "parameters": {
                    "max_new_tokens": 1000, "ignore_eos_token": True}}, timeout=0.3)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                samples = metric_samples(server.url)
                if samples.get(("olora_generations_finished_total", (("reason", "cancelled"),)), 0) > before:
                    break
                time.sleep(0.2)
            else:
                raise AssertionError("disconnect did not cancel the generation")
            assert samples[("olora_running_batch_size", ())] == 0

            samples = metric_samples(server.url)
            assert samples[("olora_adapter_requests_total", (("adapter", "ad0"),))] == 2 * len(PROMPTS)
            assert samples[("olora_adapters_registered", ())] == 3
    finally:
        server.stop()

    server = start_server(base, store, root)  # restart: the adapters are still there and servable
    try:
        ids = [a["id"] for a in httpx.get(server.url + "/adapters").json()["adapters"]]
        assert ids == sorted(loras)
        r = httpx.post(server.url + "/generate", json={"inputs": PROMPTS[0], "parameters": {
            "adapter_id": "ad1", "max_new_tokens": 12}}, timeout=60)
        assert r.json()["generated_text"] == singles[jobs.index((PROMPTS[0], "ad1"))]
    finally:
        server.stop()


def test_public_bind_without_keys_is_refused(tmp_path):
    r = subprocess.run([sys.executable, "-m", "olora_core.cli", "serve", "--host", "0.0.0.0", "--port", "1"],
                       capture_output=True, text=True, timeout=60, env=dict(os.environ, OLORA_ADAPTER_DIR=str(tmp_path)))
    assert r.returncode == 2 and "no API keys" in r.stderr
