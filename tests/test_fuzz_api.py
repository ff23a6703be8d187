"""schemathesis over the app's own OpenAPI description, against a real `olora serve` process with keys set.

Properties: every response has a documented status, errors are JSON,
nothing is a 5xx, and afterwards the server still generates PEFT's greedy output and /health tells the truth.
Examples are bounded per operation so the file stays within a couple of minutes on 2 cores.
"""
from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import content_type_conformance, not_a_server_error, status_code_conformance

from app.server.main import create_app
from app.server.settings import Settings
from http_helpers import peft_greedy_text
from server_process import Replica
from test_http_api import base_dir  # noqa: F401 - fixture

ADMIN = {"Authorization": "Bearer admin-key"}
PROMPT = "Return the number of"
schema = schemathesis.openapi.from_dict(create_app(Settings(demo_adapters=False)).openapi())


@pytest.fixture(scope="module")
def server(base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    server = Replica("fuzz", base_dir, root / "store", root, extra_env={
        "OLORA_API_KEYS": "user-key", "OLORA_ADMIN_KEYS": "admin-key", "OLORA_MAX_INPUT_TOKENS": "32",
        "OLORA_MAX_TOTAL_TOKENS": "64", "OLORA_MAX_BATCH_TOKENS": "64", "OLORA_REQUEST_TIMEOUT_S": "20"})
    server.wait_ready()
    yield server
    server.stop()


def _json_errors(ctx, response, case) -> None:
    """Every error response is JSON (a body a client can parse, not a plain-text 500)."""
    if response.status_code >= 400:
        assert response.headers.get("content-type", [""])[0].startswith("application/json"), response.text
        assert len(response.content) < 1024 and "error" in response.json(), response.text


@schema.parametrize()
@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])
def test_api_conforms_to_its_schema(case, server):
    response = case.call(base_url=server.url, headers=ADMIN, timeout=60)
    case.validate_response(response, checks=[status_code_conformance, content_type_conformance, not_a_server_error])
    _json_errors(None, response, case)


def test_server_still_generates_after_the_fuzzing(server, base_dir):
    """Runs after the fuzz test in the same process: /health is honest and the base output is PEFT's."""
    with httpx.Client(base_url=server.url, headers=ADMIN, timeout=60) as c:
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200
        r = c.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 6}})
        assert r.status_code == 200 and r.json()["generated_text"] == peft_greedy_text(base_dir, None, PROMPT, 6)
