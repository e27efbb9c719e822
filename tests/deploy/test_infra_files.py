"""infra/ and prefect.yaml on their own: manifests valid for Kubernetes, names consistent across
files, no secret and no public endpoint anywhere, the image and the pull step agreeing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import jsonschema
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
# The prefect-worker chart's values schema (origin and licence in data/README.md).
WORKER_VALUES_SCHEMA = Path(__file__).parent / "data" / "prefect-worker-values.schema.json"


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


def test_image_size_is_stated_once_and_fits_the_cache() -> None:
    """infra/README.md and k8s/imagecache.yaml give the same image size, no other figure for
    it, and the cache disk they name is the manifest's and holds the image."""
    readme = (INFRA / "README.md").read_text()
    manifest_text = (INFRA / "k8s" / "imagecache.yaml").read_text()
    sizes = {
        name: re.findall(r"more than (\d+) GB\s+unpacked", text)
        for name, text in (("README", readme), ("imagecache.yaml", manifest_text))
    }
    assert sizes["README"] and sizes["README"][:1] == sizes["imagecache.yaml"], sizes
    assert not re.search(r"~\s*\d+ GB|about \d+ GB", readme + manifest_text)
    (cache,) = manifests_of("ImageCache")
    stated = re.search(r"`imageCacheSize` in `k8s/imagecache.yaml` is (\d+) GiB", readme)
    assert stated and int(stated.group(1)) == cache["spec"]["imageCacheSize"]
    assert cache["spec"]["imageCacheSize"] * 2**30 > int(sizes["README"][0]) * 10**9


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
    # The chart turns jobNamespace into PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES.
    assert values["worker"]["config"]["jobNamespace"] == namespace_name

    gpu_pool = deployment_config("gpu")["work_pool"]["name"]
    assert values["worker"]["config"]["workPool"] == gpu_pool
    api = values["worker"]["selfHostedServerApiConfig"]["apiUrl"]
    assert api == variables["prefect_api_url"]["default"]
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


def worker_values_validator() -> jsonschema.Draft7Validator:
    """The chart's values schema (draft 7, what Helm reads), itself checked as a schema."""
    schema = json.loads(WORKER_VALUES_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_worker_values_fit_the_charts_values_schema() -> None:
    """What `helm install` checks first: every key known to the chart, every value allowed."""
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in worker_values_validator().iter_errors(worker_values())
    ]
    assert errors == []
    assert worker_values()["worker"]["apiConfig"] == "selfHostedServer"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"apiConfig": "server"}, "'server' is not one of"),
        ({"serverApiConfig": {"apiUrl": "http://x/api"}}, "'serverApiConfig' was unexpected"),
        ({"config": {"workPool": "p", "observerNamespaces": "x"}}, "was unexpected"),
    ],
    ids=["old-api-config", "old-server-key", "unknown-config-key"],
)
def test_worker_values_schema_refuses_the_old_chart_keys(
    change: dict[str, Any], message: str
) -> None:
    """The schema check can fail: the keys of older chart versions are refused."""
    values = worker_values()
    values["worker"].update(change)
    messages = [e.message for e in worker_values_validator().iter_errors(values)]
    assert any(message in m for m in messages), messages


def test_worker_values_leave_the_charts_own_variables_alone() -> None:
    """The chart sets the API URL, the observer's namespaces and the cluster id itself; an
    extraEnvVars entry of the same name would give the worker's container that variable twice."""
    chart_sets = {
        "HOME",
        "PREFECT_API_URL",
        "PREFECT_API_KEY",
        "PREFECT_API_AUTH_STRING",
        "PREFECT_DEBUG_MODE",
        "PREFECT_KUBERNETES_CLUSTER_UID",
        "PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES",
    }
    extra = {e["name"] for e in worker_values()["worker"].get("extraEnvVars", [])}
    assert extra & chart_sets == set()


def dockerfile_instructions() -> list[tuple[str, str]]:
    """infra/Dockerfile as (INSTRUCTION, arguments) pairs, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", (INFRA / "Dockerfile").read_text())
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), " ".join(rest.split())))
    return found


def pod_security_context() -> dict[str, Any]:
    template = load_pool_template()["job_configuration"]["job_manifest"]["spec"]["template"]
    return dict(template["spec"]["securityContext"])


def test_dockerfile_bakes_weights_and_puts_the_code_where_the_pull_step_looks() -> None:
    """RAPIDS base, TensorFlow's CUDA build, weights in the Keras cache, code at
    IMAGE_SEARCH_HOME."""
    dockerfile = (INFRA / "Dockerfile").read_text()
    base = re.search(r"^ARG RAPIDS_IMAGE=(\S+)$", dockerfile, re.MULTILINE)
    assert base and re.fullmatch(
        r"nvcr\.io/nvidia/rapidsai/base:\d\d\.\d\d-cuda12(\.\d)?-py3\.1[0-3]", base.group(1)
    )
    assert "tensorflow[and-cuda]" in dockerfile
    assert "ResNet50(include_top=False, weights='imagenet')" in dockerfile
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in dockerfile
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


def test_runtime_user_can_run_the_rapids_python() -> None:
    """RAPIDS images keep /opt/conda root:conda, mode 770: the user the pod runs as must have
    group `conda` as its primary group (the pod sets no runAsGroup, so the image's passwd entry
    decides), and the image's last USER and the pod's runAsUser must be that user."""
    steps = dockerfile_instructions()
    (useradd,) = [args for word, args in steps if word == "RUN" and "useradd" in args]
    uid = re.search(r"--uid (\d+)", useradd)
    assert uid and re.search(r"--gid conda\b", useradd), useradd
    users = [args for word, args in steps if word == "USER"]
    assert users[-1] == uid.group(1), "the last USER must be the uid alone, group from passwd"
    security = pod_security_context()
    assert security["runAsUser"] == int(uid.group(1)) and security["runAsNonRoot"] is True
    assert "runAsGroup" not in security, "runAsGroup would replace the primary group conda"


def test_image_checks_itself_as_the_runtime_user() -> None:
    """The build ends with checks run as the pod's user, so an image the pod cannot start fails
    the build: its group, the project, TensorFlow, Prefect, cuDF/cuML without a GPU, the weights
    and the entrypoint the worker's arguments go through."""
    steps = dockerfile_instructions()
    last_user = max(i for i, (word, _) in enumerate(steps) if word == "USER")
    after = [args for word, args in steps[last_user + 1 :] if word == "RUN"]
    assert after, "no RUN after the last USER: every check ran as root"
    checks = " && ".join(after).replace('"', "")
    (entrypoint,) = [json.loads(args) for word, args in steps if word == "ENTRYPOINT"]
    for expected in (
        "test $(id -u):$(id -gn) = 10001:conda",
        "python -c import tasks, flows, flows.image_search, tensorflow",
        "prefect version",
        "RAPIDS_NO_INITIALIZE=1 python -c import cudf, cuml",
        "test -r ${KERAS_HOME}/models/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        f"{entrypoint[0]} python -c",
    ):
        assert expected in checks, expected


def test_pure_functions_log_to_the_run_in_every_deployment() -> None:
    """PREFECT_LOGGING_EXTRA_LOGGERS=tasks in the image and in both deployments' environments."""
    env = " ".join(args for word, args in dockerfile_instructions() if word == "ENV")
    assert "PREFECT_LOGGING_EXTRA_LOGGERS=tasks" in env.split()
    for name in ("gpu", "local"):
        job_env = deployment_config(name)["work_pool"]["job_variables"]["env"]
        assert job_env["PREFECT_LOGGING_EXTRA_LOGGERS"] == "tasks", name


@pytest.mark.slow
def test_extra_loggers_setting_sends_module_loggers_to_the_api() -> None:
    """What the deployments' value does in a fresh process: a module logger under `tasks.`
    reaches Prefect's API log handler, a logger outside the package does not."""
    probe = (
        "import logging, sys; from prefect.logging.configuration import setup_logging\n"
        "setup_logging()\n"
        "for name in sys.argv[1:]:\n"
        "    lg, found = logging.getLogger(name), set()\n"
        "    while lg: found |= {type(h).__name__ for h in lg.handlers}; lg = lg.parent\n"
        "    print(name, 'APILogHandler' in found)\n"
    )
    value = deployment_config("gpu")["work_pool"]["job_variables"]["env"]
    env = {**os.environ, "PREFECT_LOGGING_EXTRA_LOGGERS": value["PREFECT_LOGGING_EXTRA_LOGGERS"]}
    done = subprocess.run(
        [sys.executable, "-c", probe, "tasks.sources.fetch", "elsewhere.module"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.split("\n")[:2] == ["tasks.sources.fetch True", "elsewhere.module False"]


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
    assert len(re.findall(r"\*entrypoint\b", raw)) == 4
    assert deployment_config("photos")["schedules"] == [definitions["schedules"]["hourly"]]


def test_deployment_parameters_are_valid_search_params() -> None:
    """Both deployments' defaults pass the flow's own parameter model; local is the quick one."""
    gpu = SearchParams(**deployment_config("gpu")["parameters"])
    local = SearchParams(**deployment_config("local")["parameters"])
    assert gpu.weights == "imagenet" and gpu.limit is None and "cuml" in (gpu.backends or [])
    assert gpu.out.startswith("/shared/")
    assert (local.source, local.weights) == ("sample", "none")
    assert local.limit is not None and local.limit <= 500
    photos = SearchParams(**deployment_config("photos")["parameters"])
    assert photos.source.startswith("/shared/") and photos.out.startswith("/shared/")
    assert photos.input_size == 224 and photos.weights == "imagenet"


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
        ({"registry": "", "build": "true"}, "IMAGE_SEARCH_REGISTRY is not set"),
        ({"registry": None, "build": ""}, "IMAGE_SEARCH_REGISTRY is not set"),
        ({"registry": "  / ", "build": None}, "IMAGE_SEARCH_REGISTRY is not set"),
        ({"registry": "reg.io", "build": "1", "tag": "  "}, "the image tag is empty"),
    ],
    ids=["build-without-registry", "no-registry", "blank-registry", "no-commit"],
)
def test_build_step_refuses_what_cannot_work(
    fake_docker: FakeDocker, kwargs: dict[str, Any], message: str
) -> None:
    """No registry (building or not: a bare name is unpullable), or no commit: the deploy exits 1
    with one line that says what to set, and nothing is built."""
    kwargs = {"repository": "image-search", "tag": "abc123", **kwargs}
    with pytest.raises(SystemExit) as stopped:
        deploy_steps.build_image(**kwargs)
    text = str(stopped.value.code)
    assert text.startswith("prefect deploy: error: ") and message in text
    assert "\n" not in text
    if "REGISTRY" in message:
        assert "export IMAGE_SEARCH_REGISTRY=" in text and "--name local" in text
    assert fake_docker.calls == []


def test_build_step_says_how_to_get_prefect_docker(monkeypatch: pytest.MonkeyPatch) -> None:
    """Asked to build without prefect-docker installed: the error names the package."""
    monkeypatch.setitem(sys.modules, "prefect_docker", None)
    with pytest.raises(SystemExit, match="pip install prefect-docker"):
        deploy_steps.build_image("image-search", "abc123", registry="reg.io", build="yes")
