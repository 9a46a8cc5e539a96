"""The deployment manifests (deploy/k8s, docker-compose.yml, deploy/nginx.conf), without a cluster or a
Docker engine: they parse, agree with the app's settings, routes and Dockerfile, and the Kubernetes
objects validate against the API schemas shipped by kubernetes-validate (offline, strict)."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from app.main import create_app
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.33.0"
MANIFESTS = sorted(K8S.glob("*.yaml"))


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def objects() -> list[dict]:
    return [doc for path in MANIFESTS for doc in load(path)]


def one(kind: str) -> dict:
    found = [doc for doc in objects() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container() -> dict:
    return one("Deployment")["spec"]["template"]["spec"]["containers"][0]


def env() -> dict[str, dict]:
    return {item["name"]: item for item in container()["env"]}


def drain_timeout_s() -> float:
    return float(env()["LYRICS_DRAIN_TIMEOUT_S"]["value"])


def test_every_manifest_parses_and_all_kinds_are_there():
    assert {p.name for p in MANIFESTS} == {"deployment.yaml", "service.yaml", "hpa.yaml", "pvc.yaml"}
    kinds = sorted(doc["kind"] for doc in objects())
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "PersistentVolumeClaim", "Service"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_the_kubernetes_schema(path):
    for doc in load(path):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_probes_hit_the_apps_real_routes():
    paths = create_app(Settings()).openapi()["paths"]
    c = container()
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        if probe in c:
            assert c[probe]["httpGet"]["path"] in paths
            assert c[probe]["httpGet"]["port"] == "http"


def test_port_and_env_agree_with_the_settings():
    c = container()
    (port,) = c["ports"]
    assert port["name"] == "http" and port["containerPort"] == Settings.model_fields["port"].default
    fields = {f"LYRICS_{name.upper()}" for name in Settings.model_fields}
    names = set(env())
    assert {n for n in names if n.startswith("LYRICS_")} <= fields, names - fields
    assert {"LYRICS_MODEL_DIR", "LYRICS_HOST", "LYRICS_PORT", "LYRICS_DRAIN_TIMEOUT_S"} <= names
    values = {n: item["value"] for n, item in env().items() if "value" in item}
    settings = Settings(**{n.removeprefix("LYRICS_").lower(): v for n, v in values.items()})
    assert settings.port == port["containerPort"] and settings.host == "0.0.0.0"


def test_api_keys_come_from_an_optional_secret():
    ref = env()["LYRICS_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True and ref["name"] and ref["key"]


def test_grace_period_outlasts_twice_the_drain_timeout():
    spec = one("Deployment")["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] > 2 * drain_timeout_s()


def test_models_volume_is_the_read_only_claim_at_the_model_dir():
    deployment, claim = one("Deployment"), one("PersistentVolumeClaim")
    spec = deployment["spec"]["template"]["spec"]
    (mount,) = [m for m in container()["volumeMounts"] if m["name"] == "models"]
    assert mount["mountPath"] == env()["LYRICS_MODEL_DIR"]["value"] and mount["readOnly"] is True
    (volume,) = [v for v in spec["volumes"] if v["name"] == "models"]
    assert volume["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"], "readOnly": True}
    assert claim["metadata"]["name"] == "lyrics-models" and claim["spec"]["accessModes"] == ["ReadOnlyMany"]


def test_security_context_matches_the_image_user():
    dockerfile_users = re.findall(r"^USER\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    pod = one("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True and str(pod["runAsUser"]) == dockerfile_users[-1] == "10001"
    assert container()["securityContext"]["readOnlyRootFilesystem"] is True


def test_resources_replicas_and_image():
    deployment = one("Deployment")
    assert deployment["spec"]["replicas"] == 2 and container()["image"] == "lyrics:latest"
    resources = container()["resources"]
    assert resources["requests"] == {"cpu": "2", "memory": "512Mi"} and resources["limits"] == {"memory": "1Gi"}


def test_service_and_hpa_target_the_deployment():
    deployment, service, hpa = one("Deployment"), one("Service"), one("HorizontalPodAutoscaler")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["type"] == "ClusterIP" and service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80 and port["targetPort"] == container()["ports"][0]["name"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"


def test_compose_builds_the_dockerfile_behind_nginx():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service, nginx = compose["services"]["lyrics"], compose["services"]["nginx"]
    build = service["build"]
    assert (ROOT / build["context"] / build["dockerfile"]).resolve() == (ROOT / "Dockerfile")
    assert service["deploy"]["replicas"] == 3 and "ports" not in service
    probe = service["healthcheck"]["test"]
    assert probe[:3] == ["CMD", "python", "-c"] and "urllib" in probe[3] and "/healthz" in probe[3]
    assert f":{Settings.model_fields['port'].default}/healthz" in probe[3]
    assert float(service["environment"]["LYRICS_DRAIN_TIMEOUT_S"]) * 2 < float(service["stop_grace_period"].rstrip("s"))
    assert nginx["image"] == "nginx:1.27-alpine" and nginx["ports"] == ["8000:80"]
    source, target = nginx["volumes"][0].split(":")[:2]
    assert (ROOT / source).resolve() == ROOT / "deploy" / "nginx.conf"
    assert target == "/etc/nginx/conf.d/default.conf"


def test_nginx_proxies_to_the_service_without_buffering():
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    conf = "\n".join(line.split("#", 1)[0] for line in conf.splitlines())
    port = Settings.model_fields["port"].default
    upstream = re.search(r"upstream\s+(\w+)\s*\{([^}]*)\}", conf)
    assert upstream and re.search(rf"server\s+lyrics:{port}\s*;", upstream.group(2))
    assert re.search(rf"proxy_pass\s+http://{upstream.group(1)}\s*;", conf)
    assert re.search(r"proxy_buffering\s+off\s*;", conf)
    assert re.search(r"listen\s+80\s*;", conf)
