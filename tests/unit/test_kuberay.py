"""deploy/kuberay/rayservice.yaml, checked offline: its serve config against Ray's schema, ours
and deploy/serve_config.yaml; its pods and Service against Kubernetes' own schemas; and the
links between them that only a running cluster would otherwise reveal (the gateway resource,
GPUs, ports, mounted secrets, `ray start` flags)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest
import ray
import yaml
from pydantic import ValidationError
from ray.scripts.scripts import start as ray_start
from ray.serve.schema import ServeDeploySchema

from multimed.services.config import GATEWAY_RESOURCE, ROUTER, ServeConfigFile
from multimed.services.server import REPLICA_ENV

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy/kuberay/rayservice.yaml"
BASE_CONFIG = ROOT / "deploy/serve_config.yaml"
# The oldest Kubernetes we claim, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())

APP = ("applications", "multimed")
GPU_LISTED = tuple(f"encoder-{m}" for m in ("xray", "ct", "mri", "text"))  # in the base too
GPU_ADDED = ("encoder-oct", "encoder-pathology")  # the base leaves them to the app's defaults
GPU_ENCODERS = GPU_LISTED + GPU_ADDED
# Where serveConfigV2 may differ from deploy/serve_config.yaml, and nowhere else (lists of named
# things are keyed by name): what a cluster needs that a laptop does not.
CLUSTER_DIFFERENCES = {
    (*APP, "args", "bundle"),  # trained into the image
    (*APP, "args", "gateway", "host"),  # other pods connect
    (*APP, "args", "gateway", "token_file"),  # mounted Secrets
    (*APP, "args", "gateway", "tls"),
    *((*APP, "deployments", name, "ray_actor_options") for name in GPU_LISTED),
    *((*APP, "deployments", name) for name in GPU_ADDED),
}


def load_manifest() -> tuple[dict, dict]:
    docs = list(yaml.safe_load_all(MANIFEST.read_text()))
    kinds = {(d["apiVersion"], d["kind"]): d for d in docs}
    assert len(kinds) == len(docs) == 2
    return kinds["ray.io/v1", "RayService"], kinds["v1", "Service"]


RAYSERVICE, SERVICE = load_manifest()
CLUSTER = RAYSERVICE["spec"]["rayClusterConfig"]
GROUPS = {"head": CLUSTER["headGroupSpec"]} | {
    g["groupName"]: g for g in CLUSTER["workerGroupSpecs"]
}
SERVE = yaml.safe_load(RAYSERVICE["spec"]["serveConfigV2"])


def serve_app() -> dict:
    [app] = SERVE["applications"]
    return app


def deployment(name: str) -> dict:
    return next((d for d in serve_app()["deployments"] if d["name"] == name), {})


def ray_container(group: str) -> dict:
    return GROUPS[group]["template"]["spec"]["containers"][0]  # KubeRay's Ray container


def declared_resources(group: str) -> dict[str, float]:
    """The custom resources a group's `ray start` declares, read as its shell will read them:
    KubeRay writes ` --resources=<value> ` into the container's bash command line."""
    value = GROUPS[group]["rayStartParams"].get("resources")
    if value is None:
        return {}
    words = shlex.split(f"--resources={value}")
    assert len(words) == 1, f"the shell splits {value!r} into {words}: quote it as KubeRay does"
    return json.loads(words[0].removeprefix("--resources="))


def leaves(node, path=()) -> dict[tuple, object]:
    """{path: value} for every scalar of a serve config; named lists are keyed by name."""
    if isinstance(node, list) and node and all(isinstance(x, dict) and "name" in x for x in node):
        node = {x["name"]: x for x in node}
    if isinstance(node, dict) and node:
        return {p: v for key, child in node.items() for p, v in leaves(child, (*path, key)).items()}
    return {path: node}


def differences(a: dict, b: dict) -> set[tuple]:
    la, lb = leaves(a), leaves(b)
    missing = object()
    return {p for p in la.keys() | lb.keys() if la.get(p, missing) != lb.get(p, missing)}


def under(path: tuple, prefixes) -> bool:
    return any(path[: len(p)] == p for p in prefixes)


def test_the_rayservice_has_what_kuberay_reads():
    assert RAYSERVICE["metadata"]["name"]
    assert isinstance(RAYSERVICE["spec"]["serveConfigV2"], str)  # a YAML string, not a mapping
    assert CLUSTER["rayVersion"] == ray.__version__  # the Ray the image installs
    assert CLUSTER["headGroupSpec"]["template"]["spec"]["containers"]
    assert {"gateway", "gpu"} <= GROUPS.keys()
    # KubeRay deploys serveConfigV2 through the dashboard, with the token only if it knows it.
    assert CLUSTER["authOptions"] == {"mode": "token", "secretName": "multimed-ray-token"}


def test_serve_config_v2_passes_rays_schema_and_ours():
    assert ServeDeploySchema.model_validate(SERVE).proxy_location.value == "Disabled"
    config = ServeConfigFile.model_validate(SERVE)
    assert config.app.args.bundle.startswith("/")  # replicas start in any working directory


@pytest.mark.parametrize(
    "where",
    [
        (),
        ("args",),
        ("args", "gateway", "tls"),
        ("deployments", 1),
        ("deployments", 1, "user_config"),
    ],
)
def test_a_misspelt_key_in_serve_config_v2_is_refused(where):
    # Ray's schema ignores unknown keys; ours (extra=forbid) is what catches them before deploy.
    config = yaml.safe_load(RAYSERVICE["spec"]["serveConfigV2"])
    node = config["applications"][0]
    for key in where:
        node = node[key]
    node["bogus"] = 1
    with pytest.raises(ValidationError, match="bogus"):
        ServeConfigFile.model_validate(config)


def test_serve_config_v2_is_the_repo_config_but_for_the_declared_paths():
    diff = differences(yaml.safe_load(BASE_CONFIG.read_text()), SERVE)
    assert sorted(p for p in diff if not under(p, CLUSTER_DIFFERENCES)) == []
    stale = [p for p in CLUSTER_DIFFERENCES if not any(under(d, [p]) for d in diff)]
    assert stale == []  # a declared path that no longer differs would hide later drift


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("group", ["head", "gateway", "gpu"])
def test_every_pod_template_is_a_valid_pod(group, version):
    template = GROUPS[group]["template"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"multimed-{group}", **template["metadata"]},
        "spec": template["spec"],
    }
    kubernetes_validate.validate(pod, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_service_is_valid(version):
    kubernetes_validate.validate(SERVICE, version, strict=True)


@pytest.mark.parametrize("group", ["head", "gateway", "gpu"])
def test_every_pod_runs_as_non_root_with_requests_and_limits(group):
    spec = GROUPS[group]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    for container in spec["containers"]:
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= container["resources"][bound].keys(), container["name"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("group", ["gateway", "gpu"])
def test_replicas_get_the_malloc_settings(group):
    env = {e["name"]: e.get("value") for e in ray_container(group).get("env", [])}
    assert env.items() >= REPLICA_ENV.items()


def test_the_head_runs_no_replicas():
    assert GROUPS["head"]["rayStartParams"]["num-cpus"] == "0"
    assert declared_resources("head") == {}


def test_the_router_fits_only_on_the_gateway_group():
    wanted = deployment(ROUTER)["ray_actor_options"]["resources"]
    assert set(wanted) == {GATEWAY_RESOURCE}
    replicas = deployment(ROUTER).get("num_replicas", 1)
    gateway = GROUPS["gateway"]
    declared = declared_resources("gateway")[GATEWAY_RESOURCE]
    assert declared * gateway["replicas"] >= wanted[GATEWAY_RESOURCE] * replicas
    assert all(GATEWAY_RESOURCE not in declared_resources(g) for g in GROUPS if g != "gateway")


def test_the_gpu_encoders_fit_the_gpu_group():
    asking = {
        d["name"]
        for d in serve_app()["deployments"]
        if "num_gpus" in d.get("ray_actor_options", {})
    }
    assert asking == set(GPU_ENCODERS)
    gpus = sum(
        deployment(n)["ray_actor_options"]["num_gpus"] * deployment(n).get("num_replicas", 1)
        for n in GPU_ENCODERS
    )
    group = GROUPS["gpu"]
    limits = ray_container("gpu")["resources"]["limits"]
    assert gpus <= int(limits["nvidia.com/gpu"]) * group["replicas"]  # quarters pack exactly
    tolerations = group["template"]["spec"]["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    for other in ("head", "gateway"):
        assert "nvidia.com/gpu" not in ray_container(other)["resources"]["limits"]


def test_the_service_reaches_the_gateway_ports_on_the_gateway_pods_only():
    selector = SERVICE["spec"]["selector"].items()
    labels = {g: GROUPS[g]["template"]["metadata"]["labels"].items() for g in GROUPS}
    assert selector <= labels["gateway"]
    assert not any(selector <= labels[g] for g in GROUPS if g != "gateway")

    args = serve_app()["args"]
    wanted = {args["gateway"]["port"], args["metrics_port"]}
    named = {p["name"]: p["containerPort"] for p in ray_container("gateway")["ports"]}
    ports = SERVICE["spec"]["ports"]
    assert {named.get(p["targetPort"], p["targetPort"]) for p in ports} == wanted
    assert {p["port"] for p in ports} == wanted  # clients use the same ports as on one machine
    probe = ray_container("gateway")["readinessProbe"]["tcpSocket"]["port"]
    assert named.get(probe, probe) == args["gateway"]["port"]


def test_the_secrets_mounted_hold_the_files_the_serve_config_names():
    gateway = serve_app()["args"]["gateway"]
    files = [gateway["token_file"], gateway["tls"]["cert"], gateway["tls"]["key"]]
    spec = GROUPS["gateway"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in ray_container("gateway")["volumeMounts"]}
    for file in map(PurePosixPath, files):
        mount = mounts[str(file.parent)]
        assert mount["readOnly"] is True
        secret = volumes[mount["name"]]["secret"]
        assert file.name in {item["path"] for item in secret["items"]}, file


def test_ray_start_params_are_ray_start_flags():
    flags = {opt for param in ray_start.params for opt in param.opts}
    for name, group in GROUPS.items():
        unknown = {f"--{key}" for key in group["rayStartParams"]} - flags
        assert unknown == set(), name
