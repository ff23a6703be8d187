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
from app.server.drain import Drain, DrainMiddleware
from app.server.http_edges import HttpEdgeMiddleware
from app.server.connections import BodyTimeoutMiddleware
from app.server.tenants import TenantLimitMiddleware, TenantMetrics
from app.server.tracing import TracingMiddleware, tracer_provider_from_env
from app.server.startup import Startup
from app.server.router_metrics import RouterProtocolMetrics
from app.server.middleware import AccessLogMiddleware, BodySizeLimitMiddleware, UploadLimitMiddleware, route_template
from app.server.route_policy import RouteTable, RoutePolicyMiddleware, policy_of
from app.server.settings import Settings
from app.adapters.index import AdapterIndex
from app.adapters.on_demand import OnDemandLoader
from app.adapters.repository import RepositoryUnavailable
from app.adapters.store.adapter_store import StoreError, StoreFinding
from app.adapters.store.local_repository import LocalDirectoryRepository
from app.adapters.store.peft_folder import PeftFolderRepository
from app.adapters.store.archive import ArchiveError, ArchiveLimits

log = logging.getLogger("olora.server")


def _error_response(request: Request, kind: errors.ErrorKind, message: str, param: str | None = None,
                    headers: dict | None = None) -> JSONResponse:
    if kind.status == 429:  # the queue is full: the route policy says when to come back
        route_policy = policy_of(request.scope)
        headers = {**(headers or {}), "Retry-After": str(route_policy.retry_after_s)}
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


class StoreFindingsLog:
    """Logs what the store's sweeps find (repairs and damage), each adapter's finding once until it changes."""

    def __init__(self) -> None:
        self._logged: dict[str, str] = {}  # adapter id -> the message logged last

    def report(self, findings: list[StoreFinding], complete: bool = True) -> None:
        """`complete`: the sweep looked at every adapter (then an id it no longer names is sound again)."""
        for finding in findings:
            if self._logged.get(finding.adapter_id) != finding.message:
                self._logged[finding.adapter_id] = finding.message
                log.log(logging.WARNING if finding.repaired else logging.ERROR, "adapter store: adapter %r: %s",
                        finding.adapter_id, finding.message)
        if not complete:
            return
        for adapter_id in set(self._logged) - {f.adapter_id for f in findings}:
            del self._logged[adapter_id]  # sound again (repaired, overwritten or deleted)


async def _watch_store(state: AppState, repository, index: AdapterIndex, findings: StoreFindingsLog) -> None:
    """Keep the in-memory index current: each poll applies what the repository's change journal names (its cost
    grows with the changes, not with the adapters); a full rebuild every `store_rescan_s` repairs anything missed.
    The engine drops cached copies of changed or deleted adapters; retired versions are swept and store damage is
    repaired or reported (logged by id): every SWEEP_EVERY_S for the ids the journal named (a cost that grows with
    the changes), every `store_rescan_s` for every adapter."""
    last_sweep = last_rescan = last_full_sweep = time.monotonic()
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
                full = time.monotonic() - last_full_sweep > state.settings.store_rescan_s
                if full:
                    last_full_sweep = time.monotonic()
                found = await asyncio.to_thread(repository.sweep, full)
                findings.report(found, complete=full)
                # a repaired CURRENT names another version: the index reads those ids again
                changed += await asyncio.to_thread(index.recheck, [f.adapter_id for f in found if f.repaired])
        except (OSError, ValueError, RepositoryUnavailable) as exc:  # a store gone away or read-only must not end it
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
                            endpoint_url=settings.s3_endpoint_url, timeout_s=settings.s3_timeout_s,
                            cache_bytes=settings.adapter_cache_bytes)
    return LocalDirectoryRepository(settings.adapter_dir)  # removes crashed writers' staging folders


def _sources(settings: Settings, limits: ArchiveLimits) -> list:
    """The read-only folders of PEFT saves adapters are loaded from on demand: on disk, then in buckets."""
    sources: list = [PeftFolderRepository(d) for d in settings.peft_dirs]
    if settings.peft_s3_uris:
        from app.adapters.store.s3_peft_folder import S3PeftFolderRepository

        sources += [S3PeftFolderRepository(uri, endpoint_url=settings.s3_endpoint_url, timeout_s=settings.s3_timeout_s,
                                           limits=limits) for uri in settings.peft_s3_uris]
    return sources


async def _self_check(engine, harness) -> None:
    """Serve the start-time probe (app/engine/self_check.py); on a mismatch the start fails (the caller stops the
    engine)."""
    from app.engine.self_check import run_self_check

    report = await asyncio.to_thread(run_self_check, engine, harness)
    log.info("self-check passed: %s, %d log-probs within %.3g of transformers/PEFT (max distance %.3g, %s) in "
             "%.1f s", report.model_type, report.compared, report.max_tolerance, report.max_distance, report.dtype,
             report.seconds)
    for note in report.notes:
        log.warning("self-check: %s", note)


async def _build_state(settings: Settings, metrics: ServerMetrics, drain: Drain,
                       startup: Startup) -> tuple[AppState, StoreFindingsLog]:
    """Everything the app serves with, phase by phase (app/server/startup.py names them), and the log of store
    damage the watcher goes on reporting."""
    from app.engine.engine import Engine
    from app.engine.self_check import ProbeHarness

    with startup.enter("store"):
        repository = _repository(settings)
        findings = StoreFindingsLog()
        findings.report(await asyncio.to_thread(repository.sweep))  # damage found at start is logged by id
        index = AdapterIndex(repository)
        await asyncio.to_thread(index.rebuild)

        def local(adapter_id: str):  # the live version with its files on this machine (None: no such adapter)
            stored = index.lookup(adapter_id)
            return None if stored is None else repository.localize(stored)

        ephemeral = EphemeralAdapters(repository, lookup=local, held=repository.held)
        loader_box: list[OnDemandLoader] = []  # the loader needs the service, which needs the engine

        def fetch(adapter_id: str):
            return loader_box[0].fetch(adapter_id) if loader_box else local(adapter_id)

    with startup.enter("model"):
        # the self-check's probe adapters are served, and its requests kept out of the metrics, by the harness
        harness = ProbeHarness(ServedAdapters(fetch, ephemeral), metrics)
        engine = await asyncio.to_thread(Engine, settings.engine_config(), harness, harness)
    loader = None
    try:
        metrics.set_max_loras(engine.config.max_loras)
        engine.start()
        ephemeral.validate = engine.validate_adapter  # a merge's scaled weights are checked before it is served
        if settings.self_check == "on":
            with startup.enter("self_check"):
                await _self_check(engine, harness)
        with startup.enter("adapters"):
            ephemeral.limits = MergeLimits(settings.max_merge_sources, engine.config.max_rank)
            limits = ArchiveLimits(max_compressed_bytes=settings.max_upload_bytes,
                                   max_unpacked_bytes=settings.max_unpacked_bytes)
            service = AdapterService(repository, engine, limits, index, settings.max_merge_sources)
            loader = OnDemandLoader(service, _sources(settings, limits),
                                    timeout_s=settings.fetch_timeout_s, cache_bytes=settings.adapter_cache_bytes)
            for copies in (getattr(repository, "copies", None), loader.copies):
                if copies is not None:  # what the engine has still to read is never evicted
                    copies.in_use = engine.loading_paths
            loader_box.append(loader)
            starts = ThreadPoolExecutor(settings.start_threads, thread_name_prefix="olora-start")
            state = AppState(settings=settings, engine=engine, adapters=service, metrics=metrics,
                             ephemeral=ephemeral, starts=starts, loader=loader, drain=drain,
                             router_metrics=RouterProtocolMetrics(metrics.registry))
            if settings.demo_adapters:
                from app.adapters.demo import register_demo_adapters
                await asyncio.to_thread(register_demo_adapters, state.adapters, settings.model)
            registered = await state.recount_adapters()
    except BaseException:
        if loader is not None:
            loader.close()
        await asyncio.to_thread(engine.shutdown)
        raise
    log.info("serving %s (fingerprint %s) with %d adapters", engine.base.name, engine.base.fingerprint,
             registered)
    return state, findings


def create_app(settings: Settings | None = None, *, load_in_background: bool = False) -> FastAPI:
    """The app. `load_in_background`: the lifespan returns at once (the server binds its port) and the model loads
    meanwhile, reported by /health and /ready (`olora serve` does this); else the lifespan returns once loaded."""
    settings = settings or Settings()
    metrics = ServerMetrics(settings.metrics_max_adapter_labels, settings.max_loras)
    drain = Drain()
    startup = Startup()

    async def load_and_serve(app: FastAPI) -> AppState:
        try:
            state, findings = await _build_state(settings, metrics, drain, startup)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            startup.fail(exc)
            raise
        app.state.olora = state
        state.watcher = asyncio.create_task(_watch_store(state, state.adapters.repository, state.adapters.index, findings))
        startup.done()
        return state

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(load_and_serve(app))
        if not load_in_background:
            await asyncio.shield(loading)
        try:
            yield
        finally:
            loading.cancel()  # a start still running (its thread finishes the step it is in)
            with contextlib.suppress(BaseException):
                await loading
            state = getattr(app.state, "olora", None)
            app.state.olora = None
            if state is not None:
                state.watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await state.watcher
                await asyncio.to_thread(state.engine.shutdown)
                state.starts.shutdown(wait=False, cancel_futures=True)
                state.loader.close()
                await asyncio.to_thread(state.ephemeral.close)
            provider = getattr(app.state, "tracer_provider", None)
            if provider is not None:
                await asyncio.to_thread(provider.shutdown)  # the last spans are exported

    # /docs and /redoc with their assets served from the fastapi-offline package: no CDN, they work offline
    app = FastAPIOffline(title="olora-serve", version=__version__, lifespan=lifespan,
                         description="Many OLoRA/LoRA adapters on one base model: TGI/LoRAX- and OpenAI-compatible.")
    app.state.settings = settings  # the route policies' key checks read it (app/server/deps.py)
    app.state.drain = drain  # cli_serve's server starts it on SIGTERM
    app.state.startup = startup  # /health and /ready report it; cli_serve exits 1 when it fails
    framework_routes = list(app.routes)  # the docs' routes, before the API's
    _install_error_handlers(app)
    from app.server.routers import adapters, generate, ops, openai_compat, vllm_lora
    routers = (generate.router, openai_compat.router, adapters.router, ops.router, vllm_lora.router)
    for router in routers:
        app.include_router(router, responses=errors.openapi_error_responses())
    # every route's policy (fails when a route declares none): the docs' routes, then the API's
    table = RouteTable([*framework_routes, *(r for router in routers for r in router.routes)], framework_routes)
    app.state.route_table = table

    # outermost last: access log -> http edges -> route policy -> drain -> keys (headers only) -> tenant limit ->
    # upload bound -> body size -> body timeout -> routes
    app.add_middleware(BodyTimeoutMiddleware, body_timeout=settings.body_timeout)
    app.add_middleware(BodySizeLimitMiddleware, settings=settings)
    app.add_middleware(UploadLimitMiddleware, max_uploads=settings.max_concurrent_uploads)
    app.add_middleware(TenantLimitMiddleware, metrics=TenantMetrics(metrics.registry),
                       max_concurrent=settings.tenant_max_concurrent)
    app.add_middleware(AuthMiddleware, settings=settings)
    app.add_middleware(DrainMiddleware, drain=drain)
    app.add_middleware(RoutePolicyMiddleware, table=table)  # what the middlewares below it read (policy_of)
    app.add_middleware(HttpEdgeMiddleware)  # canonical paths, CL+TE refused, HEAD as GET: before keys and limits
    app.add_middleware(AccessLogMiddleware, metrics=metrics)
    provider = tracer_provider_from_env()  # OTLP export when OTEL_EXPORTER_OTLP_* says where; else no spans
    if provider is not None:
        app.add_middleware(TracingMiddleware, provider=provider, route_of=route_template)
        app.state.tracer_provider = provider  # flushed at shutdown
    return app
