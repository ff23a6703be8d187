"""Operations: /health (live), /ready (model loaded), /info, /cache (adapter residency), /metrics, /get_load (the
load vllm-router's power_of_two polls); TGI's /v2/health/* aliases."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app import __version__
from app.adapters.ephemeral import EPHEMERAL_PREFIX
from app.server.auth import role_of
from app.server.deps import Credentials, State, policy
from app.server.route_policy import PUBLIC, READ, SCRAPE
from app.server.metrics import MERGED_ADAPTERS
from app.server.router_metrics import engine_load
from app.engine.sampling import MAX_STOP_SEQUENCES
from app.server.schemas import MAX_BEST_OF

router = APIRouter(tags=["operations"])


@router.get("/health", dependencies=policy(PUBLIC))
@router.get("/v2/health/live", dependencies=policy(PUBLIC))
async def health(request: Request):
    """Liveness: 200 while starting (`loading`, with the start-up phase) and serving; 503 once the start failed
    or the engine loop died (restart the process)."""
    startup = request.app.state.startup
    if startup.error is not None:
        return JSONResponse(startup.progress(), status_code=503)
    if startup.loading:
        return startup.progress()
    state = getattr(request.app.state, "olora", None)
    if state is not None and not state.engine.stats().alive:
        return JSONResponse({"status": "engine stopped", "model": state.engine.base.name}, status_code=503)
    return {"status": "ok"}


@router.get("/ready", dependencies=policy(PUBLIC))
@router.get("/v2/health/ready", dependencies=policy(PUBLIC))
async def ready(request: Request):
    """Readiness: 200 once the model is loaded; 503 while starting, draining (SIGTERM) or with the engine dead."""
    if request.app.state.drain.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    state = getattr(request.app.state, "olora", None)
    if state is None:
        return JSONResponse(request.app.state.startup.progress(), status_code=503)
    if not state.engine.stats().alive:  # the engine loop died: take this replica out of rotation
        return JSONResponse({"status": "engine stopped", "model": state.engine.base.name}, status_code=503)
    return {"status": "ready", "model": state.engine.base.name}


@router.get("/info", dependencies=policy(READ))
async def info(state: State) -> dict:
    """TGI's `Info` fields (docs/openapi.json), then this server's own."""
    s, engine = state.settings, state.engine
    dtype = str(engine.base.dtype).removeprefix("torch.")
    return {
        # TGI's Info
        "model_id": engine.base.name, "model_sha": None, "model_dtype": f"torch.{dtype}",
        "model_device_type": engine.base.device.type, "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": s.max_waiting + s.max_batch_size, "max_best_of": MAX_BEST_OF,
        "max_stop_sequences": MAX_STOP_SEQUENCES, "max_input_tokens": s.max_input_tokens,
        "max_total_tokens": s.max_total_tokens, "validation_workers": 1, "max_client_batch_size": 1,
        "router": "olora-serve", "version": __version__, "sha": None, "docker_label": None,
        # olora-serve's own
        "base_fingerprint": engine.base.fingerprint, "quantize": s.quantize, "dtype": dtype,
        "device": str(engine.base.device), "max_loras": engine.config.max_loras, "max_cpu_adapters": s.max_cpu_adapters,
        "max_rank": s.max_rank, "max_batch_size": s.max_batch_size, "max_batch_tokens": s.max_batch_tokens,
        "max_waiting": s.max_waiting, "auth": s.auth_enabled,
    }


@router.get("/cache", dependencies=policy(READ))
async def cache(state: State, credentials: Credentials) -> dict:
    """Where adapters are now: the device slots (null = free) and the host-memory cache. Per-request merges are
    other clients' requests: their ids are shown to admin keys only, `~merged` to the others."""
    stats = state.engine.stats()
    admin = not state.settings.auth_enabled or (
        credentials is not None and role_of(state.settings, credentials.credentials) == "admin")

    def shown(adapter_id: str | None) -> str | None:
        hidden = not admin and adapter_id is not None and adapter_id.startswith(EPHEMERAL_PREFIX)
        return MERGED_ADAPTERS if hidden else adapter_id

    return {"device_slots": [shown(a) for a in stats.slot_adapters], "max_loras": stats.max_loras,
            "host_cache": [shown(a) for a in stats.host_adapter_ids], "max_cpu_adapters": stats.max_cpu_adapters,
            "host_bytes": stats.host_bytes}


@router.get("/metrics", response_class=Response, dependencies=policy(SCRAPE),
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(state: State) -> Response:
    stats = state.engine.stats()  # one snapshot for both families
    state.metrics.refresh(stats)
    state.router_metrics.refresh(stats, state.engine.base.name, str(state.engine.base.dtype).removeprefix("torch."))
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/get_load", dependencies=policy(SCRAPE))
async def get_load(state: State) -> dict:
    """The load route vllm-router's `power_of_two` polls (`{"load": int}`, SGLang's route; 0.1.17 polls it every
    `--worker-startup-check-interval` seconds):
    requests in the engine, running + waiting (vllm:num_requests_running + vllm:num_requests_waiting)."""
    return {"load": engine_load(state.engine.stats())}
