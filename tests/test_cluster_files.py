"""The cluster files: cluster.yaml (Ray cluster launcher, AWS) and k8s/*.yaml (KubeRay).

Each is checked against a real schema where one exists -- Ray's own ray-schema.json for
cluster.yaml, the Kubernetes API models of the official client for every pod template, Ray's
RuntimeEnv for the RayJob's runtime env -- and the KubeRay custom resources field by field
against KubeRay's ray.io/v1 types. Then against the project: the versions it pins equal the
ones installed here and admitted by pyproject.toml, the job it runs exists, MLflow is
configured everywhere, and nothing listens beyond the cluster.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PINNED = ("ray", "torch", "torchvision")

# Fields of KubeRay's ray.io/v1 types (ray-project/kuberay, ray-operator/apis/ray/v1/
# raycluster_types.go and rayjob_types.go, v1.5-v1.6): a key outside these is a typo the API
# server would reject (or, without strict validation, silently drop).
RAY_CLUSTER_SPEC = {
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
    "headGroupSpec", "headServiceAnnotations", "managedBy", "rayVersion", "suspend",
    "workerGroupSpecs",
}
HEAD_GROUP_SPEC = {
    "enableIngress", "headService", "labels", "rayStartParams", "resources", "serviceType",
    "template",
}
HEAD_GROUP_REQUIRED = {"rayStartParams", "template"}
WORKER_GROUP_SPEC = {
    "groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts",
    "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template",
}
WORKER_GROUP_REQUIRED = {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"}
AUTH_OPTIONS = {"mode", "secretName", "enableK8sTokenAuth"}
RAY_JOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionPolicy",
    "deletionStrategy", "entrypoint", "entrypointNumCpus", "entrypointNumGpus",
    "entrypointResources", "jobId", "managedBy", "metadata", "rayClusterSpec",
    "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode", "submitterConfig",
    "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished",
}


def _installed(name: str) -> str:
    return importlib.metadata.version(name)


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _project_requirements() -> dict[str, Requirement]:
    reqs = (Requirement(r) for r in _pyproject()["project"]["dependencies"])
    return {r.name: r for r in reqs}


def _load(relpath: str) -> dict:
    docs = list(yaml.safe_load_all((ROOT / relpath).read_text()))
    assert len(docs) == 1, f"{relpath}: expected one YAML document, got {len(docs)}"
    return docs[0]


def _walk(node, path="$"):
    """Every mapping in a parsed YAML tree, with its path."""
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def _cluster_specs() -> dict[str, dict]:
    return {
        "raycluster.yaml spec": _load("k8s/raycluster.yaml")["spec"],
        "rayjob.yaml spec.rayClusterSpec": _load("k8s/rayjob.yaml")["spec"]["rayClusterSpec"],
    }


def _pod_templates(spec: dict) -> dict[str, dict]:
    out = {"head": spec["headGroupSpec"]["template"]}
    for group in spec["workerGroupSpecs"]:
        out[group["groupName"]] = group["template"]
    return out


def _runtime_env() -> dict:
    env = yaml.safe_load(_load("k8s/rayjob.yaml")["spec"]["runtimeEnvYAML"])
    assert isinstance(env, dict), "runtimeEnvYAML must be a YAML mapping"
    return env


# ---------------------------------------------------------------- cluster.yaml (AWS launcher)


def _cluster_yaml() -> dict:
    return _load("cluster.yaml")


def test_cluster_yaml_matches_rays_launcher_schema():
    jsonschema = pytest.importorskip("jsonschema")
    ray_dir = Path(importlib.util.find_spec("ray").submodule_search_locations[0])
    schema = json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(_cluster_yaml(), schema)  # the schema `ray up` validates against


def test_cluster_yaml_pins_the_installed_and_declared_versions():
    cfg = _cluster_yaml()
    setup = " ".join(cfg["setup_commands"])
    declared = _project_requirements()
    pins, extras = {}, {}
    for m in re.finditer(r'"(ray|torch|torchvision)(\[[^\]]*\])?==([^"\s]+)"', setup):
        pins[m.group(1)], extras[m.group(1)] = m.group(3), m.group(2) or ""
    assert set(pins) == set(PINNED), f"setup_commands must pin exactly {PINNED}: {setup}"
    for name, version in pins.items():
        assert version == _installed(name), f"cluster.yaml pins {name}=={version}, installed {_installed(name)}"
        assert version in SpecifierSet(str(declared[name].specifier)), (
            f"cluster.yaml's {name}=={version} is outside pyproject.toml's {declared[name]}")
    assert set(extras["ray"].strip("[]").split(",")) == declared["ray"].extras
    # the pins come first; installing the mounted repo afterwards keeps them
    mount = next(dst for dst, src in cfg["file_mounts"].items() if src == ".")
    last = cfg["setup_commands"][-1]
    assert re.search(rf"pip install (-q )?-e {re.escape(mount)}$", last), last
    assert setup.index("torch==") < setup.index(f"-e {mount}")


def _mlflow_host(cfg: dict) -> str:
    cmd = next(c for c in cfg["head_setup_commands"] if "mlflow server" in c)
    m = re.search(r"--host[ =](\$\([^)]*\)|\S+)", cmd)
    assert m, f"mlflow server without --host: {cmd}"
    return m.group(1)


def test_cluster_yaml_listens_on_private_addresses_only():
    cfg = _cluster_yaml()
    head = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head
    assert re.findall(r"--dashboard-host[ =](\S+)", head) == ["127.0.0.1"], head
    host = _mlflow_host(cfg)
    assert host not in {"0.0.0.0", "::", "[::]", "*", ""}, f"MLflow binds {host}"
    assert "127.0.0.1" not in host and "localhost" not in host, "workers could not reach MLflow"
    # the head's jobs and the workers use the address MLflow listens on
    assert f"MLFLOW_TRACKING_URI=http://{host}:5000" in head
    workers = " ".join(cfg["worker_start_ray_commands"])
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in workers
    # without MLflow's job runner, as LocalTrackingServer starts its servers
    mlflow_cmd = next(c for c in cfg["head_setup_commands"] if "mlflow server" in c)
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in mlflow_cmd.split("mlflow server")[0], mlflow_cmd
    # the launcher's security group: own members + SSH, and no extra inbound rule
    assert cfg["provider"]["security_group"].get("IpPermissions", []) == []


# ---------------------------------------------------------------- k8s: KubeRay resources


def test_kuberay_resources_have_kuberays_fields():
    rc, job = _load("k8s/raycluster.yaml"), _load("k8s/rayjob.yaml")
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert rc["metadata"]["name"] and job["metadata"]["name"]
    for where, spec in _cluster_specs().items():
        assert set(spec) <= RAY_CLUSTER_SPEC, f"{where}: unknown {set(spec) - RAY_CLUSTER_SPEC}"
        assert set(spec.get("authOptions", {})) <= AUTH_OPTIONS
        head = spec["headGroupSpec"]
        assert HEAD_GROUP_REQUIRED <= set(head) <= HEAD_GROUP_SPEC, f"{where}.headGroupSpec: {set(head)}"
        groups = spec["workerGroupSpecs"]
        assert groups and len({g["groupName"] for g in groups}) == len(groups)
        for g in groups:
            assert WORKER_GROUP_REQUIRED <= set(g) <= WORKER_GROUP_SPEC, f"{where} {g.get('groupName')}: {set(g)}"
            assert all(isinstance(g[k], int) for k in ("replicas", "minReplicas", "maxReplicas"))
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        for params in [head["rayStartParams"], *(g["rayStartParams"] for g in groups)]:
            # map[string]string in the CRD: an unquoted number or boolean is rejected
            assert all(isinstance(v, str) for v in params.values()), params
    spec = job["spec"]
    assert set(spec) <= RAY_JOB_SPEC, f"rayjob.yaml: unknown {set(spec) - RAY_JOB_SPEC}"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0


def test_rayjob_creates_the_same_cluster_as_raycluster_yaml():
    rc, job = _cluster_specs().values()
    assert job == rc


def _normalise_quantities(template: dict) -> dict:
    """Kubernetes accepts 8 and "8" for a quantity; the client's models take strings only."""
    out = json.loads(json.dumps(template))
    for container in out["spec"].get("containers", []) + out["spec"].get("initContainers", []):
        for kind in ("limits", "requests"):
            q = container.get("resources", {}).get(kind, {})
            q.update({k: str(v) for k, v in q.items()})
    return out


def test_pod_templates_are_valid_kubernetes_objects():
    pytest.importorskip("kubernetes", minversion="37")
    from kubernetes.client import ApiClient

    api = ApiClient()
    for where, spec in _cluster_specs().items():
        for group, template in _pod_templates(spec).items():
            given = _normalise_quantities(template)
            # the client's own deserialisation into the API model (types, required fields)...
            parsed = api.deserialize(json.dumps(given), "V1PodTemplateSpec", "application/json")
            # ...drops keys it does not know: a round trip that loses nothing has no typo
            assert api.sanitize_for_serialization(parsed) == given, f"{where} {group}"
            assert parsed.spec.containers and all(c.image for c in parsed.spec.containers)


def test_images_run_the_installed_ray_version():
    ray_version = _installed("ray")
    for where, spec in _cluster_specs().items():
        assert spec["rayVersion"] == ray_version, where
        for group, template in _pod_templates(spec).items():
            for c in template["spec"]["containers"]:
                m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)(-[\w.-]+)?", c["image"])
                assert m and m.group(1) == ray_version, f"{where} {group}: {c['image']}"


def test_gpu_workers_request_gpus():
    for where, spec in _cluster_specs().items():
        for g in spec["workerGroupSpecs"]:
            ray_container = g["template"]["spec"]["containers"][0]
            assert int(ray_container["resources"]["limits"]["nvidia.com/gpu"]) >= 1, (where, g["groupName"])


def test_nothing_is_exposed_beyond_the_kubernetes_cluster():
    for rel in ("k8s/raycluster.yaml", "k8s/rayjob.yaml"):
        for path, node in _walk(_load(rel)):
            where = f"{rel} {path}"
            assert node.get("serviceType", "ClusterIP") == "ClusterIP", where
            if node.get("kind") in {"Service", "Ingress"} or path.endswith(".headService"):
                assert node.get("kind") != "Ingress", where
                assert node.get("spec", {}).get("type", "ClusterIP") == "ClusterIP", where
            assert node.get("enableIngress") is not True, where
            assert node.get("hostNetwork") is not True, where
            assert "hostPort" not in node, where
    # dashboard-host 0.0.0.0 is fine inside the pod only because the Service is ClusterIP
    for spec in _cluster_specs().values():
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"


def _is_in_cluster_url(url: str) -> bool:
    u = urlparse(url)
    return u.scheme == "http" and bool(u.port) and (
        u.hostname.endswith(".svc") or u.hostname.endswith(".svc.cluster.local"))


def test_mlflow_tracking_uri_reaches_every_ray_process():
    uri = _runtime_env()["env_vars"]["MLFLOW_TRACKING_URI"]
    assert _is_in_cluster_url(uri), uri
    for where, spec in _cluster_specs().items():
        for group, template in _pod_templates(spec).items():
            for c in template["spec"]["containers"]:
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                assert env.get("MLFLOW_TRACKING_URI") == uri, f"{where} {group} {c['name']}"


def test_rayjob_runs_meta_train_from_its_runtime_env():
    entry = shlex.split(_load("k8s/rayjob.yaml")["spec"]["entrypoint"])
    assert entry[:2] == ["python", "jobs/meta_train.py"], entry
    assert (ROOT / entry[1]).is_file()

    env = _runtime_env()
    from ray.runtime_env import RuntimeEnv

    assert set(env) <= RuntimeEnv.known_fields, set(env) - RuntimeEnv.known_fields
    RuntimeEnv(**env)  # Ray's own validation (e.g. a remote working_dir must be an archive)
    url = env["working_dir"]
    assert urlparse(url).scheme in {"https", "s3", "gs"} and url.endswith(".zip"), url

    packages = env["pip"]["packages"] if isinstance(env["pip"], dict) else env["pip"]
    reqs = {r.name: r for r in map(Requirement, packages)}
    assert "ray" not in reqs, "Ray comes from the image; a pip ray could differ from it"
    for name in ("torch", "torchvision"):
        assert str(reqs[name].specifier) == f"=={_installed(name)}", reqs[name]
    project = _pyproject()["project"]["name"]
    assert reqs[project].url == url, "the package must come from the same commit as working_dir"
