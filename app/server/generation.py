"""Running one generation through the engine for the HTTP layer: parameter mapping, collection, streaming,
timeouts and cancellation. No web framework types: a `disconnected` coroutine function is passed in.

Tokens come from the engine in per-step batches (`RequestHandle.next_events`): one wake-up of the consumer per step,
one timer per wait, and one pending ASGI read per request for the client's disconnect."""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable, Iterable

from app.engine.handle import GenerationResult, TokenEvent
from app.engine.sampling import SamplingParams
from app.server.tracing import record_generation

if TYPE_CHECKING:
    from app.server.drain import Drain

# returns once the client has gone (until_disconnected); a poll that returns False is asked again every
# DISCONNECT_POLL_S (Request.is_disconnected works, at the cost of a wake-up per poll)
Disconnected = Callable[[], Awaitable[object]]
DISCONNECT_POLL_S = 0.1


class GenerationError(Exception):
    """A generation the HTTP layer refuses or ends; `status_code` is the hint for it."""

    status_code = 500


class GenerationTimeout(GenerationError):
    status_code = 504


class DrainTimeout(GenerationError):
    """The server shut down and the drain timeout passed before this generation ended."""

    status_code = 503


class AdapterHeaderMismatch(GenerationError):
    status_code = 400


class UnsupportedOption(GenerationError):
    """A protocol option (TGI, LoRAX or OpenAI) set to a value this server cannot honour: refused, never ignored."""

    status_code = 422


@dataclass
class Generation(GenerationResult):
    """Everything one request's generation produced: the engine's accumulator (tokens as the engine's
    `TokenEvent`s, text, finish reason, seed) plus what the renderers need of the request (its timings are the
    engine's: observer RequestStats)."""

    adapter_id: str | None = None
    prompt_tokens: int = 0
    prompt_ids: list[int] = field(default_factory=list)


def sampling_params(*, max_new_tokens: int | None, default_max_new_tokens: int, do_sample: bool = False,
                    temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                    typical_p: float | None = None, repetition_penalty: float | None = None,
                    frequency_penalty: float | None = None, presence_penalty: float | None = None,
                    seed: int | None = None, stop: list[str] | None = None, ignore_eos: bool = False,
                    top_n_tokens: int | None = None, prompt_logprobs: bool = False) -> SamplingParams:
    """TGI semantics: sampling is on when asked, or implied by temperature/top_p/top_k/typical_p (as TGI does).
    A sampled request without a seed gets one from the engine (its RowSampler), reported back in
    `details.seed` so it can be replayed."""
    temperature_given = temperature is not None and temperature != 1.0
    sample = (do_sample or temperature_given or (top_p is not None and top_p < 1.0) or bool(top_k)
              or (typical_p is not None and typical_p < 1.0))
    if temperature == 0:  # OpenAI clients ask for greedy with temperature 0
        sample, temperature = False, None
    return SamplingParams(
        max_new_tokens=max_new_tokens or default_max_new_tokens, do_sample=sample,
        temperature=temperature or 1.0, top_p=top_p or 1.0, top_k=top_k or 0, typical_p=typical_p or 1.0,
        repetition_penalty=repetition_penalty or 1.0, frequency_penalty=frequency_penalty or 0.0,
        presence_penalty=presence_penalty or 0.0, seed=seed if sample else None, stop=list(stop or []),
        ignore_eos=ignore_eos, top_n_tokens=top_n_tokens or 0, prompt_logprobs=prompt_logprobs)


def adapter_with_header(named: str | None, header: str | None, *, body_names_one: bool) -> str | None:
    """The adapter a request runs with. An `X-Adapter-Id` header (for proxies that route by adapter) is used when
    the body names no adapter, and must agree with the body when it does."""
    if not header:
        return named
    if not body_names_one:
        return header
    if header != (named or ""):
        raise AdapterHeaderMismatch(f"X-Adapter-Id header {header!r} does not match the adapter the body names "
                                    f"({named or 'the base model'!r})")
    return named


def _prompt_ids(engine, prompt: str | list[int], truncate: int | None) -> list[int]:
    """Tokenize (token ids are taken as they are) and keep the last `truncate` tokens (TGI's truncation side)."""
    prompt_ids = engine.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
    return prompt_ids[-truncate:] if truncate is not None else prompt_ids


def start(engine, *, request_id: str, prompt: str | list[int], adapter_id: str | None, params: SamplingParams,
          truncate: int | None = None) -> tuple[object, Generation]:
    """Start one generation: `start_many` with one job."""
    return start_many(engine, request_id=request_id, adapter_id=adapter_id, jobs=[(prompt, params)],
                      truncate=truncate)[0]


def start_many(engine, *, request_id: str, adapter_id: str | None,
               jobs: Iterable[tuple[str | list[int], SamplingParams]], truncate: int | None = None
               ) -> list[tuple[object, Generation]]:
    """The one way a router starts the generations of one request (TGI's best_of, OpenAI's n and prompt lists),
    one per (prompt, params) job: tokenize, then queue them all at once with `engine.submit_many`, so the request
    is queued whole or refused whole (QueueFull, or the typed error of the job that cannot run)."""
    prepared = [(_prompt_ids(engine, prompt, truncate), params) for prompt, params in jobs]
    handles = engine.submit_many(prepared, adapter_id)
    return [(handle, Generation(request_id=request_id, adapter_id=adapter_id, prompt_tokens=len(ids),
                                seed=handle.seed, prompt_ids=ids)) for handle, (ids, _) in zip(handles, prepared)]


async def start_off_loop(start_runs: Callable[[], list[tuple[object, Generation]]], executor: Executor | None = None
                         ) -> list[tuple[object, Generation]]:
    """Run a request's blocking start (tokenizing, the engine's store reads in `submit`) in a thread of `executor`,
    the starts' own bounded pool (AppState.starts): store I/O, uploads and merges run in the loop's default
    executor, so however many of them are in flight, a generation still starts. A request cancelled while the
    thread runs (client gone) cancels the generations the thread went on to start."""
    call = functools.partial(contextvars.copy_context().run, start_runs)  # as asyncio.to_thread does
    started = asyncio.get_running_loop().run_in_executor(executor, call)
    try:
        return await asyncio.shield(started)
    except asyncio.CancelledError:
        started.add_done_callback(_cancel_runs)
        raise


def _cancel_runs(started: asyncio.Future) -> None:
    if not started.cancelled() and started.exception() is None:
        for handle, _ in started.result():
            handle.cancel()


async def until_disconnected(receive: Callable[[], Awaitable[dict]]) -> None:
    """Return once the ASGI connection reports `http.disconnect`. After the request body has been read, `receive`
    waits until the client goes (or the response is complete), so this costs one pending read per request, not a
    poll every few milliseconds."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _cancel_on_disconnect(disconnected: Disconnected, cancel: Callable[[], None]) -> None:
    while await disconnected() is False:  # a poll-style check (Starlette's Request.is_disconnected): ask again
        await asyncio.sleep(DISCONNECT_POLL_S)
    cancel()


async def _event_batches(handle, generation: Generation, *, timeout_s: float,
                         disconnected: Disconnected | None = None, drain: Drain | None = None
                         ) -> AsyncIterator[list[TokenEvent]]:
    """The request's events in the batches the engine hands over (one per step, more when the consumer fell
    behind), not yet added to `generation`: the consumer adds them. Cancel the request on timeout, disconnect or
    consumer exit; a `drain` that times out cancels it too, and the iteration then raises DrainTimeout."""
    watcher = asyncio.create_task(_cancel_on_disconnect(disconnected, handle.cancel)) if disconnected else None
    cut_key = drain.register(handle.cancel) if drain is not None else None
    loop = asyncio.get_running_loop()
    started, first_token_s = loop.time(), None
    deadline = started + timeout_s
    timeout = GenerationTimeout(f"generation exceeded the request timeout of {timeout_s:g} s")
    try:
        while True:  # every event carries a token; a cancelled request ends the iteration without one
            if loop.time() >= deadline:
                raise timeout
            try:
                async with asyncio.timeout_at(deadline):  # one timer per wait, not a task per token
                    events = await handle.next_events()
            except TimeoutError:
                raise timeout from None
            if not events:
                if drain is not None and drain.expired:
                    raise DrainTimeout("the server is shutting down and its drain timeout passed") from None
                break
            if first_token_s is None:
                first_token_s = loop.time() - started
            yield events
            if events[-1].finish_reason is not None:
                break
    finally:
        if generation.finish_reason is None:
            generation.finish_reason = handle.finish_reason or "cancelled"
            handle.cancel()  # no-op for a finished request; frees the row of an abandoned one
        if cut_key is not None:
            drain.unregister(cut_key)
        record_generation(generation.prompt_tokens, len(generation.tokens), first_token_s, handle.queue_seconds)
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


async def stream_tokens(handle, generation: Generation, *, timeout_s: float,
                        disconnected: Disconnected | None = None, drain: Drain | None = None
                        ) -> AsyncIterator[TokenEvent]:
    """Yield the request's tokens as they come, each added to `generation` first; cancel the request on timeout,
    disconnect or consumer exit. A `drain` that times out cancels it too, and the iteration then raises
    DrainTimeout (an in-band error)."""
    async with contextlib.aclosing(_event_batches(handle, generation, timeout_s=timeout_s, disconnected=disconnected,
                                                  drain=drain)) as batches:
        async for events in batches:
            for event in events:
                generation.add(event)
                yield event


async def collect(handle, generation: Generation, *, timeout_s: float,
                  disconnected: Disconnected | None = None, drain: Drain | None = None) -> Generation:
    """`stream_tokens` read to its end: the whole generation."""
    async with contextlib.aclosing(stream_tokens(handle, generation, timeout_s=timeout_s, disconnected=disconnected,
                                                 drain=drain)) as tokens:
        async for _ in tokens:
            pass
    return generation


async def merged_tokens(runs: list[tuple[object, Generation]], *, timeout_s: float,
                        disconnected: Disconnected | None = None, drain: Drain | None = None
                        ) -> AsyncIterator[tuple[int, TokenEvent | None]]:
    """Tokens of several generations as they come: (run index, token), and (run index, None) when one ends.
    Leaving the iteration cancels the runs still going; the first error ends it."""
    if len(runs) == 1:  # the common case: no queue and no task per token
        handle, generation = runs[0]
        async with contextlib.aclosing(stream_tokens(handle, generation, timeout_s=timeout_s,
                                                     disconnected=disconnected, drain=drain)) as tokens:
            async for token in tokens:
                yield 0, token
        yield 0, None
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, handle, generation: Generation) -> None:
        try:
            async for token in stream_tokens(handle, generation, timeout_s=timeout_s, disconnected=disconnected,
                                             drain=drain):
                await queue.put((i, token, None))
            await queue.put((i, None, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, None, exc))

    tasks = [asyncio.create_task(pump(i, handle, g)) for i, (handle, g) in enumerate(runs)]
    try:
        running = len(tasks)
        while running:
            i, token, exc = await queue.get()
            if exc is not None:
                raise exc
            if token is None:
                running -= 1
            yield i, token
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
