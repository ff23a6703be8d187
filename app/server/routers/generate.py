"""TGI/LoRAX-compatible generation: POST /generate, POST /generate_stream (SSE) and TGI's compat route POST /
(`{"inputs", "parameters", "stream"}`: a JSON list of one GenerateResponse, or the /generate_stream SSE)."""
from __future__ import annotations

import asyncio
import json
from functools import partial

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from app.server import tgi
from app.server.deps import AppState, State, policy
from app.server.errors import stream_error
from app.server.generation import (Generation, adapter_with_header, collect, start_many, start_off_loop,
                                   stream_tokens, until_disconnected)
from app.server.route_policy import GENERATE
from app.server.schemas import GenerateRequest, GenerateResponse

router = APIRouter(tags=["generation"])


async def _start_all(state: AppState, request: Request, body: GenerateRequest, header_adapter: str | None,
                     stream: bool) -> list[tuple[object, Generation]]:
    """Start the request's `best_of` sequences (one unless asked). A per-request merge (store reads, a merge
    written to disk) runs in the loop's default executor first; the start itself in the starts' own pool."""
    p = body.parameters
    tgi.check_supported(p, stream=stream)
    if p.merged_adapters is not None:
        named, names_one = await asyncio.to_thread(tgi.body_adapter, state.ephemeral, p)
    else:
        named, names_one = tgi.body_adapter(state.ephemeral, p)
    adapter_id = adapter_with_header(named, header_adapter, body_names_one=names_one)
    request.scope["state"]["adapter_id"] = adapter_id
    jobs = [(body.inputs, tgi.sampling(p, state.settings.max_new_tokens_default)) for _ in range(p.best_of or 1)]
    return await start_off_loop(lambda: start_many(state.engine, request_id=request.scope["state"]["request_id"],
                                                   adapter_id=adapter_id, jobs=jobs, truncate=p.truncate),
                                state.starts)


async def _generate(body: GenerateRequest, request: Request, state: AppState,
                    header_adapter: str | None) -> GenerateResponse:
    runs = await _start_all(state, request, body, header_adapter, stream=False)
    await asyncio.gather(*(collect(h, g, timeout_s=state.settings.request_timeout_s,
                                   disconnected=partial(until_disconnected, request.receive), drain=state.drain) for h, g in runs))
    best, others = tgi.best_of([g for _, g in runs])
    render = tgi.Renderer(state.engine.tokenizer, body.parameters)
    details = render.details(body.inputs, best, others) if body.parameters.details else None
    return GenerateResponse(generated_text=render.generated_text(body.inputs, best), details=details)


def _event(obj) -> str:
    """One SSE `data:` payload: strict JSON (a NaN or infinity is an error here, never a bare `-Infinity`)."""
    return json.dumps(obj, allow_nan=False)


async def _generate_stream(body: GenerateRequest, request: Request, state: AppState,
                           header_adapter: str | None) -> EventSourceResponse:
    """One SSE `data:` line per token (TGI format); the last one also carries generated_text and details."""
    [(handle, generation)] = await _start_all(state, request, body, header_adapter, stream=True)
    render = tgi.Renderer(state.engine.tokenizer, body.parameters)

    async def events():
        pending = None
        try:
            async for token in stream_tokens(handle, generation, timeout_s=state.settings.request_timeout_s,
                                             disconnected=partial(until_disconnected, request.receive), drain=state.drain):
                if pending is not None:
                    yield _event(pending.model_dump(exclude_none=False))
                pending = render.stream_event(len(generation.tokens), token)
            if pending is not None:
                pending.generated_text = render.generated_text(body.inputs, generation)
                pending.details = render.stream_details(generation)
                yield _event(pending.model_dump(exclude_none=False))
        except Exception as exc:  # noqa: BLE001 - headers are sent: report in-band, as TGI does
            yield _event(stream_error(exc, openai=False))

    return EventSourceResponse(events(), ping=15)


@router.post("/generate", response_model=GenerateResponse, response_model_exclude_none=True,
             dependencies=policy(GENERATE))
async def generate(body: GenerateRequest, request: Request, state: State,
                   x_adapter_id: str | None = Header(None)) -> GenerateResponse:
    return await _generate(body, request, state, x_adapter_id)


@router.post("/generate_stream", response_class=EventSourceResponse, dependencies=policy(GENERATE),
             responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}})
async def generate_stream(body: GenerateRequest, request: Request, state: State,
                          x_adapter_id: str | None = Header(None)) -> EventSourceResponse:
    return await _generate_stream(body, request, state, x_adapter_id)


@router.post("/", summary="TGI's compat route: /generate (as a list of one) or /generate_stream",
             dependencies=policy(GENERATE),
             responses={200: {"content": {"application/json": {"schema": {"type": "array", "items": {
                 "$ref": "#/components/schemas/GenerateResponse"}}},
                 "text/event-stream": {"schema": {"type": "string"}}}}})
async def compat_generate(body: GenerateRequest, request: Request, state: State,
                          x_adapter_id: str | None = Header(None)):
    if body.stream:
        return await _generate_stream(body, request, state, x_adapter_id)
    response = await _generate(body, request, state, x_adapter_id)
    return JSONResponse([response.model_dump(exclude_none=True)])
