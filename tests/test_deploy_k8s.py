"""deploy/k8s, checked offline: kustomization.yaml lists every manifest and only those; each manifest validates
(strict) with kubernetes-validate against Kubernetes 1.33 and 1.37 schemas shipped in the package, except the
ServiceMonitor (a CRD), validated against deploy/schemas/servicemonitor-monitoring-v1.json, and the Gateway API
objects (InferencePool, Gateway, HTTPRoute: tests/test_deploy_gateway.py); the objects reference each other
consistently (selectors, names, ports, probes, security context)."""
from __future__ import annotations

import json

import pytest
import yaml

from test_deploy_validation import DEPLOY, K8S, K8S_VERSIONS, exposed_metrics

# ---- Kubernetes ------------------------------------------------------------------------------------------
def k8s_documents() -> dict[str, list[dict]]:
    """file name -> the objects it holds, for every manifest except kustomization.yaml."""
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d]
            for p in sorted(K8S.glob("*.y*ml")) if p.name != "kustomization.yaml"}


ENDPOINT_PICKER = "endpoint-picker"  # the component label of epp.yaml's objects (a second Deployment, Service, ...)
CRD_GROUPS = ("monitoring.coreos.com/", "gateway.networking.k8s.io/", "inference.networking.k8s.io/")


def k8s_objects(component_picker: bool = False) -> dict[str, dict]:
    """kind -> the object, of the server's objects (or, with `component_picker`, of the endpoint picker's)."""
    return {doc["kind"]: doc for docs in k8s_documents().values() for doc in docs
            if (doc["metadata"].get("labels", {}).get("app.kubernetes.io/component") == ENDPOINT_PICKER)
            == component_picker}


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    on_disk = sorted(k8s_documents())
    assert sorted(listed) == on_disk, f"not listed: {set(on_disk) - set(listed)}; missing: {set(listed) - set(on_disk)}"
    other = [p.name for p in K8S.iterdir() if p.name != "kustomization.yaml" and p.name not in on_disk]
    assert not other, f"files in deploy/k8s that are not manifests: {other}"
    deployment = k8s_objects()["Deployment"]
    images = {c["image"] for c in deployment["spec"]["template"]["spec"]["containers"]}
    assert images <= {i["name"] for i in kustomization["images"]}, "the image name is set by kustomization images"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_validate_strictly(version):
    import kubernetes_validate.utils as kv

    checked = []
    for name, docs in k8s_documents().items():
        for doc in docs:
            if doc["apiVersion"].startswith(CRD_GROUPS):
                continue  # a CRD's object: validated against its CRD schema (below, tests/test_deploy_gateway.py)
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{name}: {doc['kind']} invalid for Kubernetes {version} at {path}: {exc.message}")
            except kv.SchemaNotFoundError as exc:
                pytest.fail(f"{name}: {exc.message}")
            checked.append(doc["kind"])
    assert {"Deployment", "Service", "PersistentVolumeClaim", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "Secret", "ServiceAccount", "Role", "RoleBinding", "ConfigMap"} <= set(checked)
    assert checked.count("Deployment") == 2 and checked.count("Service") == 2  # the server's and the picker's


def test_k8s_validation_can_fail():
    import kubernetes_validate.utils as kv

    deployment = json.loads(json.dumps(k8s_objects()["Deployment"]))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = "yes"
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, K8S_VERSIONS[0], strict=True)
    deployment = json.loads(json.dumps(k8s_objects()["Deployment"]))
    deployment["spec"]["replica"] = 2  # a typo that a non-strict check would let through
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, K8S_VERSIONS[0], strict=True)


def test_servicemonitor_validates_against_the_local_crd_schema():
    import jsonschema

    schema = json.loads((DEPLOY / "schemas" / "servicemonitor-monitoring-v1.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    monitor = k8s_objects()["ServiceMonitor"]
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(monitor)]
    assert not errors, errors
    broken = json.loads(json.dumps(monitor))
    broken["spec"]["endpoints"][0]["interval"] = "15 seconds"
    broken["spec"]["endpoint"] = broken["spec"].pop("endpoints")
    assert len(list(validator.iter_errors(broken))) >= 1


def test_k8s_objects_fit_together():
    objs = k8s_objects()
    deployment, service = objs["Deployment"], objs["Service"]
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    spec = pod["spec"]

    def selects(selector: dict) -> bool:
        return all(pod_labels.get(k) == v for k, v in selector.items())

    assert deployment["spec"]["selector"]["matchLabels"] == {k: pod_labels[k] for k in
                                                             deployment["spec"]["selector"]["matchLabels"]}
    assert selects(service["spec"]["selector"])
    assert selects(objs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"])
    monitor = objs["ServiceMonitor"]["spec"]
    assert all(service["metadata"]["labels"].get(k) == v for k, v in monitor["selector"]["matchLabels"].items())
    assert monitor["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["endpoints"][0]["path"] == "/metrics"

    (container,) = spec["containers"]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert port_names["http"] == int(env["OLORA_PORT"]) and env["OLORA_HOST"] == "0.0.0.0"
    assert service["spec"]["ports"][0]["targetPort"] in port_names

    # GPU, probes, security
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["startupProbe"]["httpGet"]["path"] == "/ready"  # /health is 200 `loading` while starting
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    # drain: the grace period covers the preStop pause, the drain timeout and the server's close after it
    from app.server.cli_serve import GRACEFUL_SHUTDOWN_S
    pre_stop_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert spec["terminationGracePeriodSeconds"] >= pre_stop_s + float(env["OLORA_DRAIN_TIMEOUT"]) + GRACEFUL_SHUTDOWN_S
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and spec["securityContext"]["runAsNonRoot"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "a read-only root needs a writable /tmp"
    assert env["OLORA_ADAPTER_DIR"] in mounts and env["HF_HOME"] in mounts
    claim = volumes[mounts[env["OLORA_ADAPTER_DIR"]]]["persistentVolumeClaim"]["claimName"]
    pvc = objs["PersistentVolumeClaim"]
    assert claim == pvc["metadata"]["name"] and pvc["spec"]["accessModes"] == ["ReadWriteMany"]

    # keys come from the Secret, which holds no real key
    secret = objs["Secret"]
    assert {"name": secret["metadata"]["name"]} == container["envFrom"][0]["secretRef"]
    assert set(secret["stringData"]) == {"OLORA_API_KEYS", "OLORA_ADMIN_KEYS"}
    assert all(v == "" for v in secret["stringData"].values()), "the Secret is a template: no keys in git"
    assert "OLORA_ALLOW_PUBLIC_WITHOUT_KEYS" not in env

    hpa = objs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert hpa["metrics"][0]["type"] == "Pods" and hpa["metrics"][0]["pods"]["metric"]["name"] == "olora_queue_length"
    assert "olora_queue_length" in exposed_metrics()
    assert hpa["minReplicas"] > objs["PodDisruptionBudget"]["spec"]["minAvailable"]
