"""Against a real ``prefect server``: both pools created from infra/, ``prefect --no-prompt deploy
--all`` from a fresh clone, then the deployments, schedules and parameter form read back through
the API, and the Job the Kubernetes worker would submit for a `gpu` run rendered by the worker's
own code path (``resolve_for_flow_run``). Also README's Deploy commands, run as written on a
fresh clone with a random port, and what deploying `gpu` without a registry says."""

from __future__ import annotations

import asyncio
import subprocess
import urllib.error
from typing import Any

import kubernetes_validate
import pytest
from prefect.client.orchestration import PrefectClient
from prefect.exceptions import PrefectHTTPStatusError
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

from flows.params import SearchParams
from tests.deploy.conftest import REGISTRY, Deployed, ReadmeDeploy
from tests.deploy.helpers import PREFECT, http_json, load_pool_template

pytestmark = pytest.mark.slow


def deployment(deployed: Deployed, name: str) -> dict[str, Any]:
    return deployed.server.get(f"/deployments/name/image-search/{name}")


def test_pools_are_created_from_the_repos_files(deployed: Deployed) -> None:
    """The Kubernetes pool holds infra/work-pool-kubernetes.json as is; `local` runs processes."""
    gpu_pool = deployed.server.get("/work_pools/kubernetes-gpu")
    assert gpu_pool["type"] == "kubernetes"
    assert gpu_pool["base_job_template"] == load_pool_template()
    assert deployed.server.get("/work_pools/local")["type"] == "process"


def test_deploy_all_needs_no_docker(deployed: Deployed) -> None:
    """The image build is skipped and the gpu deployment names the commit's image in the
    registry."""
    assert f"Not building {REGISTRY}/image-search:{deployed.sha}" in deployed.deploy_output
    gpu = deployment(deployed, "gpu")
    assert gpu["job_variables"]["image"] == f"{REGISTRY}/image-search:{deployed.sha}"


def test_deployments_point_at_their_pools_and_code(deployed: Deployed) -> None:
    """gpu on the Kubernetes pool with its job variables; local on the process pool, pulled from
    the checkout it was deployed from."""
    gpu, local = deployment(deployed, "gpu"), deployment(deployed, "local")
    for found in (gpu, local):
        assert found["entrypoint"] == "flows/image_search.py:image_search"
        assert found["pull_steps"] == [
            {
                "prefect.deployments.steps.set_working_directory": {
                    "directory": "{{ $IMAGE_SEARCH_HOME }}"
                }
            }
        ]
    assert gpu["work_pool_name"] == "kubernetes-gpu"
    # The pod's shape is the pool's (its template's defaults), not repeated per deployment.
    assert not {"gpu_count", "eci_instance_type", "memory_request"} & set(gpu["job_variables"])
    assert gpu["job_variables"]["env"] == {"PREFECT_LOGGING_EXTRA_LOGGERS": "tasks"}
    assert gpu["parameters"]["weights"] == "imagenet"
    assert local["work_pool_name"] == "local"
    assert local["job_variables"] == {
        "env": {
            "IMAGE_SEARCH_HOME": str(deployed.checkout.resolve()),
            "PREFECT_LOGGING_EXTRA_LOGGERS": "tasks",
        }
    }
    assert local["parameters"]["source"] == "sample"


def test_gpu_runs_on_a_schedule_local_on_demand(deployed: Deployed) -> None:
    """A weekly cron for gpu, with runs already scheduled; none for local."""
    gpu, local = deployment(deployed, "gpu"), deployment(deployed, "local")
    (schedule,) = gpu["schedules"]
    assert schedule["active"] is True
    assert schedule["schedule"]["cron"] == "0 3 * * 1"
    assert schedule["schedule"]["timezone"] == "UTC"
    assert local["schedules"] == []


def test_run_form_describes_every_parameter(deployed: Deployed) -> None:
    """The UI builds the run form from this schema: every field of SearchParams, described."""
    for name in ("gpu", "local"):
        fields = deployment(deployed, name)["parameter_openapi_schema"]["properties"]
        assert set(fields) == set(SearchParams.model_fields)
        undescribed = [f for f, spec in fields.items() if not spec.get("description", "").strip()]
        assert undescribed == [], f"{name}: no description for {undescribed}"


def render_for_run(deployed: Deployed, job_variables: dict[str, Any]) -> dict[str, Any]:
    """Create a gpu flow run with per-run job variables and resolve its Job as the worker does."""

    async def resolve() -> dict[str, Any]:
        async with PrefectClient(deployed.server.api_url) as client:
            found = await client.read_deployment_by_name("image-search/gpu")
            run = await client.create_flow_run_from_deployment(
                found.id, job_variables=job_variables
            )
            pool = await client.read_work_pool("kubernetes-gpu")
            configuration = await KubernetesWorkerJobConfiguration.resolve_for_flow_run(
                run, client=client, work_pool=pool, worker_name="test-worker"
            )
            await client.delete_flow_run(run.id)
            return configuration.job_manifest

    # The worker's own PREFECT_API_URL is this loopback server.
    with temporary_settings({PREFECT_API_URL: deployed.server.api_url}):
        return asyncio.run(resolve())


def test_worker_renders_the_gpu_job_with_a_per_run_gpu_count(deployed: Deployed) -> None:
    """Deployment defaults, then a run that asks for 2 GPUs: the worker's Job follows the run."""
    default = render_for_run(deployed, {})
    two_t4 = "ecs.gn6i-c24g1.12xlarge"
    override = render_for_run(deployed, {"gpu_count": 2, "eci_instance_type": two_t4})
    for job, gpus, instance in ((default, 1, "ecs.gn6i-c4g1.xlarge"), (override, 2, two_t4)):
        pod = job["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert container["image"] == f"{REGISTRY}/image-search:{deployed.sha}"
        assert env["PREFECT_LOGGING_EXTRA_LOGGERS"] == "tasks"
        assert pod["spec"]["nodeSelector"] == {"type": "virtual-kubelet"}
        assert pod["spec"]["tolerations"] == [
            {"key": "virtual-kubelet.io/provider", "operator": "Exists"}
        ]
        assert pod["metadata"]["annotations"]["k8s.aliyun.com/eci-use-specs"] == instance
        assert env["PREFECT_API_URL"] == (
            "http://prefect-server.prefect.svc.cluster.local:4200/api"
        )
        assert env["PREFECT_API_URL"] != deployed.server.api_url
        assert job["metadata"]["labels"]["prefect.io/deployment-name"] == "gpu"
        assert kubernetes_validate.validate(job, kubernetes_validate.latest_version())


def test_a_run_with_more_gpus_than_its_instance_type_is_refused(deployed: Deployed) -> None:
    """The server validates a run's job variables against the pool: 2 GPUs on the default
    single-T4 type is refused when the run is created, naming the field and the limit, from the
    API and from the CLI alike, instead of a pod that can never be scheduled."""

    async def create() -> None:
        async with PrefectClient(deployed.server.api_url) as client:
            found = await client.read_deployment_by_name("image-search/gpu")
            await client.create_flow_run_from_deployment(found.id, job_variables={"gpu_count": 2})

    with pytest.raises(PrefectHTTPStatusError) as refused:
        asyncio.run(create())
    assert refused.value.response.status_code == 422
    detail = refused.value.response.json()["detail"]
    assert "'gpu_count'" in detail and "greater than the maximum of 1" in detail

    cli = subprocess.run(
        [PREFECT, "deployment", "run", "image-search/gpu", "--job-variable", "gpu_count=2"],
        env=deployed.server.env(),
        cwd=deployed.checkout,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = cli.stdout + cli.stderr
    assert cli.returncode != 0 and "greater than the maximum of 1" in output, output
    runs = deployed.server.post("/flow_runs/filter", {})
    assert [r for r in runs if r["job_variables"] == {"gpu_count": 2}] == []


def test_readme_deploy_commands_work_on_any_port(readme_deploy: ReadmeDeploy) -> None:
    """README's Deploy block, with another port than 4200: the pools from infra/, `local`
    deployed and polled by a worker, the UI pointed at the same port, and no `gpu` deployment
    whose weekly runs would pile up on a machine without its cluster."""
    assert readme_deploy.port != 4200
    gpu_pool = readme_deploy.get("/work_pools/kubernetes-gpu")
    assert gpu_pool["base_job_template"] == load_pool_template()
    local = readme_deploy.get("/deployments/name/image-search/local")
    assert local["work_pool_name"] == "local"
    assert local["job_variables"]["env"]["IMAGE_SEARCH_HOME"] == str(
        readme_deploy.checkout.resolve()
    )
    (worker,) = readme_deploy.get_workers()
    assert worker["status"] == "ONLINE"
    ui = http_json(f"http://127.0.0.1:{readme_deploy.port}/ui-settings")
    assert ui["api_url"] == readme_deploy.api_url
    with pytest.raises(urllib.error.HTTPError) as missing:
        readme_deploy.get("/deployments/name/image-search/gpu")
    assert missing.value.code == 404


def test_deploying_gpu_without_a_registry_fails_clearly(readme_deploy: ReadmeDeploy) -> None:
    """No IMAGE_SEARCH_REGISTRY: `prefect deploy --name gpu` exits 1 with one line that names
    the variable to set and an example, no traceback, and nothing is deployed."""
    done = subprocess.run(
        [PREFECT, "--no-prompt", "deploy", "--name", "gpu"],
        env={**readme_deploy.env, "PREFECT_API_URL": readme_deploy.api_url},
        cwd=readme_deploy.checkout,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "prefect deploy: error: IMAGE_SEARCH_REGISTRY is not set" in output
    assert "export IMAGE_SEARCH_REGISTRY=" in output
    assert "Traceback" not in output
    with pytest.raises(urllib.error.HTTPError) as missing:
        readme_deploy.get("/deployments/name/image-search/gpu")
    assert missing.value.code == 404
