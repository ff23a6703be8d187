"""Drain on SIGTERM, on a real `olora serve` process: a running 1,000-token stream ends with its normal final
event, /ready turns 503 at once, a new generation gets 503 + Retry-After, and the process exits 0. Past the drain
timeout the stream ends with an in-band error event instead (never a cut connection)."""
from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from helpers import save_tiny_checkpoint
from server_process import Replica

LONG_STREAM_TOKENS = 1000
EXIT_WAIT_S = 60


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return Path(save_tiny_checkpoint(tmp_path_factory.mktemp("drain") / "base", seed=0))


def _stream(url: str, events: list, first_event: threading.Event) -> None:
    """Read /generate_stream to its end, every `data:` event parsed."""
    body = {"inputs": "Return the number", "parameters": {"max_new_tokens": LONG_STREAM_TOKENS,
                                                          "ignore_eos_token": True}}
    with httpx.stream("POST", url + "/generate_stream", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[len("data:"):]))
                first_event.set()
    first_event.set()


def _start(base: Path, tmp_path: Path, drain_timeout: float) -> tuple[Replica, list, threading.Thread]:
    replica = Replica("drain", base, tmp_path / "store", tmp_path,
                      extra_env={"OLORA_DRAIN_TIMEOUT": str(drain_timeout), "OLORA_MAX_TOTAL_TOKENS": "1100"})
    replica.wait_ready()
    events: list = []
    first_event = threading.Event()
    reader = threading.Thread(target=_stream, args=(replica.url, events, first_event), daemon=True)
    reader.start()
    assert first_event.wait(60), "no stream event within 60 s"
    assert events, "the stream ended before its first event"
    replica.proc.send_signal(signal.SIGTERM)
    return replica, events, reader


def test_sigterm_mid_stream_finishes_the_stream_refuses_new_work_and_exits_0(base, tmp_path):
    replica, events, reader = _start(base, tmp_path, drain_timeout=60)
    try:
        ready = httpx.get(replica.url + "/ready", timeout=5)  # sent right after the signal: drain is at once
        assert ready.status_code == 503 and ready.json()["status"] == "draining", ready.text
        refused = httpx.post(replica.url + "/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}},
                             timeout=10)
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["retry-after"]) > 0
        assert refused.json()["error_type"] == "unavailable"
        openai_refused = httpx.post(replica.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2},
                                    timeout=10)
        assert openai_refused.status_code == 503 and "retry-after" in openai_refused.headers
        assert httpx.get(replica.url + "/health", timeout=5).status_code == 200  # alive while it drains
        assert len(events) < LONG_STREAM_TOKENS, "the stream ended before the signal: the test shows nothing"
        reader.join(120)
        assert not reader.is_alive()
        final = events[-1]
        assert "error" not in final, final
        assert final["details"]["finish_reason"] == "length"
        assert final["details"]["generated_tokens"] == LONG_STREAM_TOKENS
        assert len(events) == LONG_STREAM_TOKENS
        assert replica.proc.wait(EXIT_WAIT_S) == 0
    finally:
        replica.stop()


def test_past_the_drain_timeout_the_stream_ends_with_an_error_event_and_the_process_exits_0(base, tmp_path):
    replica, events, reader = _start(base, tmp_path, drain_timeout=0.5)
    try:
        started = time.monotonic()
        reader.join(60)
        assert not reader.is_alive()
        final = events[-1]
        assert final.get("error_type") == "shutting_down", final
        assert len(events) < LONG_STREAM_TOKENS + 1
        assert replica.proc.wait(EXIT_WAIT_S) == 0
        assert time.monotonic() - started < EXIT_WAIT_S
    finally:
        replica.stop()
