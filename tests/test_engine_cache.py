"""Adapter cache tiers: slot LRU and pinning, host LRU bound (1,000 registered adapters), invalidation, counters,
and load errors found on the loader thread."""
from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time

import pytest
import torch
from helpers import save_random_lora, save_tiny_checkpoint
from safetensors.torch import save_file

from app.engine import (
    AdapterNotFound,
    AdapterShapeMismatch,
    DirectoryAdapterSource,
    Engine,
    EngineConfig,
    SamplingParams,
)
from app.engine.adapter_cache import AdapterCache, SlotView
from app.engine.errors import EngineError
from app.engine.observer import NullObserver

PROMPT = [5, 9, 200, 31, 7]


def write_lora_dir(path, r: int, seed: int, layers=(0, 1), hidden=64, kv=32) -> None:
    """A plain PEFT-format LoRA on q_proj/v_proj written directly (fast enough for 1,000 adapters)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in layers:
        for module, out in (("q_proj", hidden), ("v_proj", kv)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, hidden, generator=gen) * 0.1
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, r, generator=gen) * 0.05
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"],
        "init_lora_weights": True, "bias": "none"}))


class Events:
    """Observer recording cache events and loads."""

    def __init__(self):
        self.events: list[tuple[str, str, str]] = []
        self.loads: list[tuple[str, float]] = []
        self.lock = threading.Lock()

    def on_cache_event(self, tier, event, adapter_id):
        with self.lock:
            self.events.append((tier, event, adapter_id))

    def on_adapter_load(self, tier, seconds):
        self.loads.append((tier, seconds))

    def on_step(self, *args):
        pass

    def on_request_done(self, stats):
        pass

    def of(self, tier, event):
        return [a for t, e, a in self.events if t == tier and e == event]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("cache") / "base")


def make_engine(base, root, observer=None, **overrides) -> Engine:
    cfg = dict(model=base, dtype="fp32", device="cpu", max_loras=2, max_cpu_adapters=3, max_rank=8,
               max_batch_size=4, max_input_tokens=16, max_total_tokens=128, max_batch_tokens=64, max_waiting=64)
    cfg.update(overrides)
    engine = Engine(EngineConfig(**cfg), DirectoryAdapterSource(root), observer)
    engine.start()
    return engine


def run(engine, adapter, n=4, **kw):
    return engine.submit(PROMPT, adapter, SamplingParams(max_new_tokens=n, ignore_eos=True, **kw)).result(timeout=60)


def test_slot_and_host_lru_order_and_counters(base, tmp_path):
    for i, name in enumerate("pqrs"):
        write_lora_dir(tmp_path / name, r=2 + i, seed=i)
    events = Events()
    engine = make_engine(base, tmp_path, events)
    try:
        for name in ["p", "q", "p", "r"]:  # p is used again, so q is the least recently used slot when r comes
            run(engine, name)
        assert events.of("device", "eviction") == ["q"]
        assert set(engine.stats().slot_adapters) == {"p", "r"}
        assert events.of("device", "hit") == ["p"] and events.of("device", "miss") == ["p", "q", "r"]
        run(engine, "s")  # host holds 3: p, q, r -> s evicts the least recently used host entry (q)
        assert events.of("host", "eviction") == ["q"]
        assert events.of("host", "miss") == ["p", "q", "r", "s"]
        assert len(events.of("host", "load")) == 4 and len(events.of("device", "load")) == 4
        assert len(events.of("device", "hit")) == 1
        assert len([t for t, _ in events.loads if t == "host"]) == 4
        assert all(s >= 0 for _, s in events.loads)
        stats = engine.stats()
        assert stats.host_adapters == 3 and stats.host_bytes > 0 and stats.slots_pinned == 0
    finally:
        engine.shutdown()


def test_pinned_slots_are_never_evicted_and_newcomers_wait(base, tmp_path):
    for i, name in enumerate("pq"):
        write_lora_dir(tmp_path / name, r=4, seed=10 + i)
    engine = make_engine(base, tmp_path, max_loras=1)
    try:
        q_alone = run(engine, "q", n=6).token_ids
        long = engine.submit(PROMPT, "p", SamplingParams(max_new_tokens=120, ignore_eos=True))
        deadline = time.monotonic() + 30
        while engine.stats().running < 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        waiting = engine.submit(PROMPT, "q", SamplingParams(max_new_tokens=6, ignore_eos=True))
        base_row = engine.submit(PROMPT, None, SamplingParams(max_new_tokens=3, ignore_eos=True))
        assert base_row.result(timeout=30).finish_reason == "length"  # base rows need no slot: not blocked
        stats = engine.stats()
        assert stats.slot_adapters == ("p",) and stats.slots_pinned == 1
        assert stats.waiting_adapters == ("q",) and not waiting.done and not long.done
        long.cancel()
        assert waiting.result(timeout=30).token_ids == q_alone
        assert engine.stats().slot_adapters == ("q",)
    finally:
        engine.shutdown()


def test_invalidate_overwrite_and_delete(base, tmp_path):
    root = tmp_path / "store"
    save_random_lora(base, root / "p", r=4, seed=1)
    save_random_lora(base, root / "new", r=8, targets=("k_proj", "o_proj"), seed=2)
    engine = make_engine(base, root)
    try:
        old = run(engine, "p", n=30).token_ids
        new = run(engine, "new", n=30).token_ids
        assert old != new
        running = engine.submit(PROMPT, "p", SamplingParams(max_new_tokens=120, ignore_eos=True))
        while engine.stats().running < 1:
            time.sleep(0.005)
        shutil.rmtree(root / "p")
        shutil.copytree(root / "new", root / "p")  # overwrite in place (same path)
        engine.invalidate("p")
        assert not running.done
        assert run(engine, "p", n=30).token_ids == new  # later requests see the new version...
        res = running.result(timeout=60)
        assert res.token_ids[:30] == old  # ...while the running one finished with what it had
        shutil.rmtree(root / "p")
        engine.invalidate("p")
        with pytest.raises(AdapterNotFound):
            engine.submit(PROMPT, "p", SamplingParams())
        assert "p" not in engine.stats().slot_adapters
    finally:
        engine.shutdown()


def test_load_error_reaches_the_request_and_is_remembered(base, tmp_path):
    write_lora_dir(tmp_path / "bad", r=4, seed=0, hidden=48)  # A has in=48, the base has 64
    engine = make_engine(base, tmp_path)
    try:
        handle = engine.submit(PROMPT, "bad", SamplingParams())  # the config is fine; tensors are checked later
        with pytest.raises(AdapterShapeMismatch, match="lora_A"):
            handle.result(timeout=30)
        assert handle.finish_reason == "error"
        with pytest.raises(AdapterShapeMismatch):
            engine.submit(PROMPT, "bad", SamplingParams())
        assert run(engine, None).finish_reason == "length"  # the engine goes on
    finally:
        engine.shutdown()


def test_thousand_registered_adapters_host_memory_is_bounded(base, tmp_path):
    n_adapters, max_cpu = 1000, 8
    for i in range(n_adapters):
        write_lora_dir(tmp_path / f"a{i:04d}", r=1 + i % 4, seed=i, layers=(0,))
    per_adapter_max = 4 * (64 + 64) * 4 + 4 * (64 + 32) * 4  # r=4 on q (64->64) and v (64->32), fp32
    peak = {"entries": 0, "bytes": 0}

    class Watch(Events):
        def on_cache_event(self, tier, event, adapter_id):
            if tier == "host" and event == "load":
                snap = engine.cache.snapshot()
                peak["entries"] = max(peak["entries"], len(snap.host_adapter_ids))
                peak["bytes"] = max(peak["bytes"], snap.host_bytes)
            super().on_cache_event(tier, event, adapter_id)

    watch = Watch()
    engine = make_engine(base, tmp_path, watch, max_cpu_adapters=max_cpu, max_loras=4, max_batch_size=8,
                         max_waiting=1000)
    try:
        handles = [engine.submit(PROMPT, f"a{i:04d}", SamplingParams(max_new_tokens=1)) for i in range(n_adapters)]
        for h in handles:
            assert h.result(timeout=120).finish_reason in ("length", "eos_token")
        assert len(watch.of("host", "load")) == n_adapters
        assert 0 < peak["entries"] <= max_cpu and peak["bytes"] <= max_cpu * per_adapter_max
        stats = engine.stats()
        assert stats.host_adapters <= max_cpu and stats.slots_used <= 4
        assert len(watch.of("host", "eviction")) >= n_adapters - max_cpu
    finally:
        engine.shutdown()


def test_snapshot_is_typed_and_follows_pins(base, tmp_path):
    write_lora_dir(tmp_path / "p", r=4, seed=3)
    engine = make_engine(base, tmp_path)
    try:
        long = engine.submit(PROMPT, "p", SamplingParams(max_new_tokens=120, ignore_eos=True))
        deadline = time.monotonic() + 30
        while engine.stats().running < 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        snap = engine.cache.snapshot()
        assert snap.slots == (SlotView("p", 1), None) and snap.host_adapter_ids == ("p",)
        assert snap.pending_loads == 0 and snap.host_bytes == 4 * (2 * (64 + 64) + 2 * (64 + 32)) * 4
        with pytest.raises(dataclasses.FrozenInstanceError):
            snap.host_bytes = 0
        long.cancel()
        assert long.result(timeout=30).finish_reason == "cancelled"
        assert engine.cache.snapshot().slots == (SlotView("p", 0), None)  # unpinned, still loaded
        assert engine.stats().slots_pinned == 0 and engine.stats().slot_adapters == ("p", None)
    finally:
        engine.shutdown()


def test_cache_parses_with_the_parser_object_and_sets_the_wake_event(base, tmp_path):
    """The cache knows the engine only through its parser and a threading.Event: a finished or failed load sets
    the event, and the outcome is read back through status()."""
    write_lora_dir(tmp_path / "good", r=4, seed=4)
    write_lora_dir(tmp_path / "bad", r=4, seed=5, hidden=48)
    engine = make_engine(base, tmp_path)
    wake = threading.Event()
    cache = AdapterCache(DirectoryAdapterSource(tmp_path), engine.bank, 2, engine.parser, NullObserver(), wake)
    cache.start()
    try:
        for name, expected in (("good", "host"), ("bad", AdapterShapeMismatch)):
            wake.clear()
            key = cache.resolve(name)
            cache.want(key)
            assert wake.wait(timeout=30)
            status = cache.status(key)
            if isinstance(expected, str):
                assert status == expected
            else:
                assert isinstance(status, EngineError) and isinstance(status, expected)
                with pytest.raises(expected):
                    cache.resolve(name)  # the error is remembered for this version
            cache.unwant(key)
        assert cache.snapshot().host_adapter_ids == ("good",) and cache.snapshot().pending_loads == 0
        cache.invalidate("bad")
        assert cache.resolve("bad").generation == 1  # the failure was forgotten with its version
    finally:
        cache.stop()
        engine.shutdown()
