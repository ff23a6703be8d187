"""The metrics the alerts, the dashboard and the docs rely on are produced by the running server: a real adapter
load failure moves `olora_adapter_load_failures_total`, and the alert rule fires on the series scraped from the
server (`promtool test rules` on scraped values, not on hand-written ones)."""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.server.main import create_app
from helpers import save_random_lora
from http_helpers import tar_gz, upload
from test_deploy_validation import COMPOSE, REPO, system_binary
from test_http_api import base_dir, make_settings  # noqa: F401 - base_dir is a fixture

PROMPT = "Return the number of items"
RULES = COMPOSE / "prometheus" / "olora-rules.yml"
NOT_METRICS = {"olora_core", "olora_init", "olora_serve"}  # module and package names that share the prefix


def scrape(client) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, as Prometheus would scrape it from /metrics."""
    r = client.get("/metrics")
    assert r.status_code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def scrape_when(client, ready, timeout: float = 30.0) -> dict[tuple[str, tuple], float]:
    """Scrape until `ready(samples)`: the engine reports an event just after it resolves the request, from its
    own thread, so the response can arrive a moment before the counter moves. Bounded; the last scrape if never."""
    deadline = time.monotonic() + timeout
    samples = scrape(client)
    while not ready(samples) and time.monotonic() < deadline:
        time.sleep(0.05)
        samples = scrape(client)
    return samples


def load_failures(samples) -> float:
    return samples[("olora_adapter_load_failures_total", (("stage", "host"),))]


@pytest.fixture(scope="module")
def served(tmp_path_factory, base_dir):
    """A server that has generated with an adapter, then failed to load one whose weights file is corrupt:
    (scrape before the failure, scrape after it, the client)."""
    tmp = tmp_path_factory.mktemp("metrics")
    good = save_random_lora(base_dir, tmp / "good", r=4, seed=1, task_type="CAUSAL_LM")
    settings = make_settings(tmp, base_dir)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert upload(client, "good", tar_gz(Path(good))).status_code == 201
        r = client.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "good",
                                                                            "max_new_tokens": 4}})
        assert r.status_code == 200, r.text
        assert client.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
        # a second stored adapter whose weights file is then damaged on the store volume (a torn copy, a bad
        # disk): it is listed, and loading it for a request fails
        assert upload(client, "broken", tar_gz(Path(good))).status_code == 201
        before = scrape(client)
        for weights in (settings.adapter_dir / "broken").rglob("adapter_model.safetensors"):
            weights.write_bytes(b"\x00" * 64)
        r = client.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "broken",
                                                                            "max_new_tokens": 4}})
        assert r.status_code >= 400, r.text
        after = scrape_when(client, lambda samples: load_failures(samples) > load_failures(before))
        yield before, after, client


def test_a_real_load_failure_moves_the_counter(served):
    before, after, _ = served
    assert load_failures(after) == load_failures(before) + 1, (load_failures(before), load_failures(after))


def test_the_alert_fires_on_the_scraped_series(served, tmp_path):
    """The rule file's own alert, evaluated by promtool on the two scraped values (one scrape a minute)."""
    before, after, _ = served
    v0, v1 = load_failures(before), load_failures(after)
    series = 'olora_adapter_load_failures_total{job="olora", instance="olora-1:8000", stage="host"}'
    case = {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": series, "values": f"{v0:g} {v0:g} {v1:g}x20"}],
        "alert_rule_test": [
            {"eval_time": "1m", "alertname": "OloraAdapterLoadFailures", "exp_alerts": []},
            {"eval_time": "3m", "alertname": "OloraAdapterLoadFailures", "exp_alerts": [{
                "exp_labels": {"severity": "warning", "instance": "olora-1:8000", "stage": "host"},
                "exp_annotations": {
                    "summary": "olora-serve failed to load adapters on olora-1:8000 (host)",
                    "description": f"{v1 - v0:g} adapter loads failed in the last 10 minutes at stage host. "
                                   "Check the replica's logs and the shared store."}}]},
        ]}]}
    (tmp_path / "scraped.test.yml").write_text(yaml.safe_dump(case))
    r = subprocess.run([system_binary("promtool", "prometheus"), "test", "rules", "scraped.test.yml"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def used_metric_names() -> dict[str, str]:
    """Metric name -> where it is used: the alert rules, the Grafana dashboard, README.md and docs/*.md."""
    sources = {"olora-rules.yml": RULES.read_text(),
               "olora.json": json.dumps(json.loads((COMPOSE / "grafana" / "dashboards" / "olora.json").read_text())),
               "README.md": (REPO / "README.md").read_text()}
    sources.update({f"docs/{p.name}": p.read_text() for p in sorted((REPO / "docs").glob("*.md"))})
    used = {}
    for where, text in sources.items():
        for name in re.findall(r"(?<![\w:/.])((?:olora_|vllm:)[a-z0-9_:]*[a-z0-9])(?![\w:])", text):
            if name not in NOT_METRICS:
                used.setdefault(name, where)
    return used


def test_every_metric_the_alerts_dashboard_and_docs_use_is_produced(served):
    _, after, _ = served
    produced = {name for name, _ in after}
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", name) for name in produced}
    used = used_metric_names()
    assert "olora_adapter_load_failures_total" in used and "olora_queue_length" in used
    missing = {name: where for name, where in used.items() if name not in produced and name not in families}
    assert not missing, f"used but never produced by the server: {missing}"


def test_observer_exceptions_are_counted_not_hidden(served, monkeypatch):
    """An exception in a metrics callback is swallowed by the engine (SafeObserver) and shows as a counter."""
    from app.server.metrics import ServerMetrics

    _, _, client = served
    before = scrape(client)[("olora_engine_observer_errors_total", ())]

    def broken(self, stats):
        raise RuntimeError("a broken metrics callback")

    monkeypatch.setattr(ServerMetrics, "on_request_done", broken)
    r = client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200, r.text  # the request is served all the same
    key = ("olora_engine_observer_errors_total", ())
    assert scrape_when(client, lambda samples: samples[key] > before)[key] == before + 1
