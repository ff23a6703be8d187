"""API keys, checked from the request headers before any body is read (pure ASGI middleware).

Keys may carry a tenant name (`name:key` in the settings): it is put on the request (`scope["state"]["tenant"]`)
for the access log, the `tenant` metric label and the per-tenant limit (app/server/tenants.py).

Roles: an admin key may do everything; an API key may generate and read. When no key is configured every
request passes. Which role a route needs is its policy (app/server/route_policy.py), resolved before this
middleware runs: the probes are public, `/metrics` is open unless `metrics_require_key`, changing adapters needs
an admin key, everything else (`/info`, `/docs` and `/openapi.json` included) an API key.

Because the check runs before FastAPI parses a multipart body, an upload without a valid key is answered
401/403 without a byte of it being spooled to disk. The route dependencies in app/server/deps.py apply the same
policy once more, and describe the Bearer scheme in the OpenAPI document.
"""
from __future__ import annotations

import hmac
import json
from typing import Literal

from app.server import errors
from app.server.route_policy import policy_of
from app.server.settings import Settings

Role = Literal["admin", "api"]
MISSING_KEY = "missing API key (Authorization: Bearer <key>)"
INVALID_KEY = "invalid API key"
NOT_ADMIN = "this API key may generate but not change adapters"


def split_key(entry: str) -> tuple[str | None, str]:
    """A configured key `name:key` -> (tenant name, key); a key without a name -> (None, key)."""
    name, sep, key = entry.partition(":")
    return (name, key) if sep and name and key else (None, entry)


def _matching(token: str, keys: list[str]) -> str | None:
    """The configured entry `token` is the key of, else None."""
    found = None
    for entry in keys:  # no early exit: every key is compared, each in constant time
        if hmac.compare_digest(token.encode(), split_key(entry)[1].encode()):
            found = entry
    return found


def _matches(token: str, keys: list[str]) -> bool:
    return _matching(token, keys) is not None


def tenant_of(settings: Settings, token: str | None) -> str | None:
    """The tenant name a bearer token's configured entry carries (`name:key`); None for an unnamed or unknown key."""
    if not token:
        return None
    entry = _matching(token, settings.admin_keys) or _matching(token, settings.api_keys)
    return None if entry is None else split_key(entry)[0]


def role_of(settings: Settings, token: str | None) -> Role | None:
    """What a bearer token may do (None: nothing)."""
    if not token:
        return None
    if _matches(token, settings.admin_keys or settings.api_keys):
        return "admin"
    if _matches(token, settings.api_keys):
        return "api"
    return None


def refusal(settings: Settings, need: Role | None, authorization: str | None) -> tuple[int, str] | None:
    """(status, message) when a request that needs role `need` (None: open) may not proceed, else None."""
    if need is None:
        return None
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return 401, MISSING_KEY
    role = role_of(settings, token.strip())
    if role is None:
        return 401, INVALID_KEY
    if need == "admin" and role != "admin":
        return 403, NOT_ADMIN
    return None


class AuthMiddleware:
    def __init__(self, app, settings: Settings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.settings.auth_enabled:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        authorization = headers.get(b"authorization", b"").decode("latin-1") or None
        refused = refusal(self.settings, policy_of(scope).needs(self.settings), authorization)
        if refused is None:
            scheme, _, token = (authorization or "").partition(" ")
            tenant = tenant_of(self.settings, token.strip()) if scheme.lower() == "bearer" else None
            scope.setdefault("state", {})["tenant"] = tenant
            return await self.app(scope, receive, send)
        status, message = refused
        await send_error(send, scope, status, message,
                         [(b"www-authenticate", b"Bearer")] if status == 401 else [])


async def send_error(send, scope, status: int, message: str, extra_headers: list | None = None) -> None:
    """An error response from ASGI middleware, in the same body shapes as the app's handlers."""
    kind = errors.BY_STATUS[status]
    content = errors.body(kind, message, openai=errors.is_openai_path(scope.get("path", "")))
    payload = json.dumps(content).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
               *(extra_headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
