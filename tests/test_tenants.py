"""Tenants on a real `olora serve`: keys `name:key` name their tenant; the name is on the access-log line and on
the bounded `tenant` label; with a per-tenant limit of one generation in flight, a tenant's second concurrent
generation gets 429 + Retry-After while other tenants (and unnamed keys) are served."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from helpers import save_tiny_checkpoint
from server_process import Replica

STREAM_TOKENS = 300


def _post(url: str, key: str, tokens: int = 2) -> httpx.Response:
    return httpx.post(url + "/generate", json={"inputs": "x", "parameters": {"max_new_tokens": tokens}},
                      headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_tenant_names_labels_and_per_tenant_limit(tmp_path):
    base = Path(save_tiny_checkpoint(tmp_path / "base", seed=0))
    replica = Replica("tenants", base, tmp_path / "store", tmp_path, extra_env={
        "OLORA_API_KEYS": "team-a:ka,team-b:kb,kc", "OLORA_TENANT_MAX_CONCURRENT": "1",
        "OLORA_MAX_INPUT_TOKENS": "64", "OLORA_MAX_TOTAL_TOKENS": "512"})
    try:
        replica.wait_ready()
        assert _post(replica.url, "team-a:ka").status_code == 401  # the whole entry is not the key
        first = threading.Event()
        events: list = []

        def stream():
            body = {"inputs": "x", "parameters": {"max_new_tokens": STREAM_TOKENS, "ignore_eos_token": True}}
            with httpx.stream("POST", replica.url + "/generate_stream", json=body,
                              headers={"Authorization": "Bearer ka"}, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        events.append(json.loads(line[5:]))
                        first.set()
            first.set()

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        assert first.wait(60) and events
        refused = _post(replica.url, "ka")
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) > 0 and "team-a" in refused.json()["error"]
        assert _post(replica.url, "kb").status_code == 200  # another tenant
        assert _post(replica.url, "kc").status_code == 200  # an unnamed key: the `anonymous` tenant
        assert len(events) < STREAM_TOKENS, "the stream ended before the checks: they showed nothing"
        reader.join(120)
        assert events[-1]["details"]["generated_tokens"] == STREAM_TOKENS
        assert _post(replica.url, "ka").status_code == 200  # its slot is free again

        text = httpx.get(replica.url + "/metrics", timeout=10).text
        counts = {(s.labels["tenant"], s.labels["status"]): s.value for f in text_string_to_metric_families(text)
                  for s in f.samples if s.name == "olora_tenant_requests_total"}
        assert counts[("team-a", "429")] == 1 and counts[("team-a", "200")] == 2
        assert counts[("team-b", "200")] == 1 and counts[("anonymous", "200")] >= 1
        access = [json.loads(line) for line in replica.log_path.read_text().splitlines()
                  if line.startswith("{") and '"request_id"' in line]
        assert {a["tenant"] for a in access if a["path"] == "/generate" and a["status"] == 200} == \
            {"team-a", "team-b", None}
    finally:
        replica.stop()
