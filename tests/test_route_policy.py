"""The route-policy table (app/server/route_policy.py): every route of the app has exactly one policy, declared
beside it; the key check, the body limits, the upload bound and the 429 hints follow it, route by route."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi import APIRouter
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from app.server import auth
from app.server.deps import policy
from app.server.main import create_app
from app.server.route_policy import (FRAMEWORK_POLICY, GENERATE, READ, UPLOAD, RouteTable, declared_policies)
from app.server.settings import Settings
from helpers import save_tiny_checkpoint

USER = {"Authorization": "Bearer user-key"}
ADMIN = {"Authorization": "Bearer admin-key"}
DOCS_PATHS = {"/openapi.json", "/static-offline-docs", "/docs", "/docs/oauth2-redirect", "/redoc"}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return Path(save_tiny_checkpoint(tmp_path_factory.mktemp("base") / "tiny", seed=0))


def _settings(tmp_path: Path, base_dir: Path, **overrides) -> Settings:
    values = dict(model=str(base_dir), adapter_dir=tmp_path / "store", demo_adapters=False, self_check="off",
                  max_batch_size=2, max_input_tokens=64, max_total_tokens=128, max_loras=2, max_cpu_adapters=4,
                  max_rank=16, api_keys="user-key", admin_keys="admin-key", max_request_bytes=4096,
                  max_upload_bytes=65536)
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def client(tmp_path_factory, base_dir):
    with TestClient(create_app(_settings(tmp_path_factory.mktemp("app"), base_dir))) as c:
        yield c


def all_routes(routes) -> list:
    """Every route an app serves, through the routers it includes (FastAPI >= 0.16x keeps an included router as
    one entry of `app.routes`, with the router under `original_router`)."""
    found = []
    for route in routes:
        included = getattr(route, "original_router", None)
        found.extend(all_routes(included.routes) if included is not None else [route])
    return found


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


def _requests(table: RouteTable):
    """(method, concrete path, policy) for every route in the table (the docs' static mount: one of its files)."""
    for route, route_policy in table.entries:
        path = _concrete(route.path)
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            if method == "HEAD":
                continue
            yield method, path if path != "/static-offline-docs" else path + "/redoc.standalone.js", route_policy


def test_every_route_of_the_app_has_exactly_one_policy(client):
    table = client.app.state.route_table
    routes = all_routes(client.app.routes)
    assert len(routes) == len(table.entries) > 20
    for route in routes:
        assert any(r is route for r, _ in table.entries), f"{route.path} has no policy"
    for route, route_policy in table.entries:
        if route.path in DOCS_PATHS:
            assert route_policy is FRAMEWORK_POLICY
        else:  # declared beside the route, as its dependency: FastAPI runs it before the handler
            assert isinstance(route, APIRoute) and declared_policies(route) == [route_policy], route.path
    by_path = {(r.path, tuple(sorted(getattr(r, "methods", None) or ()))): p for r, p in table.entries}
    assert by_path[("/adapters", ("POST",))] is UPLOAD
    assert by_path[("/v1/chat/completions", ("POST",))] is GENERATE
    assert by_path[("/info", ("GET",))] is READ


def test_a_route_without_a_policy_fails_the_table():
    router = APIRouter()

    @router.get("/with", dependencies=policy(READ))
    async def with_policy() -> dict:
        return {}

    RouteTable(router.routes)  # one policy each: builds

    @router.get("/without")
    async def without_policy() -> dict:
        return {}

    with pytest.raises(ValueError, match="/without declares 0 policies"):
        RouteTable(router.routes)

    twice = APIRouter()

    @twice.get("/twice", dependencies=policy(READ) + policy(GENERATE))
    async def two_policies() -> dict:
        return {}

    with pytest.raises(ValueError, match="/twice declares 2 policies"):
        RouteTable(twice.routes)


def _refused(r) -> bool:
    return r.status_code in (401, 403)


def test_the_key_check_follows_each_routes_policy(client):
    """Every route of the table, without a key, with an API key and with an admin key."""
    settings = client.app.state.settings
    checked = set()
    for method, path, route_policy in _requests(client.app.state.route_table):
        need = route_policy.needs(settings)
        anonymous = client.request(method, path)
        user = client.request(method, path, headers=USER)
        admin = client.request(method, path, headers=ADMIN)
        assert not _refused(admin), (method, path, admin.status_code)
        if need is None:
            assert not _refused(anonymous), (method, path)
        else:
            assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == "Bearer", (method, path)
            assert user.status_code == (403 if need == "admin" else user.status_code), (method, path)
            assert need == "admin" or not _refused(user), (method, path, user.status_code)
        checked.add(need)
    assert checked == {None, "api", "admin"}
    # a path no route serves asks for a key; a path served with another method takes the strictest of its routes
    assert client.get("/no/such/path").status_code == 401
    assert client.get("/no/such/path", headers=USER).status_code == 404
    assert client.put("/adapters/x", headers=USER).status_code == 403  # GET (api) and DELETE (admin) serve it
    assert client.put("/adapters/x", headers=ADMIN).status_code == 405


def test_the_routes_own_dependencies_refuse_without_the_middleware(tmp_path, base_dir, monkeypatch):
    """No route escapes its policy: with the key middleware taken out, each API route's own dependency still
    answers 401/403 (the docs' routes, which have none, rely on the middleware: the test above)."""
    async def passing(self, scope, receive, send):
        return await self.app(scope, receive, send)

    monkeypatch.setattr(auth.AuthMiddleware, "__call__", passing)
    with TestClient(create_app(_settings(tmp_path, base_dir))) as c:
        settings = c.app.state.settings
        for method, path, route_policy in _requests(c.app.state.route_table):
            if route_policy is FRAMEWORK_POLICY and path.split("/")[1] in {"docs", "redoc", "openapi.json",
                                                                        "static-offline-docs"}:
                continue
            need = route_policy.needs(settings)
            anonymous = c.request(method, path)
            assert (anonymous.status_code == 401) == (need is not None), (method, path, anonymous.status_code)
            if need == "admin":
                assert c.request(method, path, headers=USER).status_code == 403, (method, path)


def test_body_limits_and_upload_bound_follow_the_policy(client):
    settings = client.app.state.settings
    between = b"x" * (settings.max_request_bytes + 1)  # over the JSON limit, under the upload limit
    r = client.post("/generate", content=between, headers={**USER, "Content-Type": "application/json"})
    assert r.status_code == 413 and str(settings.max_request_bytes) in r.json()["error"]
    r = client.post("/v1/load_lora_adapter", content=between, headers={**ADMIN, "Content-Type": "application/json"})
    assert r.status_code == 413
    r = client.post("/adapters", files={"archive": ("a.tgz", between)}, data={"adapter_id": "big"}, headers=ADMIN)
    assert r.status_code == 422, r.text  # past the JSON limit, within the upload one: read, then refused as an archive
    over = b"x" * (settings.max_upload_bytes + 1)
    r = client.post("/adapters", files={"archive": ("a.tgz", over)}, data={"adapter_id": "big"}, headers=ADMIN)
    assert r.status_code == 413 and str(settings.max_upload_bytes) in r.json()["error"]


def test_upload_bound_answers_the_policys_retry_after(client):
    bound = next(m for m in _middlewares(client.app) if type(m).__name__ == "UploadLimitMiddleware")
    bound.in_progress = bound.max_uploads  # every slot taken
    try:
        r = client.post("/adapters", files={"archive": ("a.tgz", b"x")}, data={"adapter_id": "a"}, headers=ADMIN)
        assert r.status_code == 429 and r.headers["retry-after"] == str(UPLOAD.retry_after_s)
        # routes without an upload slot pass
        assert client.post("/adapters/merge", json={}, headers=ADMIN).status_code == 422
    finally:
        bound.in_progress = 0


def _middlewares(app):
    """The app's middleware instances, outermost first."""
    layer = app.middleware_stack
    while layer is not None:
        yield layer
        layer = getattr(layer, "app", None)
