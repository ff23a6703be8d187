"""Running one generation through the engine for the HTTP layer: parameter mapping, collection, streaming,
timeouts and cancellation. No web framework types: a `disconnected` coroutine function is passed in."""
from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from app.engine.sampling import SamplingParams

Disconnected = Callable[[], Awaitable[bool]]
DISCONNECT_POLL_S = 0.1


class GenerationTimeout(Exception):
    status_code = 504


@dataclass
class TokenOut:
    id: int
    text: str
    logprob: float | None


@dataclass
class Generation:
    """Everything one finished request produced (its timings are the engine's: observer RequestStats)."""

    request_id: str
    adapter_id: str | None
    prompt_tokens: int
    seed: int | None
    tokens: list[TokenOut] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


def sampling_params(*, max_new_tokens: int | None, default_max_new_tokens: int, do_sample: bool = False,
                    temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                    repetition_penalty: float | None = None, seed: int | None = None, stop: list[str] | None = None,
                    ignore_eos: bool = False) -> SamplingParams:
    """TGI semantics: sampling is on when asked, or implied by temperature/top_p/top_k (as TGI does).
    A sampled request without a seed gets one, reported back in `details.seed` so it can be replayed."""
    temperature_given = temperature is not None and temperature != 1.0
    sample = do_sample or temperature_given or (top_p is not None and top_p < 1.0) or bool(top_k)
    if temperature == 0:  # OpenAI clients ask for greedy with temperature 0
        sample, temperature = False, None
    if sample and seed is None:
        seed = random.randrange(2**63)
    return SamplingParams(
        max_new_tokens=max_new_tokens or default_max_new_tokens, do_sample=sample,
        temperature=temperature or 1.0, top_p=top_p or 1.0, top_k=top_k or 0,
        repetition_penalty=repetition_penalty or 1.0, seed=seed if sample else None, stop=list(stop or []),
        ignore_eos=ignore_eos)


async def _watch_disconnect(disconnected: Disconnected, handle) -> None:
    while True:
        if await disconnected():
            handle.cancel()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


async def stream_tokens(handle, generation: Generation, *, timeout_s: float,
                        disconnected: Disconnected | None = None) -> AsyncIterator[TokenOut]:
    """Yield the request's tokens as they come; cancel the request on timeout, disconnect or consumer exit."""
    watcher = asyncio.create_task(_watch_disconnect(disconnected, handle)) if disconnected else None
    deadline = time.monotonic() + timeout_s
    timeout = GenerationTimeout(f"generation exceeded the request timeout of {timeout_s:g} s")
    events = handle.__aiter__()
    try:
        while True:  # every event carries a token; a cancelled request ends the iteration without one
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise timeout
            try:
                event = await asyncio.wait_for(events.__anext__(), timeout=remaining)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise timeout from None
            finite = event.logprob is not None and math.isfinite(event.logprob)  # JSON has no NaN/Infinity
            token = TokenOut(event.token_id, event.text, event.logprob if finite else None)
            generation.tokens.append(token)
            generation.text += event.text
            generation.finish_reason = event.finish_reason
            yield token
            if event.finish_reason is not None:
                break
    finally:
        if generation.finish_reason is None:
            generation.finish_reason = getattr(handle, "finish_reason", None) or "cancelled"
            handle.cancel()  # no-op for a finished request; frees the row of an abandoned one
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


async def collect(handle, generation: Generation, *, timeout_s: float,
                  disconnected: Disconnected | None = None) -> Generation:
    async for _ in stream_tokens(handle, generation, timeout_s=timeout_s, disconnected=disconnected):
        pass
    return generation
