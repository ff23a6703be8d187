"""Admission through a real engine: a request of many sequences is queued whole or refused whole, cancelled
sequences stop counting against max_waiting at once, and evictions spare what the waiting queue needs."""
from __future__ import annotations

import threading

import pytest
from helpers import save_random_lora, save_tiny_checkpoint

from app.engine import DirectoryAdapterSource, Engine, EngineConfig, QueueFull, SamplingParams
from app.engine.adapter_cache import AdapterKey
from app.server.generation import start_many


class Gate:
    """Observer holding the engine loop after each step until released: nothing leaves the queue meanwhile."""

    def __init__(self):
        self.release = threading.Event()
        self.stepped = threading.Event()

    def on_step(self, running, waiting, prefill_tokens, decode_tokens):
        self.stepped.set()
        self.release.wait(timeout=30)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("admission")
    base = save_tiny_checkpoint(root / "base")
    for i, name in enumerate(("x", "y", "z")):
        save_random_lora(base, root / "adapters" / name, r=4, seed=i + 1)
    return base, root / "adapters"


def make_engine(files, **kw) -> Engine:
    base, adapters = files
    cfg = dict(model=base, dtype="fp32", device="cpu", max_loras=2, max_rank=8, max_batch_size=2,
               max_input_tokens=16, max_total_tokens=64, max_batch_tokens=64, max_waiting=12)
    cfg.update(kw)
    engine = Engine(EngineConfig(**cfg), DirectoryAdapterSource(adapters))
    engine.start()
    return engine


LONG = SamplingParams(max_new_tokens=40, ignore_eos=True)


def test_many_sequences_enter_whole_and_cancelled_ones_stop_counting(files):
    engine = make_engine(files)
    gate = Gate()
    engine.observer.inner = gate
    try:
        running = engine.submit_many([([1, 2, 3], LONG)] * 2, None)  # fills both rows
        assert gate.stepped.wait(30)  # the loop is now held after its first step: the queue does not move
        assert engine.stats().running == 2
        a = start_many(engine, request_id="a", adapter_id=None, jobs=[([4, 5], LONG)] * 8)
        assert engine.stats().waiting == 8
        with pytest.raises(QueueFull, match="refused whole"):
            start_many(engine, request_id="b", adapter_id=None, jobs=[([6, 7], LONG)] * 8)  # 8 + 8 > 12
        assert engine.stats().waiting == 8, "the refused request left nothing queued"
        c = start_many(engine, request_id="c", adapter_id=None, jobs=[([8, 9], LONG)] * 4)  # 8 + 4 fit
        for handle, _ in a:
            handle.cancel()
        assert engine.stats().waiting == 4, "cancelled sequences stop counting before the next engine step"
        d = start_many(engine, request_id="d", adapter_id=None, jobs=[([10, 11], LONG)] * 8)  # 4 + 8 fit now
        gate.release.set()
        assert all(h.result(timeout=60).finish_reason == "cancelled" for h, _ in a)
        for handle, _ in c + d:
            assert handle.result(timeout=120).finish_reason == "length"
        assert all(h.result(timeout=60).finish_reason == "length" for h in running)
        assert engine.stats().waiting == 0 and engine.stats().running == 0
    finally:
        gate.release.set()
        engine.shutdown()


def test_three_concurrent_requests_where_two_fit(files):
    """Three threads each start a request of 8 sequences (max_waiting 16, the loop held): exactly two are
    queued, whatever the interleaving, and the third is refused whole."""
    engine = make_engine(files, max_waiting=16)
    gate = Gate()
    engine.observer.inner = gate
    try:
        engine.submit_many([([1, 2, 3], LONG)] * 2, None)
        assert gate.stepped.wait(30)
        outcomes: list = []
        barrier = threading.Barrier(3)

        def request(i: int) -> None:
            barrier.wait()
            try:
                outcomes.append(start_many(engine, request_id=f"r{i}", adapter_id=None,
                                           jobs=[([i + 1, j + 1], LONG) for j in range(8)]))
            except QueueFull:
                outcomes.append(None)

        threads = [threading.Thread(target=request, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(o is not None for o in outcomes) == 2
        assert engine.stats().waiting == 16
    finally:
        gate.release.set()
        engine.shutdown()


def test_eviction_spares_the_adapter_the_queue_needs_next(files):
    """Two slots hold x and y, idle; the queue needs y next: a copy of z overwrites x, not the older y."""
    engine = make_engine(files, max_waiting=12)
    try:
        cache = engine.cache
        keys = {name: cache.resolve(name) for name in "xyz"}
        for name in "yxz":  # y used first: the least recently used slot
            cache.want(keys[name])
        for name in "yx":
            _wait_host(cache, keys[name])
            cache.release_slot(cache.acquire_slot(keys[name]))
        _wait_host(cache, keys["z"])
        slot = cache.acquire_slot(keys["z"], needed=(keys["y"],))
        held = {view.adapter_id for view in cache.snapshot().slots if view is not None}
        assert held == {"y", "z"}, "plain LRU would have evicted y"
        cache.release_slot(slot)
        cache.release_slot(cache.acquire_slot(keys["x"], needed=(keys["z"], keys["y"])))  # both needed: the
        held = {view.adapter_id for view in cache.snapshot().slots if view is not None}  # one needed last goes
        assert held == {"x", "z"}
    finally:
        engine.shutdown()


def _wait_host(cache, key: AdapterKey) -> None:
    import time

    deadline = time.monotonic() + 30
    while cache.residency(key) == "loading":
        assert time.monotonic() < deadline, "adapter never reached host memory"
        time.sleep(0.01)
