"""Every manifest under infra/ validates: core kinds against Kubernetes' schemas (kubernetes-validate), RayCluster
and RayJob against KubeRay's own CRD schemas. Overlays are rendered as kustomize would (resources, generated
secrets, images, JSON patches, namespace) and then checked for what an infrastructure team requires: resource
requests and limits, probes, non-root security contexts and no secret values in any file."""

from __future__ import annotations

import copy
import functools
import re
import tomllib
from pathlib import Path

import jsonpatch
import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
CRDS = ROOT / "tests" / "schemas" / "kuberay"  # KubeRay CRDs, vendored (see its README)
K8S_VERSION = "1.30"
RAY_KINDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
CLUSTER_SCOPED = {"Namespace"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|_KEY$|BACKEND_STORE_URI", re.I)


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def render(folder: Path) -> list[dict]:
    """The manifests ``kubectl apply -k folder`` would apply (generated secrets from the example env file)."""
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for res in k.get("resources", []):
        path = folder / res
        docs += render(path) if path.is_dir() else _docs(path)
    for gen in k.get("secretGenerator", []):
        keys = [
            line.split("=", 1)[0]
            for line in (INFRA / "secrets.example.env").read_text().splitlines()
            if line and not line.startswith("#")
        ]
        meta = {"name": gen["name"]}
        docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": meta, "stringData": dict.fromkeys(keys, "x")})
    for p in k.get("patches", []):
        target = p["target"]
        matches = [d for d in docs if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]]
        assert len(matches) == 1, f"{folder}: patch target {target} matches {len(matches)} resources"
        patched = jsonpatch.apply_patch(matches[0], yaml.safe_load(p["patch"]))
        docs[docs.index(matches[0])] = patched
    images = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in k.get("images", [])}
    for d in docs:
        for c in containers(d):
            name = c["image"].split(":")[0]
            c["image"] = images.get(name, c["image"])
        if k.get("namespace") and d["kind"] not in CLUSTER_SCOPED:
            d["metadata"]["namespace"] = k["namespace"]
    return docs


def pod_specs(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    if doc["kind"] in ("Deployment", "StatefulSet"):
        return [spec["template"]["spec"]]
    if doc["kind"] == "RayCluster":
        return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    if doc["kind"] == "RayJob":
        return [spec["submitterPodTemplate"]["spec"]]
    return []


def containers(doc: dict) -> list[dict]:
    return [c for pod in pod_specs(doc) for c in pod.get("containers", [])]


@functools.cache
def _crd_schema(kind: str, version: str) -> dict:
    """A KubeRay CRD's schema, parsed once and with libyaml where PyYAML has it (2.3 MB of YAML: seconds each time
    in pure Python)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((CRDS / RAY_KINDS[kind]).read_text(), Loader=loader)
    return next(v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version)


def validate(doc: dict) -> None:
    """Raise with a readable message (kind/name, field path, reason) if ``doc`` is not a valid resource."""
    where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    if doc.get("kind") in RAY_KINDS:
        version = doc["apiVersion"].split("/")[1]
        validator = jsonschema.Draft7Validator(_crd_schema(doc["kind"], version))
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        if errors:
            e = errors[0]
            path = ".".join(str(p) for p in e.absolute_path) or "(root)"
            raise ValueError(f"{where}: {path}: {e.message}")
        return
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path) or "(root)"
        raise ValueError(f"{where}: {path}: {exc.message}") from None


ALL_FILES = sorted(p for p in INFRA.rglob("*.yaml") if p.name != "kustomization.yaml")
OVERLAYS = sorted(p.parent for p in (INFRA / "overlays").glob("*/kustomization.yaml"))


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_every_manifest_file_validates(path):
    for doc in _docs(path):
        validate(doc)
        assert doc["kind"] != "Secret", f"{path}: secrets are generated from a git-ignored env file, never committed"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_rendered_overlay_validates_and_meets_the_rules(overlay):
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ConfigMap", "RayCluster", "Deployment", "Service", "Secret"} <= kinds
    for doc in docs:
        validate(doc)
        for pod in pod_specs(doc):
            ctx = pod.get("securityContext", {})
            assert ctx.get("runAsNonRoot") is True and ctx.get("runAsUser", 0) > 0, doc["metadata"]["name"]
        for c in containers(doc):
            name = f"{doc['metadata']['name']}/{c['name']}"
            res = c.get("resources", {})
            assert res.get("requests") and res.get("limits"), f"{name}: resource requests and limits"
            assert c.get("securityContext", {}).get("allowPrivilegeEscalation") is False, name
            if doc["kind"] != "RayJob":  # long-running containers
                assert c.get("readinessProbe") and c.get("livenessProbe"), f"{name}: probes"
            for env in c.get("env", []):
                if SECRET_NAME.search(env["name"]):
                    assert "valueFrom" in env, f"{name}: {env['name']} must come from a Secret"
    ray = next(d for d in docs if d["kind"] == "RayCluster")
    gpu, cpu = ray["spec"]["workerGroupSpecs"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["minReplicas"] <= gpu["maxReplicas"] and cpu["minReplicas"] <= cpu["maxReplicas"]
    assert ray["spec"]["enableInTreeAutoscaling"] is True
    assert not any(c["image"].startswith("tessera:") for d in docs for c in containers(d))  # images resolved


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_every_pod_finds_the_ray_head_and_reads_settings_tessera_knows(overlay):
    """A job's `tessera train` runs in a pod: with Tessera's local-stack defaults it would call ray.init on
    127.0.0.1:6380, where no pod listens. The ConfigMap points it at the RayCluster's head Service (KubeRay's
    name for it, <cluster>-head-svc) on the GCS port the head exposes, and names no setting Tessera ignores."""
    from cluster.settings import Settings

    docs = render(overlay)
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "tessera-config")["data"]
    ray = next(d for d in docs if d["kind"] == "RayCluster")
    head = ray["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    settings = Settings(
        **{k.removeprefix("TESSERA_").lower(): v for k, v in config.items() if k.startswith("TESSERA_")}
    )
    assert settings.ray_gcs_address == f"{ray['metadata']['name']}-head-svc:{ports['gcs']}"
    assert settings.ray_dashboard_url == f"http://{ray['metadata']['name']}-head-svc:{ports['dashboard']}"
    unknown = {
        k
        for k in config
        if k.startswith("TESSERA_") and k.removeprefix("TESSERA_").lower() not in Settings.model_fields
    }
    assert unknown == set()


def test_dev_and_prod_differ_where_they_should():
    dev, prod = render(INFRA / "overlays" / "dev"), render(INFRA / "overlays" / "prod")

    def gpu_max(docs):
        return next(d for d in docs if d["kind"] == "RayCluster")["spec"]["workerGroupSpecs"][0]["maxReplicas"]

    assert gpu_max(dev) < gpu_max(prod)
    assert any(d["metadata"]["name"] == "tessera-minio" for d in dev)
    assert not any(d["metadata"]["name"] == "tessera-minio" for d in prod)


def test_broken_manifests_fail_with_a_readable_message():
    ray = copy.deepcopy(next(d for d in _docs(INFRA / "base" / "raycluster.yaml")))
    ray["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "many"
    with pytest.raises(ValueError, match=r"RayCluster/tessera: spec\.workerGroupSpecs\.0\.maxReplicas: 'many' is not"):
        validate(ray)
    mlflow = copy.deepcopy(next(d for d in _docs(INFRA / "base" / "mlflow.yaml") if d["kind"] == "Deployment"))
    mlflow["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    with pytest.raises(ValueError, match=r"Deployment/tessera-mlflow: spec\.template\.spec\.containers\.0\.ports"):
        validate(mlflow)
    mlflow["spec"]["replicas"] = 1
    mlflow["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = 5000
    mlflow["spec"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    with pytest.raises(ValueError, match="resourcez"):
        validate(mlflow)


def _exact_pins(path: Path) -> dict[str, str]:
    """``name == version`` lines of a pip requirements or constraints file, by canonical name; every line must
    pin one exact version."""
    pins = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{path.name}: {line} is not an exact version"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def test_runtime_image_pins_every_dependency_within_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = _exact_pins(INFRA / "docker" / "requirements.txt")
    for dep in deps:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in infra/docker/requirements.txt"
        assert req.specifier.contains(pins[name]), f"{req.name}=={pins[name]} vs {dep}"
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    assert f"torch=={pins['torch']}" in dockerfile and f"torchvision=={pins['torchvision']}" in dockerfile


def test_the_image_and_the_test_environment_pin_the_same_versions():
    """``make`` installs with constraints.txt, the image from its requirements.txt: one version of each package."""
    locked = _exact_pins(ROOT / "constraints.txt")
    for name, version in _exact_pins(INFRA / "docker" / "requirements.txt").items():
        assert name in locked, f"{name} is in the image but not in constraints.txt"
        assert locked[name] == version, f"image {name}=={version} vs constraints.txt {name}=={locked[name]}"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    for dep in deps:
        req = Requirement(dep)
        assert canonicalize_name(req.name) in locked, f"dev dependency {req.name} is not in constraints.txt"
