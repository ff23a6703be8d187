"""FastAPI dependencies: the per-app state and API-key checks (Bearer, constant-time comparison)."""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.adapter_service import AdapterService
from app.metrics import ServerMetrics
from app.settings import Settings


@dataclass
class AppState:
    """Everything the lifespan builds; routers reach it through `get_state`."""

    settings: Settings
    engine: object  # app.engine.engine.Engine
    adapters: AdapterService
    metrics: ServerMetrics
    ephemeral: object  # app.ephemeral.EphemeralAdapters (per-request merges)


def get_state(request: Request) -> AppState:
    state = getattr(request.app.state, "olora", None)
    if state is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the server is starting")
    return state


State = Annotated[AppState, Depends(get_state)]
_bearer = HTTPBearer(auto_error=False)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _matches(token: str, keys: list[str]) -> bool:
    found = False
    for key in keys:  # no early exit: every key is compared, each in constant time
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


def _token(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or not credentials.credentials:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing API key (Authorization: Bearer <key>)",
                            headers={"WWW-Authenticate": "Bearer"})
    return credentials.credentials


def require_api_key(state: State, credentials: Credentials) -> None:
    """Generation and reading: any API key or admin key."""
    s = state.settings
    if not s.auth_enabled:
        return
    if not _matches(_token(credentials), s.api_keys + s.admin_keys):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid API key", headers={"WWW-Authenticate": "Bearer"})


def require_admin_key(state: State, credentials: Credentials) -> None:
    """Upload, delete, merge: an admin key (the API keys too when no admin key is configured)."""
    s = state.settings
    if not s.auth_enabled:
        return
    token = _token(credentials)
    admin = s.admin_keys or s.api_keys
    if _matches(token, admin):
        return
    if _matches(token, s.api_keys):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this API key may generate but not change adapters")
    raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid API key", headers={"WWW-Authenticate": "Bearer"})


ApiKey = Depends(require_api_key)
AdminKey = Depends(require_admin_key)
