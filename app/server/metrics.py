"""Prometheus metrics of one server process (its own registry, so several apps can live in one test process)."""
from __future__ import annotations

import time
from typing import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from app.adapters.ephemeral import EPHEMERAL_PREFIX

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
OTHER_ADAPTERS = "__other__"
BASE_MODEL = "__base__"
MERGED_ADAPTERS = "~merged"  # every per-request merge (their ids are per request: never a label slot each)


class ServerMetrics:
    """All metrics of the server. Also the engine's observer (cache events, loads, steps)."""

    def __init__(self, max_adapter_labels: int = 100, max_loras: int = 0):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("olora_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.request_duration = Histogram("olora_request_duration_seconds", "End-to-end request duration",
                                          ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("olora_time_to_first_token_seconds", "Time from arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("olora_time_per_output_token_seconds", "Mean time per output token after the first",
                              buckets=TOKEN_BUCKETS, registry=r)
        self.queue_duration = Histogram("olora_queue_duration_seconds", "Time spent waiting before prefill",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("olora_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter("olora_generated_tokens", "Tokens generated", registry=r)
        self.finished = Counter("olora_generations_finished", "Finished generations by finish reason "
                                "(length, eos_token, stop_sequence, cancelled, error)", ["reason"], registry=r)
        self.queue_length = Gauge("olora_queue_length", "Requests waiting to be scheduled", registry=r)
        self.running = Gauge("olora_running_batch_size", "Sequences in the running batch", registry=r)
        self.cache_events = Counter("olora_adapter_cache_events", "Adapter cache events per tier",
                                    ["tier", "event"], registry=r)
        self.adapter_load = Histogram("olora_adapter_load_duration_seconds", "Adapter load duration into a tier",
                                      ["tier"], buckets=LOAD_BUCKETS, registry=r)
        self.observer_errors = Counter("olora_engine_observer_errors", "Exceptions raised by the engine's observer "
                                       "(these metrics' own callbacks), swallowed so the loop goes on", registry=r)
        self._observer_errors_seen = 0
        self.load_failures = Counter("olora_adapter_load_failures", "Adapter loads that failed", ["stage"],
                                     registry=r)
        self.load_failures.labels(stage="host")  # exported at 0 from the start: increase() sees the first failure
        self.adapters_registered = Gauge("olora_adapters_registered", "Adapters in the persistent store",
                                         registry=r)
        self.adapters_resident = Gauge("olora_adapters_resident", "Adapters resident per cache tier", ["tier"],
                                       registry=r)
        self.adapter_requests = Counter("olora_adapter_requests", "Generation requests per adapter "
                                        f"(at most {max_adapter_labels} labels, the rest as {OTHER_ADAPTERS})",
                                        ["adapter"], registry=r)
        labels = ["max_lora", "running_lora_adapters", "waiting_lora_adapters"]
        self.lora_info = Gauge("olora_lora_requests_info", "Running and waiting adapters (vLLM shape)", labels,
                               registry=r)
        # Same series under vLLM's name, which LoRA-aware gateways (Gateway API inference extension) read.
        self.vllm_lora_info = Gauge("vllm:lora_requests_info", "Running and waiting adapters", labels, registry=r)
        self._max_adapter_labels = max_adapter_labels
        self._adapter_labels: set[str] = set()
        self._max_loras = max_loras

    # ---- HTTP side --------------------------------------------------------------------------------------
    def adapter_label(self, adapter_id: str | None) -> str:
        if adapter_id is None:
            return BASE_MODEL
        if adapter_id.startswith(EPHEMERAL_PREFIX):
            return MERGED_ADAPTERS
        if adapter_id in self._adapter_labels:
            return adapter_id
        if len(self._adapter_labels) < self._max_adapter_labels:
            self._adapter_labels.add(adapter_id)
            return adapter_id
        return OTHER_ADAPTERS

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.request_duration.labels(route=route).observe(seconds)


    def set_max_loras(self, max_loras: int) -> None:
        """The engine's resolved slot count (the setting may be 0 = auto), shown as the `max_lora` label."""
        self._max_loras = max_loras

    def set_lora_info(self, running: list[str], waiting: list[str]) -> None:
        """vLLM's series; per-request merges are listed once as MERGED_ADAPTERS (their ids name other clients'
        merges and change with every request)."""
        def listed(ids: list[str]) -> str:
            return ",".join(sorted({MERGED_ADAPTERS if i.startswith(EPHEMERAL_PREFIX) else i for i in ids}))

        labels = dict(max_lora=str(self._max_loras), running_lora_adapters=listed(running),
                      waiting_lora_adapters=listed(waiting))
        for gauge in (self.lora_info, self.vllm_lora_info):
            gauge.clear()  # one series: the current state; its value is the time it was taken (as vLLM does)
            gauge.labels(**labels).set(time.time())

    def refresh(self, stats) -> None:
        """Set the gauges that describe the engine now from one snapshot (app.engine.engine_stats.EngineStats), at
        scrape time: the only place they are set, so they agree with each other."""
        self.set_lora_info(list(stats.running_adapters), list(stats.waiting_adapters))
        self.queue_length.set(stats.waiting)
        self.running.set(stats.running)
        self.adapters_resident.labels(tier="device").set(stats.slots_used)
        self.adapters_resident.labels(tier="host").set(stats.host_adapters)
        self.observer_errors.inc(stats.observer_errors - self._observer_errors_seen)  # a counter from a count
        self._observer_errors_seen = stats.observer_errors

    def count_registered(self, versions: Mapping[str, str]) -> int:
        """Set `olora_adapters_registered` from the store's `versions()` (id -> current version) and return it;
        the one place it is set (AppState.recount_adapters reads the store for the routes)."""
        self.adapters_registered.set(len(versions))
        return len(versions)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ---- engine observer --------------------------------------------------------------------------------
    def on_cache_event(self, tier: str, event: str, adapter_id: str) -> None:
        self.cache_events.labels(tier=tier, event=event).inc()
        if event == "load_error":  # the cache's one report of a failed load: `stage` is the tier it failed at
            self.on_adapter_load_failed(tier, adapter_id)

    def on_adapter_load(self, tier: str, seconds: float) -> None:
        self.adapter_load.labels(tier=tier).observe(seconds)

    def on_adapter_load_failed(self, stage: str, adapter_id: str) -> None:
        self.load_failures.labels(stage=stage).inc()

    def on_request_done(self, stats) -> None:
        """One generation finished (app.engine.observer.RequestStats), whatever the reason."""
        self.finished.labels(reason=stats.finish_reason).inc()
        self.adapter_requests.labels(adapter=self.adapter_label(stats.adapter_id)).inc()
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.generated_tokens.inc(stats.generated_tokens)
        self.queue_duration.observe(stats.queue_seconds)
        if stats.time_to_first_token is not None:
            self.ttft.observe(stats.time_to_first_token)
            if stats.generated_tokens > 1:
                self.tpot.observe((stats.total_seconds - stats.time_to_first_token) / (stats.generated_tokens - 1))
