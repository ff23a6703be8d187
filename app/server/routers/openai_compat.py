"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions (with stream), /v1/models[/{id}].

`model` is an adapter id, or the base model's name for no adapter (as vLLM, LoRAX and TGI do).
Chat prompts use the tokenizer's chat template, else DEFAULT_CHAT_TEMPLATE.
"""
from __future__ import annotations

import asyncio
import json
from functools import partial
import time
import uuid
import weakref
from typing import Callable

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse

from app.server import openai_render as oai
from app.server.deps import AppState, State, policy
from app.server.route_policy import GENERATE, READ
from app.server.errors import stream_error
from app.engine.handle import TokenEvent
from app.engine.sampling import SamplingParams
from app.server.generation import (Generation, adapter_with_header, merged_tokens, sampling_params, start_many,
                                   start_off_loop, until_disconnected)
from app.server.openai_schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, OpenAIRequest

router = APIRouter(prefix="/v1", tags=["openai"])

# Used when the tokenizer has no chat template (documented in the README).
DEFAULT_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SSE_OR_JSON = {200: {"content": {"application/json": {}, "text/event-stream": {"schema": {"type": "string"}}}}}
_SEED_LIMIT = 2**63

# chunk(choice index, new text, the tokens since the last chunk, finish reason or None, where those tokens' text
# starts in the choice's generated text) -> one SSE object
Chunk = Callable[[int, str, list[TokenEvent], str | None, int], dict]


def _adapter_for_model(state: AppState, model: str) -> str | None:
    if model in (state.engine.base.name, "base", "__base__"):
        return None
    return model


async def _start_choices(state: AppState, request: Request, body: OpenAIRequest, prompts: list, per_prompt: int,
                         max_tokens: int | None, top_n: int, prompt_logprobs: bool) -> list[tuple[object, Generation]]:
    """Start `per_prompt` generations of every prompt (choice j of a seeded request uses seed + j), off the event
    loop (tokenizing and the engine's store reads block)."""
    adapter_id = adapter_with_header(_adapter_for_model(state, body.model), request.headers.get("x-adapter-id"),
                                     body_names_one=True)
    request.scope["state"]["adapter_id"] = adapter_id

    def params(j: int) -> SamplingParams:
        return sampling_params(
            max_new_tokens=max_tokens, default_max_new_tokens=state.settings.max_new_tokens_default,
            # OpenAI's temperature defaults to 1: sampling unless it is 0 (vLLM, TGI's and LoRAX's /v1 routes)
            do_sample=body.temperature != 0, temperature=body.temperature, top_p=body.top_p,
            seed=None if body.seed is None else (body.seed + j) % _SEED_LIMIT, stop=oai.stop_list(body.stop),
            frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
            top_n_tokens=top_n, prompt_logprobs=prompt_logprobs, ignore_eos=body.ignore_eos)

    jobs = ((prompt, params(j)) for prompt in prompts for j in range(per_prompt))
    return await start_off_loop(lambda: start_many(state.engine, request_id=request.scope["state"]["request_id"],
                                                   adapter_id=adapter_id, jobs=jobs), state.starts)


def _event(obj) -> str:
    """One SSE `data:` payload: strict JSON (a NaN or infinity is an error here, never a bare `-Infinity`)."""
    return json.dumps(obj, allow_nan=False)


def _sse(state: AppState, request: Request, runs: list[tuple[object, Generation]], stop: list[str], chunk: Chunk,
         final_usage: Callable[[], dict] | None, with_tokens: bool) -> EventSourceResponse:
    """Stream `chunk(...)` objects of every choice (run i = choice i), then a usage chunk when asked, then
    `data: [DONE]`. Stop sequences are held back until it is clear they are not one (so streamed text equals the
    non-streamed text); with `with_tokens` a chunk is sent for every token (its log-probabilities)."""
    hold = max((len(s) - 1 for s in stop), default=0)

    async def events():
        sent = [0] * len(runs)  # characters of choice i's text sent so far
        texts = [""] * len(runs)  # choice i's text so far, as this loop has seen it
        pending: list[list[TokenEvent]] = [[] for _ in runs]  # tokens not yet sent in a chunk
        try:
            async for i, token in merged_tokens(runs, timeout_s=state.settings.request_timeout_s,
                                                disconnected=partial(until_disconnected, request.receive), drain=state.drain):
                g = runs[i][1]
                if token is not None:
                    pending[i].append(token)
                    texts[i] += token.text
                token_offset = len(texts[i]) - sum(len(t.text) for t in pending[i])
                if token is None:  # choice i is done: the rest of its text, without the stop sequence
                    final = oai.trim_stop(texts[i], stop, g.finish_reason)
                    yield _event(chunk(i, final[sent[i]:], pending[i], oai.finish_reason(g), token_offset))
                    continue
                safe = max(sent[i], len(texts[i]) - hold)
                if safe > sent[i] or (with_tokens and token.finish_reason is None):
                    yield _event(chunk(i, texts[i][sent[i]:safe], pending[i], None, token_offset))
                    sent[i], pending[i] = safe, []
            if final_usage is not None:
                yield _event(final_usage())
            yield "[DONE]"
        except Exception as exc:  # noqa: BLE001 - headers already sent: report in-band
            yield _event(stream_error(exc, openai=True))

    return EventSourceResponse(events(), ping=15)


def _envelope(kind: str, rid: str, created: int, model: str) -> dict:
    return {"id": rid, "object": kind, "created": created, "model": model, "system_fingerprint": None}


@router.post("/completions", responses=SSE_OR_JSON, dependencies=policy(GENERATE))
async def completions(body: CompletionRequest, request: Request, state: State):
    prompts = body.prompts()
    n, per_prompt = body.choices_per_prompt, max(body.choices_per_prompt, body.best_of or 1)
    k = body.logprobs
    runs = await _start_choices(state, request, body, prompts, per_prompt, body.max_tokens, top_n=k or 0,
                          prompt_logprobs=bool(body.echo) and k is not None)
    stop = oai.stop_list(body.stop)
    logprobs = oai.Logprobs(state.engine.tokenizer, state.engine.token_bytes)
    prompt_texts = [p if isinstance(p, str) else state.engine.tokenizer.decode(p) for p in prompts]
    head = _envelope("text_completion", f"cmpl-{uuid.uuid4().hex}", int(time.time()), body.model)
    prompt_tokens = sum(g.prompt_tokens for _, g in runs[::per_prompt])

    def choice(index: int, g: Generation, text: str, tokens: list[TokenEvent], finish: str | None,
               offset: int, echo: bool) -> dict:
        """`offset`: where `tokens`' text starts in the generated text; `echo`: the prompt is part of `text`."""
        lp = None
        if k is not None:
            start_at = offset + (len(prompt_texts[index // n]) if body.echo else 0)
            lp = logprobs.completion(tokens, k, offset=start_at, prompt=g if echo else None)
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}

    if body.stream:  # per_prompt == n here: best_of > n is refused with stream
        echoed = [False] * len(runs)

        def chunk(i: int, text: str, tokens: list[TokenEvent], finish: str | None, offset: int) -> dict:
            echo_now = bool(body.echo) and not echoed[i]  # the choice's first chunk carries the prompt
            echoed[i] = True
            prefix = prompt_texts[i // n] if echo_now else ""
            c = choice(i, runs[i][1], prefix + text, tokens, finish, offset, echo_now)
            return {**head, "choices": [c], **({"usage": None} if body.include_usage else {})}

        final = (lambda: {**head, "choices": [], "usage": oai.usage(prompt_tokens, [g for _, g in runs])}
                 ) if body.include_usage else None
        return _sse(state, request, runs, stop, chunk, final, with_tokens=k is not None)

    await _collect_all(state, request, runs)
    choices = []
    for p, prompt_text in enumerate(prompt_texts):
        group = [g for _, g in runs[p * per_prompt:(p + 1) * per_prompt]]
        if per_prompt > n:  # best_of: the n sequences with the highest sum of token log-probabilities
            group = sorted(group, key=lambda g: g.logprob_sum, reverse=True)[:n]
        for j, g in enumerate(group):
            text = oai.trim_stop(g.text, stop, g.finish_reason)
            shown = (prompt_text + text) if body.echo else text
            choices.append(choice(p * n + j, g, shown, g.tokens, oai.finish_reason(g), 0, bool(body.echo)))
    return JSONResponse({**head, "choices": choices, "usage": oai.usage(prompt_tokens, [g for _, g in runs])})


async def _collect_all(state: AppState, request: Request, runs: list[tuple[object, Generation]]) -> None:
    async for _ in merged_tokens(runs, timeout_s=state.settings.request_timeout_s,
                                 disconnected=partial(until_disconnected, request.receive), drain=state.drain):
        pass


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=True)


@router.post("/chat/completions", responses=SSE_OR_JSON, dependencies=policy(GENERATE))
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State):
    prompt = chat_prompt(state.engine.tokenizer, [m.for_template() for m in body.messages])
    k = (body.top_logprobs or 0) if body.logprobs else None
    runs = await _start_choices(state, request, body, [prompt], body.choices_per_prompt,
                          body.max_completion_tokens or body.max_tokens, top_n=k or 0, prompt_logprobs=False)
    stop = oai.stop_list(body.stop)
    logprobs = oai.Logprobs(state.engine.tokenizer, state.engine.token_bytes)
    prompt_tokens = runs[0][1].prompt_tokens

    if body.stream:
        head = _envelope("chat.completion.chunk", f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.model)
        started = [False] * len(runs)

        def chunk(i: int, text: str, tokens: list[TokenEvent], finish: str | None, offset: int) -> dict:
            delta = {"content": text}
            if not started[i]:
                delta["role"], started[i] = "assistant", True
            lp = logprobs.chat(tokens, k) if k is not None else None
            return {**head, "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}],
                    **({"usage": None} if body.include_usage else {})}

        final = (lambda: {**head, "choices": [], "usage": oai.usage(prompt_tokens, [g for _, g in runs])}
                 ) if body.include_usage else None
        return _sse(state, request, runs, stop, chunk, final, with_tokens=k is not None)

    await _collect_all(state, request, runs)
    head = _envelope("chat.completion", f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.model)
    choices = [{"index": i, "message": {"role": "assistant", "content": oai.trim_stop(g.text, stop, g.finish_reason)},
                "logprobs": logprobs.chat(g.tokens, k) if k is not None else None,
                "finish_reason": oai.finish_reason(g)} for i, (_, g) in enumerate(runs)]
    return JSONResponse({**head, "choices": choices, "usage": oai.usage(prompt_tokens, [g for _, g in runs])})


def _cards(state: AppState) -> list[ModelCard]:
    now = int(time.time())
    return [ModelCard(id=state.engine.base.name, created=now)] + [
        ModelCard(id=a.id, created=int(a.created), parent=state.engine.base.name)
        for a in state.adapters.list() if a.servable]


# adapter index -> (its generation, the adapters' cards as JSON); weak: an app's entry goes with its index
_ADAPTER_CARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _models_json(state: AppState) -> str:
    """The ModelList as JSON; the adapters' cards are serialized once per change of the adapter index (10,000
    adapters through pydantic take longer than the 50 ms a listing may), the base card on every call."""
    index = state.adapters.index
    generation = index.generation
    cached = _ADAPTER_CARDS.get(index)
    if cached is None or cached[0] != generation:
        cards = _cards(state)[1:]
        cached = (generation, ",".join(card.model_dump_json() for card in cards))
        _ADAPTER_CARDS[index] = cached
    base = ModelCard(id=state.engine.base.name, created=int(time.time())).model_dump_json()
    return f'{{"object":"list","data":[{base}{"," if cached[1] else ""}{cached[1]}]}}'


@router.get("/models", response_model=ModelList, dependencies=policy(READ))
async def models(state: State) -> Response:
    return Response(await asyncio.to_thread(_models_json, state), media_type="application/json")


@router.get("/models/{model_id:path}", response_model=ModelCard, dependencies=policy(READ))
async def model(model_id: str, state: State) -> ModelCard:
    for card in await asyncio.to_thread(_cards, state):
        if card.id == model_id:
            return card
    raise HTTPException(404, f"model {model_id!r} not found: see GET /v1/models")
