"""LoRAX/TGI-compatible generation: POST /generate and POST /generate_stream (SSE)."""
from __future__ import annotations

import json

from fastapi import APIRouter, Header, HTTPException, Request
from sse_starlette.sse import EventSourceResponse

from app.deps import ApiKey, AppState, State
from app.errors import stream_error
from app.generation import Generation, collect, sampling_params, stream_tokens
from app.schemas import Details, GenerateRequest, GenerateResponse, StreamDetails, StreamResponse, Token

router = APIRouter(tags=["generation"], dependencies=[ApiKey])


def resolve_adapter(state: AppState, body: GenerateRequest, header_adapter: str | None) -> str | None:
    """The adapter this request runs with: `adapter_id`, or a per-request merge, or None for the base model.
    An `X-Adapter-Id` header (for proxies that route by adapter) must agree with the body."""
    p = body.parameters
    if p.adapter_source not in (None, "local"):
        raise HTTPException(422, f"adapter_source {p.adapter_source!r} is not supported: this server never "
                                 "downloads adapters; upload them with POST /adapters")
    if p.merged_adapters is not None:
        if p.adapter_id is not None:
            raise HTTPException(422, "give either adapter_id or merged_adapters, not both")
        m = p.merged_adapters
        adapter_id = state.ephemeral.adapter_id_for(m.ids, m.weights or [1.0] * len(m.ids), m.merge_strategy,
                                                    m.density, m.majority_sign_method)
    else:
        adapter_id = p.adapter_id or None
    if header_adapter is not None and header_adapter != (p.adapter_id or ""):
        raise HTTPException(400, f"X-Adapter-Id header {header_adapter!r} does not match the body's adapter_id "
                                 f"{p.adapter_id!r}")
    return adapter_id


def start(state: AppState, request: Request, body: GenerateRequest, header_adapter: str | None
          ) -> tuple[object, Generation]:
    adapter_id = resolve_adapter(state, body, header_adapter)
    request.scope["state"]["adapter_id"] = adapter_id
    p = body.parameters
    params = sampling_params(
        max_new_tokens=p.max_new_tokens, default_max_new_tokens=state.settings.max_new_tokens_default,
        do_sample=p.do_sample, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
        repetition_penalty=p.repetition_penalty, seed=p.seed, stop=p.stop, ignore_eos=p.ignore_eos_token)
    prompt_ids = state.engine.tokenizer(body.inputs)["input_ids"]
    handle = state.engine.submit(prompt_ids, adapter_id, params)
    generation = Generation(request_id=request.scope["state"]["request_id"], adapter_id=adapter_id,
                            prompt_tokens=len(prompt_ids), seed=params.seed)
    return handle, generation


@router.post("/generate", response_model=GenerateResponse, response_model_exclude_none=True)
async def generate(body: GenerateRequest, request: Request, state: State,
                   x_adapter_id: str | None = Header(None)) -> GenerateResponse:
    handle, generation = start(state, request, body, x_adapter_id)
    await collect(handle, generation, timeout_s=state.settings.request_timeout_s, disconnected=request.is_disconnected)
    text = (body.inputs + generation.text) if body.parameters.return_full_text else generation.text
    details = None
    if body.parameters.details:
        details = Details(finish_reason=generation.finish_reason, generated_tokens=len(generation.tokens),
                          seed=generation.seed, prompt_tokens=generation.prompt_tokens,
                          adapter_id=body.parameters.adapter_id,
                          tokens=[Token(id=t.id, text=t.text, logprob=t.logprob) for t in generation.tokens])
    return GenerateResponse(generated_text=text, details=details)


@router.post("/generate_stream", response_class=EventSourceResponse,
             responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}})
async def generate_stream(body: GenerateRequest, request: Request, state: State,
                          x_adapter_id: str | None = Header(None)) -> EventSourceResponse:
    """One SSE `data:` line per token (TGI format); the last one also carries generated_text and details."""
    handle, generation = start(state, request, body, x_adapter_id)
    prefix = body.inputs if body.parameters.return_full_text else ""

    async def events():
        pending = None
        try:
            async for token in stream_tokens(handle, generation, timeout_s=state.settings.request_timeout_s,
                                             disconnected=request.is_disconnected):
                if pending is not None:
                    yield json.dumps(pending.model_dump(exclude_none=False))
                pending = StreamResponse(token=Token(id=token.id, text=token.text, logprob=token.logprob))
            if pending is not None:
                pending.generated_text = prefix + generation.text
                pending.details = StreamDetails(finish_reason=generation.finish_reason,
                                                generated_tokens=len(generation.tokens), seed=generation.seed)
                yield json.dumps(pending.model_dump(exclude_none=False))
        except Exception as exc:  # noqa: BLE001 - headers are sent: report in-band, as TGI does
            yield json.dumps(stream_error(exc, openai=False))

    return EventSourceResponse(events(), ping=15)
