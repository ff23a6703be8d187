"""How tokens travel from the engine thread to the HTTP layer's event loop: one wake-up per loop per engine step
(`Wakeups.batch`), every event of a step read at once (`RequestHandle.next_events`), the request's timeout and
the client's disconnect without polling (app/server/generation.py)."""
from __future__ import annotations

import asyncio
import threading

import pytest

from app.engine.errors import AdapterUnavailable
from app.engine.handle import RequestHandle, TokenEvent, Wakeups
from app.server.generation import Generation, GenerationTimeout, collect, merged_tokens, until_disconnected


def _event(i: int, last: bool = False) -> TokenEvent:
    return TokenEvent(i, f"t{i}", -0.5, "length" if last else None)


class CountingLoop:
    """Counts the cross-thread hand-offs (`call_soon_threadsafe`) scheduled on the running loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.calls = 0
        inner = loop.call_soon_threadsafe

        def counted(*args, **kwargs):
            self.calls += 1
            return inner(*args, **kwargs)
        loop.call_soon_threadsafe = counted


async def _in_thread(fn) -> None:
    thread = threading.Thread(target=fn)  # the engine thread's role
    thread.start()
    while thread.is_alive():  # polled: a to_thread join would add a hand-off of its own to the count
        await asyncio.sleep(0.001)


def test_one_step_wakes_the_loop_once_and_every_consumer_reads_its_tokens():
    async def run():
        counter = CountingLoop(asyncio.get_running_loop())
        wakeups = Wakeups()
        handles = [RequestHandle(f"r{i}", lambda rid: None, wakeups=wakeups) for i in range(4)]
        readers = [asyncio.create_task(h.next_events()) for h in handles]
        await asyncio.sleep(0)  # every reader is waiting (its loop registered with its handle)

        def step():
            with wakeups.batch():
                for i, h in enumerate(handles):
                    h.push(_event(i))
                    h.push(_event(10 + i))  # two tokens in one step (a consumer that fell behind)
        before = counter.calls
        await _in_thread(step)
        got = await asyncio.gather(*readers)
        batched = counter.calls - before
        assert [[e.token_id for e in events] for events in got] == [[i, 10 + i] for i in range(4)]

        def unbatched():  # outside a batch (e.g. a cancel from another thread): every wake-up at once
            for i, h in enumerate(handles):
                h.push(_event(20 + i))
        readers = [asyncio.create_task(h.next_events()) for h in handles]
        await asyncio.sleep(0)
        before = counter.calls
        await _in_thread(unbatched)
        got = await asyncio.gather(*readers)
        assert [[e.token_id for e in events] for events in got] == [[20 + i] for i in range(4)]
        return batched, counter.calls - before

    batched, unbatched = asyncio.run(run())
    assert batched == 1  # 8 tokens to 4 consumers on one loop: one hand-off
    assert unbatched == 4


def test_next_events_ends_empty_or_raises_the_error():
    async def run():
        done, failed = RequestHandle("a", lambda rid: None), RequestHandle("b", lambda rid: None)
        done.push(_event(1))
        done.push(_event(2, last=True))
        done.finish("length")
        failed.finish("error", AdapterUnavailable("gone"))
        first = await done.next_events()
        with pytest.raises(AdapterUnavailable):
            await failed.next_events()
        return first, await done.next_events()

    first, after = asyncio.run(run())
    assert [e.token_id for e in first] == [1, 2] and after == []


def test_collect_and_merged_tokens_give_every_token_once_in_order():
    async def run():
        wakeups = Wakeups()
        handles = [RequestHandle(f"r{i}", lambda rid: None, wakeups=wakeups) for i in range(2)]
        gens = [Generation(request_id=f"r{i}") for i in range(2)]

        def engine():
            for step in range(5):
                with wakeups.batch():
                    for h in handles:
                        h.push(_event(step, last=step == 4))
            for h in handles:
                h.finish("length")
        single = asyncio.create_task(collect(handles[0], gens[0], timeout_s=60))
        merged = await _merged([(handles[1], gens[1])], engine)
        await single
        return gens, merged

    async def _merged(runs, engine):
        thread = threading.Thread(target=engine)
        thread.start()
        out = [(i, None if t is None else t.token_id) async for i, t in merged_tokens(runs, timeout_s=60)]
        await asyncio.to_thread(thread.join)
        return out

    gens, merged = asyncio.run(run())
    assert gens[0].token_ids == [0, 1, 2, 3, 4] and gens[0].text == "t0t1t2t3t4"
    assert gens[0].finish_reason == "length"
    assert merged == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (0, None)]
    assert gens[1].token_ids == [0, 1, 2, 3, 4]


def test_timeout_and_disconnect_cancel_the_request():
    cancelled: list[str] = []

    async def run():
        quiet = RequestHandle("quiet", cancelled.append)
        with pytest.raises(GenerationTimeout):
            await collect(quiet, Generation(request_id="quiet"), timeout_s=0.05)
        gone = asyncio.Event()
        left = RequestHandle("left", cancelled.append)

        async def disconnected():
            await gone.wait()

        task = asyncio.create_task(collect(left, Generation(request_id="left"), timeout_s=60,
                                           disconnected=disconnected))
        await asyncio.sleep(0.01)
        assert "left" not in cancelled  # no disconnect yet: the request runs on
        gone.set()
        for _ in range(100):
            if "left" in cancelled:
                break
            await asyncio.sleep(0.01)
        left.finish("cancelled")  # what the engine does once it sees the cancel
        polls = []

        async def poll() -> bool:  # a poll-style check (Request.is_disconnected): False twice, then gone
            polls.append(1)
            return len(polls) > 2

        polled = RequestHandle("polled", cancelled.append)
        polling = asyncio.create_task(collect(polled, Generation(request_id="polled"), timeout_s=60,
                                              disconnected=poll))
        for _ in range(200):
            if "polled" in cancelled:
                break
            await asyncio.sleep(0.01)
        assert len(polls) == 3  # not cancelled on the first False
        polled.finish("cancelled")
        await polling
        return await task

    generation = asyncio.run(run())
    assert cancelled[0] == "quiet" and "left" in cancelled
    assert generation.finish_reason == "cancelled"


def test_until_disconnected_reads_until_the_disconnect_message():
    messages = [{"type": "http.request", "body": b"", "more_body": False}] * 2 + [{"type": "http.disconnect"}]
    reads = []

    async def receive():
        reads.append(1)
        return messages[len(reads) - 1]

    asyncio.run(until_disconnected(receive))
    assert len(reads) == 3
