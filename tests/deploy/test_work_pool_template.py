"""The Job the Kubernetes worker submits for the `gpu` deployment, rendered by prefect-kubernetes'
own ``KubernetesWorkerJobConfiguration`` from infra/work-pool-kubernetes.json and the job
variables of prefect.yaml, then validated against the Kubernetes OpenAPI schema."""

from __future__ import annotations

import asyncio
import copy
import uuid
from typing import Any

import kubernetes_validate
import pytest
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.templating import apply_values
from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

from tests.deploy.helpers import deployment_config, load_manifests, load_pool_template

K8S_VERSION = kubernetes_validate.latest_version()
LOOPBACK_API = "http://127.0.0.1:4200/api"
CLUSTER_API = "http://prefect-server.prefect.svc.cluster.local:4200/api"
IMAGE = "registry.example.com/image-search:0123456789ab"
ECI_TYPE = "k8s.aliyun.com/eci-instance-type"
ECI_SNAPSHOT = "k8s.aliyun.com/eci-image-snapshot-id"


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
    """ECI reads annotations of the pod, so they must be on the pod template, not only the Job."""
    pod_annotations = gpu_job["spec"]["template"]["metadata"]["annotations"]
    assert pod_annotations[ECI_TYPE] == "ecs.gn6i-c4g1.xlarge"
    # No snapshot configured: the annotation is left out rather than sent empty.
    assert ECI_SNAPSHOT not in pod_annotations
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
            {"gpu_count": 2},
            lambda job: container(job)["resources"]["limits"]["nvidia.com/gpu"] == 2,
        ),
        (
            {"gpu_count": 0},
            lambda job: container(job)["resources"]["limits"]["nvidia.com/gpu"] == 0,
        ),
        (
            {"eci_image_snapshot_id": "imc-2ze1234567890abcdef"},
            lambda job: (
                job["spec"]["template"]["metadata"]["annotations"][ECI_SNAPSHOT]
                == "imc-2ze1234567890abcdef"
            ),
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
    ids=["gpu-2", "gpu-0", "snapshot", "selector-tolerations", "public-image", "api-url"],
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
