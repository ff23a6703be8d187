"""Robustness over HTTP (TestClient, the real app and lifespan): hostile requests get a JSON 4xx/5xx from the one
error table and the server goes on; error bodies stay small and leak nothing; keys guard /info and the docs;
disk full / read-only store; SSE stays valid JSON. Real-process cases (auth before body, kill -9): test_chaos.py.
"""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from app.engine.errors import QueueFull
from app.server.errors import ERROR_TABLE
from app.server.main import create_app
from helpers import overflow_at_run_time, save_random_lora
from http_helpers import peft_greedy_text, remount_read_only, tar_gz, tmpfs_store, upload
from test_http_api import base_dir, make_settings  # noqa: F401 - base_dir is a fixture

PROMPT = "Return the number of items"
HOSTILE_GENERATE = [
    {"do_sample": True, "temperature": 1e-45},
    {"do_sample": True, "temperature": 1e-38},
    {"do_sample": True, "repetition_penalty": 1e-45},
    {"do_sample": True, "top_p": 1e-300},
    {"do_sample": True, "temperature": 1e-45, "top_k": 1, "repetition_penalty": 100},
    {"seed": 2**63},
    {"seed": 2**64 + 5, "do_sample": True},
]
HOSTILE_COMPLETIONS = [{"temperature": 1e-45}, {"temperature": 1e-38}, {"top_p": 1e-300}, {"seed": 2**63}]


@pytest.fixture(scope="module")
def lora_dirs(base_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    good = Path(save_random_lora(base_dir, root / "good", r=4, seed=1, task_type="CAUSAL_LM"))
    huge = Path(save_random_lora(base_dir, root / "huge", r=4, seed=2, task_type="CAUSAL_LM"))
    weights = huge / "adapter_model.safetensors"
    save_file({k: v * 1e25 for k, v in load_file(str(weights)).items()}, str(weights))  # refused at upload
    hot = Path(save_random_lora(base_dir, root / "hot", r=4, seed=3, task_type="CAUSAL_LM"))  # see overflow_at_run_time
    return {"good": good, "huge": huge, "hot": hot}


@pytest.fixture(scope="module")
def client(tmp_path_factory, base_dir, lora_dirs):
    settings = make_settings(tmp_path_factory.mktemp("srv"), base_dir)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        assert upload(c, "good", tar_gz(lora_dirs["good"])).status_code == 201
        assert upload(c, "hot", tar_gz(lora_dirs["hot"])).status_code == 201
        refused = _small_json_error(upload(c, "huge", tar_gz(lora_dirs["huge"])), 422)  # the magnitude check
        assert refused["error_type"] == "adapter_rejected" and "too large" in refused["error"], refused
        assert c.get("/adapters/huge").status_code == 404
        yield c


def _small_json_error(r, status: int | tuple[int, ...], openai: bool = False) -> dict:
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json") and len(r.content) < 1024, r.text
    body = r.json()
    text = json.dumps(body)
    assert "Traceback" not in text and "lora_A" not in text and "/tmp/" not in text and "/work/" not in text
    if openai:
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    else:
        assert isinstance(body["error"], str) and body["error_type"]
    return body


def _still_serves(client, base_dir, lora_dirs) -> None:
    assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200
    r = client.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "good", "max_new_tokens": 6}})
    assert r.status_code == 200 and r.json()["generated_text"] == peft_greedy_text(base_dir, lora_dirs["good"],
                                                                                  PROMPT, 6)


@pytest.mark.parametrize("params", HOSTILE_GENERATE, ids=[json.dumps(p) for p in HOSTILE_GENERATE])
def test_hostile_sampling_on_generate(client, base_dir, lora_dirs, params):
    r = client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4, **params}})
    if r.status_code != 200:
        _small_json_error(r, 422)
    assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200


@pytest.mark.parametrize("params", HOSTILE_COMPLETIONS, ids=[json.dumps(p) for p in HOSTILE_COMPLETIONS])
def test_hostile_sampling_on_completions(client, params):
    r = client.post("/v1/completions", json={"model": "good", "prompt": PROMPT, "max_tokens": 4, **params})
    if r.status_code != 200:
        _small_json_error(r, 422, openai=True)
    assert client.get("/health").status_code == 200


def test_overflowing_merges_and_adapters_end_only_their_request(client, base_dir, lora_dirs, monkeypatch):
    overflow_at_run_time(monkeypatch, "hot")
    merged = {"ids": ["good", "good"], "weights": [1e20, 1e20]}
    for do_sample in (False, True):
        r = client.post("/generate", json={"inputs": PROMPT, "parameters": {
            "merged_adapters": merged, "do_sample": do_sample, "max_new_tokens": 4}})
        # the engine survives. (Whether such a merge is refused up front, or runs with RMSNorm squashing
        # its overflow to zeros, is the served-weight check's business.)
        if r.status_code != 200:
            _small_json_error(r, 422)
        r = client.post("/generate", json={"inputs": PROMPT, "parameters": {
            "adapter_id": "hot", "do_sample": do_sample, "max_new_tokens": 4}})
        assert _small_json_error(r, 422)["error_type"] == "non_finite_logits"
    _still_serves(client, base_dir, lora_dirs)


def test_stream_never_sends_bare_nan(client, monkeypatch):
    """Every SSE data line is strict JSON (no NaN/Infinity), also when the request fails mid-way: the stream has
    started (200) when the `hot` adapter's logits turn NaN, so the failure is an error event, not a status."""
    def strict(line: str):
        return json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in {line}"))

    overflow_at_run_time(monkeypatch, "hot")
    outcomes = {}
    for adapter in ("good", "hot"):
        with client.stream("POST", "/generate_stream", json={"inputs": PROMPT, "parameters": {
                "adapter_id": adapter, "max_new_tokens": 4, "details": True}}) as r:
            r.read()
            lines = [line[5:].strip() for line in r.text.splitlines() if line.startswith("data:")]
        assert r.status_code == 200, (adapter, r.status_code, r.text)
        events = [strict(line) for line in lines]
        assert events, adapter
        outcomes[adapter] = events[-1]
    assert outcomes["good"]["details"]["generated_tokens"] == 4 and "error" not in outcomes["good"]
    assert outcomes["hot"]["error_type"] == "non_finite_logits" and "not finite" in outcomes["hot"]["error"]


def test_nan_merge_weight_leaks_nothing(client):
    """the 422 of a NaN weight holds no config, tensor values or store path, and is < 1 KB."""
    raw = ('{"inputs": "x", "parameters": {"merged_adapters": {"ids": ["good", "good"], "weights": [NaN, 1]}}}')
    r = client.post("/generate", content=raw, headers={"content-type": "application/json"})
    _small_json_error(r, 422)
    r = client.post("/adapters/merge", content='{"adapter_id": "m", "sources": [{"id": "good", "weight": NaN}]}',
                    headers={"content-type": "application/json"})
    _small_json_error(r, 422)


def test_lone_surrogate_and_huge_seed_are_422(client):
    """a lone surrogate in a prompt and a merge seed >= 2**63 are 4xx JSON, not a plain-text 500."""
    for path, raw in [("/generate", '{"inputs": "a\\ud800b", "parameters": {"max_new_tokens": 2}}'),
                      ("/v1/completions", '{"model": "good", "prompt": "\\udfff", "max_tokens": 2}'),
                      ("/v1/chat/completions", '{"model": "good", "messages": [{"role": "user", "content": '
                                               '"\\ud800"}], "max_tokens": 2}')]:
        r = client.post(path, content=raw, headers={"content-type": "application/json"})
        _small_json_error(r, 422, openai=path.startswith("/v1"))
    r = client.post("/adapters/merge", json={"adapter_id": "m", "sources": [{"id": "good"}], "seed": 2**63})
    _small_json_error(r, 422)
    r = client.post("/adapters/merge", json={"adapter_id": "m", "sources": [{"id": "good"}], "seed": 2**200})
    _small_json_error(r, 422)


def test_one_error_contract(client):
    """one name per kind of error on every route; QueueFull's hint agrees with what is sent."""
    assert QueueFull.status_code == 429 == ERROR_TABLE[QueueFull].status
    missing = [
        client.get("/adapters/nope"),
        client.delete("/adapters/nope"),
        client.post("/adapters/nope/merge-into-base"),
        client.post("/generate", json={"inputs": "x", "parameters": {"adapter_id": "nope"}}),
        client.post("/adapters/merge", json={"adapter_id": "m", "sources": [{"id": "nope"}]}),
    ]
    assert {_small_json_error(r, 404)["error_type"] for r in missing} == {"adapter_not_found"}
    r = client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert _small_json_error(r, 404, openai=True)["error"]["code"] == "adapter_not_found"
    assert _small_json_error(client.get("/no/such/path"), 404)["error_type"] == "not_found"
    r = client.post("/v1/completions", json={"model": "good"})
    assert _small_json_error(r, 422, openai=True)["error"]["param"] == "prompt"
    assert _small_json_error(client.post("/generate", json={}), 422)["error_type"] == "validation"


def test_openai_client_shows_the_message(client):
    import openai

    oai = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        oai.completions.create(model="nope", prompt="x", max_tokens=2)
    assert "'nope' not found" in info.value.message and info.value.code == "adapter_not_found"
    with pytest.raises(openai.UnprocessableEntityError) as info:
        oai.completions.create(model="good", prompt="x", max_tokens=2, logit_bias={"5": 10})
    assert "logit_bias" in info.value.message


def test_keys_guard_info_and_docs_but_not_probes(tmp_path, base_dir):
    """with keys set only /health, /ready and /metrics are open (README); OLORA_METRICS_REQUIRE_KEY."""
    for require in (False, True):
        settings = make_settings(tmp_path / str(require), base_dir, api_keys="user-key", admin_keys="admin-key",
                                 metrics_require_key=require)
        with TestClient(create_app(settings)) as c:
            for path in ("/info", "/docs", "/openapi.json", "/redoc", "/v1/models", "/adapters", "/nope"):
                r = c.get(path)
                _small_json_error(r, 401, openai=path.startswith("/v1"))
                assert c.get(path, headers={"Authorization": "Bearer user-key"}).status_code in (200, 404)
            for path in ("/health", "/ready", "/v2/health/live", "/v2/health/ready"):
                assert c.get(path).status_code == 200
            assert c.get("/metrics").status_code == (401 if require else 200)
            assert c.get("/metrics", headers={"Authorization": "Bearer user-key"}).status_code == 200
            r = c.post("/adapters/merge", json={}, headers={"Authorization": "Bearer user-key"})
            _small_json_error(r, 403)


def _failing(error: int):
    def fail(*args, **kwargs):
        raise OSError(error, "injected")
    return fail


@pytest.mark.parametrize("error,status,kind", [(errno.ENOSPC, 507, "insufficient_storage"),
                                               (errno.EROFS, 503, "store_read_only")])
def test_store_errors_are_json(client, lora_dirs, monkeypatch, error, status, kind):
    from app.adapters.store import adapter_store

    monkeypatch.setattr(adapter_store.shutil, "copyfile", _failing(error))
    r = upload(client, "later", tar_gz(lora_dirs["good"]))
    assert _small_json_error(r, status)["error_type"] == kind
    monkeypatch.undo()
    assert client.get("/adapters/later").status_code == 404
    store_root = client.app.state.olora.adapters.repository.root
    assert list((store_root / ".staging").iterdir()) == []


def test_real_full_and_read_only_disk(tmp_path, base_dir, lora_dirs):
    """The same on a real filesystem: a 2 MiB tmpfs as the store (needs mount rights, as root on CI)."""
    with tmpfs_store(tmp_path / "store", "2m",
                     "cannot mount a tmpfs here (not root); test_store_errors_are_json covers the mapping") as store:
        settings = make_settings(tmp_path, base_dir, adapter_dir=store)
        with TestClient(create_app(settings), raise_server_exceptions=False) as c:
            junk = lora_dirs["good"].parent / "junk"
            junk.mkdir(exist_ok=True)
            with open(lora_dirs["good"].parent / "junk" / "noise.bin", "wb") as fh:
                fh.write(__import__("os").urandom(3 << 20))  # incompressible: the spooled archive > 2 MiB
            big = tar_gz(junk, arcname="junk")
            r = upload(c, "big", big)
            assert _small_json_error(r, 507)["error_type"] == "insufficient_storage"
            assert list((store / ".staging").iterdir()) == []  # nothing half-written, the space is back
            assert upload(c, "small", tar_gz(lora_dirs["good"])).status_code == 201
            assert remount_read_only(store)
            r = upload(c, "other", tar_gz(lora_dirs["good"]))
            assert _small_json_error(r, 503)["error_type"] == "store_read_only"
            assert c.get("/adapters/small").status_code == 200
            r = c.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "small",
                                                                            "max_new_tokens": 4}})
            assert r.status_code == 200


def test_rejections_name_files_without_absolute_paths(client, lora_dirs, tmp_path):
    """a refused upload names the file and key, never the store/staging path it was read from."""
    import shutil
    bad = tmp_path / "dora"
    shutil.copytree(lora_dirs["good"], bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    body = _small_json_error(upload(client, "dora", tar_gz(bad)), 422)
    assert "adapter_config.json" in body["error"] and "use_dora" in body["error"]
    assert str(client.app.state.olora.adapters.repository.root) not in body["error"]


def test_health_fails_when_the_engine_loop_died(tmp_path, base_dir, monkeypatch):
    """a persistent engine fault takes /health down with /ready (the orchestrator restarts the pod)."""
    with TestClient(create_app(make_settings(tmp_path, base_dir)), raise_server_exceptions=False) as c:
        def broken(*args, **kwargs):
            raise RuntimeError("simulated device loss")

        monkeypatch.setattr(c.app.state.olora.engine.runner, "prefill", broken)
        assert c.get("/health").status_code == 200
        for _ in range(4):
            r = c.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
            assert r.status_code in (500, 503) and "simulated" not in r.text
            _small_json_error(r, (500, 503))
        assert c.get("/health").status_code == 503 and c.get("/ready").status_code == 503
        assert _small_json_error(c.post("/generate", json={"inputs": "x"}), 503)["error_type"] == "engine_unavailable"


def test_after_the_hostile_suite_the_server_matches_peft(client, base_dir, lora_dirs):
    """Acceptance: after everything above in this one app, a normal request gives PEFT's greedy output."""
    _still_serves(client, base_dir, lora_dirs)
    assert client.app.state.olora.engine.stats().alive
