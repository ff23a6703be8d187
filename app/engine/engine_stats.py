"""EngineStats: one consistent snapshot of the engine (Engine.stats()), read by the server's metrics, /info,
/get_load and the router-protocol gauges."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    waiting: int
    running: int
    running_adapters: tuple[str, ...]  # distinct ids, sorted (vLLM's running_lora_adapters)
    waiting_adapters: tuple[str, ...]
    max_loras: int
    slots_used: int
    slots_pinned: int
    slot_adapters: tuple[str | None, ...]  # per slot 1..max_loras
    host_adapters: int
    host_adapter_ids: tuple[str, ...]  # ids of the adapters in the host-memory cache
    host_bytes: int
    max_cpu_adapters: int
    pending_loads: int
    steps: int
    alive: bool
    kv_rows: int = 0  # rows of the KV cache: one per running sequence, each holding up to kv_row_tokens positions
    kv_rows_used: int = 0  # rows held by a sequence now (running, finished ones until the step frees them)
    kv_row_tokens: int = 0  # positions a row can hold (max_total_tokens)
    kv_tokens_used: int = 0  # positions written across the rows in use
    observer_errors: int = 0  # exceptions the observer raised (swallowed: SafeObserver)
    cpu_threads: int = 0  # intra-op threads the engine's loop thread runs its forwards with (0: loop not started)
