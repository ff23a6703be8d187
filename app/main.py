"""The FastAPI application: `create_app(settings)`; all state is built in the lifespan, none at import."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from olora_core.errors import OLoRAError

from app import __version__
from app.adapter_service import AdapterService, UploadRefused
from app.deps import AppState
from app.engine.errors import EngineError, QueueFull
from app.ephemeral import EphemeralAdapters, ServedAdapters
from app.generation import GenerationError
from app.metrics import ServerMetrics
from app.middleware import AccessLogMiddleware, BodySizeLimitMiddleware
from app.settings import Settings
from app.store.adapter_store import AdapterStore, StoreError
from app.store.archive import ArchiveError, ArchiveLimits

log = logging.getLogger("olora.server")


def _error(status: int, message: str, error_type: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return _error(422, f"invalid request: {problems}", "validation")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), f"http_{exc.status_code}", headers=exc.headers)

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, exc: QueueFull):
        return _error(429, str(exc), "overloaded", headers={"Retry-After": "1"})

    @app.exception_handler(EngineError)
    async def _engine(request: Request, exc: EngineError):
        return _error(getattr(exc, "status_code", 500), str(exc), type(exc).__name__)

    for family in (ArchiveError, StoreError, UploadRefused, GenerationError):
        @app.exception_handler(family)
        async def _typed(request: Request, exc: Exception):
            return _error(getattr(exc, "status_code", 422), str(exc), type(exc).__name__)

    @app.exception_handler(OLoRAError)
    async def _olora(request: Request, exc: OLoRAError):
        return _error(422, str(exc), type(exc).__name__)


async def _watch_store(state: AppState, store: AdapterStore) -> None:
    """Pick up adapters changed or deleted by other replicas sharing the store directory."""
    known = store.versions()
    while True:
        await asyncio.sleep(state.settings.store_poll_s)
        current = await asyncio.to_thread(store.versions)
        for adapter_id in set(known) | set(current):
            if known.get(adapter_id) != current.get(adapter_id):
                state.engine.invalidate(adapter_id)
        known = current
        state.metrics.adapters_registered.set(len(current))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = ServerMetrics(settings.metrics_max_adapter_labels, settings.max_loras)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from app.engine.engine import Engine, EngineConfig

        store = AdapterStore(settings.adapter_dir)
        ephemeral = EphemeralAdapters(store)
        config = EngineConfig(
            model=settings.model, dtype=settings.dtype, quantize=settings.quantize, device=settings.device,
            max_loras=settings.max_loras, max_cpu_adapters=settings.max_cpu_adapters, max_rank=settings.max_rank,
            max_batch_size=settings.max_batch_size, max_batch_tokens=settings.max_batch_tokens,
            max_input_tokens=settings.max_input_tokens, max_total_tokens=settings.max_total_tokens,
            max_waiting=settings.max_waiting)
        engine = await asyncio.to_thread(Engine, config, ServedAdapters(store, ephemeral), metrics)
        engine.start()
        limits = ArchiveLimits(max_compressed_bytes=settings.max_upload_bytes,
                               max_unpacked_bytes=settings.max_unpacked_bytes)
        state = AppState(settings=settings, engine=engine, adapters=AdapterService(store, engine, limits),
                         metrics=metrics, ephemeral=ephemeral)
        if settings.demo_adapters:
            from app.demo import register_demo_adapters
            await asyncio.to_thread(register_demo_adapters, state)
        metrics.adapters_registered.set(len(store.versions()))
        app.state.olora = state
        watcher = asyncio.create_task(_watch_store(state, store))
        log.info("serving %s (fingerprint %s) with %d adapters", engine.model_name, engine.base_fingerprint,
                 len(store.versions()))
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            app.state.olora = None
            await asyncio.to_thread(engine.shutdown)

    # /docs and /redoc with their assets served from the fastapi-offline package: no CDN, they work offline
    app = FastAPIOffline(title="olora-serve", version=__version__, lifespan=lifespan,
                         description="Many OLoRA/LoRA adapters on one base model: TGI/LoRAX- and OpenAI-compatible.")
    _install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_json_bytes=settings.max_request_bytes,
                       max_upload_bytes=settings.max_upload_bytes)
    app.add_middleware(AccessLogMiddleware, metrics=metrics)

    from app.routers import adapters, generate, ops, openai_compat
    for router in (generate.router, openai_compat.router, adapters.router, ops.router):
        app.include_router(router)
    return app
