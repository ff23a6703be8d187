"""`--log-format json` on a real `olora serve`: every line it writes (uvicorn's, the engine's, access lines,
errors, warnings) is one JSON object; request lines carry the request id and the trace id of the W3C traceparent
the request came with."""
from __future__ import annotations

import json
from pathlib import Path

import httpx

from helpers import save_tiny_checkpoint
from server_process import Replica

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def test_every_line_is_json_with_request_and_trace_ids(tmp_path):
    base = Path(save_tiny_checkpoint(tmp_path / "base", seed=0))
    replica = Replica("jsonlog", base, tmp_path / "store", tmp_path, extra_env={"OLORA_LOG_FORMAT": "json"})
    try:
        replica.wait_ready()
        ok = httpx.post(replica.url + "/v1/completions", json={"model": "no-such-adapter", "prompt": "x", "max_tokens": 2},
                        headers={"traceparent": TRACEPARENT, "X-Request-Id": "req-json-1"}, timeout=60)
        # an unknown adapter: an error answer, logged too
        assert ok.status_code == 404, ok.text
        gen = httpx.post(replica.url + "/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}},
                         headers={"traceparent": TRACEPARENT}, timeout=60)
        assert gen.status_code == 200
    finally:
        replica.stop()
    lines = [line for line in replica.log_path.read_text().splitlines() if line.strip()]
    parsed = []
    for line in lines:
        parsed.append(json.loads(line))  # a line that is not JSON fails here, naming it
        assert isinstance(parsed[-1], dict), line
    assert any(p.get("logger", "").startswith("uvicorn") for p in parsed)
    access = [p for p in parsed if p.get("logger") == "olora.access"]
    first = next(p for p in access if p["request_id"] == "req-json-1")
    assert first["trace_id"] == TRACE_ID and first["path"] == "/v1/completions" and first["status"] == 404
    generate = next(p for p in access if p["path"] == "/generate")
    assert generate["trace_id"] == TRACE_ID and generate["status"] == 200
    assert all(set(p) >= {"ts", "level", "logger", "request_id", "trace_id"} for p in parsed)
