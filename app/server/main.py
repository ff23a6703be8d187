"""The FastAPI application: `create_app(settings)`; all state is built in the lifespan, none at import."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
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
from app.adapters.merge_plan import MergeLimits
from app.adapters.served import ServedAdapters
from app.server.generation import GenerationError
from app.server.metrics import ServerMetrics
from app.server.auth import AuthMiddleware
from app.server.middleware import AccessLogMiddleware, BodySizeLimitMiddleware, UploadLimitMiddleware
from app.server.settings import Settings
from app.adapters.store.adapter_store import AdapterStore, StoreError, StoreFinding
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

    for family in (EngineError, StoreError, ArchiveError, UploadRefused, GenerationError, OLoRAError,
                   ValidationError, UnicodeError, OSError, Exception):
        app.add_exception_handler(family, _typed)


SWEEP_EVERY_S = 30.0  # retired adapter versions are removed this often (after their grace period)


class StoreFindingsLog:
    """Logs what the store's sweeps find (repairs and damage), each adapter's finding once until it changes."""

    def __init__(self) -> None:
        self._logged: dict[str, str] = {}  # adapter id -> the message logged last

    def report(self, findings: list[StoreFinding]) -> None:
        for finding in findings:
            if self._logged.get(finding.adapter_id) != finding.message:
                self._logged[finding.adapter_id] = finding.message
                log.log(logging.WARNING if finding.repaired else logging.ERROR, "adapter store: adapter %r: %s",
                        finding.adapter_id, finding.message)
        for adapter_id in set(self._logged) - {f.adapter_id for f in findings}:
            del self._logged[adapter_id]  # sound again (repaired, overwritten or deleted)


async def _watch_store(state: AppState, store: AdapterStore, findings: StoreFindingsLog) -> None:
    """Pick up adapters changed or deleted by other replicas sharing the store directory; sweep retired versions,
    repair or report damage (logged by id)."""
    known = await asyncio.to_thread(store.versions)
    last_sweep = time.monotonic()
    while True:
        await asyncio.sleep(state.settings.store_poll_s)
        try:
            if time.monotonic() - last_sweep > SWEEP_EVERY_S:
                last_sweep = time.monotonic()
                findings.report(await asyncio.to_thread(store.sweep))
            current = await asyncio.to_thread(store.versions)
        except (OSError, ValueError) as exc:  # a store that went away or read-only must not end the watcher
            log.warning("adapter store watcher: %s", exc)
            continue
        for adapter_id in set(known) | set(current):
            if known.get(adapter_id) != current.get(adapter_id):
                version = current.get(adapter_id)  # None: deleted
                path = None if version is None else str(store.root / adapter_id / version)
                state.engine.invalidate(adapter_id, current_path=path)  # an up-to-date cache is left alone
        known = current
        state.metrics.count_registered(current)


async def _self_check(engine, harness) -> None:
    """Serve the start-time probe (app/engine/self_check.py); on a mismatch the engine stops and the start fails."""
    from app.engine.self_check import run_self_check

    try:
        report = await asyncio.to_thread(run_self_check, engine, harness)
    except BaseException:
        await asyncio.to_thread(engine.shutdown)
        raise
    log.info("self-check passed: %s, %d log-probs within %.3g of transformers/PEFT (max distance %.3g, %s) in "
             "%.1f s", report.model_type, report.compared, report.max_tolerance, report.max_distance, report.dtype,
             report.seconds)
    for note in report.notes:
        log.warning("self-check: %s", note)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = ServerMetrics(settings.metrics_max_adapter_labels, settings.max_loras)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from app.engine.engine import Engine
        from app.engine.self_check import ProbeHarness

        store = AdapterStore(settings.adapter_dir)  # removes crashed writers' staging folders
        findings = StoreFindingsLog()
        findings.report(await asyncio.to_thread(store.sweep))  # damage found at start is logged by id
        ephemeral = EphemeralAdapters(store)
        # the self-check's probe adapters are served, and its requests kept out of the metrics, by the harness
        harness = ProbeHarness(ServedAdapters(store, ephemeral), metrics)
        engine = await asyncio.to_thread(Engine, settings.engine_config(), harness, harness)
        metrics.set_max_loras(engine.config.max_loras)
        engine.start()
        if settings.self_check == "on":
            await _self_check(engine, harness)
        ephemeral.validate = engine.validate_adapter  # a merge's scaled weights are checked before it is served
        ephemeral.limits = MergeLimits(settings.max_merge_sources, engine.config.max_rank)
        limits = ArchiveLimits(max_compressed_bytes=settings.max_upload_bytes,
                               max_unpacked_bytes=settings.max_unpacked_bytes)
        starts = ThreadPoolExecutor(settings.start_threads, thread_name_prefix="olora-start")
        state = AppState(settings=settings, engine=engine,
                         adapters=AdapterService(store, engine, limits, settings.max_merge_sources),
                         metrics=metrics, ephemeral=ephemeral, starts=starts)
        if settings.demo_adapters:
            from app.adapters.demo import register_demo_adapters
            await asyncio.to_thread(register_demo_adapters, state.adapters, settings.model)
        registered = await state.recount_adapters()
        app.state.olora = state
        watcher = asyncio.create_task(_watch_store(state, store, findings))
        log.info("serving %s (fingerprint %s) with %d adapters", engine.base.name, engine.base.fingerprint,
                 registered)
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            app.state.olora = None
            await asyncio.to_thread(engine.shutdown)
            starts.shutdown(wait=False, cancel_futures=True)
            await asyncio.to_thread(ephemeral.close)

    # /docs and /redoc with their assets served from the fastapi-offline package: no CDN, they work offline
    app = FastAPIOffline(title="olora-serve", version=__version__, lifespan=lifespan,
                         description="Many OLoRA/LoRA adapters on one base model: TGI/LoRAX- and OpenAI-compatible.")
    _install_error_handlers(app)
    from app.server.routers import adapters, generate, ops, openai_compat
    routers = (generate.router, openai_compat.router, adapters.router, ops.router)
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
