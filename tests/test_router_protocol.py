"""The model-server protocol LoRA-aware routers read, scraped from a real `olora serve` while it works: vLLM's
gauge names, types and labels (the inference extension's protocol document; vLLM's own exposition), values from
the engine's real state (one running stream holds the only KV row: usage 1.0; a second request waits), and
`/v1/models` cards whose adapters name their `parent`."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from helpers import save_random_lora, save_tiny_checkpoint
from http_helpers import tar_gz
from server_process import Replica

MAX_TOTAL_TOKENS = 512
STREAM_TOKENS = 400
WAIT_S = 60


def scrape(url: str) -> dict:
    """name -> (type, [samples]) with prometheus_client's parser of the text format (what scrapers parse)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {f.name: (f.type, f.samples) for f in text_string_to_metric_families(text)}


def _stream(url: str, adapter: str | None, events: list, first: threading.Event) -> None:
    body = {"inputs": "Return the number", "parameters": {"max_new_tokens": STREAM_TOKENS, "ignore_eos_token": True,
                                                          "adapter_id": adapter}}
    with httpx.stream("POST", url + "/generate_stream", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
                first.set()
    first.set()


def _until(predicate, what: str):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {WAIT_S} s: {what}")


def test_router_gauges_follow_the_engine_and_cards_name_their_parent(tmp_path):
    base = Path(save_tiny_checkpoint(tmp_path / "base", seed=0))
    lora = Path(save_random_lora(base, tmp_path / "lora", r=4, seed=1, task_type="CAUSAL_LM"))
    replica = Replica("protocol", base, tmp_path / "store", tmp_path,
                      extra_env={"OLORA_MAX_BATCH_SIZE": "1", "OLORA_MAX_TOTAL_TOKENS": str(MAX_TOTAL_TOKENS),
                                 "OLORA_MAX_INPUT_TOKENS": "64"})
    try:
        replica.wait_ready()
        up = httpx.post(replica.url + "/adapters", data={"adapter_id": "ad1"},
                        files={"archive": ("a.tgz", tar_gz(lora), "application/gzip")}, timeout=60)
        assert up.status_code == 201, up.text
        idle = scrape(replica.url)
        model = httpx.get(replica.url + "/info", timeout=5).json()["model_id"]
        for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                     "vllm:cache_config_info", "vllm:lora_requests_info"):
            assert idle[name][0] == "gauge", name
        assert httpx.get(replica.url + "/get_load", timeout=5).json() == {"load": 0}  # vllm-router's load route
        (usage,) = idle["vllm:kv_cache_usage_perc"][1]
        assert usage.labels == {"model_name": model} and usage.value == 0
        (config,) = idle["vllm:cache_config_info"][1]
        assert config.value == 1 and config.labels["block_size"] == str(MAX_TOTAL_TOKENS)
        assert config.labels["num_gpu_blocks"] == "1"

        streams = []
        for adapter in ("ad1", None):  # the second waits: one KV row
            events, first = [], threading.Event()
            thread = threading.Thread(target=_stream, args=(replica.url, adapter, events, first), daemon=True)
            thread.start()
            streams.append((thread, events, first))
            if adapter == "ad1":
                assert first.wait(WAIT_S) and events

        def busy():
            m = scrape(replica.url)
            value = {n: m[n][1][0].value for n in ("vllm:num_requests_waiting", "vllm:num_requests_running",
                                                   "vllm:kv_cache_usage_perc")}
            load = httpx.get(replica.url + "/get_load", timeout=5).json()
            return m if value == {"vllm:num_requests_waiting": 1, "vllm:num_requests_running": 1,
                                  "vllm:kv_cache_usage_perc": 1.0} and load == {"load": 2} else None
        m = _until(busy, "one running, one waiting, the KV row held; /get_load says 2")
        assert all(s.labels == {"model_name": model} for n in ("vllm:num_requests_waiting", "vllm:num_requests_running")
                   for s in m[n][1])
        (lora_info,) = m["vllm:lora_requests_info"][1]
        assert lora_info.labels["running_lora_adapters"] == "ad1" and lora_info.labels["max_lora"]
        assert m["olora_kv_cache_tokens_used"][1][0].value > len("Return the number")

        for thread, events, _ in streams:
            thread.join(300)
            assert events[-1]["details"]["generated_tokens"] == STREAM_TOKENS
        done = _until(lambda: (lambda m: m if m["vllm:num_requests_running"][1][0].value == 0 else None)(
            scrape(replica.url)), "the batch empties")
        assert done["vllm:kv_cache_usage_perc"][1][0].value == 0

        cards = {c["id"]: c for c in httpx.get(replica.url + "/v1/models", timeout=5).json()["data"]}
        assert cards["ad1"]["parent"] == model and cards[model]["parent"] is None
    finally:
        replica.stop()
