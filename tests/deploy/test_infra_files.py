"""infra/ and prefect.yaml on their own: manifests valid for Kubernetes, names consistent across
files, no secret and no public endpoint anywhere, the image and the pull step agreeing."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from flows.params import SearchParams
from infra import deploy_steps
from tests.deploy.helpers import (
    INFRA,
    PREFECT_YAML,
    REPO,
    deployment_config,
    load_manifests,
    load_pool_template,
    load_prefect_yaml,
)

K8S_VERSION = kubernetes_validate.latest_version()
CRD_KINDS = {"ImageCache"}


def manifests_of(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in load_manifests() if doc["kind"] == kind]


def worker_values() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "k8s" / "worker-values.yaml").read_text())


def test_every_kind_of_the_setup_is_there() -> None:
    """Namespace, worker identity, shared storage and the ECI image cache."""
    kinds = sorted(doc["kind"] for _, doc in load_manifests())
    assert kinds == sorted(
        [
            "ImageCache",
            "Namespace",
            "PersistentVolumeClaim",
            "Role",
            "RoleBinding",
            "ServiceAccount",
        ]
    )


@pytest.mark.parametrize(
    ("path", "doc"),
    [(p, d) for p, d in load_manifests() if d["kind"] not in CRD_KINDS],
    ids=lambda v: v.name if isinstance(v, Path) else v["kind"],
)
def test_manifest_is_valid_kubernetes(path: Path, doc: dict[str, Any]) -> None:
    """Strict validation: no unknown field, every required one present."""
    assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_imagecache_is_a_crd_validated_as_far_as_possible() -> None:
    """ImageCache (eci.alibabacloud.com/v1) is a custom resource: kubernetes-validate has no
    schema for it. Its metadata is checked as an ObjectMeta, its spec against the fields the ECI
    ImageCache API documents."""
    (cache,) = manifests_of("ImageCache")
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(cache, K8S_VERSION, strict=True)
    assert cache["apiVersion"] == "eci.alibabacloud.com/v1"
    as_meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": cache["metadata"]}
    assert kubernetes_validate.validate(as_meta, K8S_VERSION, strict=True)
    spec = cache["spec"]
    assert set(spec) <= {"images", "imagePullSecrets", "imageCacheSize", "retentionDays"}
    assert spec["images"] and all(isinstance(i, str) and ":" in i for i in spec["images"])
    assert all(re.fullmatch(r"[a-z0-9-]+:[a-z0-9.-]+", s) for s in spec.get("imagePullSecrets", []))
    assert 20 <= spec.get("imageCacheSize", 20) <= 32768
    assert 1 <= spec.get("retentionDays", 1) <= 65536


def test_names_agree_across_files() -> None:
    """Namespace, service account, pool name, API URL and volume claim match everywhere."""
    template = load_pool_template()
    variables = template["variables"]["properties"]
    (namespace,) = manifests_of("Namespace")
    namespace_name = namespace["metadata"]["name"]
    assert variables["namespace"]["default"] == namespace_name
    for _, doc in load_manifests():
        if doc["kind"] not in {"Namespace", "ImageCache"}:
            assert doc["metadata"]["namespace"] == namespace_name, doc["kind"]

    values = worker_values()
    (account,) = manifests_of("ServiceAccount")
    (binding,) = manifests_of("RoleBinding")
    (role,) = manifests_of("Role")
    assert values["serviceAccount"] == {"create": False, "name": account["metadata"]["name"]}
    assert values["role"]["create"] is False and values["rolebinding"]["create"] is False
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": namespace_name}
    ]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    observer = {e["name"]: e["value"] for e in values["worker"]["extraEnvVars"]}
    assert observer["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"] == namespace_name

    gpu_pool = deployment_config("gpu")["work_pool"]["name"]
    assert values["worker"]["config"]["workPool"] == gpu_pool
    assert values["worker"]["serverApiConfig"]["apiUrl"] == variables["prefect_api_url"]["default"]
    (claim,) = manifests_of("PersistentVolumeClaim")
    assert variables["pvc_name"]["default"] == claim["metadata"]["name"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    (cache,) = manifests_of("ImageCache")
    pull_secrets = [s["name"] for s in variables["image_pull_secrets"]["default"]]
    assert cache["spec"]["imagePullSecrets"] == [f"{namespace_name}:{n}" for n in pull_secrets]
    assert "create kubernetes-gpu --type kubernetes" in (INFRA / "create-work-pools.sh").read_text()


def test_worker_role_allows_what_the_worker_does() -> None:
    """Create and watch Jobs, read their pods and logs; nothing cluster-wide."""
    (role,) = manifests_of("Role")
    allowed = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    for verb in ("create", "get", "list", "watch", "delete"):
        assert ("batch", "jobs", verb) in allowed
    for resource in ("pods", "pods/log"):
        for verb in ("get", "list", "watch"):
            assert ("", resource, verb) in allowed
    assert not manifests_of("ClusterRole")


def committed_config_text() -> dict[str, str]:
    """Every configuration file of the deployment, by name."""
    files = [*INFRA.rglob("*"), PREFECT_YAML]
    return {
        str(p.relative_to(REPO)): p.read_text()
        for p in files
        if p.is_file()
        and p.suffix in {".yaml", ".yml", ".json", ".sh", ".md", ""}
        and "__pycache__" not in p.parts
    }


def test_no_public_endpoint_and_no_credential_in_any_file() -> None:
    """No LoadBalancer Service; secrets only referenced by name, never written down."""
    secret_value = re.compile(
        r"(password|passwd|token|api[_-]?key|secret[_-]?key|auth[_-]?string)\s*[:=]\s*['\"]?"
        r"(?!\$|\{\{|<|\s*$)[A-Za-z0-9+/_\-]{8,}",
        re.IGNORECASE,
    )
    for name, text in committed_config_text().items():
        assert "LoadBalancer" not in text or name.endswith(".md"), name
        assert not re.search(r"type:\s*LoadBalancer", text), name
        assert not secret_value.search(text), (name, secret_value.search(text))
        assert not re.search(r"pnu_[A-Za-z0-9]{10,}", text), name


def test_dockerfile_bakes_weights_and_runs_as_the_pods_user() -> None:
    """RAPIDS base, TensorFlow's CUDA build, weights in the Keras cache, a non-root user whose
    id the pod's securityContext expects, and the code where the pull step looks."""
    dockerfile = (INFRA / "Dockerfile").read_text()
    base = re.search(r"^ARG RAPIDS_IMAGE=(\S+)$", dockerfile, re.MULTILINE)
    assert base and re.fullmatch(
        r"nvcr\.io/nvidia/rapidsai/base:\d\d\.\d\d-cuda12(\.\d)?-py3\.1[0-3]", base.group(1)
    )
    assert "tensorflow[and-cuda]" in dockerfile
    assert "ResNet50(include_top=False, weights='imagenet')" in dockerfile
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in dockerfile
    user = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)[-1]
    uid = int(user.split(":")[0])
    security = load_pool_template()["job_configuration"]["job_manifest"]["spec"]["template"][
        "spec"
    ]["securityContext"]
    assert uid != 0 and security["runAsUser"] == uid
    home = re.search(r"IMAGE_SEARCH_HOME=(\S+)", dockerfile)
    assert home and "WORKDIR ${IMAGE_SEARCH_HOME}" in dockerfile
    pull = load_prefect_yaml()["pull"]
    assert pull == [
        {
            "prefect.deployments.steps.set_working_directory": {
                "directory": "{{ $IMAGE_SEARCH_HOME }}"
            }
        }
    ]


def test_dockerignore_sends_only_the_package() -> None:
    """The build context is the project, never .venv or outputs."""
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*")] == "*"
    assert {"!pyproject.toml", "!flows/", "!tasks/"} <= set(ignore)


def test_prefect_yaml_shares_pieces_through_definitions() -> None:
    """Pools, schedule and build actions defined once in `definitions:` and referenced."""
    raw = PREFECT_YAML.read_text()
    config = load_prefect_yaml()
    definitions = config["definitions"]
    assert deployment_config("gpu")["work_pool"] == definitions["work_pools"]["kubernetes_gpu"]
    assert deployment_config("local")["work_pool"] == definitions["work_pools"]["local_process"]
    assert deployment_config("gpu")["build"] == definitions["actions"]["build_image"]
    assert deployment_config("local")["build"] == definitions["actions"]["checkout_path"]
    assert len(re.findall(r"\*entrypoint\b", raw)) == 2


def test_deployment_parameters_are_valid_search_params() -> None:
    """Both deployments' defaults pass the flow's own parameter model; local is the quick one."""
    gpu = SearchParams(**deployment_config("gpu")["parameters"]["params"])
    local = SearchParams(**deployment_config("local")["parameters"]["params"])
    assert gpu.weights == "imagenet" and gpu.limit is None and "cuml" in (gpu.backends or [])
    assert gpu.out.startswith("/shared/")
    assert (local.source, local.weights) == ("sample", "none")
    assert local.limit is not None and local.limit <= 500


class FakeDocker:
    """prefect_docker.deployments.steps as a recorder."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def build_docker_image(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(("build", kwargs))
        name, tag = kwargs["image_name"], kwargs["tag"]
        return {"image_name": name, "tag": tag, "image": f"{name}:{tag}", "image_id": "sha256:0"}

    def push_docker_image(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(("push", kwargs))
        return {"image_name": kwargs["image_name"], "tag": kwargs["tag"]}


@pytest.fixture
def fake_docker(monkeypatch: pytest.MonkeyPatch) -> FakeDocker:
    """Install a fake prefect_docker so the build branch runs without Docker."""
    fake = FakeDocker()
    steps = types.ModuleType("prefect_docker.deployments.steps")
    steps.build_docker_image = fake.build_docker_image  # type: ignore[attr-defined]
    steps.push_docker_image = fake.push_docker_image  # type: ignore[attr-defined]
    for name, module in {
        "prefect_docker": types.ModuleType("prefect_docker"),
        "prefect_docker.deployments": types.ModuleType("prefect_docker.deployments"),
        "prefect_docker.deployments.steps": steps,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    return fake


def test_build_step_without_the_flag_only_names_the_image(fake_docker: FakeDocker) -> None:
    """No IMAGE_SEARCH_BUILD_IMAGE: no Docker call; the image of this commit is named."""
    built = deploy_steps.build_image("image-search", "abc123\n", registry="reg.io/team/", build="")
    assert built == {
        "image_name": "reg.io/team/image-search",
        "tag": "abc123",
        "image": "reg.io/team/image-search:abc123",
        "built": False,
    }
    pushed = deploy_steps.push_image(built["image_name"], built["tag"], built=built["built"])
    assert pushed["pushed"] is False
    assert fake_docker.calls == []


def test_build_step_with_the_flag_builds_and_pushes(fake_docker: FakeDocker) -> None:
    """IMAGE_SEARCH_BUILD_IMAGE=1: prefect-docker builds infra/Dockerfile and pushes the tag."""
    built = deploy_steps.build_image("image-search", "abc123", registry="reg.io/team", build="1")
    deploy_steps.push_image(built["image_name"], built["tag"], built=built["built"])
    assert [call[0] for call in fake_docker.calls] == ["build", "push"]
    assert fake_docker.calls[0][1] == {
        "image_name": "reg.io/team/image-search",
        "tag": "abc123",
        "dockerfile": "infra/Dockerfile",
        "platform": "linux/amd64",
    }
    assert fake_docker.calls[1][1] == {"image_name": "reg.io/team/image-search", "tag": "abc123"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"registry": "", "build": "true"}, "IMAGE_SEARCH_REGISTRY is empty"),
        ({"registry": "reg.io", "build": "1", "tag": "  "}, "tag is empty"),
    ],
)
def test_build_step_refuses_what_cannot_work(
    fake_docker: FakeDocker, kwargs: dict[str, Any], message: str
) -> None:
    """Building without a registry, or without a commit, stops the deploy with the fix."""
    kwargs = {"repository": "image-search", "tag": "abc123", **kwargs}
    with pytest.raises(ValueError, match=message):
        deploy_steps.build_image(**kwargs)
    assert fake_docker.calls == []


def test_build_step_says_how_to_get_prefect_docker(monkeypatch: pytest.MonkeyPatch) -> None:
    """Asked to build without prefect-docker installed: the error names the package."""
    monkeypatch.setitem(sys.modules, "prefect_docker", None)
    with pytest.raises(RuntimeError, match="pip install prefect-docker"):
        deploy_steps.build_image("image-search", "abc123", registry="reg.io", build="yes")
