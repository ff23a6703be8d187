"""Continuous batching: rows join/leave/cancel without leaking into each other, seeded sampling, finish reasons,
incremental text, request validation."""
from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time

import pytest
from helpers import byte_tokenizer, save_random_lora, save_tiny_checkpoint

from app.engine import (
    AdapterNotFound,
    DirectoryAdapterSource,
    Engine,
    EngineConfig,
    InputTooLong,
    InvalidRequest,
    QueueFull,
    SamplingParams,
)
from app.engine.text import IncrementalDetokenizer, find_stop

PROMPTS = {"a": [5, 9, 200, 31, 7], "b": [100, 3, 44], "c": [17, 18, 19, 20, 21, 22, 23], "d": [64, 65]}
ADAPTER_OF = {"a": "x", "b": None, "c": "y", "d": "x"}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    base = save_tiny_checkpoint(root / "base")
    save_random_lora(base, root / "adapters" / "x", r=4, seed=1)
    save_random_lora(base, root / "adapters" / "y", r=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"), seed=2)
    eng = Engine(EngineConfig(model=base, dtype="fp32", device="cpu", max_loras=2, max_rank=8, max_batch_size=4,
                              max_input_tokens=32, max_total_tokens=96, max_batch_tokens=64, max_waiting=4),
                 DirectoryAdapterSource(root / "adapters"))
    eng.start()
    yield eng
    eng.shutdown()


def alone(engine, name, **params):
    params.setdefault("ignore_eos", True)
    return engine.submit(PROMPTS[name], ADAPTER_OF[name], SamplingParams(**params)).result(timeout=60)


def wait_until(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


class StepGate:
    """An observer that holds the engine loop after every step until the test lets it go on: the test decides
    at which step each request joins or is cancelled."""

    def __init__(self):
        self.permits = threading.Semaphore(0)
        self.cond = threading.Condition()
        self.steps = 0
        self.running: list[int] = []
        self.opened = False

    def on_step(self, running, waiting, prefill_tokens, decode_tokens):
        with self.cond:
            self.steps += 1
            self.running.append(running)
            self.cond.notify_all()
        if not self.opened:
            self.permits.acquire(timeout=10)

    def wait_steps(self, n):
        with self.cond:
            assert self.cond.wait_for(lambda: self.steps >= n, timeout=10), f"engine stuck before step {n}"

    def advance(self, n=1):
        target = self.steps + n
        for _ in range(n):
            self.permits.release()
        self.wait_steps(target)

    def open(self):
        self.opened = True
        self.permits.release(1000)


def test_join_leave_and_cancel_do_not_change_other_rows(engine):
    reference = {n: alone(engine, n, max_new_tokens=24).token_ids for n in PROMPTS}
    gate = StepGate()
    engine.observer.inner = gate
    params = lambda n: SamplingParams(max_new_tokens=n, ignore_eos=True)  # noqa: E731
    try:
        a = engine.submit(PROMPTS["a"], "x", params(24))
        gate.wait_steps(1)  # step 1: a prefilled
        gate.advance(2)
        b = engine.submit(PROMPTS["b"], None, params(10))  # joins at step 4, leaves early
        gate.advance(5)
        c = engine.submit(PROMPTS["c"], "y", params(24))
        d = engine.submit(PROMPTS["d"], "x", params(24))  # c and d join at step 9 (4 rows, 2 adapters + base)
        gate.advance(4)
        c.cancel()  # c leaves mid-way, after 4 tokens; its row is refilled by the last row
        gate.advance(3)
    finally:
        gate.open()
        engine.observer.inner = None
    got = {name: h.result(timeout=60) for name, h in zip("abcd", (a, b, c, d))}
    assert max(gate.running) == 4
    assert got["a"].token_ids == reference["a"]
    assert got["b"].token_ids == reference["b"][:10]
    assert got["d"].token_ids == reference["d"]
    assert got["c"].finish_reason == "cancelled" and len(got["c"].token_ids) == 4
    assert got["c"].token_ids == reference["c"][:4]
    assert {got[n].finish_reason for n in "abd"} == {"length"}
    stats = engine.stats()
    assert stats.running == 0 and stats.slots_pinned == 0


def test_async_stream_matches_result(engine):
    expected = alone(engine, "c", max_new_tokens=12)

    async def main():
        handle = engine.submit(PROMPTS["c"], "y", SamplingParams(max_new_tokens=12, ignore_eos=True))
        return [event async for event in handle], handle

    events, handle = asyncio.run(main())
    assert [e.token_id for e in events] == expected.token_ids
    assert "".join(e.text for e in events) == expected.text
    assert [e.finish_reason for e in events] == [None] * 11 + ["length"] and handle.finish_reason == "length"
    assert all(e.logprob <= 0 for e in events)


def test_cancel_frees_row_and_slot_at_once(engine):
    h = engine.submit(PROMPTS["c"], "y", SamplingParams(max_new_tokens=80, ignore_eos=True))
    other = engine.submit(PROMPTS["b"], None, SamplingParams(max_new_tokens=60, ignore_eos=True))
    wait_until(lambda: engine.stats().running == 2)
    assert "y" in engine.stats().running_adapters and engine.stats().slots_pinned == 1
    h.cancel()
    wait_until(lambda: engine.stats().running == 1)
    stats = engine.stats()
    assert stats.slots_pinned == 0 and stats.running_adapters == ()
    assert not other.done  # the other row keeps decoding
    assert h.result(timeout=10).finish_reason == "cancelled"
    other.cancel()
    assert other.result(timeout=10).finish_reason == "cancelled"


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(engine):
    params = dict(max_new_tokens=16, do_sample=True, temperature=0.8, top_k=50, top_p=0.95,
                  repetition_penalty=1.1, seed=1234, ignore_eos=True)
    solo = alone(engine, "a", **params).token_ids
    batch = [engine.submit(PROMPTS[n], ADAPTER_OF[n], SamplingParams(**{**params, "seed": 99 + i}))
             for i, n in enumerate(["c", "b"])]
    mine = engine.submit(PROMPTS["a"], "x", SamplingParams(**params))
    batch.append(engine.submit(PROMPTS["d"], "x", SamplingParams(max_new_tokens=16)))
    assert mine.result(timeout=60).token_ids == solo
    others = [h.result(timeout=60).token_ids for h in batch]
    assert alone(engine, "a", **{**params, "seed": 4321}).token_ids != solo  # the seed matters
    assert others[0] != solo


def test_stop_sequence_and_eos(engine, tmp_path):
    full = alone(engine, "b", max_new_tokens=12)
    text = full.text
    stop = next(text[i:i + 2] for i in range(2, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    res = alone(engine, "b", max_new_tokens=12, stop=[stop, "never-appears"])
    assert res.finish_reason == "stop_sequence"
    assert res.text.endswith(stop) and text.startswith(res.text) and len(res.token_ids) < 12
    # eos: a copy of the checkpoint whose generation_config calls the 3rd greedy token an end-of-sequence token
    base = tmp_path / "base"
    shutil.copytree(engine.base.path, base)
    gen = json.loads((base / "generation_config.json").read_text())
    gen["eos_token_id"] = [gen["eos_token_id"], full.token_ids[2]]
    (base / "generation_config.json").write_text(json.dumps(gen))
    eng2 = Engine(EngineConfig(model=str(base), device="cpu", max_input_tokens=16, max_total_tokens=32,
                               max_batch_tokens=32, max_rank=8, max_loras=1), DirectoryAdapterSource(tmp_path))
    eng2.start()
    try:
        first = full.token_ids.index(full.token_ids[2])
        res = eng2.submit(PROMPTS["b"], None, SamplingParams(max_new_tokens=12)).result(timeout=60)
        assert res.finish_reason == "eos_token" and res.token_ids == full.token_ids[:first + 1]
        res = eng2.submit(PROMPTS["b"], None, SamplingParams(max_new_tokens=12, ignore_eos=True)).result(timeout=60)
        assert res.finish_reason == "length" and res.token_ids == full.token_ids
    finally:
        eng2.shutdown()


def test_incremental_text_across_byte_boundaries():
    tok = byte_tokenizer()
    text = "héllo 日本語 🙂!"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode())  # one token per byte
    detok = IncrementalDetokenizer(tok, [72, 105])
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    assert pieces[1] == "" and pieces[2] == "é"  # the 2-byte é is emitted once complete
    # invalid byte soup decodes like a one-shot decode, replacement characters included
    soup = [200, 65, 230, 151, 66, 240]
    detok = IncrementalDetokenizer(tok, [])
    assert "".join([detok.add(t) for t in soup] + [detok.flush()]) == tok.decode(soup)
    assert find_stop("abcdef", 2, ["cde"]) == 5 and find_stop("abcdef", 1, ["cd"]) == -1


def test_request_validation(engine):
    with pytest.raises(InputTooLong):
        engine.submit(list(range(33)), None, SamplingParams())
    with pytest.raises(InputTooLong):
        engine.submit([1] * 30, None, SamplingParams(max_new_tokens=70))
    with pytest.raises(AdapterNotFound):
        engine.submit([1], "nope", SamplingParams())
    with pytest.raises(AdapterNotFound):
        engine.submit([1], "../adapters/x", SamplingParams())
    with pytest.raises(InvalidRequest):
        engine.submit([1, 100000], None, SamplingParams())
    with pytest.raises(InvalidRequest):
        engine.submit([], None, SamplingParams())
    for bad in (dict(temperature=0), dict(top_p=0), dict(top_k=-1), dict(max_new_tokens=0), dict(seed=-1),
                dict(stop=[""]), dict(repetition_penalty=0), dict(stop="x" * 3)):
        with pytest.raises(InvalidRequest):
            SamplingParams(**bad)


def test_queue_full(engine):
    long = SamplingParams(max_new_tokens=90, ignore_eos=True)
    running = [engine.submit([1, 2], None, long) for _ in range(4)]
    wait_until(lambda: engine.stats().running == 4)
    waiting = [engine.submit([1, 2], None, long) for _ in range(4)]
    with pytest.raises(QueueFull):
        engine.submit([1, 2], None, long)
    assert engine.stats().waiting == 4
    for h in running + waiting:
        h.cancel()
    assert all(h.result(timeout=30).finish_reason == "cancelled" for h in running + waiting)


def test_prefill_token_budget_and_request_stats(engine):
    class Record:
        def __init__(self):
            self.prefill, self.done = [], []

        def on_step(self, running, waiting, prefill_tokens, decode_tokens):
            self.prefill.append(prefill_tokens)

        def on_request_done(self, stats):
            self.done.append(stats)

    record = Record()
    engine.observer.inner = record
    try:
        prompts = [[7 + i] * 30 for i in range(4)]  # 4 x 30 tokens; max_batch_tokens is 64
        handles = [engine.submit(p, "x", SamplingParams(max_new_tokens=3, ignore_eos=True)) for p in prompts]
        results = [h.result(timeout=60) for h in handles]
    finally:
        engine.observer.inner = None
    assert 0 < max(record.prefill) <= 64 and sum(record.prefill) == 120  # never 3 prompts in one iteration
    assert {s.request_id for s in record.done} == {h.request_id for h in handles}
    for stats in record.done:
        assert stats.finish_reason == "length" and stats.prompt_tokens == 30 and stats.generated_tokens == 3
        assert stats.adapter_id == "x" and 0 <= stats.queue_seconds <= stats.total_seconds
        assert stats.time_to_first_token is not None and stats.error is None
    assert all(len(r.token_ids) == 3 for r in results)
