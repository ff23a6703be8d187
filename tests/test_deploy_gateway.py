"""deploy/k8s's Gateway API objects, checked offline: the InferencePool, Gateway and HTTPRoute validate against
the CRDs' openAPIV3Schema (vendored in deploy/schemas/crds/, README there says from which commits), read as
JSON Schema (strict: unknown fields refused, as `kubectl apply --validate=strict` does); a wrong field fails; and
the pool, its endpoint picker, the route and the server's pods fit together (names, selectors, ports, RBAC, the
metrics the picker scrapes)."""
from __future__ import annotations

import copy

import jsonschema
import pytest
import yaml

from test_deploy_k8s import k8s_objects
from test_deploy_validation import DEPLOY

CRDS = DEPLOY / "schemas" / "crds"
GATEWAY_KINDS = {"InferencePool", "Gateway", "HTTPRoute"}


def json_schema(schema: dict) -> dict:
    """A CRD's openAPIV3Schema as JSON Schema: `nullable` allows null, `x-kubernetes-int-or-string` an integer or a
    string, an object with `properties` refuses other fields unless `x-kubernetes-preserve-unknown-fields`; the
    other `x-kubernetes-*` keys (list types, CEL rules) are dropped: they are not checked offline."""
    out = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key in ("properties", "patternProperties"):
            out[key] = {name: json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [json_schema(sub) for sub in value]
        else:
            out[key] = value
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if ("properties" in out and "additionalProperties" not in out
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) -> a validator, for every served version of every vendored CRD."""
    validators = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        assert crd["kind"] == "CustomResourceDefinition", path
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("served"):
                continue
            schema = json_schema(version["schema"]["openAPIV3Schema"])
            jsonschema.Draft202012Validator.check_schema(schema)
            validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft202012Validator(schema)
    return validators


@pytest.fixture(scope="module")
def validators():
    return crd_validators()


def errors_of(validators, obj: dict) -> list[str]:
    validator = validators[(obj["apiVersion"], obj["kind"])]
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def test_gateway_api_objects_validate_against_their_crds(validators):
    assert {kind for _, kind in validators} == GATEWAY_KINDS
    objs = k8s_objects()
    for kind in sorted(GATEWAY_KINDS):
        obj = objs[kind]
        assert (obj["apiVersion"], kind) in validators, f"{kind} {obj['apiVersion']} is not a served version"
        assert not errors_of(validators, obj), (kind, errors_of(validators, obj))
    assert objs["InferencePool"]["apiVersion"] == "inference.networking.k8s.io/v1"
    assert objs["HTTPRoute"]["apiVersion"] == objs["Gateway"]["apiVersion"] == "gateway.networking.k8s.io/v1"


@pytest.mark.parametrize("kind,break_it,where", [
    ("InferencePool", lambda o: o["spec"].__setitem__("targetPort", o["spec"].pop("targetPorts")), "spec"),
    ("InferencePool", lambda o: o["spec"]["endpointPickerRef"].__setitem__("failureMode", "Open"),
     "spec.endpointPickerRef.failureMode"),
    ("InferencePool", lambda o: o["spec"]["targetPorts"][0].__setitem__("number", 70000), "spec.targetPorts.0.number"),
    ("HTTPRoute", lambda o: o["spec"]["rules"][0]["backendRefs"][0].__setitem__("weigth", 1),
     "spec.rules.0.backendRefs.0"),
    ("HTTPRoute", lambda o: o["spec"]["rules"][0]["matches"][0]["path"].__setitem__("type", "Prefix"),
     "spec.rules.0.matches.0.path.type"),
    ("Gateway", lambda o: o["spec"]["listeners"][0].__setitem__("protocol", 443), "spec.listeners.0.protocol"),
])
def test_a_wrong_field_fails_the_crd_check(validators, kind, break_it, where):
    broken = copy.deepcopy(k8s_objects()[kind])
    break_it(broken)
    found = errors_of(validators, broken)
    assert any(e.startswith(where + ":") for e in found), found


def _args(container: dict) -> dict[str, str]:
    """`--flag value` and `--flag=value` arguments -> {flag: value}."""
    args, out = container["args"], {}
    i = 0
    while i < len(args):
        flag = args[i].removeprefix("--")
        if "=" in flag:
            key, value = flag.split("=", 1)
            out[key] = value
            i += 1
        else:
            out[flag] = args[i + 1]
            i += 2
    return out


def test_pool_picker_route_and_pods_fit_together():
    from app.server.settings import Settings

    objs, picker = k8s_objects(), k8s_objects(component_picker=True)
    pool, route, gateway = objs["InferencePool"]["spec"], objs["HTTPRoute"], objs["Gateway"]
    server_pod = objs["Deployment"]["spec"]["template"]
    (server,) = server_pod["spec"]["containers"]
    # the pool selects exactly the server's pods, on their serving port
    assert pool["selector"]["matchLabels"].items() <= server_pod["metadata"]["labels"].items()
    assert pool["selector"]["matchLabels"] == objs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert [p["number"] for p in pool["targetPorts"]] == [p["containerPort"] for p in server["ports"]
                                                          if p["name"] == "http"]
    # the pool's endpoint picker: its Service, the picker's Deployment behind it, watching this pool
    epp_service, epp = picker["Service"], picker["Deployment"]
    ref = pool["endpointPickerRef"]
    assert ref["name"] == epp_service["metadata"]["name"]
    assert ref["port"]["number"] in {p["port"] for p in epp_service["spec"]["ports"]}
    epp_pod = epp["spec"]["template"]
    assert epp_service["spec"]["selector"].items() <= epp_pod["metadata"]["labels"].items()
    (container,) = epp_pod["spec"]["containers"]
    args = _args(container)
    assert args["pool-name"] == objs["InferencePool"]["metadata"]["name"]
    assert args["pool-group"] == objs["InferencePool"]["apiVersion"].split("/")[0]
    assert int(args["grpc-port"]) == ref["port"]["number"]
    assert {"name": "NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}} in container["env"]
    # its plugins config is the mounted ConfigMap; it scores on the LoRA affinity and reads /metrics
    config_map = picker["ConfigMap"]
    (volume,) = epp_pod["spec"]["volumes"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    config_name = args["config-file"].removeprefix(mount["mountPath"] + "/")
    plugins = yaml.safe_load(config_map["data"][config_name])
    assert plugins["kind"] == "EndpointPickerConfig"
    types = {p["type"] for p in plugins["plugins"]}
    assert {"lora-affinity-scorer", "queue-scorer", "kv-cache-utilization-scorer"} <= types
    assert {r["pluginRef"] for r in plugins["schedulingProfiles"][0]["plugins"]} <= types
    source = next(p for p in plugins["plugins"] if p["type"] == "metrics-data-source")
    assert source["parameters"]["path"] == "/metrics"
    # RBAC: the picker's service account may watch the pods and the pool
    role, binding, account = picker["Role"], picker["RoleBinding"], picker["ServiceAccount"]
    assert epp_pod["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               if {"get", "watch", "list"} <= set(rule["verbs"])}
    assert {("", "pods"), ("inference.networking.k8s.io", "inferencepools")} <= granted
    # the route: on the Gateway; OpenAI generation to the pool, the rest to the Service; timeouts past the server's
    assert route["spec"]["parentRefs"][0]["name"] == gateway["metadata"]["name"]
    listeners = {listener["name"] for listener in gateway["spec"]["listeners"]}
    assert route["spec"]["parentRefs"][0]["sectionName"] in listeners
    pool_rule, rest_rule = route["spec"]["rules"]
    assert {m["path"]["value"] for m in pool_rule["matches"]} == {"/v1/chat/completions", "/v1/completions"}
    assert pool_rule["backendRefs"] == [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                         "name": objs["InferencePool"]["metadata"]["name"]}]
    (service_ref,) = rest_rule["backendRefs"]
    assert service_ref["name"] == objs["Service"]["metadata"]["name"]
    assert service_ref["port"] in {p["port"] for p in objs["Service"]["spec"]["ports"]}
    request_timeout_s = Settings.model_fields["request_timeout_s"].default
    for rule in route["spec"]["rules"]:
        assert float(rule["timeouts"]["request"].removesuffix("s")) > request_timeout_s


def test_the_picker_scrapes_gauges_the_server_exports():
    """The picker's defaults for vLLM servers (its model-server protocol) are gauges olora-serve exports, and
    `/metrics` is open to it (no key) unless OLORA_METRICS_REQUIRE_KEY says otherwise."""
    from app.server.metrics import ServerMetrics
    from app.server.router_metrics import RouterProtocolMetrics
    from app.server.settings import Settings

    registry = ServerMetrics(max_adapter_labels=4, max_loras=2).registry
    RouterProtocolMetrics(registry)
    exported = {(m.name, m.type) for m in registry.collect()}
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:cache_config_info", "vllm:lora_requests_info"):
        assert (name, "gauge") in exported, name
    assert Settings.model_fields["metrics_require_key"].default is False
