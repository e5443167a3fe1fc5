"""deploy/: the Kubernetes manifests validated offline against the Kubernetes schemas
(kubernetes-validate ships them: 1.25 to 1.37), strict (unknown fields refused), on the
oldest version with native gRPC probes (1.27) and the newest; the KubeRay RayCluster (a
CRD kubernetes-validate has no schema for) checked in its parts: its pod templates as
core PodTemplates, the rest against the fields of KubeRay's ray.io/v1 RayCluster written
out below (and against KubeRay's own CRD schema when KUBERAY_CRD names that file); the
pieces checked against each other (probes, ports, names, volumes, the Ray address, the
Ray version); the ConfigMap's config read by the server's own config loader; the
container's health check run against a real server process; the Dockerfile parsed (there
is no Docker daemon here to build it)."""

from __future__ import annotations

import copy
import importlib.metadata
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from machineserver.server.config import check_exposure, load
from machineserver.server.drivers.qemu.machine import BINARIES
from tests.helpers.firmware import ROOT
from tests.helpers.server import ServerProcess
from tests.helpers.tools import require_tool

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
# grpc probes are GA from 1.27; the newest schemas kubernetes-validate ships
K8S_VERSIONS = ("1.27", "1.37")


def documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> dict[str, Any]:
    (doc,) = [d for _, d in documents() if d["kind"] == kind]
    return doc


def test_the_manifests_are_the_expected_set() -> None:
    kinds = sorted((d["kind"], d["metadata"]["name"]) for _, d in documents())
    assert kinds == [("ConfigMap", "machineserver-config"), ("RayCluster", "machineserver-ray"),
                     ("Secret", "machineserver-admin-key"), ("Service", "machineserver"),
                     ("StatefulSet", "machineserver")]
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_resources_validate_strictly_against_the_kubernetes_schemas(version: str) -> None:
    checked = []
    for file, doc in documents():
        if doc["apiVersion"] == "ray.io/v1":
            continue
        assert kubernetes_validate.validate(doc, version, strict=True) == version, file
        checked.append(doc["kind"])
    assert sorted(checked) == ["ConfigMap", "Secret", "Service", "StatefulSet"]


def test_the_validator_does_refuse_a_broken_manifest() -> None:
    """The check above can fail: a misspelt field, a probe on a string port, a bad type."""
    sts = by_kind("StatefulSet")
    for path, value in ((("spec", "replicas"), "one"), (("spec", "template", "spec", "containers", 0, "readinessProbe",
                                                          "grpc", "port"), "grpc"),
                        (("spec", "template", "spec", "containers", 0, "livenessprobe"), {"grpc": {"port": 50051}})):
        broken = copy.deepcopy(sts)
        node = broken
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value  # type: ignore[index]
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, "1.37", strict=True)


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    return container


def test_the_statefulset_probes_with_native_grpc_probes_on_its_grpc_port() -> None:
    sts = by_kind("StatefulSet")
    container = _container(sts)
    (port,) = container["ports"]
    assert port == {"name": "grpc", "containerPort": 50051, "protocol": "TCP"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": 50051}, probe
        assert not {"httpGet", "exec", "tcpSocket"} & set(container[probe]), probe
    # the server listens on that port, on every interface, with the data on the claim
    args = shlex.split(container["args"][0])
    server = args[args.index("machineserver"):]
    assert server[server.index("--listen") + 1] == "0.0.0.0:50051"
    data_dir = server[server.index("--data-dir") + 1]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]]["mountPath"] == data_dir == "/data"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["spec"]["resources"]["requests"]["storage"]


def test_the_service_selects_the_pods_and_names_their_port() -> None:
    sts, svc = by_kind("StatefulSet"), by_kind("Service")
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] == _container(sts)["ports"][0]["name"] and port["appProtocol"] == "grpc"


def test_config_and_admin_key_are_mounted_where_the_config_says() -> None:
    sts, cm, secret = by_kind("StatefulSet"), by_kind("ConfigMap"), by_kind("Secret")
    pod = sts["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in _container(sts)["volumeMounts"]}
    config_volume = next(n for n, v in volumes.items() if v.get("configMap", {}).get("name") == cm["metadata"]["name"])
    config_path = Path(mounts[config_volume]["mountPath"])
    assert mounts[config_volume]["subPath"] in cm["data"]
    env = {e["name"]: e["value"] for e in _container(sts)["env"]}
    assert env["MACHINESERVER_CONFIG"] == str(config_path)
    key_volume = next(n for n, v in volumes.items() if v.get("secret", {}).get("secretName") == secret["metadata"]["name"])
    config = yaml.safe_load(cm["data"][mounts[config_volume]["subPath"]])
    key_path = Path(config["auth"]["bootstrap_admin_key_file"])
    assert key_path.parent == Path(mounts[key_volume]["mountPath"]) and key_path.name in secret["stringData"]


def test_the_configmap_config_is_one_the_server_accepts(tmp_path: Path) -> None:
    """The ConfigMap's config.yaml with the StatefulSet's flags, through the server's own
    loader and its exposure check: authentication on, served beyond loopback (plaintext:
    the kubelet's gRPC probes speak no TLS) with the warning that says so."""
    cm, sts = by_kind("ConfigMap"), by_kind("StatefulSet")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(cm["data"]["config.yaml"])
    args = shlex.split(_container(sts)["args"][0])
    flags = [a.replace('"$RAY_HEAD:6379"', "head:6379").replace("$RAY_HEAD", "head")
             for a in args[args.index("machineserver") + 1:]]
    cfg = load(["--config", str(config_file), *flags])
    assert cfg.auth.enabled and cfg.listen == "0.0.0.0:50051" and str(cfg.data_dir) == "/data"
    assert cfg.job_engine == "ray" and cfg.ray_address == "head:6379"  # without --job-engine ray the address is unused
    warnings = check_exposure(cfg)
    assert any("INSECURE" in w and "TLS" in w for w in warnings), warnings


def test_the_placeholder_admin_key_is_refused_and_a_real_one_serves(tmp_path: Path) -> None:
    """The shipped Secret holds a placeholder the server refuses to start with; with a
    real key the same config serves, and the image's health check says so."""
    cm, secret = by_kind("ConfigMap"), by_kind("Secret")
    config = yaml.safe_load(cm["data"]["config.yaml"])
    key_file = tmp_path / "admin.key"
    config["auth"]["bootstrap_admin_key_file"] = str(key_file)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    key_file.write_text(secret["stringData"]["admin.key"])
    refused = ServerProcess(tmp_path / "data", "--config", str(config_file))
    with pytest.raises(RuntimeError, match="at least 32 characters"):
        refused.start()
    refused.stop()

    key_file.write_text("msk_" + "k" * 40 + "\n")
    sp = ServerProcess(tmp_path / "data", "--config", str(config_file)).start()
    try:
        ok = _healthcheck("--target", sp.target)
        assert ok.returncode == 0 and ok.stdout.startswith("healthy: ") and "SERVING" in ok.stdout, ok
    finally:
        sp.stop()
    down = _healthcheck("--target", sp.target, "--timeout", "1")
    assert down.returncode == 1 and down.stdout.startswith("unhealthy: ") and "UNAVAILABLE" in down.stdout, down


def _healthcheck(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MACHINESERVER_CONFIG"}
    return subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py"), *args], capture_output=True, text=True,
                          timeout=30, env=env)


# ---------------------------------------------------------------------- the RayCluster

# The fields of KubeRay's ray.io/v1 RayCluster the manifest may use, with their types
# (from KubeRay's API reference); unknown fields are refused, as the API server prunes them.
_GROUP_COMMON = {"rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
                 "template": {"type": "object"}}
RAYCLUSTER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["headGroupSpec"],
            "additionalProperties": False,
            "properties": {
                "rayVersion": {"type": "string"},
                "enableInTreeAutoscaling": {"type": "boolean"},
                "headGroupSpec": {
                    "type": "object", "required": ["template"], "additionalProperties": False,
                    "properties": {**_GROUP_COMMON, "serviceType": {"type": "string"},
                                   "enableIngress": {"type": "boolean"}},
                },
                "workerGroupSpecs": {
                    "type": "array",
                    "items": {
                        "type": "object", "required": ["groupName", "template"], "additionalProperties": False,
                        "properties": {**_GROUP_COMMON, "groupName": {"type": "string"},
                                       "replicas": {"type": "integer", "minimum": 0},
                                       "minReplicas": {"type": "integer", "minimum": 0},
                                       "maxReplicas": {"type": "integer", "minimum": 0},
                                       "suspend": {"type": "boolean"}},
                    },
                },
            },
        },
    },
}


def _pod_templates(ray: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = ray["spec"]
    return [("head", spec["headGroupSpec"]["template"]),
            *((g["groupName"], g["template"]) for g in spec["workerGroupSpecs"])]


def test_the_raycluster_has_kuberays_shape() -> None:
    ray = by_kind("RayCluster")
    jsonschema.Draft202012Validator(RAYCLUSTER_SCHEMA).validate(ray)
    for group in ray["spec"]["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
    broken = copy.deepcopy(ray)
    broken["spec"]["workerGroupSpecs"][0]["replica"] = 2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(RAYCLUSTER_SCHEMA).validate(broken)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_raycluster_pod_templates_validate_as_core_pod_templates(version: str) -> None:
    for group, template in _pod_templates(by_kind("RayCluster")):
        doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template}
        assert kubernetes_validate.validate(doc, version, strict=True) == version, group


def test_the_raycluster_against_kuberays_crd_when_given() -> None:
    """KubeRay's CRD (ray-operator/config/crd/bases/ray.io_rayclusters.yaml) is not
    shipped here; with KUBERAY_CRD naming that file, the RayCluster is validated against
    its v1 schema, unknown fields refused."""
    crd_path = os.environ.get("KUBERAY_CRD")
    if not crd_path:
        pytest.skip("KUBERAY_CRD is not set (the path of KubeRay's ray.io_rayclusters.yaml)")
    crd = yaml.safe_load(Path(crd_path).read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    _close_objects(schema)
    validator = jsonschema.Draft7Validator(schema)
    assert [e.message for e in validator.iter_errors(by_kind("RayCluster"))] == []
    broken = copy.deepcopy(by_kind("RayCluster"))
    broken["spec"]["headGroupSpec"]["bogus"] = 1
    assert list(validator.iter_errors(broken))


def _close_objects(schema: Any) -> None:
    """additionalProperties: false wherever the schema lists properties (what the API
    server's pruning does to unknown fields, made an error)."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        for key, value in schema.items():
            if key == "properties":
                for sub in value.values():
                    _close_objects(sub)
            elif isinstance(value, dict | list):
                _close_objects(value)
    elif isinstance(schema, list):
        for item in schema:
            _close_objects(item)


def test_the_server_joins_the_raycluster_it_ships_with() -> None:
    """--ray-address is the head's Service (KubeRay names it NAME-head-svc) at the GCS
    port the head exposes; every pod runs the server's image; rayVersion is the Ray the
    wheel pins and this environment runs."""
    ray, sts = by_kind("RayCluster"), by_kind("StatefulSet")
    container = _container(sts)
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["RAY_HEAD"] == f"{ray['metadata']['name']}-head-svc"
    script = container["args"][0]
    assert 'ray start --address="$RAY_HEAD:6379" --num-cpus=0' in script
    assert '--ray-address "$RAY_HEAD:6379"' in script
    (head,) = ray["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert {"name": "gcs-server", "containerPort": 6379} in head["ports"]
    images = {c["image"] for _, t in _pod_templates(ray) for c in t["spec"]["containers"]}
    assert images == {container["image"]}
    pinned = re.search(r'"ray==([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned is not None
    assert ray["spec"]["rayVersion"] == pinned[1] == importlib.metadata.version("ray")
    # a custom resource a job can ask for, as Ray reads it from rayStartParams
    farm = next(g for g in ray["spec"]["workerGroupSpecs"] if g["groupName"] == "board-farm-stm32")
    assert yaml.safe_load(yaml.safe_load(farm["rayStartParams"]["resources"])) == {"board-farm=stm32": 1}


def test_kustomize_builds_the_set() -> None:
    kubectl = require_tool("kubectl", "kubectl kustomize")
    out = subprocess.run([str(kubectl), "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    built = sorted((d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(out.stdout) if d)
    assert built == sorted((d["kind"], d["metadata"]["name"]) for _, d in documents())


# ---------------------------------------------------------------------- the Dockerfile


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in dockerfile():
        if instruction[0] == "FROM":
            stages.append([])
        stages[-1].append(instruction)
    return stages


def _apt_packages(stage: list[tuple[str, str]]) -> set[str]:
    packages: set[str] = set()
    for word, args in stage:
        if word == "RUN" and "apt-get install" in args:
            assert "--no-install-recommends" in args, args
            install = args.split("apt-get install", 1)[1].split("&&", 1)[0]
            packages |= {w for w in install.split() if not w.startswith("-")}
    return packages


def test_the_dockerfile_is_debian_slim_with_qemu_from_apt_and_the_wheel() -> None:
    build, runtime = _stages()
    for stage in (build, runtime):
        assert re.fullmatch(r"debian:[a-z]+-slim( AS \w+)?", stage[0][1]), stage[0]
    # the wheel: built from the repository with pip wheel, installed from those wheels only
    assert any(w == "RUN" and "pip wheel" in a and a.rstrip().endswith(" .") for w, a in build)
    assert any(w == "RUN" and "pip install" in a and "--no-index" in a and " machineserver" in a for w, a in runtime)
    for word, args in build + runtime:
        if word == "COPY" and "--from" not in args:
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), source
    packages = _apt_packages(runtime)
    assert {"qemu-system-arm", "gdb-multiarch", "python3"} <= packages
    instructions = dict(runtime)
    assert instructions["EXPOSE"] == "50051"
    assert instructions["HEALTHCHECK"].split("CMD", 1)[1].strip() == '["machineserver-healthcheck"]'
    assert any(w == "COPY" and a.startswith("deploy/healthcheck.py ") for w, a in runtime)
    assert instructions["USER"] != "root" and "VOLUME" in instructions
    cmd = yaml.safe_load(instructions["CMD"])  # a JSON array
    assert cmd[:5] == ["machineserver", "--listen", "0.0.0.0:50051", "--data-dir", "/data"]
    assert "/data" in instructions["VOLUME"]


def test_the_image_installs_a_package_for_every_qemu_binary_the_driver_runs() -> None:
    """Which Debian package holds each of the QEMU driver's binaries, asked of this
    (Debian) machine's dpkg, and that package is in the image's apt-get install."""
    packages = _apt_packages(_stages()[1])
    dpkg = require_tool("dpkg", "which package holds a QEMU binary")
    for binary in sorted(set(BINARIES.values())):
        path = require_tool(binary, "the image must install it")
        owner = subprocess.run([str(dpkg), "-S", str(path.resolve())], capture_output=True, text=True, timeout=30)
        if owner.returncode != 0:  # /usr/bin may be a link to /bin on this machine
            owner = subprocess.run([str(dpkg), "-S", f"/usr/bin/{binary}"], capture_output=True, text=True, timeout=30)
        assert owner.returncode == 0, owner.stderr
        package = owner.stdout.split(":", 1)[0]
        assert package in packages, f"{binary} comes from {package}, which the image does not install"
