"""ASGI middleware: request ids, structured JSON access logs, request metrics, request body size limits,
the bound on concurrent uploads (auth before body: app/server/auth.py; limits from each route's policy:
app/server/route_policy.py)."""
from __future__ import annotations

import json
import logging
import time
import uuid

from starlette.exceptions import HTTPException

from app.server.auth import send_error
from app.server.route_policy import matched_route, policy_of, retry_after
from app.server.settings import Settings
from app.server.log_format import request_context, trace_id_of
from app.server.metrics import ServerMetrics

access_log = logging.getLogger("olora.access")


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the bytes received pass the limit. An HTTPException, so FastAPI's body parsing
    passes it on (any other error there becomes 400 "error parsing the body") and the handlers answer 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit} bytes")


UNMATCHED = "unmatched"  # the route label of a path no route serves (bounded: never the raw path)


def route_template(scope) -> str:
    """The route template a request is counted under: the one the router chose, or, for a request a middleware
    answered before routing (401/403 of the key check, 413, 429 of the upload bound), the one RoutePolicyMiddleware
    matched (a wrong method: the route it names); `unmatched` when none serves its path."""
    route = scope.get("route") or matched_route(scope)
    return getattr(route, "path", None) or UNMATCHED


class AccessLogMiddleware:
    """Gives every request an id (X-Request-Id, taken from the client if it sent a sane one), logs one JSON line
    per request and counts it in the metrics under its route template (bounded label values)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        sane = 0 < len(given) <= 64 and given.isascii() and given.replace("-", "").isalnum()  # ASCII: echoed as sent
        request_id = given if sane else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        context = request_context.set({"request_id": request_id,
                                       "trace_id": trace_id_of(headers.get(b"traceparent", b"").decode("latin-1"))})
        started = time.perf_counter()
        status_holder = {"status": 500}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            route_label = route_template(scope)
            self.metrics.observe_request(route_label, status_holder["status"], seconds)
            access_log.info(json.dumps({
                "ts": time.time(), "request_id": request_id, "method": scope.get("method"),
                "path": scope.get("path"), "route": route_label, "status": status_holder["status"],
                "duration_ms": round(seconds * 1000, 2),
                "adapter_id": scope["state"].get("adapter_id"), "tenant": scope["state"].get("tenant"),
                "client": (scope.get("client") or [None])[0]}))
            request_context.reset(context)


class BodySizeLimitMiddleware:
    """413 for bodies over the route policy's limit (RoutePolicy.body_limit: the upload limit for uploads, the JSON
    limit for everything else): checked on Content-Length up front and on the bytes actually received (chunked)."""

    def __init__(self, app, settings: Settings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = policy_of(scope).body_limit(self.settings)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _send_413(send, scope, limit)
        received = 0
        started = {"response": False}

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                started["response"] = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started["response"]:
                await _send_413(send, scope, limit)


async def _send_413(send, scope, limit: int) -> None:
    await send_error(send, scope, 413, f"request body larger than {limit} bytes")


class UploadLimitMiddleware:
    """At most `max_uploads` requests of routes whose policy takes an upload slot in progress at once: the next one
    gets 429 + the policy's Retry-After before its body is read. (Runs after the key check, so unauthenticated
    requests take no place.)"""

    def __init__(self, app, max_uploads: int):
        self.app = app
        self.max_uploads = max_uploads
        self.in_progress = 0  # one event loop: no lock needed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not policy_of(scope).upload_slot:
            return await self.app(scope, receive, send)
        if self.in_progress >= self.max_uploads:
            return await send_error(send, scope, 429, f"{self.max_uploads} uploads are already in progress; "
                                                      "retry later", retry_after(policy_of(scope)))
        self.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress -= 1
