"""Integration tests of the HTTP API through TestClient (the lifespan runs: `with TestClient(app)`)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.server.main import create_app
from app.server.route_policy import GENERATE
from app.server.settings import Settings
from app.adapters.store.local_repository import LocalDirectoryRepository
from helpers import save_random_lora, save_tiny_checkpoint
from http_helpers import peft_greedy_text, tar_gz, upload

PROMPT = "Return the number of items"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return Path(save_tiny_checkpoint(tmp_path_factory.mktemp("base") / "tiny", seed=0))


@pytest.fixture(scope="module")
def lora_dirs(base_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {
        "qv4": Path(save_random_lora(base_dir, root / "qv4", r=4, seed=1, task_type="CAUSAL_LM")),
        "all8": Path(save_random_lora(base_dir, root / "all8", r=8, seed=2, task_type="CAUSAL_LM",
                                      targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"))),
        "qv4b": Path(save_random_lora(base_dir, root / "qv4b", r=4, seed=3, task_type="CAUSAL_LM")),
    }


def make_settings(tmp_path: Path, base_dir: Path, **overrides) -> Settings:
    values = dict(model=str(base_dir), adapter_dir=tmp_path / "store", demo_adapters=False, max_batch_size=4,
                  max_input_tokens=64, max_total_tokens=128, max_loras=2, max_cpu_adapters=4, max_rank=16)
    values.update(overrides)
    return Settings(**values)


@pytest.fixture()
def client(tmp_path, base_dir):
    with TestClient(create_app(make_settings(tmp_path, base_dir))) as c:
        yield c


def gen(client, adapter_id=None, prompt=PROMPT, **params):
    params.setdefault("max_new_tokens", 8)
    return client.post("/generate", json={"inputs": prompt, "parameters": {"adapter_id": adapter_id, **params}})


def test_health_ready_info(client, base_dir):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["status"] == "ready"
    assert client.get("/v2/health/ready").status_code == 200
    info = client.get("/info").json()
    assert info["max_loras"] == 2 and info["quantize"] == "none" and len(info["base_fingerprint"]) >= 16


def test_upload_generate_matches_peft_and_base(client, base_dir, lora_dirs):
    r = upload(client, "qv4", tar_gz(lora_dirs["qv4"]))
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["id"] == "qv4" and info["rank"] == 4 and info["kind"] == "lora"
    assert set(info["target_modules"]) == {"q_proj", "v_proj"} and len(info["sha256"]) == 64
    assert info["base_fingerprint"] == client.get("/info").json()["base_fingerprint"]
    assert [a["id"] for a in client.get("/adapters").json()["adapters"]] == ["qv4"]
    assert client.get("/adapters/qv4").json()["sha256"] == info["sha256"]

    with_adapter = gen(client, "qv4").json()["generated_text"]
    base = gen(client, None).json()["generated_text"]
    assert with_adapter == peft_greedy_text(base_dir, lora_dirs["qv4"], PROMPT, 8)
    assert base == peft_greedy_text(base_dir, None, PROMPT, 8)
    assert with_adapter != base  # the adapter changes the output


def test_details_full_text_and_x_adapter_header(client, lora_dirs):
    upload(client, "qv4", tar_gz(lora_dirs["qv4"]))
    body = gen(client, "qv4", details=True, return_full_text=True).json()
    assert body["generated_text"].startswith(PROMPT)
    d = body["details"]
    assert d["finish_reason"] == "length" and d["generated_tokens"] == 8 and len(d["tokens"]) == 8
    assert all(t["logprob"] <= 0 for t in d["tokens"])
    r = client.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "qv4"}},
                    headers={"X-Adapter-Id": "other"})
    assert r.status_code == 400 and "X-Adapter-Id" in r.json()["error"]
    r = client.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "qv4"}},
                    headers={"X-Adapter-Id": "qv4"})
    assert r.status_code == 200


def test_seeded_sampling_is_reproducible(client):
    a = gen(client, None, do_sample=True, temperature=0.9, top_p=0.9, seed=7, details=True).json()
    b = gen(client, None, do_sample=True, temperature=0.9, top_p=0.9, seed=7, details=True).json()
    assert a["generated_text"] == b["generated_text"] and a["details"]["seed"] == 7


def test_unseeded_sampling_reports_the_seed_it_ran_with(client):
    """The engine draws the seed of an unseeded sampled request (in one place) and details.seed reports it:
    replaying with that seed gives the same text; greedy requests report none."""
    params = dict(do_sample=True, temperature=0.9, top_p=0.9, max_new_tokens=12, details=True)
    first = gen(client, None, **params).json()["details"]
    seeds = [first["seed"], gen(client, None, **params).json()["details"]["seed"]]
    assert all(isinstance(s, int) and 0 <= s < 2**63 for s in seeds) and seeds[0] != seeds[1]
    replay = gen(client, None, **params, seed=seeds[0]).json()
    assert replay["details"]["seed"] == seeds[0] and [t["id"] for t in replay["details"]["tokens"]] == \
        [t["id"] for t in first["tokens"]]
    assert gen(client, None, details=True).json()["details"].get("seed") is None


def test_stream_matches_generate(client, lora_dirs):
    upload(client, "all8", tar_gz(lora_dirs["all8"]))
    expected = gen(client, "all8", max_new_tokens=10).json()["generated_text"]
    with client.stream("POST", "/generate_stream",
                       json={"inputs": PROMPT, "parameters": {"adapter_id": "all8", "max_new_tokens": 10}}) as r:
        assert r.status_code == 200
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert len(events) == 10
    assert "".join(e["token"]["text"] for e in events) == expected
    assert events[-1]["generated_text"] == expected and events[-1]["details"]["finish_reason"] == "length"
    assert all(e["generated_text"] is None for e in events[:-1])


def test_openai_endpoints(client, lora_dirs, base_dir):
    upload(client, "qv4", tar_gz(lora_dirs["qv4"]))
    models = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert "qv4" in models and len(models) == 2
    expected = gen(client, "qv4", max_new_tokens=6).json()["generated_text"]
    r = client.post("/v1/completions", json={"model": "qv4", "prompt": PROMPT, "max_tokens": 6, "temperature": 0})
    body = r.json()
    assert body["choices"][0]["text"] == expected and body["usage"]["completion_tokens"] == 6
    with client.stream("POST", "/v1/completions",
                       json={"model": "qv4", "prompt": PROMPT, "max_tokens": 6, "stream": True,
                             "temperature": 0}) as r:
        lines = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "[DONE]"
    assert "".join(json.loads(x)["choices"][0]["text"] for x in lines[:-1]) == expected
    chat = client.post("/v1/chat/completions", json={"model": "qv4", "max_tokens": 5,
                                                     "messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["choices"][0]["message"]["role"] == "assistant" and chat["usage"]["completion_tokens"] == 5
    base_name = client.get("/info").json()["model_id"]
    assert client.post("/v1/completions", json={"model": base_name, "prompt": PROMPT, "max_tokens": 3}).status_code == 200
    assert client.post("/v1/completions", json={"model": "nope", "prompt": PROMPT}).status_code == 404
    r = client.post("/v1/completions", json={"model": "qv4", "prompt": PROMPT, "logit_bias": {"5": 10}})
    assert r.status_code == 422 and "logit_bias" in str(r.json()["error"])
    r = client.post("/v1/completions", json={"model": "qv4", "prompt": PROMPT, "max_tokens": 2},
                    headers={"X-Adapter-Id": "other"})
    assert r.status_code == 400 and "X-Adapter-Id" in r.json()["error"]["message"]


def test_overwrite_conflict_and_delete(client, lora_dirs):
    assert upload(client, "a", tar_gz(lora_dirs["qv4"])).status_code == 201
    r = upload(client, "a", tar_gz(lora_dirs["qv4b"]))
    assert r.status_code == 409 and "overwrite" in r.json()["error"]
    first = gen(client, "a").json()["generated_text"]
    assert upload(client, "a", tar_gz(lora_dirs["qv4b"]), overwrite=True).status_code == 201
    second = gen(client, "a").json()["generated_text"]
    assert first != second  # the new version is served, not a cached old one
    assert client.delete("/adapters/a").status_code == 200
    r = gen(client, "a")
    assert r.status_code == 404 and "a" in r.json()["error"]
    assert client.delete("/adapters/a").status_code == 404


def test_merge_endpoint_and_per_request_merge(client, lora_dirs):
    upload(client, "x", tar_gz(lora_dirs["qv4"]))
    upload(client, "y", tar_gz(lora_dirs["qv4b"]))
    r = client.post("/adapters/merge", json={"adapter_id": "xy", "sources": [{"id": "x", "weight": 0.5},
                                                                           {"id": "y", "weight": 0.5}],
                                             "method": "cat"})
    assert r.status_code == 201, r.text
    assert r.json()["kind"] == "merged" and r.json()["rank"] == 8
    merged = gen(client, "xy").json()["generated_text"]
    per_request = client.post("/generate", json={"inputs": PROMPT, "parameters": {
        "max_new_tokens": 8, "merged_adapters": {"ids": ["x", "y"], "weights": [0.5, 0.5]}}}).json()
    assert per_request["generated_text"] == merged  # LoRAX `linear` = exact weighted sum = PEFT `cat`
    r = client.post("/adapters/merge", json={"adapter_id": "bad", "sources": [{"id": "x"}, {"id": "nope"}]})
    assert r.status_code == 404


def test_merge_into_base_streams_a_loadable_model(client, lora_dirs, tmp_path):
    import io
    import tarfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    upload(client, "qv4", tar_gz(lora_dirs["qv4"]))
    expected = gen(client, "qv4").json()["generated_text"]
    r = client.post("/adapters/qv4/merge-into-base")
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        tar.extractall(tmp_path / "merged", filter="data")
    root = tmp_path / "merged"
    root = next(p.parent for p in root.rglob("config.json"))
    model = AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(root)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         eos_token_id=None)
    assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == expected


def test_metrics_are_prometheus_and_count(client, lora_dirs):
    upload(client, "qv4", tar_gz(lora_dirs["qv4"]))
    for _ in range(2):
        gen(client, "qv4", max_new_tokens=4)
    gen(client, None, max_new_tokens=4)
    text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("olora_adapter_requests_total", (("adapter", "qv4"),))] == 2
    assert samples[("olora_adapter_requests_total", (("adapter", "__base__"),))] == 1
    assert samples[("olora_generated_tokens_total", ())] == 12
    assert samples[("olora_requests_total", (("route", "/generate"), ("status", "200")))] == 3
    assert samples[("olora_time_to_first_token_seconds_count", ())] == 3
    assert samples[("olora_adapters_registered", ())] == 1
    assert any(n == "olora_adapter_cache_events_total" and dict(l).get("event") == "load"
               for n, l in samples)
    info = [s for s in families["vllm:lora_requests_info"].samples]
    assert info and set(info[0].labels) == {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}
    assert info[0].labels["max_lora"] == "2"


def test_restart_keeps_adapters(tmp_path, base_dir, lora_dirs):
    settings = make_settings(tmp_path, base_dir)
    with TestClient(create_app(settings)) as c:
        assert upload(c, "keep", tar_gz(lora_dirs["qv4"])).status_code == 201
        before = gen(c, "keep").json()["generated_text"]
    with TestClient(create_app(settings)) as c:
        assert [a["id"] for a in c.get("/adapters").json()["adapters"]] == ["keep"]
        assert gen(c, "keep").json()["generated_text"] == before


def test_auth(tmp_path, base_dir, lora_dirs):
    settings = make_settings(tmp_path, base_dir, api_keys="user-key", admin_keys="admin-key")
    with TestClient(create_app(settings)) as c:
        assert gen(c).status_code == 401
        assert c.post("/generate", json={"inputs": "x"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
        user = {"Authorization": "Bearer user-key"}
        admin = {"Authorization": "Bearer admin-key"}
        assert c.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}},
                      headers=user).status_code == 200
        assert upload(c, "a", tar_gz(lora_dirs["qv4"]), headers=user).status_code == 403
        assert upload(c, "a", tar_gz(lora_dirs["qv4"]), headers=admin).status_code == 201
        assert c.delete("/adapters/a", headers=user).status_code == 403
        assert c.get("/health").status_code == 200  # probes stay open
        assert c.get("/metrics").status_code == 200


def test_requests_refused_before_routing_are_counted_under_their_route(tmp_path, base_dir):
    settings = make_settings(tmp_path, base_dir, api_keys="user-key", metrics_require_key=True)
    key = {"Authorization": "Bearer user-key"}
    with TestClient(create_app(settings)) as c:
        assert gen(c).status_code == 401  # refused by the auth middleware, before the router
        assert c.delete("/adapters/some-id").status_code == 401
        assert c.get("/no/such/path", headers=key).status_code == 404
        text = c.get("/metrics", headers=key).text
    requests = {(s.labels["route"], s.labels["status"]): s.value for f in text_string_to_metric_families(text)
                for s in f.samples if s.name == "olora_requests_total"}
    assert requests.get(("/generate", "401")) == 1, requests
    assert requests[("/adapters/{adapter_id}", "401")] == 1  # the template, not the path
    assert requests[("unmatched", "404")] == 1


def test_queue_full_is_429(tmp_path, base_dir, monkeypatch):
    import threading
    import time

    settings = make_settings(tmp_path, base_dir, max_batch_size=1, max_waiting=1)
    with TestClient(create_app(settings)) as c:
        runner = c.app.state.olora.engine.runner
        decode = runner.decode  # >= 0.4 s per request: the others surely arrive while it runs, even on a slow CI
        monkeypatch.setattr(runner, "decode", lambda *a, **k: (time.sleep(0.01), decode(*a, **k))[1])
        codes, lock = [], threading.Lock()

        def one():
            r = gen(c, None, max_new_tokens=40)
            with lock:
                codes.append((r.status_code, r.headers.get("retry-after")))

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    # the Retry-After is the route policy's hint
    assert (429, str(GENERATE.retry_after_s)) in codes and any(code == 200 for code, _ in codes)


def test_request_timeout_is_504_and_frees_the_row(tmp_path, base_dir, monkeypatch):
    settings = make_settings(tmp_path, base_dir, request_timeout_s=0.05)
    with TestClient(create_app(settings)) as c:
        runner = c.app.state.olora.engine.runner
        decode = runner.decode  # 100 steps >= 1 s: far past the 0.05 s timeout on any machine
        monkeypatch.setattr(runner, "decode", lambda *a, **k: (__import__("time").sleep(0.01), decode(*a, **k))[1])
        r = gen(c, None, max_new_tokens=100, ignore_eos_token=True)
        assert r.status_code == 504 and "timeout" in r.json()["error"]
        engine = c.app.state.olora.engine
        for _ in range(100):
            if engine.stats().running == 0:
                break
            import time
            time.sleep(0.05)
        assert engine.stats().running == 0


def test_delete_lets_running_requests_finish(client, lora_dirs, monkeypatch):
    import threading
    import time

    upload(client, "del", tar_gz(lora_dirs["all8"]))
    expected = gen(client, "del", max_new_tokens=60, ignore_eos_token=True).json()["generated_text"]
    result = {}
    runner = client.app.state.olora.engine.runner
    decode = runner.decode
    monkeypatch.setattr(runner, "decode", lambda *a, **k: (time.sleep(0.01), decode(*a, **k))[1])  # >= 0.6 s

    def long_request():
        result["r"] = gen(client, "del", max_new_tokens=60, ignore_eos_token=True, details=True)

    worker = threading.Thread(target=long_request)
    worker.start()
    engine = client.app.state.olora.engine
    deadline = time.monotonic() + 30
    while engine.stats().running == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.stats().running == 1  # the request is generating...
    assert client.delete("/adapters/del").status_code == 200  # ...when its adapter is deleted
    assert gen(client, "del").status_code == 404  # later requests: 404
    assert worker.is_alive() and engine.stats().running == 1  # all of this happened while it was running
    worker.join(60)
    body = result["r"].json()
    assert result["r"].status_code == 200 and body["details"]["finish_reason"] == "length"
    assert body["generated_text"] == expected  # finished with the adapter it started with


def test_store_watcher_keeps_a_fresh_upload_cached(tmp_path, base_dir, lora_dirs):
    """The store watcher saw this process's own upload as a change and evicted the adapter it had just loaded;
    an overwrite by another process (a new version) is still picked up."""
    import time as _time

    with TestClient(create_app(make_settings(tmp_path, base_dir, store_poll_s=0.1))) as c:
        assert upload(c, "fresh", tar_gz(lora_dirs["qv4"])).status_code == 201
        assert c.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "fresh",
                                                                          "max_new_tokens": 2}}).status_code == 200
        _time.sleep(0.6)  # several polls
        assert "fresh" in c.get("/cache").json()["host_cache"]
        state = c.app.state.olora
        other = LocalDirectoryRepository(state.settings.adapter_dir)  # another replica overwriting the adapter
        other.put("fresh", lora_dirs["qv4b"], dict(other.get("fresh").metadata), overwrite=True)
        deadline = _time.monotonic() + 5
        while "fresh" in c.get("/cache").json()["host_cache"] and _time.monotonic() < deadline:
            _time.sleep(0.1)
        assert "fresh" not in c.get("/cache").json()["host_cache"]  # the old version was dropped
