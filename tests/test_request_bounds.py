"""Bounds before work: every list a request body may carry has a bound in its schema (checked over the app's whole
OpenAPI description), and a merge's source count, duplicates and merged rank are checked on the store's metadata
before any source is loaded (POST /adapters/merge and a request's `merged_adapters`)."""
from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.adapters import ephemeral, service
from app.adapters.merge_plan import MergeLimits, combine_duplicates, plan_merge
from app.server.main import create_app
from helpers import save_random_lora
from http_helpers import tar_gz, upload
from olora_core.errors import MergeError
from test_http_api import base_dir, make_settings  # noqa: F401 - base_dir is a fixture

PROMPT = "Return the number of items"


def _unbounded_arrays(node, where: str, defs: dict, seen: set) -> list[str]:
    """Every JSON-schema array (at any depth, through $refs) without maxItems."""
    out = []
    if isinstance(node, dict):
        ref = node.get("$ref")
        if ref is not None:
            name = ref.rsplit("/", 1)[-1]
            if name not in seen:
                seen.add(name)
                out += _unbounded_arrays(defs[name], f"{where}->{name}", defs, seen)
        if node.get("type") == "array" and "maxItems" not in node:
            out.append(where)
        for key, value in node.items():
            if key != "$ref":
                out += _unbounded_arrays(value, f"{where}.{key}", defs, seen)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _unbounded_arrays(value, f"{where}[{i}]", defs, seen)
    return out


def test_every_request_list_is_bounded(tmp_path):
    spec = create_app(make_settings(tmp_path, tmp_path)).openapi()  # no lifespan: the schema only
    defs = spec["components"]["schemas"]
    bodies = 0
    problems = []
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            for media, content in operation.get("requestBody", {}).get("content", {}).items():
                bodies += 1
                problems += _unbounded_arrays(content["schema"], f"{method.upper()} {path} {media}", defs, set())
            for parameter in operation.get("parameters", []):
                problems += _unbounded_arrays(parameter.get("schema", {}), f"{path}?{parameter['name']}", defs,
                                              set())
    assert bodies >= 6  # /generate, /generate_stream, /, completions, chat, upload, merge
    assert problems == []


def test_plan_merge_rules():
    limits = MergeLimits(max_sources=3, max_rank=16)
    ranks = {"a": 4, "b": 8, "c": 8}
    assert combine_duplicates([("a", 0.5), ("b", 1.0), ("a", 0.25)], "cat") == [("a", 0.75), ("b", 1.0)]
    with pytest.raises(MergeError, match="listed twice"):
        combine_duplicates([("a", 1.0), ("a", 1.0)], "ties")
    assert plan_merge([("a", 1.0), ("a", 1.0), ("b", 1.0)], "cat", None, limits, ranks.__getitem__) == [
        ("a", 2.0), ("b", 1.0)]
    with pytest.raises(MergeError, match="at most 3"):
        plan_merge([("a", 1.0)] * 4, "cat", None, limits, ranks.__getitem__)
    with pytest.raises(MergeError, match="rank 20"):
        plan_merge([("a", 1.0), ("b", 1.0), ("c", 1.0)], "cat", None, limits, ranks.__getitem__)
    assert plan_merge([("b", 1.0), ("c", 1.0)], "svd", 16, limits, ranks.__getitem__) == [("b", 1.0), ("c", 1.0)]
    assert plan_merge([("b", 1.0), ("c", 1.0)], "ties", None, limits, ranks.__getitem__) == [("b", 1.0), ("c", 1.0)]


@pytest.fixture(scope="module")
def client(tmp_path_factory, base_dir):
    lora = Path(save_random_lora(base_dir, tmp_path_factory.mktemp("loras") / "qv4", r=4, seed=1,
                                 task_type="CAUSAL_LM"))
    settings = make_settings(tmp_path_factory.mktemp("srv"), base_dir, max_merge_sources=4)  # max_rank 16
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        for i in range(5):
            assert upload(c, f"s{i}", tar_gz(lora)).status_code == 201
        yield c


@pytest.fixture()
def loads(monkeypatch) -> list[Path]:
    """Every adapter directory a merge path reads (both modules import load_adapter_dir by name)."""
    from olora_core.adapter_io import load_adapter_dir

    seen: list[Path] = []

    def spy(path, *args, **kwargs):
        seen.append(Path(path))
        return load_adapter_dir(path, *args, **kwargs)

    monkeypatch.setattr(ephemeral, "load_adapter_dir", spy)
    monkeypatch.setattr(service, "load_adapter_dir", spy)
    return seen


def _per_request(client, ids, weights=None, strategy=None):
    merged = {"ids": ids, **({"weights": weights} if weights else {}),
              **({"merge_strategy": strategy, "density": 0.5} if strategy else {})}
    return client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4,
                                                                          "merged_adapters": merged}})


def test_many_copies_of_one_id_are_refused_by_the_schema(client, loads):
    r = _per_request(client, ["s0"] * 800)  # the campaign's 14.5 KB body that cost 1.1 GB
    assert r.status_code == 422 and r.json()["error_type"] == "validation" and loads == []


def test_per_request_merge_bounds_before_loading(client, loads):
    r = _per_request(client, [f"s{i}" for i in range(5)])  # 5 ids > max_merge_sources 4
    assert r.status_code == 422 and "max_merge_sources" in r.json()["error"] and loads == []
    r = _per_request(client, [f"s{i}" for i in range(4)] + ["s0"])  # 5 given: the bound is on what is sent
    assert r.status_code == 422 and loads == []
    # cat of 4 rank-4 adapters fits max_rank 16 ...
    assert _per_request(client, [f"s{i}" for i in range(4)]).status_code == 200 and len(loads) == 4
    loads.clear()
    r = _per_request(client, ["s0", "s1", "s0"], strategy="ties")
    assert r.status_code == 422 and "listed twice" in r.json()["error"] and loads == []


def test_duplicates_are_combined(client, loads):
    """Two halves of one adapter are that adapter: one source read, the adapter's own output."""
    alone = client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4,
                                                                           "adapter_id": "s1"}})
    r = _per_request(client, ["s1", "s1"], weights=[0.5, 0.5])
    assert r.status_code == 200 and r.json()["generated_text"] == alone.json()["generated_text"]
    assert len(loads) == 1


def test_merge_route_bounds_before_loading(client, loads):
    def merge(sources, method="cat", **extra):
        return client.post("/adapters/merge", json={"adapter_id": "m", "sources": sources, "method": method,
                                                    "overwrite": True, **extra})

    r = merge([{"id": "s0"}] * 65)
    assert r.status_code == 422 and r.json()["error_type"] == "validation" and loads == []
    r = merge([{"id": f"s{i}"} for i in range(5)])
    assert r.status_code == 422 and "max_merge_sources" in r.json()["error"] and loads == []
    r = merge([{"id": "s0"}, {"id": "s1"}, {"id": "s2"}, {"id": "s3"}], svd_rank=17, method="svd")
    assert r.status_code == 422 and "max_rank" in r.json()["error"] and loads == []
    r = merge([{"id": "s0", "weight": 0.5}, {"id": "s0", "weight": 0.5}, {"id": "s2"}])
    assert r.status_code == 201, r.text
    assert r.json()["sources"] == [{"id": "s0", "weight": 1.0}, {"id": "s2", "weight": 1.0}] and len(loads) == 2
