"""Static checks of deploy/ (no Docker, no Kubernetes here): every file parses; core Kubernetes objects
validate against the Kubernetes schemas (kubernetes-validate, offline); KubeRay objects against the fields of
the ray.io/v1 CRDs; compose's structure and secrets; the `ray up` file against Ray's own schema; and every
`mfsweep` / `ray` command line inside deploy/ against the real parsers, so a renamed flag or config key fails
here rather than on a cluster."""

from __future__ import annotations

import copy
import json
import re
import shlex
import stat
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
import yaml

from orchestrator.cli import build_parser

from .support import DEPLOY, ROOT, Command, deploy_commands, dockerfile_instructions, yaml_docs

K8S = DEPLOY / "k8s"
PROJECT_VERSION = "0.1.0"


def _all_yaml() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def _k8s_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in sorted(K8S.glob("*.yaml")) for d in yaml_docs(p)]


def _walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


# --------------------------------------------------------------------------------------------- parsing


def test_every_yaml_file_parses() -> None:
    files = _all_yaml()
    names = {str(p.relative_to(DEPLOY)) for p in files}
    assert {"compose.yaml", "ray-cluster.yaml", "k8s/raycluster.yaml", "k8s/rayjob-scaling.yaml",
            "k8s/rayjob-search.yaml"} <= names, names
    for path in files:
        docs = yaml_docs(path)
        assert docs, f"{path} is empty"
        assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"


# ------------------------------------------------------------------------------------------ Kubernetes core


def _k8s_version() -> str:
    from kubernetes_validate.utils import latest_version

    return latest_version()


def test_core_kubernetes_objects_validate_strictly() -> None:
    import kubernetes_validate

    seen = set()
    for path, doc in _k8s_objects():
        if doc["apiVersion"].startswith("ray.io/"):
            continue
        try:
            kubernetes_validate.validate(doc, _k8s_version(), strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {err.message} at "
                        f"{'/'.join(map(str, err.path))}")
        seen.add(doc["kind"])
    assert {"Secret", "PersistentVolumeClaim", "NetworkPolicy"} <= seen, seen


def test_kubernetes_validate_rejects_a_broken_object() -> None:
    """The validator is live (schemas shipped, strict mode): a misspelled field fails."""
    import kubernetes_validate

    pvc = next(d for _, d in _k8s_objects() if d["kind"] == "PersistentVolumeClaim")
    bad = copy.deepcopy(pvc)
    bad["spec"]["accessMode"] = bad["spec"].pop("accessModes")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, _k8s_version(), strict=True)


# --------------------------------------------------------------------------------------------- KubeRay CRDs

# The fields of the KubeRay ray.io/v1 CRDs (RayCluster, RayJob) as of KubeRay 1.6, restricted to the parts
# these manifests touch plus their siblings, so that a typo is an unknown field. Embedded pod templates are
# checked as Kubernetes PodTemplateSpecs (strict). Required fields follow the CRD's `required` lists.
_DEFS = "/api/_definitions.json#/$defs/"
_INT = {"type": "integer", "minimum": 0}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}


def _obj(props: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _DEFS + name}


_POD_TEMPLATE = _ref("io.k8s.api.core.v1.PodTemplateSpec")
_HEAD_GROUP = _obj({
    "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
    "headService": {"type": "object"},
    "enableIngress": {"type": "boolean"},
    "rayStartParams": _STR_MAP,
    "template": _POD_TEMPLATE,
}, required=("rayStartParams", "template"))
_WORKER_GROUP = _obj({
    "groupName": {"type": "string", "minLength": 1},
    "replicas": _INT, "minReplicas": _INT, "maxReplicas": _INT,
    "numOfHosts": {"type": "integer", "minimum": 1},
    "idleTimeoutSeconds": _INT,
    "suspend": {"type": "boolean"},
    "rayStartParams": _STR_MAP,
    "template": _POD_TEMPLATE,
    "scaleStrategy": _obj({"workersToDelete": {"type": "array", "items": {"type": "string"}}}),
}, required=("groupName", "maxReplicas", "minReplicas", "rayStartParams", "template"))
_AUTOSCALER = _obj({
    "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
    "idleTimeoutSeconds": _INT,
    "resources": _ref("io.k8s.api.core.v1.ResourceRequirements"),
    "image": {"type": "string"},
    "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
    "env": {"type": "array", "items": _ref("io.k8s.api.core.v1.EnvVar")},
    "envFrom": {"type": "array", "items": _ref("io.k8s.api.core.v1.EnvFromSource")},
    "volumeMounts": {"type": "array", "items": _ref("io.k8s.api.core.v1.VolumeMount")},
    "securityContext": _ref("io.k8s.api.core.v1.SecurityContext"),
    "version": {"enum": ["v1", "v2"]},
})
_AUTH = _obj({"mode": {"enum": ["disabled", "token"]}, "secretName": {"type": "string", "minLength": 1},
              "enableK8sTokenAuth": {"type": "boolean"}})
_CLUSTER_SPEC = _obj({
    "headGroupSpec": _HEAD_GROUP,
    "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
    "rayVersion": {"type": "string"},
    "enableInTreeAutoscaling": {"type": "boolean"},
    "autoscalerOptions": _AUTOSCALER,
    "authOptions": _AUTH,
    "headServiceAnnotations": _STR_MAP,
    "suspend": {"type": "boolean"},
    "managedBy": {"type": "string"},
    "gcsFaultToleranceOptions": {"type": "object"},
}, required=("headGroupSpec",))
_JOB_SPEC = _obj({
    "entrypoint": {"type": "string"},
    "rayClusterSpec": _CLUSTER_SPEC,
    "clusterSelector": _STR_MAP,
    "shutdownAfterJobFinishes": {"type": "boolean"},
    "ttlSecondsAfterFinished": _INT,
    "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
    "backoffLimit": _INT,
    "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
    "runtimeEnvYAML": {"type": "string"},
    "jobId": {"type": "string"},
    "metadata": _STR_MAP,
    "submitterPodTemplate": _POD_TEMPLATE,
    "submitterConfig": _obj({"backoffLimit": _INT}),
    "entrypointNumCpus": {"type": "number"},
    "entrypointNumGpus": {"type": "number"},
    "entrypointResources": {"type": "string"},
    "suspend": {"type": "boolean"},
    "managedBy": {"type": "string"},
    "deletionStrategy": {"type": "object"},
})


def _top(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"$id": f"https://kubernetes.io/mfsweep/{kind.lower()}.json", **_obj({
        "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind},
        "metadata": _ref("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"), "spec": spec,
        "status": {"type": "object"},
    }, required=("apiVersion", "kind", "metadata", "spec"))}


KUBERAY_SCHEMAS = {"RayCluster": _top("RayCluster", _CLUSTER_SPEC), "RayJob": _top("RayJob", _JOB_SPEC)}


def _kuberay_errors(doc: dict[str, Any]) -> list[str]:
    """Schema errors plus the CRD's cross-field rules that a schema cannot say."""
    from kubernetes_validate.utils import schema_contents
    from referencing import Registry, Resource

    defs = schema_contents(f"kubernetes-json-schema/v{_k8s_version()}-local-strict/_definitions.json",
                           _k8s_version())
    schema = KUBERAY_SCHEMAS.get(doc.get("kind", ""))
    if schema is None:
        return [f"unknown KubeRay kind {doc.get('kind')!r}"]
    registry = Registry().with_resource(defs["$id"], Resource.from_contents(defs))
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    spec = doc.get("spec", {})
    cluster = spec.get("rayClusterSpec", spec) if doc.get("kind") == "RayJob" else spec
    for g in cluster.get("workerGroupSpecs", []):
        lo, hi, n = g.get("minReplicas", 0), g.get("maxReplicas", 2**31 - 1), g.get("replicas", 0)
        if not lo <= n <= hi:
            errors.append(f"worker group {g.get('groupName')}: replicas {n} not in [{lo}, {hi}]")
    if cluster.get("authOptions", {}).get("mode") == "token":
        major, minor = (int(x) for x in cluster.get("rayVersion", "0.0").split(".")[:2])
        if (major, minor) < (2, 52):
            errors.append("authOptions.mode=token needs rayVersion >= 2.52")
    return errors


def _kuberay_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p, d in _k8s_objects() if d["apiVersion"].startswith("ray.io/")]


def test_kuberay_objects_match_crd_fields() -> None:
    objs = _kuberay_objects()
    assert sorted(d["kind"] for _, d in objs) == ["RayCluster", "RayJob", "RayJob"]
    for path, doc in objs:
        assert _kuberay_errors(doc) == [], path.name


@pytest.mark.parametrize("mutate, expect", [
    (lambda d: d["spec"].__setitem__("shutdownAfterJobFinish", True), "shutdownAfterJobFinish"),
    (lambda d: d["spec"]["rayClusterSpec"].pop("headGroupSpec"), "headGroupSpec"),
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("minReplicas"), "minReplicas"),
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
     .__setitem__("imagePull", "Always"), "imagePull"),
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].__setitem__("replicas", 99), "replicas 99"),
], ids=["unknown-field", "missing-head", "missing-minReplicas", "pod-template-typo", "replicas-range"])
def test_kuberay_check_rejects_broken_manifests(mutate: Any, expect: str) -> None:
    doc = copy.deepcopy(yaml_docs(K8S / "rayjob-scaling.yaml")[0])
    mutate(doc)
    errors = _kuberay_errors(doc)
    assert any(expect in e for e in errors), errors


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for node in _walk(doc) if isinstance(node, dict) and "containers" in node
            for c in node["containers"]]


def test_kuberay_cluster_shape() -> None:
    """GPU worker group with limits and an autoscaling range, token auth, head off the public network."""
    cluster = yaml_docs(K8S / "raycluster.yaml")[0]
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # actors stay off the head
    gpu = [g for g in spec["workerGroupSpecs"] if any(
        "nvidia.com/gpu" in c["resources"].get("limits", {}) for c in g["template"]["spec"]["containers"])]
    assert gpu, "no worker group with an nvidia.com/gpu limit"
    assert all(g["minReplicas"] < g["maxReplicas"] for g in gpu)
    for path, doc in _kuberay_objects():
        for c in _containers(doc):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, (path.name, c["name"])
        for node in _walk(doc):
            if isinstance(node, dict) and "containers" in node:
                assert node["securityContext"]["runAsNonRoot"] is True, path.name


def test_rayjobs_run_mfsweep_and_shut_down() -> None:
    cluster_spec = yaml_docs(K8S / "raycluster.yaml")[0]["spec"]
    for name, sub in (("rayjob-scaling.yaml", "scaling"), ("rayjob-search.yaml", "search")):
        job = yaml_docs(K8S / name)[0]
        assert job["spec"]["shutdownAfterJobFinishes"] is True
        cmds = [c for c in deploy_commands("mfsweep") if c.source.endswith(name)]
        assert [c.tokens[1] for c in cmds] == [sub]
        # The config is read from a ConfigMap mounted on the head (where the driver runs) that the README
        # builds from the repository folder the config lives in.
        config_dir = str(Path(build_parser().parse_args(list(cmds[0].tokens[1:])).config).parent)
        pod = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == config_dir)
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        made = re.search(rf"kubectl create configmap {volume['configMap']['name']} --from-file=(\S+)",
                         (DEPLOY / "README.md").read_text())
        assert made and made.group(1).rstrip("/") == f"configs/{Path(config_dir).name}", config_dir
        # The job's cluster is the standalone RayCluster apart from its worker counts (no drift).
        strip = copy.deepcopy(job["spec"]["rayClusterSpec"])
        ref = copy.deepcopy(cluster_spec)
        for spec in (strip, ref):
            for g in spec["workerGroupSpecs"]:
                for k in ("replicas", "minReplicas", "maxReplicas"):
                    g.pop(k)
        assert strip == ref, f"{name}: rayClusterSpec drifted from raycluster.yaml"


def test_secret_references_are_documented_and_templates_hold_placeholders() -> None:
    template = {d["metadata"]["name"]: d for d in yaml_docs(K8S / "secrets.template.yaml")}
    refs = {(n["secretKeyRef"]["name"], n["secretKeyRef"]["key"]) for _, doc in _kuberay_objects()
            for n in _walk(doc) if isinstance(n, dict) and "secretKeyRef" in n}
    assert ("mfsweep-services", "mlflow-tracking-uri") in refs
    assert ("mfsweep-services", "optuna-storage") in refs
    for name, key in refs:
        assert key in template[name]["stringData"], f"{name}/{key} missing from secrets.template.yaml"
    for _, doc in _kuberay_objects():
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        auth = spec["authOptions"]["secretName"]
        assert "auth_token" in template[auth]["stringData"]
    readme = (DEPLOY / "README.md").read_text()
    for name, secret in template.items():
        assert f"kubectl create secret generic {name}" in readme
        for key, value in secret["stringData"].items():
            # Anything credential-like is a placeholder; a URL carries no password at all (it would reach
            # command lines, job metadata and the output folder): it has its own key.
            userinfo = re.match(r"^[a-z+]+://([^@/]*)@", value)
            assert not (userinfo and ":" in userinfo.group(1)), f"{name}/{key}: password in a URL"
            if any(w in key for w in ("token", "password", "secret")):
                assert value == "CHANGE_ME", f"{name}/{key}"


def _env_of_containers() -> Iterator[tuple[str, dict[str, Any]]]:
    for path, doc in _kuberay_objects():
        for node in _walk(doc):
            if isinstance(node, dict) and "image" in node and "name" in node:
                yield f"{path.name}:{node['name']}", {e["name"]: e for e in node.get("env", [])}


def test_the_storage_password_comes_from_a_secret_beside_the_url() -> None:
    """Every container given the Optuna storage URL gets its password as MFSWEEP_STORAGE_PASSWORD from the
    Secret (mfsweep hands it to the database driver, never into a URL)."""
    from orchestrator.credentials import PASSWORD_ENV

    seen = 0
    for where, env in _env_of_containers():
        if "OPTUNA_STORAGE" not in env:
            continue
        seen += 1
        ref = env.get(PASSWORD_ENV, {}).get("valueFrom", {}).get("secretKeyRef", {})
        assert (ref.get("name"), ref.get("key")) == ("mfsweep-services", "optuna-db-password"), where
    assert seen >= 3  # the RayCluster's head and both RayJobs' heads


def test_no_command_line_carries_a_password() -> None:
    """mfsweep and `ray job submit` command lines in the docs and manifests: no password in a URL or an
    argument (they show up in `ps`, the job's metadata and the dashboard)."""
    cmds = [*MFSWEEP_CMDS, *RAY_CMDS]
    assert any("--storage" in c.tokens for c in cmds)
    for cmd in cmds:
        for tok in cmd.tokens:
            assert not re.search(r"://[^/@\s:]*:[^/@\s]+@", tok), f"{cmd.source}: password in {tok}"
            assert not re.search(r"(?i)password=", tok), f"{cmd.source}: {tok}"


def test_volumes_and_images_are_consistent() -> None:
    pvcs = {d["metadata"]["name"] for _, d in _k8s_objects() if d["kind"] == "PersistentVolumeClaim"}
    readme = (DEPLOY / "README.md").read_text()
    images = set()
    for path, doc in _kuberay_objects():
        for node in _walk(doc):
            if isinstance(node, dict) and "persistentVolumeClaim" in node:
                assert node["persistentVolumeClaim"]["claimName"] in pvcs, path.name
            if isinstance(node, dict) and "configMap" in node and "name" in node.get("configMap", {}):
                cm = node["configMap"]["name"]
                made = re.search(rf"kubectl create configmap {cm} --from-file=(\S+)", readme)
                assert made, f"{cm}: the README does not say how to create it"
                assert (ROOT / made.group(1)).is_dir(), made.group(1)
        images |= {c["image"] for c in _containers(doc)}
    ray_up = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    images.add(ray_up["docker"]["image"])
    assert len(images) == 1 and images.pop().endswith(f"/mfsweep:{PROJECT_VERSION}")
    assert f'version = "{PROJECT_VERSION}"' in (ROOT / "pyproject.toml").read_text()


# --------------------------------------------------------------------------------------------- versions


def _pins() -> dict[str, str]:
    pins = {}
    for line in (DEPLOY / "docker" / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, ver = line.partition("==")
            assert ver, f"unpinned: {line}"
            pins[name.strip().lower()] = ver.strip()
    return pins


def test_image_pins_equal_the_tested_versions() -> None:
    pins = _pins()
    for pkg in ("torch", "ray", "optuna", "mlflow", "psycopg"):
        assert pkg in pins, f"{pkg} is not pinned"
        assert pins[pkg] == version(pkg).split("+")[0], f"{pkg}: image {pins[pkg]} != tested {version(pkg)}"
    ray_versions = {doc["spec"].get("rayClusterSpec", doc["spec"])["rayVersion"]
                    for _, doc in _kuberay_objects()}
    assert ray_versions == {pins["ray"]}


# --------------------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_cuda_pinned_nonroot() -> None:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    ins = dockerfile_instructions(text)
    args = {}
    for i in ins:
        if i.keyword == "ARG" and "=" in i.args:
            k, _, v = i.args.partition("=")
            args[k] = v
    stages: list[tuple[str, list[Any]]] = []
    for i in ins:
        if i.keyword == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], i.args.split()[0])
            stages.append((image, []))
        elif stages:
            stages[-1][1].append(i)
    assert [s.split(":")[0] for s, _ in stages] == ["python", "nvidia/cuda"]
    assert "AS services" in text and "AS runtime" in text
    for image, body in stages:
        assert ":" in image and not image.endswith(":latest"), image
        users = [i.args for i in body if i.keyword == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0"), f"{image}: runs as root"
    runtime = stages[-1][1]  # the default target (last stage) is the CUDA runtime image
    pip = " ".join(i.args for i in runtime if i.keyword == "RUN")
    for pkg in ("torch", "ray[default]", "optuna", "mlflow"):
        assert pkg in pip
    assert pip.count("-c /tmp/constraints.txt") >= 2  # dependencies and the project: both constrained


def test_dockerfile_copies_existing_files_that_the_dockerignore_admits() -> None:
    ins = dockerfile_instructions((DEPLOY / "docker" / "Dockerfile").read_text())
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text()
    allowed = [ln[1:].rstrip("/") for ln in ignore.splitlines() if ln.startswith("!")]
    assert ".env" not in " ".join(allowed) and ".venv" not in allowed
    sources = [src for i in ins if i.keyword == "COPY" and "--from" not in i.args
               for src in i.args.split()[:-1]]
    assert "pyproject.toml" in sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository (the build would fail)"
        assert any(src == a or src.startswith(a + "/") for a in allowed), f"COPY {src}: dockerignored"


# --------------------------------------------------------------------------------------------- compose


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


_SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY")


def test_compose_services_and_health() -> None:
    services = _compose()["services"]
    assert set(services) == {"postgres", "minio", "minio-init", "mlflow", "optuna-dashboard"}
    for name, svc in services.items():
        one_shot = svc.get("restart") == "no"
        if not one_shot:
            assert svc.get("healthcheck", {}).get("test"), f"{name}: no health check"
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}'s health, which has no check"
            else:
                assert cond["condition"] == "service_completed_successfully"
                assert services[dep]["restart"] == "no"
        image = svc.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned image {image}"
    mlflow = services["mlflow"]
    assert mlflow["command"][:2] == ["mlflow", "server"]
    assert any(a.startswith("--artifacts-destination=s3://") for a in mlflow["command"])
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://mlflow@postgres")
    assert mlflow["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert "mc mb" in services["minio-init"]["command"][0]  # the bucket is created at start
    assert services["optuna-dashboard"]["command"][1].startswith("postgresql+psycopg://optuna@postgres")
    build = mlflow["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    assert f"AS {build['target']}" in (DEPLOY / "docker" / "Dockerfile").read_text()
    init = services["postgres"]["volumes"][1].split(":")[0]
    script = DEPLOY / init
    assert script.is_file() and script.stat().st_mode & stat.S_IXUSR, f"{init} missing or not executable"


def test_compose_ports_are_loopback_only() -> None:
    ports = [(name, p) for name, svc in _compose()["services"].items() for p in svc.get("ports", [])]
    assert {n for n, _ in ports} == {"postgres", "minio", "mlflow", "optuna-dashboard"}
    for name, port in ports:
        host_ip = port["host_ip"] if isinstance(port, dict) else str(port).split(":")[0]
        assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond loopback"


def test_compose_takes_credentials_only_from_the_environment() -> None:
    text = "\n".join(s for s in _walk(_compose()) if isinstance(s, str))  # values, not comments
    example = dict(ln.split("=", 1) for ln in (DEPLOY / ".env.example").read_text().splitlines()
                   if ln and not ln.startswith("#"))
    used = set(re.findall(r"(?<!\$)\$\{(\w+)", text))
    assert used <= set(example), f"undocumented in .env.example: {used - set(example)}"
    secrets = {k for k in example if _SECRET_KEY.search(k)}
    assert secrets >= {"POSTGRES_PASSWORD", "MLFLOW_DB_PASSWORD", "OPTUNA_DB_PASSWORD", "MINIO_ROOT_PASSWORD",
                       "MLFLOW_S3_SECRET_KEY"}
    for key in secrets:
        assert example[key] == "" or key.endswith("ACCESS_KEY"), f".env.example ships a value for {key}"
    for name, svc in _compose()["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if _SECRET_KEY.search(key) or key == "PGPASSWORD":
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", str(value)), f"{name}.{key}: literal credential"
            assert not re.search(r"://[^/@\s]*:[^/@\s$]+@", str(value)), f"{name}.{key}: password in a URL"
    for var in re.findall(r"\$\{(\w+):\?", text):
        assert var in secrets or var.endswith("_USER") or var.endswith("ACCESS_KEY"), var
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()


# --------------------------------------------------------------------------------------------- ray up


def test_ray_up_config_matches_rays_schema_and_is_locked_down() -> None:
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))
    gpu = [t for t in config["available_node_types"].values()
           if t["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert gpu and all(t["max_workers"] > t["min_workers"] for t in gpu)
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    for rule in config["provider"]["security_group"]["IpPermissions"]:
        assert all(r["CidrIp"] != "0.0.0.0/0" for r in rule["IpRanges"])


# --------------------------------------------------------------------------------------------- command lines

MFSWEEP_CMDS = deploy_commands("mfsweep")
RAY_CMDS = deploy_commands("ray")


def test_command_lines_are_found() -> None:
    """The extraction below is not vacuous: the commands we know of are all there."""
    subs = {(Path(c.source).name, c.tokens[1]) for c in MFSWEEP_CMDS}
    assert {("README.md", "scaling"), ("README.md", "search"), ("README.md", "resume"),
            ("Dockerfile", "validate"), ("rayjob-scaling.yaml", "scaling"),
            ("rayjob-search.yaml", "search")} <= subs
    assert sum(1 for c in RAY_CMDS if c.tokens[1:3] == ("job", "submit")) >= 4


def _parse_mfsweep(tokens: tuple[str, ...]) -> Any:
    try:
        return build_parser().parse_args(list(tokens[1:]))
    except SystemExit as exit_:
        if exit_.code == 0 and "--help" in tokens:
            return None
        raise AssertionError(f"mfsweep rejects: {shlex.join(tokens)}") from None


def _repo_config(path: str) -> Path | None:
    """Where a config named in a deploy command lives in this repository (image and ConfigMap paths)."""
    for prefix in ("/opt/mfsweep/", "/"):
        if path.startswith(prefix + "configs/"):
            return ROOT / path[len(prefix):]
    return ROOT / path if path.startswith("configs/") else None


@pytest.mark.parametrize("cmd", MFSWEEP_CMDS, ids=lambda c: c.id)
def test_mfsweep_command_parses_and_its_config_loads(cmd: Command) -> None:
    args = _parse_mfsweep(cmd.tokens)
    if args is None or args.command == "resume" or getattr(args, "config", None) is None:
        return
    cfg_path = _repo_config(args.config)
    if cfg_path is None:  # a user's own config (README example shipped with --working-dir)
        assert "--working-dir" in (DEPLOY / "README.md").read_text()
        return
    if args.command == "search" and not cfg_path.exists() and not list(cfg_path.parent.glob("*.yaml")):
        pytest.skip(f"no search configs in {cfg_path.parent.relative_to(ROOT)} yet")
    assert cfg_path.is_file(), f"{cmd.source}: {args.config} -> {cfg_path} does not exist"
    direct = {k: v for k, v in (("execution.device", getattr(args, "device", None)),
                                ("execution.backend", getattr(args, "backend", None))) if v}
    if args.command == "search":
        from orchestrator.search_config import load_search

        load_search(cfg_path, args.overrides, **direct)
    else:
        from orchestrator.config import load

        load(cfg_path, args.overrides, **direct)


def test_a_renamed_flag_would_fail() -> None:
    cmd = next(c for c in MFSWEEP_CMDS if "--tracking-uri" in c.tokens)
    renamed = tuple("--tracking-url" if t == "--tracking-uri" else t for t in cmd.tokens)
    with pytest.raises(AssertionError, match="rejects"):
        _parse_mfsweep(renamed)


def _parse_ray(tokens: tuple[str, ...]) -> click.Context:
    from ray.scripts.scripts import cli

    cmd: click.Command = cli
    name, args, parent = "ray", list(tokens[1:]), None
    while True:
        ctx = cmd.make_context(name, args, parent=parent)
        if not isinstance(cmd, click.Group):
            return ctx
        rest = [*(ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args), *ctx.args]
        sub_name, sub, args = cmd.resolve_command(ctx, rest)
        assert sub is not None and sub_name is not None, f"unknown ray command: {shlex.join(tokens)}"
        cmd, name, parent = sub, sub_name, ctx


@pytest.mark.parametrize("cmd", RAY_CMDS, ids=lambda c: c.id)
def test_ray_command_parses(cmd: Command) -> None:
    try:
        ctx = _parse_ray(cmd.tokens)
    except click.ClickException as err:
        pytest.fail(f"{cmd.source}: ray rejects {shlex.join(cmd.tokens)}: {err.format_message()}")
    if cmd.tokens[1:3] == ("job", "submit"):
        entry = ctx.params["entrypoint"]
        assert entry[0] == "mfsweep" and any(c.tokens == entry for c in MFSWEEP_CMDS), entry
