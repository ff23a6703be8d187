"""FastAPI dependencies: the per-app state and each route's policy check (`policy(...)`; the key rules and
comparison live in app/server/auth.py, the policies in app/server/route_policy.py)."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.adapters.ephemeral import EphemeralAdapters
from app.adapters.on_demand import OnDemandLoader
from app.adapters.service import AdapterService
from app.server.auth import INVALID_KEY, MISSING_KEY, NOT_ADMIN, role_of
from app.server.drain import Drain
from app.server.metrics import ServerMetrics
from app.server.route_policy import PolicyGuard, RoutePolicy
from app.server.router_metrics import RouterProtocolMetrics
from app.server.settings import Settings

if TYPE_CHECKING:  # the engine module imports torch: the lifespan imports it, not the app's import
    from app.engine.engine import Engine


@dataclass
class AppState:
    """Everything the lifespan builds; routers reach it through `get_state`."""

    settings: Settings
    engine: Engine
    adapters: AdapterService
    metrics: ServerMetrics
    ephemeral: EphemeralAdapters  # per-request merges
    starts: ThreadPoolExecutor  # generation starts only (start_off_loop): never behind store I/O or merges
    loader: OnDemandLoader  # adapters loaded from the configured sources on first request
    drain: Drain = field(default_factory=Drain)  # the app's (create_app makes it before the lifespan)
    router_metrics: RouterProtocolMetrics | None = None  # vLLM's gauges, on the metrics' registry
    watcher: asyncio.Task | None = None  # the store watcher the lifespan runs

    async def recount_adapters(self) -> int:
        """After a change to the store: the registered-adapters gauge, from the in-memory index (no store read)."""
        return self.metrics.count_registered(self.adapters.index.versions())


# The dependencies are coroutines: they do not block, and a plain `def` one would cost every request a hop to
# a worker thread and back (FastAPI runs those in its thread pool).
async def get_state(request: Request) -> AppState:
    state = getattr(request.app.state, "olora", None)
    if state is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the server is starting")
    return state


State = Annotated[AppState, Depends(get_state)]
_bearer = HTTPBearer(auto_error=False)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


class _OpenGuard(PolicyGuard):
    async def __call__(self) -> None:
        return None


class _KeyGuard(PolicyGuard):
    """The key check of app.server.auth once more, after AuthMiddleware (which ran before the body was read), so
    that no route escapes it; describes the Bearer scheme in the OpenAPI document."""

    async def __call__(self, request: Request, credentials: Credentials) -> None:
        settings: Settings = request.app.state.settings
        need = self.policy.needs(settings)
        if need is None:
            return
        if credentials is None or not credentials.credentials:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, MISSING_KEY, headers={"WWW-Authenticate": "Bearer"})
        role = role_of(settings, credentials.credentials)
        if role is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, INVALID_KEY, headers={"WWW-Authenticate": "Bearer"})
        if need == "admin" and role != "admin":
            raise HTTPException(status.HTTP_403_FORBIDDEN, NOT_ADMIN)


def policy(route_policy: RoutePolicy) -> list:
    """The `dependencies=` of a route with this policy: its one declaration (app/server/route_policy.py)."""
    return [Depends(_OpenGuard(route_policy) if route_policy.role == "public" else _KeyGuard(route_policy))]
