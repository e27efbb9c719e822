"""The Job the Kubernetes worker submits for the `gpu` deployment, rendered by prefect-kubernetes'
own ``KubernetesWorkerJobConfiguration`` from infra/work-pool-kubernetes.json and the job
variables of prefect.yaml, then validated against the Kubernetes OpenAPI schema."""

from __future__ import annotations

import asyncio
import copy
import os
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from prefect.client.schemas.objects import FlowRun
from prefect.server.api.validation import _get_base_config_defaults
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.schema_tools import ValidationError, validate
from prefect.utilities.templating import apply_values
from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

from infra.pod import job_defaults
from tests.deploy.helpers import REPO, deployment_config, load_manifests, load_pool_template

K8S_VERSION = kubernetes_validate.latest_version()
LOOPBACK_API = "http://127.0.0.1:4200/api"
CLUSTER_API = "http://prefect-server.prefect.svc.cluster.local:4200/api"
IMAGE = "registry.example.com/image-search:0123456789ab"
ECI_TYPE = "k8s.aliyun.com/eci-use-specs"
ECI_SNAPSHOT = "k8s.aliyun.com/eci-image-snapshot-id"
ECI_IMC_ID = "k8s.aliyun.com/eci-imc-id"
ECI_AUTO_IMC = "k8s.aliyun.com/eci-auto-imc"


class NoApi:
    """Stands in for the Prefect client: rendering this template must not look anything up."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the template needed the Prefect API ({name}); it should not")


def gpu_job_variables() -> dict[str, Any]:
    """The gpu deployment's job variables, its build step's image filled in as deploy does."""
    variables = deployment_config("gpu")["work_pool"]["job_variables"]
    return apply_values(variables, {"build-image": {"image": IMAGE}})


def render(
    values: dict[str, Any], template: dict[str, Any] | None = None
) -> KubernetesWorkerJobConfiguration:
    """What the worker does for a flow run: template + values, then ``prepare_for_flow_run``.

    The worker's own PREFECT_API_URL is a loopback address, as on a laptop or a port-forward.
    """
    template = copy.deepcopy(template or load_pool_template())
    flow_run = FlowRun(id=uuid.uuid4(), name="quiet-lemur", flow_id=uuid.uuid4())

    async def build() -> KubernetesWorkerJobConfiguration:
        return await KubernetesWorkerJobConfiguration.from_template_and_values(
            base_job_template=template, values=values, client=NoApi()
        )

    with temporary_settings({PREFECT_API_URL: LOOPBACK_API}):
        configuration = asyncio.run(build())
        configuration.prepare_for_flow_run(flow_run)
    return configuration


def pod_spec(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]


def container(job: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec(job)["containers"]
    assert len(containers) == 1
    return containers[0]


def pod_annotations(job: dict[str, Any]) -> dict[str, str]:
    return dict(job["spec"]["template"]["metadata"]["annotations"])


def env_of(job: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item.get("value", "") for item in container(job)["env"]}


@pytest.fixture(scope="module")
def gpu_job() -> dict[str, Any]:
    """The Job for a run of the gpu deployment with its default job variables."""
    return render(gpu_job_variables()).job_manifest


def test_template_keeps_every_variable_of_prefects_default() -> None:
    """Derived from the default template: nothing the worker offers was dropped."""
    ours = load_pool_template()["variables"]["properties"]
    default = KubernetesWorker.get_default_base_job_template()["variables"]["properties"]
    assert set(default) <= set(ours), sorted(set(default) - set(ours))


def test_gpu_job_lands_on_the_virtual_kubelet_node(gpu_job: dict[str, Any]) -> None:
    """nodeSelector type=virtual-kubelet and a toleration of the virtual-kubelet taint."""
    spec = pod_spec(gpu_job)
    assert spec["nodeSelector"] == {"type": "virtual-kubelet"}
    assert {"key": "virtual-kubelet.io/provider", "operator": "Exists"} in spec["tolerations"]


def test_gpu_job_asks_for_one_gpu_and_its_resources(gpu_job: dict[str, Any]) -> None:
    """One nvidia.com/gpu as a limit; CPU and memory requests from prefect.yaml."""
    resources = container(gpu_job)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"] == {"cpu": "3", "memory": "12Gi"}


def test_eci_annotations_are_on_the_pod(gpu_job: dict[str, Any]) -> None:
    """ECI reads annotations of the pod, so they must be on the pod template, not only the Job:
    the instance type, and automatic image-cache matching (ECI's current annotation)."""
    pod_annotations = gpu_job["spec"]["template"]["metadata"]["annotations"]
    assert pod_annotations == {ECI_TYPE: "ecs.gn6i-c4g1.xlarge", ECI_AUTO_IMC: "true"}
    # No cache pinned: eci-imc-id and the legacy snapshot id are left out, not sent empty.
    assert ECI_TYPE not in gpu_job["metadata"]["annotations"]


def test_job_reaches_the_api_not_the_workers_loopback(gpu_job: dict[str, Any]) -> None:
    """PREFECT_API_URL in the pod is the cluster address, though the worker's is 127.0.0.1."""
    env = env_of(gpu_job)
    assert env["PREFECT_API_URL"] == CLUSTER_API
    assert env["IMAGE_SEARCH_DATA"] == "/shared/cache"


def test_without_the_api_variable_the_loopback_url_leaks() -> None:
    """Why the template sets PREFECT_API_URL: Prefect's default template copies the worker's."""
    default = KubernetesWorker.get_default_base_job_template()
    job = render({"image": IMAGE}, template=default).job_manifest
    assert env_of(job)["PREFECT_API_URL"] == LOOPBACK_API


def test_job_mounts_the_shared_volume_and_expires(gpu_job: dict[str, Any]) -> None:
    """The PVC of infra/k8s/storage.yaml at /shared; finished Jobs deleted after a day."""
    claims = {
        doc["metadata"]["name"]
        for _, doc in load_manifests()
        if doc["kind"] == "PersistentVolumeClaim"
    }
    (volume,) = pod_spec(gpu_job)["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] in claims
    assert container(gpu_job)["volumeMounts"] == [{"name": volume["name"], "mountPath": "/shared"}]
    assert gpu_job["spec"]["ttlSecondsAfterFinished"] == 86400
    assert gpu_job["metadata"]["namespace"] == "image-search"


def test_job_runs_the_deployed_image_as_non_root(gpu_job: dict[str, Any]) -> None:
    """The image from the build step; the pod refuses to run as root."""
    assert container(gpu_job)["image"] == IMAGE
    assert pod_spec(gpu_job)["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert container(gpu_job)["args"] == ["prefect", "flow-run", "execute"]
    security = pod_spec(gpu_job)["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] != 0


def test_pod_watch_timeout_allows_a_slow_gpu_start() -> None:
    """A virtual GPU node needs minutes to start a pod with a big image: wait 30 minutes."""
    configuration = render(gpu_job_variables())
    assert configuration.pod_watch_timeout_seconds == 1800


@pytest.mark.parametrize(
    ("override", "check"),
    [
        (
            {"gpu_count": 2, "eci_instance_type": "ecs.gn6i-c24g1.12xlarge"},
            lambda job: (
                container(job)["resources"]["limits"]["nvidia.com/gpu"] == 2
                and pod_annotations(job)[ECI_TYPE] == "ecs.gn6i-c24g1.12xlarge"
            ),
        ),
        (
            {"gpu_count": 0},
            lambda job: container(job)["resources"]["limits"]["nvidia.com/gpu"] == 0,
        ),
        (
            {"eci_image_cache_id": "imc-2ze1234567890abcdef"},
            lambda job: pod_annotations(job)[ECI_IMC_ID] == "imc-2ze1234567890abcdef",
        ),
        (
            {"eci_auto_image_cache": "false"},
            lambda job: pod_annotations(job)[ECI_AUTO_IMC] == "false",
        ),
        (
            {"eci_image_snapshot_id": "imc-2ze1234567890abcdef"},
            lambda job: pod_annotations(job)[ECI_SNAPSHOT] == "imc-2ze1234567890abcdef",
        ),
        (
            {"node_selector": {"gpu": "a10"}, "tolerations": [{"operator": "Exists"}]},
            lambda job: (
                pod_spec(job)["nodeSelector"] == {"gpu": "a10"}
                and pod_spec(job)["tolerations"] == [{"operator": "Exists"}]
            ),
        ),
        ({"image_pull_secrets": []}, lambda job: pod_spec(job)["imagePullSecrets"] == []),
        (
            {"prefect_api_url": "https://prefect.internal/api"},
            lambda job: env_of(job)["PREFECT_API_URL"] == "https://prefect.internal/api",
        ),
    ],
    ids=[
        "gpu-2",
        "gpu-0",
        "image-cache-id",
        "no-auto-image-cache",
        "legacy-snapshot",
        "selector-tolerations",
        "public-image",
        "api-url",
    ],
)
def test_variables_override_the_defaults(override: dict[str, Any], check: Any) -> None:
    """Each knob is a template variable: a deployment or a single run can change it."""
    job = render({**gpu_job_variables(), **override}).job_manifest
    assert check(job)


def test_rendered_job_is_a_valid_kubernetes_job(gpu_job: dict[str, Any]) -> None:
    """The Job validates against the OpenAPI schema of the newest release in kubernetes-validate."""
    assert kubernetes_validate.validate(gpu_job, K8S_VERSION, strict=False)


def test_strict_validation_flags_only_what_prefect_kubernetes_adds(gpu_job: dict[str, Any]) -> None:
    """Strictly, `parallelism` and `completions` are not pod-spec fields. prefect-kubernetes puts
    them there (its base manifest) and refuses a template without them, so they stay; the API
    server drops unknown fields (or rejects them under fieldValidation=Strict). Nothing else of
    the Job is unknown to Kubernetes."""
    with pytest.raises(kubernetes_validate.ValidationError) as flagged:
        kubernetes_validate.validate(gpu_job, K8S_VERSION, strict=True)
    assert list(flagged.value.path) == ["spec", "template", "spec"]
    assert "'completions', 'parallelism' were unexpected" in flagged.value.message

    cleaned = copy.deepcopy(gpu_job)
    for field in ("parallelism", "completions"):
        del pod_spec(cleaned)[field]
    assert kubernetes_validate.validate(cleaned, K8S_VERSION, strict=True)

    template = load_pool_template()
    for field in ("parallelism", "completions"):
        del template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"][field]
    with pytest.raises(ValueError, match="missing required attributes"):
        render(gpu_job_variables(), template=template)


def init_container(job: dict[str, Any]) -> dict[str, Any]:
    (found,) = pod_spec(job)["initContainers"]
    return dict(found)


def test_shared_volume_gets_its_owner_before_the_flow_starts(gpu_job: dict[str, Any]) -> None:
    """NFS (Alibaba NAS) ignores fsGroup, so an init container of the same image, as root with
    only CHOWN and FOWNER, prepares the very folder the flow container mounts, for its user."""
    init = init_container(gpu_job)
    assert init["image"] == container(gpu_job)["image"] == IMAGE
    assert init["volumeMounts"] == container(gpu_job)["volumeMounts"]
    assert init["command"][-1] == "/shared"
    security = init["securityContext"]
    assert security["runAsUser"] == 0 and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]}
    assert f"uid={pod_spec(gpu_job)['securityContext']['runAsUser']};" in init["command"][2]


def run_init_script(job: dict[str, Any], folder: Path, path_dir: Path | None = None) -> Any:
    """The init container's command, run here on ``folder`` instead of the mount path."""
    command = [*init_container(job)["command"][:-1], str(folder)]
    env = dict(os.environ)
    if path_dir is not None:
        env["PATH"] = f"{path_dir}{os.pathsep}{env['PATH']}"
    return subprocess.run(command, capture_output=True, text=True, env=env, check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_init_script_gives_a_root_owned_folder_to_the_flow_user(
    gpu_job: dict[str, Any], tmp_path: Path
) -> None:
    """A new NAS volume belongs to root: the script hands it to uid 10001, touching nothing
    inside; a second run (or a folder already owned) changes nothing."""
    folder = tmp_path / "shared"
    (folder / "someone-elses").mkdir(parents=True)
    os.chown(folder, 0, 0)
    folder.chmod(0o755)
    done = run_init_script(gpu_job, folder)
    assert done.returncode == 0, done.stderr
    assert "gave the shared volume" in done.stdout
    assert (folder.stat().st_uid, folder.stat().st_gid) == (10001, 10001)
    assert folder.stat().st_mode & 0o700 == 0o700
    assert (folder / "someone-elses").stat().st_uid == 0
    before = folder.stat().st_ctime_ns
    again = run_init_script(gpu_job, folder)
    assert (again.returncode, again.stdout, folder.stat().st_ctime_ns) == (0, "", before)


def test_init_script_names_the_fix_where_root_cannot_chown(
    gpu_job: dict[str, Any], tmp_path: Path
) -> None:
    """An export that squashes root: chown fails (a stub that fails like it), the pod stops with
    the one command to run by hand; a folder that already has its owner needs no chown at all."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for tool in ("chown", "chmod"):
        stub = stubs / tool
        stub.write_text('#!/bin/sh\necho "$0: Operation not permitted" >&2\nexit 1\n')
        stub.chmod(0o755)
    folder = tmp_path / "shared"
    folder.mkdir()
    if folder.stat().st_uid == 10001:
        pytest.skip("this test runs as uid 10001")
    failed = run_init_script(gpu_job, folder, path_dir=stubs)
    assert failed.returncode == 1
    assert "chown 10001:10001 <export folder>" in failed.stderr
    if os.geteuid() == 0:
        os.chown(folder, 10001, 10001)
        done = run_init_script(gpu_job, folder, path_dir=stubs)
        assert (done.returncode, done.stderr) == (0, "")


# GPUs of an ECS instance type from its name: c<N>g1.<size> has vCPUs(size) / N GPUs.
INSTANCE_NAME = re.compile(r"ecs\.gn\d+[a-z]*-c(\d+)g1\.(\d*)xlarge")


def gpus_by_name(instance_type: str) -> int:
    """The GPU count Alibaba's naming gives: ``<k>xlarge`` is 4k vCPUs, one GPU per N vCPUs."""
    found = INSTANCE_NAME.fullmatch(instance_type)
    assert found, instance_type
    vcpus = 4 * int(found.group(2) or 1)
    assert vcpus % int(found.group(1)) == 0, instance_type
    return vcpus // int(found.group(1))


def pairing_table() -> dict[str, int]:
    """instance type -> GPUs, as the pool's variable schema enforces it."""
    table = {}
    for rule in load_pool_template()["variables"]["allOf"]:
        gpus = rule["then"]["properties"]["gpu_count"]["maximum"]
        assert rule["if"]["required"] == ["eci_instance_type"]
        for instance_type in rule["if"]["properties"]["eci_instance_type"]["enum"]:
            assert instance_type not in table, instance_type
            table[instance_type] = gpus
    return table


def test_pairing_table_matches_the_instance_names_and_the_docs() -> None:
    """Each type's GPU count follows from its name; infra/README.md's table and the gpu_count
    description say the same; the defaults are a valid pair."""
    table = pairing_table()
    assert {t: gpus_by_name(t) for t in table} == table
    readme = (REPO / "infra" / "README.md").read_text()
    documented = {}
    for types, gpus in re.findall(r"^\| (`ecs\.[^|]+) \| (\d)× [A-Z0-9]+ \|$", readme, re.M):
        documented.update({t: int(gpus) for t in re.findall(r"`(ecs\.[^`]+)`", types)})
    assert documented == table
    described = load_pool_template()["variables"]["properties"]["gpu_count"]["description"]
    assert all(t in described for t, gpus in table.items() if gpus > 1)
    variables = {**job_defaults(), **gpu_job_variables()}  # the pool's defaults, as deployed
    assert variables["gpu_count"] <= table[variables["eci_instance_type"]]


def check_job_variables(job_variables: dict[str, Any]) -> None:
    """What the Prefect server does when a deployment or a run brings job variables: pool
    defaults overlaid with them, validated against the pool's variable schema."""
    schema = load_pool_template()["variables"]
    defaults = {k: v["default"] for k, v in schema["properties"].items() if "default" in v}
    validate({**defaults, **job_variables}, schema, raise_on_error=True, preprocess=True)


@pytest.mark.parametrize(
    ("job_variables", "refused"),
    [
        ({}, False),
        ({"gpu_count": 2}, True),
        ({"gpu_count": 2, "eci_instance_type": "ecs.gn6i-c24g1.12xlarge"}, False),
        ({"gpu_count": 4, "eci_instance_type": "ecs.gn7i-c32g1.16xlarge"}, True),
        ({"gpu_count": 8, "eci_instance_type": "ecs.gn6v-c8g1.16xlarge"}, False),
        ({"gpu_count": 0}, False),
        ({"gpu_count": 2, "eci_instance_type": "ecs.gn8is-4x.16xlarge"}, False),
        ({"gpu_count": 2, "eci_instance_type": None}, False),
    ],
    ids=["defaults", "2-on-1", "2-on-2", "4-on-2", "8-on-8", "none", "unknown-type", "no-type"],
)
def test_pool_refuses_more_gpus_than_a_known_instance_type_has(
    job_variables: dict[str, Any], refused: bool
) -> None:
    """A validated pairing: for the types of the table, more GPUs than the type has is refused
    with the field and the limit; unknown types and ECI's own choice are left to the user."""
    if refused:
        with pytest.raises(ValidationError, match=r"'gpu_count'.*greater than the maximum of"):
            check_job_variables(job_variables)
    else:
        check_job_variables(job_variables)


def test_pool_defaults_stay_valid_one_by_one() -> None:
    """The server checks each default on its own (without `required`) and drops the invalid
    ones; the pairing rules must not make any default invalid that way."""
    template = load_pool_template()
    no_session: Any = None  # only defaults that reference blocks would need the database
    _, has_invalid = asyncio.run(_get_base_config_defaults(no_session, template))
    assert has_invalid is False
