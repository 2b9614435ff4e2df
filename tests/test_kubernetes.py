"""deploy/kubernetes/: every manifest passes kubernetes-validate (its schemas ship with the package, so this
runs offline) for a pinned Kubernetes version; every environment variable the manifests set is one that
services/common/config.py reads; the ports, probes, Services and annotations agree with each other and
with the configuration's defaults; and the pods are what the issue asks: non-root, read-only root,
resource requests, one GPU per generation pod, a grace period above the service's own."""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from services.common import config

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes"
# The Kubernetes version the manifests are written for (kubernetes-validate's schemas of that release).
KUBERNETES_VERSION = "1.33.0"
# config.py's dataclasses and the prefix each one's fields are read with.
PREFIXES = {
    config.GenerationConfig: "GENERATION_",
    config.TelemetryConfig: "TELEMETRY_",
    config.GatewayConfig: "GATEWAY_",
    config.SecurityConfig: "ORFEAS_",
    config.SupervisorConfig: "SUPERVISOR_",
    config.HunyuanConfig: "HUNYUAN3D_",
}


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())


def documents() -> list[dict[str, Any]]:
    docs = []
    for name in kustomization()["resources"]:
        docs += [d for d in yaml.safe_load_all((MANIFESTS / name).read_text()) if d]
    return docs


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in documents() if d["kind"] == kind}


def container(deployment: str) -> dict[str, Any]:
    (only,) = by_kind("Deployment")[deployment]["spec"]["template"]["spec"]["containers"]
    return only


def env_of(deployment: str) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(deployment)["env"]}


def port_named(deployment: str, name: str) -> int:
    return next(p["containerPort"] for p in container(deployment)["ports"] if p["name"] == name)


def variables_config_reads() -> set[str]:
    """Every environment variable services/common/config.py reads: the dataclass fields with their prefix,
    and the names it looks up itself (DATA_DIR, GENERATION_PORT, GENERATION_ADDRESS, ...)."""
    names = {f"{prefix}{field}".upper() for cls, prefix in PREFIXES.items() for field in cls.__dataclass_fields__}
    tree = ast.parse(Path(config.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "get" and node.args:
            target = node.func.value  # type: ignore[attr-defined]
            if isinstance(target, ast.Attribute) and target.attr == "environ" and isinstance(node.args[0], ast.Constant):
                names.add(node.args[0].value)
        if (
            isinstance(node, ast.Compare)
            and isinstance(node.left, ast.Constant)
            and isinstance(node.left.value, str)
            and any(isinstance(c, ast.Attribute) and c.attr == "environ" for c in node.comparators)
        ):
            names.add(node.left.value)
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "environ"
            and isinstance(node.slice, ast.Constant)
        ):
            names.add(node.slice.value)
    return names


def test_the_kustomization_lists_every_manifest_and_each_validates() -> None:
    listed = kustomization()["resources"]
    on_disk = sorted(p.name for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
    assert kustomization()["namespace"] == "orfeas"
    for document in documents():
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{document['kind']} {document['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_a_broken_manifest_is_caught() -> None:
    """The check above can fail: a misspelt field and a wrong type are both refused."""
    deployment = by_kind("Deployment")["orfeas-gateway"]
    misspelt = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSION, strict=True)
    wrong_type = {**deployment, "spec": {**deployment["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBERNETES_VERSION, strict=True)


def test_every_environment_variable_the_manifests_set_is_read_by_the_configuration() -> None:
    known = variables_config_reads()
    assert {"GENERATION_DATABASE_URL", "GENERATION_ADDRESS", "DATA_DIR", "TELEMETRY_DATABASE_URL"} <= known
    for deployment in by_kind("Deployment"):
        unknown = set(env_of(deployment)) - known
        assert not unknown, f"{deployment} sets {sorted(unknown)}, which services/common/config.py never reads"


def test_ports_agree_between_containers_services_probes_annotations_and_configuration() -> None:
    services = by_kind("Service")
    generation, telemetry, gateway = env_of("orfeas-generation"), env_of("orfeas-telemetry"), env_of("orfeas-gateway")
    defaults = config.GenerationConfig(), config.TelemetryConfig(), config.GatewayConfig()

    # generation: its port is the container's, the headless Service's, the probes' and the configuration's.
    grpc_port = port_named("orfeas-generation", "grpc")
    assert int(generation["GENERATION_PORT"]) == grpc_port == defaults[0].port
    assert int(generation["GENERATION_METRICS_PORT"]) == port_named("orfeas-generation", "metrics") == defaults[0].metrics_port
    headless = services["orfeas-generation-headless"]["spec"]
    assert headless["clusterIP"] == "None" and headless["ports"][0]["port"] == grpc_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container("orfeas-generation")[probe]["grpc"]["port"] == grpc_port
    # The gateway reaches every generation pod through that headless Service's DNS name and port.
    target = re.fullmatch(r"dns:///([a-z0-9-]+):(\d+)", gateway["GENERATION_ADDRESS"])
    assert target and target.group(1) == "orfeas-generation-headless" and int(target.group(2)) == grpc_port

    # telemetry: reached by generation and the gateway at its Service's name and port.
    telemetry_port = port_named("orfeas-telemetry", "grpc")
    assert int(telemetry["TELEMETRY_PORT"]) == telemetry_port == defaults[1].port
    assert int(telemetry["TELEMETRY_METRICS_PORT"]) == port_named("orfeas-telemetry", "metrics") == defaults[1].metrics_port
    assert services["orfeas-telemetry"]["spec"]["ports"][0]["port"] == telemetry_port
    for address in (generation["GENERATION_TELEMETRY_ADDRESS"], gateway["GATEWAY_TELEMETRY_ADDRESS"]):
        assert address == f"orfeas-telemetry:{telemetry_port}"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container("orfeas-telemetry")[probe]["grpc"]["port"] == telemetry_port

    # gateway: HTTP on its port, probed on /readyz and /healthz, behind its Service.
    http_port = port_named("orfeas-gateway", "http")
    assert int(gateway["GATEWAY_PORT"]) == http_port == defaults[2].port
    assert container("orfeas-gateway")["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container("orfeas-gateway")["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert services["orfeas-gateway"]["spec"]["ports"][0]["targetPort"] == "http"

    # Prometheus scrapes every pod where its metrics are.
    metrics_ports = {
        "orfeas-generation": port_named("orfeas-generation", "metrics"),
        "orfeas-telemetry": port_named("orfeas-telemetry", "metrics"),
        "orfeas-gateway": http_port,
    }
    for name, deployment in by_kind("Deployment").items():
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == metrics_ports[name]
        assert annotations["prometheus.io/path"] == "/metrics"
    # Every Service and budget selects pods that exist.
    labels = [d["spec"]["template"]["metadata"]["labels"] for d in by_kind("Deployment").values()]
    for selector in [s["spec"]["selector"] for s in services.values()] + [
        p["spec"]["selector"]["matchLabels"] for p in by_kind("PodDisruptionBudget").values()
    ]:
        assert any(selector.items() <= pod.items() for pod in labels), selector


def test_pods_are_what_a_cluster_expects() -> None:
    deployments = by_kind("Deployment")
    assert deployments["orfeas-gateway"]["spec"]["replicas"] == 2
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        (only,) = pod["containers"]
        assert only["securityContext"]["readOnlyRootFilesystem"] is True, name
        assert only["securityContext"]["allowPrivilegeEscalation"] is False, name
        assert {"cpu", "memory"} <= set(only["resources"]["requests"]), name
        assert any(m["mountPath"] == "/tmp" for m in only["volumeMounts"]), f"{name}: nowhere to write"
    generation = deployments["orfeas-generation"]["spec"]["template"]["spec"]
    (gen,) = generation["containers"]
    assert gen["resources"]["limits"]["nvidia.com/gpu"] == "1" and env_of("orfeas-generation")["GENERATION_DEVICES"] == "cuda:0"
    # The kubelet waits longer than the service drains.
    assert generation["terminationGracePeriodSeconds"] > float(env_of("orfeas-generation")["GENERATION_GRACE_PERIOD_S"])
    assert config.GenerationConfig().grace_period_s == float(env_of("orfeas-generation")["GENERATION_GRACE_PERIOD_S"])
    assert by_kind("PodDisruptionBudget")["orfeas-generation"]["spec"]["maxUnavailable"] == 1
    # The database URL comes from a Secret (CloudNativePG's `<cluster>-app`, key `uri`), never a literal.
    for name, variable in (("orfeas-generation", "GENERATION_DATABASE_URL"), ("orfeas-telemetry", "TELEMETRY_DATABASE_URL")):
        assert env_of(name)[variable] == {"secretKeyRef": {"name": "orfeas-postgres-app", "key": "uri"}}
    # Results live on the shared volume every generation pod mounts.
    mounts = {m["name"]: m["mountPath"] for m in gen["volumeMounts"]}
    assert mounts["artifacts"] == env_of("orfeas-generation")["GENERATION_ARTIFACTS_DIR"]
    claim = next(v for v in generation["volumes"] if v["name"] == "artifacts")["persistentVolumeClaim"]["claimName"]
    assert by_kind("PersistentVolumeClaim")[claim]["spec"]["accessModes"] == ["ReadWriteMany"]
