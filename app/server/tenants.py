"""Tenants: the name an API key carries (`name:key`, app/server/auth.py), counted per request and, optionally,
limited in concurrent generations.

Semantics: the `tenant` label of `olora_tenant_requests_total{tenant,status}` is a configured key's name, or
`anonymous` for unnamed keys and servers without keys: bounded by the configuration, never by clients. With
`tenant_max_concurrent` > 0, a tenant (anonymous included) with that many generation requests in flight gets 429
with its route policy's `Retry-After` for the next one, before its body is read; other tenants are unaffected.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from app.server.auth import send_error
from app.server.route_policy import policy_of, retry_after

ANONYMOUS = "anonymous"


def tenant_label(scope) -> str:
    return (scope.get("state") or {}).get("tenant") or ANONYMOUS


class TenantMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter("olora_tenant_requests", "HTTP requests by tenant (API key name) and status",
                                ["tenant", "status"], registry=registry)

    def observe(self, scope, status: int) -> None:
        self.requests.labels(tenant=tenant_label(scope), status=str(status)).inc()


class TenantLimitMiddleware:
    """Counts each tenant's requests (TenantMetrics) and bounds its generations in flight."""

    def __init__(self, app, metrics: TenantMetrics, max_concurrent: int):
        self.app = app
        self.metrics = metrics
        self.max_concurrent = max_concurrent
        self.in_flight: dict[str, int] = {}  # one event loop: no lock needed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def recording_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        tenant = tenant_label(scope)
        limited = self.max_concurrent > 0 and policy_of(scope).generation
        try:
            if limited and self.in_flight.get(tenant, 0) >= self.max_concurrent:
                return await send_error(recording_send, scope, 429,
                                        f"tenant {tenant!r} has {self.max_concurrent} generations in flight; retry "
                                        "later", retry_after(policy_of(scope)))
            if not limited:
                return await self.app(scope, receive, recording_send)
            self.in_flight[tenant] = self.in_flight.get(tenant, 0) + 1
            try:
                await self.app(scope, receive, recording_send)
            finally:
                self.in_flight[tenant] -= 1
        finally:
            self.metrics.observe(scope, status["code"])
