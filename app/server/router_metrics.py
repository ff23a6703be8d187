"""The model-server protocol LoRA-aware routers scrape: vLLM's gauge names, types and labels.

Read by the Gateway API inference extension's endpoint picker (its model-server protocol: queued and running
requests, KV-cache utilization, optional cache config, `vllm:lora_requests_info`), vLLM's router and
production-stack's router. Each gauge carries vLLM's `model_name` label (the base model); the values come from one
engine snapshot taken at scrape time (`ServerMetrics.refresh`), like the `olora_*` gauges beside them.

Semantics of the KV cache here: the engine's KV cache is row-based (app/engine/kv_cache.py), one row per running
sequence, each row holding up to `max_total_tokens` positions; a row is the unit a sequence allocates, as a block
is in vLLM. So `vllm:kv_cache_usage_perc` (0..1, "1 means 100 percent", as in vLLM) is the fraction of rows held by
a sequence, and `vllm:cache_config_info` says `block_size` = positions per row, `num_gpu_blocks` = rows. At 1.0 a
new request waits for a row: what a router should avoid. `olora_kv_cache_tokens_used` adds the positions written.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

MODEL_LABEL = "model_name"


def engine_load(stats) -> int:
    """The one load number of the routers that take one (vllm-router's `power_of_two`, through GET /get_load):
    requests in the engine, running + waiting, from one snapshot."""
    return stats.running + stats.waiting


class RouterProtocolMetrics:
    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                             [MODEL_LABEL], registry=r)
        self.running = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                             [MODEL_LABEL], registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage (rows held by "
                              "a sequence / rows).", [MODEL_LABEL], registry=r)
        self.cache_config = Gauge("vllm:cache_config_info", "Information of the KV cache config (value 1).",
                                  ["block_size", "num_gpu_blocks", "cache_dtype", "enable_prefix_caching"],
                                  registry=r)
        self.kv_tokens_used = Gauge("olora_kv_cache_tokens_used", "KV positions written across the rows in use",
                                    registry=r)

    def refresh(self, stats, model_name: str, cache_dtype: str) -> None:
        """Set every gauge from one engine snapshot (app.engine.engine_stats.EngineStats)."""
        self.waiting.labels(model_name).set(stats.waiting)
        self.running.labels(model_name).set(stats.running)
        self.kv_usage.labels(model_name).set(stats.kv_rows_used / stats.kv_rows if stats.kv_rows else 0.0)
        self.kv_tokens_used.set(stats.kv_tokens_used)
        self.cache_config.clear()
        self.cache_config.labels(block_size=str(stats.kv_row_tokens), num_gpu_blocks=str(stats.kv_rows),
                                 cache_dtype=cache_dtype, enable_prefix_caching="False").set(1)
