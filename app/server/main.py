"""The FastAPI application: `create_app(settings)`; all state is built in the lifespan, none at import."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from olora_core.errors import OLoRAError

from app import __version__
from app.server import errors
from app.adapters.service import AdapterService
from app.adapters.upload_plan import UploadRefused
from app.server.deps import AppState
from app.engine.errors import EngineError
from app.adapters.ephemeral import EphemeralAdapters
from app.adapters.served import ServedAdapters
from app.server.generation import GenerationError
from app.server.metrics import ServerMetrics
from app.server.auth import AuthMiddleware
from app.server.middleware import AccessLogMiddleware, BodySizeLimitMiddleware, UploadLimitMiddleware
from app.server.settings import Settings
from app.adapters.index import AdapterIndex
from app.adapters.on_demand import OnDemandLoader
from app.adapters.repository import RepositoryUnavailable
from app.adapters.store.adapter_store import StoreError
from app.adapters.store.local_repository import LocalDirectoryRepository
from app.adapters.store.peft_folder import PeftFolderRepository
from app.adapters.store.archive import ArchiveError, ArchiveLimits

log = logging.getLogger("olora.server")


def _error_response(request: Request, kind: errors.ErrorKind, message: str, param: str | None = None,
                    headers: dict | None = None) -> JSONResponse:
    if kind.status == 429:
        headers = {**(headers or {}), "Retry-After": "1"}
    content = errors.body(kind, message, openai=errors.is_openai_path(request.url.path), param=param)
    return JSONResponse(content, status_code=kind.status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    """Every error goes through the one table in app/server/errors.py (status, error_type, body shape)."""
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        kind, message, param = errors.validation_kind(exc.errors())
        return _error_response(request, kind, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind, message = errors.classify(exc)
        return _error_response(request, kind, message, headers=exc.headers)

    async def _typed(request: Request, exc: Exception):
        kind, message = errors.classify(exc)
        if kind.status >= 500:
            log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc,
                      exc_info=exc if kind is errors.INTERNAL else None)
        return _error_response(request, kind, message)

    for family in (EngineError, StoreError, RepositoryUnavailable, ArchiveError, UploadRefused, GenerationError, OLoRAError,
                   ValidationError, UnicodeError, OSError, Exception):
        app.add_exception_handler(family, _typed)


SWEEP_EVERY_S = 30.0  # retired adapter versions are removed this often (after their grace period)


async def _watch_store(state: AppState, repository, index: AdapterIndex) -> None:
    """Keep the in-memory index current: each poll applies what the repository's change journal names (its cost
    grows with the changes, not with the adapters); a full rebuild every `store_rescan_s` repairs anything missed.
    The engine drops cached copies of changed or deleted adapters; retired versions are swept."""
    last_sweep = last_rescan = time.monotonic()
    while True:
        await asyncio.sleep(state.settings.store_poll_s)
        try:
            if time.monotonic() - last_rescan > state.settings.store_rescan_s:
                last_rescan = time.monotonic()
                changed = await asyncio.to_thread(index.rebuild)
            else:
                changed = await asyncio.to_thread(index.refresh)
            if time.monotonic() - last_sweep > SWEEP_EVERY_S:
                last_sweep = time.monotonic()
                await asyncio.to_thread(repository.sweep)
        except (OSError, RepositoryUnavailable) as exc:  # a store gone away or read-only must not end the watcher
            log.warning("adapter store watcher: %s", exc)
            continue
        for change in changed:
            path = None if change.stored is None else str(change.stored.path)  # None: deleted
            state.engine.invalidate(change.adapter_id, current_path=path)  # an up-to-date cache is left alone
        if changed:
            state.metrics.count_registered(index.versions())


def _repository(settings: Settings):
    """The adapter repository the settings name (app/adapters/repository.py)."""
    if settings.store == "s3":
        from app.adapters.store.s3_repository import S3Repository

        if not settings.s3_bucket:
            raise ValueError("OLORA_STORE=s3 needs OLORA_S3_BUCKET")
        return S3Repository(settings.s3_bucket, settings.s3_prefix, settings.adapter_dir,
                            endpoint_url=settings.s3_endpoint_url, timeout_s=settings.s3_timeout_s)
    return LocalDirectoryRepository(settings.adapter_dir)  # removes crashed writers' staging folders


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = ServerMetrics(settings.metrics_max_adapter_labels, settings.max_loras)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from app.engine.engine import Engine

        repository = _repository(settings)
        await asyncio.to_thread(repository.sweep)
        index = AdapterIndex(repository)
        await asyncio.to_thread(index.rebuild)

        def local(adapter_id: str):  # the live version with its files on this machine (None: no such adapter)
            stored = index.lookup(adapter_id)
            return None if stored is None else repository.localize(stored)

        ephemeral = EphemeralAdapters(repository, lookup=local)
        loader_box: list[OnDemandLoader] = []  # the loader needs the service, which needs the engine

        def fetch(adapter_id: str):
            return loader_box[0].fetch(adapter_id) if loader_box else local(adapter_id)

        engine = await asyncio.to_thread(Engine, settings.engine_config(), ServedAdapters(fetch, ephemeral), metrics)
        metrics.set_max_loras(engine.config.max_loras)
        engine.start()
        ephemeral.validate = engine.validate_adapter  # a merge's scaled weights are checked before it is served
        limits = ArchiveLimits(max_compressed_bytes=settings.max_upload_bytes,
                               max_unpacked_bytes=settings.max_unpacked_bytes)
        service = AdapterService(repository, engine, limits, index)
        loader = OnDemandLoader(service, [PeftFolderRepository(d) for d in settings.peft_dirs],
                                timeout_s=settings.fetch_timeout_s)
        loader_box.append(loader)
        state = AppState(settings=settings, engine=engine, adapters=service, metrics=metrics, ephemeral=ephemeral,
                         loader=loader)
        if settings.demo_adapters:
            from app.adapters.demo import register_demo_adapters
            await asyncio.to_thread(register_demo_adapters, state.adapters, settings.model)
        registered = await state.recount_adapters()
        app.state.olora = state
        watcher = asyncio.create_task(_watch_store(state, repository, index))
        log.info("serving %s (fingerprint %s) with %d adapters", engine.base.name, engine.base.fingerprint,
                 registered)
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            app.state.olora = None
            loader.close()
            await asyncio.to_thread(engine.shutdown)

    # /docs and /redoc with their assets served from the fastapi-offline package: no CDN, they work offline
    app = FastAPIOffline(title="olora-serve", version=__version__, lifespan=lifespan,
                         description="Many OLoRA/LoRA adapters on one base model: TGI/LoRAX- and OpenAI-compatible.")
    _install_error_handlers(app)
    from app.server.routers import adapters, generate, ops, openai_compat, vllm_lora
    routers = (generate.router, openai_compat.router, adapters.router, ops.router, vllm_lora.router)
    for router in routers:
        app.include_router(router, responses=errors.openapi_error_responses())
    # the routes a request refused before routing is counted under (docs' routes, then the API's)
    routes = [r for r in app.routes if isinstance(r, Route)] + [r for router in routers for r in router.routes]
    # outermost last: access log -> keys (headers only) -> upload bound -> body size -> routes
    app.add_middleware(BodySizeLimitMiddleware, max_json_bytes=settings.max_request_bytes,
                       max_upload_bytes=settings.max_upload_bytes)
    app.add_middleware(UploadLimitMiddleware, max_uploads=settings.max_concurrent_uploads)
    app.add_middleware(AuthMiddleware, settings=settings)
    app.add_middleware(AccessLogMiddleware, metrics=metrics, routes=routes)
    return app
