"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions (with stream), /v1/models.

`model` is an adapter id, or the base model's name for no adapter (as vLLM, LoRAX and TGI do).
Chat prompts use the tokenizer's chat template, else DEFAULT_CHAT_TEMPLATE.
"""
from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from app.deps import ApiKey, AppState, State
from app.errors import stream_error
from app.generation import Generation, collect, sampling_params, stream_tokens
from app.schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[ApiKey])

# Used when the tokenizer has no chat template (documented in the README).
DEFAULT_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SSE_OR_JSON = {200: {"content": {"application/json": {}, "text/event-stream": {"schema": {"type": "string"}}}}}
FINISH = {"length": "length", "eos_token": "stop", "stop_sequence": "stop", "cancelled": "stop"}


def _adapter_for_model(state: AppState, model: str) -> str | None:
    if model in (state.engine.model_name, "base", "__base__"):
        return None
    return model


def _stop_list(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def _trim_stop(text: str, stop: list[str], finish_reason: str | None) -> str:
    """OpenAI leaves the stop sequence out of the text (TGI keeps it)."""
    if finish_reason == "stop_sequence":
        for s in stop:
            if text.endswith(s):
                return text[: -len(s)]
    return text


def _usage(g: Generation) -> dict:
    return {"prompt_tokens": g.prompt_tokens, "completion_tokens": len(g.tokens),
            "total_tokens": g.prompt_tokens + len(g.tokens)}


def _start(state: AppState, request: Request, model: str, prompt: str, max_tokens: int | None, temperature,
           top_p, seed, stop: list[str], ignore_eos: bool = False) -> tuple[object, Generation]:
    adapter_id = _adapter_for_model(state, model)
    header_adapter = request.headers.get("x-adapter-id")
    if header_adapter is not None and header_adapter != (adapter_id or ""):
        raise HTTPException(400, f"X-Adapter-Id header {header_adapter!r} does not match the model {model!r}")
    request.scope["state"]["adapter_id"] = adapter_id
    params = sampling_params(max_new_tokens=max_tokens, default_max_new_tokens=state.settings.max_new_tokens_default,
                             temperature=temperature, top_p=top_p, seed=seed, stop=stop, ignore_eos=ignore_eos)
    prompt_ids = state.engine.tokenizer(prompt)["input_ids"]
    handle = state.engine.submit(prompt_ids, adapter_id, params)
    return handle, Generation(request_id=request.scope["state"]["request_id"], adapter_id=adapter_id,
                              prompt_tokens=len(prompt_ids), seed=params.seed)


def _sse(state: AppState, request: Request, handle, g: Generation, stop: list[str], chunk) -> EventSourceResponse:
    """Stream `chunk(text, finish_reason)` objects, then `data: [DONE]`. Stop sequences are held back until it
    is clear they are not one (so streamed text equals the non-streamed text)."""
    async def events():
        sent = 0
        try:
            async for _ in stream_tokens(handle, g, timeout_s=state.settings.request_timeout_s,
                                         disconnected=request.is_disconnected):
                hold = max((len(s) - 1 for s in stop), default=0)
                safe = max(sent, len(g.text) - hold)
                if safe > sent:
                    yield json.dumps(chunk(g.text[sent:safe], None))
                    sent = safe
            final = _trim_stop(g.text, stop, g.finish_reason)
            yield json.dumps(chunk(final[sent:], FINISH.get(g.finish_reason, "stop")))
            yield "[DONE]"
        except Exception as exc:  # noqa: BLE001 - headers already sent: report in-band
            yield json.dumps(stream_error(exc, openai=True))

    return EventSourceResponse(events(), ping=15)


@router.post("/completions", responses=SSE_OR_JSON)
async def completions(body: CompletionRequest, request: Request, state: State):
    if body.presence_penalty or body.frequency_penalty:
        raise HTTPException(422, "presence_penalty and frequency_penalty are not supported (they would be ignored); "
                                 "use repetition_penalty with POST /generate")
    if isinstance(body.prompt, list):
        if len(body.prompt) != 1:
            raise HTTPException(422, "only one prompt per request is supported")
        prompt = body.prompt[0]
    else:
        prompt = body.prompt
    stop = _stop_list(body.stop)
    handle, g = _start(state, request, body.model, prompt, body.max_tokens, body.temperature, body.top_p,
                       body.seed, stop, body.ignore_eos)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(text: str, finish: str | None) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

    if body.stream:
        return _sse(state, request, handle, g, stop, chunk)
    await collect(handle, g, timeout_s=state.settings.request_timeout_s, disconnected=request.is_disconnected)
    text = _trim_stop(g.text, stop, g.finish_reason)
    out = chunk((prompt + text) if body.echo else text, FINISH.get(g.finish_reason, "stop"))
    out["usage"] = _usage(g)
    return JSONResponse(out)


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=True)


@router.post("/chat/completions", responses=SSE_OR_JSON)
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State):
    prompt = chat_prompt(state.engine.tokenizer, [m.model_dump() for m in body.messages])
    stop = _stop_list(body.stop)
    handle, g = _start(state, request, body.model, prompt, body.max_completion_tokens or body.max_tokens,
                       body.temperature, body.top_p, body.seed, stop, body.ignore_eos)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    if body.stream:
        first = {"sent": False}

        def chunk(text: str, finish: str | None) -> dict:
            delta = {"content": text}
            if not first["sent"]:
                delta["role"] = "assistant"
                first["sent"] = True
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return _sse(state, request, handle, g, stop, chunk)
    await collect(handle, g, timeout_s=state.settings.request_timeout_s, disconnected=request.is_disconnected)
    return JSONResponse({
        "id": rid, "object": "chat.completion", "created": created, "model": body.model,
        "choices": [{"index": 0, "message": {"role": "assistant",
                                             "content": _trim_stop(g.text, stop, g.finish_reason)},
                     "finish_reason": FINISH.get(g.finish_reason, "stop")}],
        "usage": _usage(g)})


@router.get("/models", response_model=ModelList)
async def models(state: State) -> ModelList:
    now = int(time.time())
    cards = [ModelCard(id=state.engine.model_name, created=now)]
    cards += [ModelCard(id=a.id, created=int(a.created), parent=state.engine.model_name)
              for a in state.adapters.list() if a.servable]
    return ModelList(data=cards)
