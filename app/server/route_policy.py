"""One policy per route: the role it needs, its body limit, whether it takes an upload slot or starts a generation,
and the Retry-After its refusals carry. Declared once beside the route (`dependencies=policy(GENERATE)`,
app/server/deps.py), read by the route's own dependency and, through `RouteTable`, by the middlewares that
answer before routing (key check, body size, upload bound, tenant limit, drain) and by the error handlers (the 429
hint).

Semantics:
* roles: `public` (no key: the probes), `scrape` (open unless `metrics_require_key`), `api` (any API or admin
  key), `admin` (an admin key; the API keys too when no admin key is configured). Without configured keys every
  route is open.
* The framework's own routes (`/docs`, `/redoc`, `/openapi.json`, the OAuth redirect, the docs' static assets)
  declare no dependencies: `RouteTable` gives them `FRAMEWORK_POLICY` by route object, enforced by the middleware.
* A path no route serves needs an API key (`UNMATCHED_POLICY`): a client without one learns nothing of the paths.
  A path some route serves with another method takes the strictest policy of those routes (the key check comes
  before the 405).
* Building the table fails when a route declares no policy or more than one: a new route cannot escape it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

from fastapi.routing import APIRoute
from starlette.routing import BaseRoute, Match

from app.server.settings import Settings

Role = Literal["public", "scrape", "api", "admin"]
BodyLimit = Literal["json", "upload"]
_STRICTNESS = {"public": 0, "scrape": 1, "api": 2, "admin": 3}


@dataclass(frozen=True)
class RoutePolicy:
    """What one route needs and how its refusals read.

    Semantics: `body` names the settings limit its body is held to (`json`: max_request_bytes, `upload`:
    max_upload_bytes); `upload_slot`: the request holds one of `max_concurrent_uploads` while it runs;
    `generation`: counted against the tenant limit and refused while draining; `retry_after_s`: the Retry-After of
    its 429s (the queue is full, the tenant or upload slots are taken): when a slot is likely free again."""

    role: Role
    body: BodyLimit = "json"
    upload_slot: bool = False
    generation: bool = False
    retry_after_s: int = 1

    def needs(self, settings: Settings) -> Literal["api", "admin"] | None:
        """The key role a request must show under `settings` (None: open)."""
        if not settings.auth_enabled or self.role == "public":
            return None
        if self.role == "scrape":
            return "api" if settings.metrics_require_key else None
        return self.role

    def body_limit(self, settings: Settings) -> int:
        """The most bytes its request body may have under `settings`."""
        return settings.max_upload_bytes if self.body == "upload" else settings.max_request_bytes


PUBLIC = RoutePolicy("public")  # liveness and readiness probes
SCRAPE = RoutePolicy("scrape")  # Prometheus and the routers' scrapers
READ = RoutePolicy("api")  # reading: models, adapters, cache, info
GENERATE = RoutePolicy("api", generation=True, retry_after_s=1)  # a row frees when any running request ends
ADMIN = RoutePolicy("admin")  # changing what is served
UPLOAD = RoutePolicy("admin", body="upload", upload_slot=True, retry_after_s=5)  # an upload takes seconds
FRAMEWORK_POLICY = READ  # /docs, /redoc, /openapi.json: the API's description needs a key as the API does
UNMATCHED_POLICY = READ


class PolicyGuard:
    """Base of a policy's route dependency (app/server/deps.py: `policy(...)`); `policy` is what the table reads."""

    def __init__(self, policy: RoutePolicy):
        self.policy = policy


def declared_policies(route: APIRoute) -> list[RoutePolicy]:
    return [d.dependency.policy for d in route.dependencies if isinstance(d.dependency, PolicyGuard)]


class RouteTable:
    """Every route of an app with its policy, keyed by the route object; `match(scope)` is what the middlewares ask
    before routing (through RoutePolicyMiddleware)."""

    def __init__(self, routes: Sequence[BaseRoute], framework_routes: Sequence[BaseRoute] = ()):
        """`framework_routes`: the routes the framework added itself (the docs), given FRAMEWORK_POLICY; every
        other route must declare exactly one policy."""
        self.entries: list[tuple[BaseRoute, RoutePolicy]] = []
        for route in routes:
            if any(route is framework for framework in framework_routes):
                self.entries.append((route, FRAMEWORK_POLICY))
                continue
            found = declared_policies(route) if isinstance(route, APIRoute) else []
            if len(found) != 1:
                raise ValueError(f"route {sorted(getattr(route, 'methods', None) or [])} {route.path} declares "
                                 f"{len(found)} policies (deps.policy(...) in its dependencies): exactly one is needed")
            self.entries.append((route, found[0]))

    def match(self, scope) -> tuple[BaseRoute | None, RoutePolicy]:
        """The route a request is for and its policy: the route that serves its method and path; else, of the
        routes serving its path with other methods, the strictest; else (None, UNMATCHED_POLICY)."""
        partial: list[tuple[BaseRoute, RoutePolicy]] = []
        for route, route_policy in self.entries:
            matched = route.matches(scope)[0]
            if matched is Match.FULL:
                return route, route_policy
            if matched is Match.PARTIAL:
                partial.append((route, route_policy))
        if partial:
            return max(partial, key=lambda entry: _STRICTNESS[entry[1].role])
        return None, UNMATCHED_POLICY


_STATE_KEY = "route_policy"


class RoutePolicyMiddleware:
    """Resolves each request's route and policy once, before the middlewares that read them (`policy_of`)."""

    def __init__(self, app, table: RouteTable):
        self.app = app
        self.table = table

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            route, route_policy = self.table.match(scope)
            state = scope.setdefault("state", {})
            state[_STATE_KEY] = route_policy
            state["matched_route"] = route
        return await self.app(scope, receive, send)


def policy_of(scope) -> RoutePolicy:
    """The policy RoutePolicyMiddleware resolved for this request (a KeyError when that middleware is missing or
    placed after the reader: a wiring mistake fails loudly, it never falls back to an open default)."""
    return scope["state"][_STATE_KEY]


def retry_after(route_policy: RoutePolicy) -> list[tuple[bytes, bytes]]:
    """The Retry-After header of the policy's 429s, as ASGI headers."""
    return [(b"retry-after", str(route_policy.retry_after_s).encode())]


def matched_route(scope) -> BaseRoute | None:
    return (scope.get("state") or {}).get("matched_route")
