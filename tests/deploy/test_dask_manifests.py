"""The Dask cluster of GPU worker pods: rendered by dask-kubernetes' ``make_cluster_spec``,
checked against the operator's own DaskCluster CRD schema (shipped with dask-kubernetes), and
its pods, as the operator's controller builds them, validated as Kubernetes Deployments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from infra.dask.cluster import DaskGpuVariables, render_cluster_spec
from infra.dask.render import PLACEHOLDER_IMAGE, main, parse_sets, render_yaml
from tasks.errors import ImageSearchError
from tests.deploy.helpers import INFRA, load_pool_template

K8S_VERSION = kubernetes_validate.latest_version()
IMAGE = "registry.example.com/image-search:0123456789ab"
ECI_TYPE = "k8s.aliyun.com/eci-use-specs"
ECI_AUTO_IMC = "k8s.aliyun.com/eci-auto-imc"
ECI_IMC_ID = "k8s.aliyun.com/eci-imc-id"


def crd_schema() -> dict[str, Any]:
    """The openAPIV3Schema of the DaskCluster CRD that dask-kubernetes' Helm chart installs."""
    import dask_kubernetes

    path = (
        Path(dask_kubernetes.__file__).parent
        / "operator/deployment/helm/dask-kubernetes-operator/crds/daskcluster.yaml"
    )
    crd = yaml.safe_load(path.read_text())
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1"
    return dict(version["schema"]["openAPIV3Schema"])


def pruned_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the API server would silently drop: not in the structural schema."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(obj, dict) and "properties" in schema:
        for key, value in obj.items():
            if key in schema["properties"]:
                found += pruned_fields(value, schema["properties"][key], f"{path}.{key}")
            elif path == "" and key in ("apiVersion", "kind", "metadata"):
                continue
            else:
                found.append(f"{path}.{key}")
    elif isinstance(obj, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, value in obj.items():
            found += pruned_fields(value, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            found += pruned_fields(item, schema["items"], f"{path}[{i}]")
    return found


def operator_objects(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What the operator's controller creates from the DaskCluster: its own build functions."""
    from dask_kubernetes.operator.controller.controller import (
        build_scheduler_deployment_spec,
        build_scheduler_service_spec,
        build_worker_deployment_spec,
    )

    name, namespace = spec["metadata"]["name"], spec["metadata"]["namespace"]
    worker, scheduler = spec["spec"]["worker"], spec["spec"]["scheduler"]
    objects = {
        "worker": build_worker_deployment_spec(
            f"{name}-default",
            namespace,
            name,
            "abc123",
            worker["spec"],
            worker["metadata"]["annotations"],
            {},
        ),
        "scheduler": build_scheduler_deployment_spec(
            name, scheduler["spec"], scheduler["metadata"]["annotations"], {}
        ),
        "service": build_scheduler_service_spec(name, scheduler["service"], {}, {}),
    }
    for obj in objects.values():
        obj["metadata"]["namespace"] = namespace
    return objects


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return render_cluster_spec(DaskGpuVariables(image=IMAGE))


@pytest.fixture(scope="module")
def worker_pod(spec: dict[str, Any]) -> dict[str, Any]:
    return dict(operator_objects(spec)["worker"]["spec"]["template"])


def test_cluster_is_valid_for_the_operators_crd(spec: dict[str, Any]) -> None:
    """The DaskCluster validates against the CRD's schema, and no field would be pruned."""
    assert (spec["apiVersion"], spec["kind"]) == ("kubernetes.dask.org/v1", "DaskCluster")
    schema = crd_schema()
    jsonschema.validate(spec, schema)
    assert pruned_fields(spec, schema) == []
    typo = {**spec, "spec": {**spec["spec"], "workers": {"replicas": 2}}}
    assert pruned_fields(typo, schema) == [".spec.workers"]  # accepted, then silently dropped
    bad = {**spec, "spec": {**spec["spec"], "worker": {"replicas": "two"}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_pods_the_operator_makes_are_valid_kubernetes_objects(spec: dict[str, Any]) -> None:
    """Worker and scheduler Deployments and the scheduler Service, strictly (no unknown field)."""
    for obj in operator_objects(spec).values():
        assert kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_workers_land_where_the_gpu_job_does(worker_pod: dict[str, Any]) -> None:
    """Same nodeSelector, tolerations, GPU limit and ECI annotations as the work pool's GPU job,
    its defaults read from infra/work-pool-kubernetes.json."""
    pool = {k: v.get("default") for k, v in load_pool_template()["variables"]["properties"].items()}
    pod = worker_pod["spec"]
    assert pod["nodeSelector"] == pool["node_selector"] == {"type": "virtual-kubelet"}
    assert pod["tolerations"] == pool["tolerations"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": str(pool["gpu_count"])}
    assert container["resources"]["requests"] == {
        "cpu": pool["cpu_request"],
        "memory": pool["memory_request"],
    }
    assert worker_pod["metadata"]["annotations"] == {
        ECI_TYPE: pool["eci_instance_type"],
        ECI_AUTO_IMC: pool["eci_auto_image_cache"],
    }
    assert pod["imagePullSecrets"] == pool["image_pull_secrets"]
    claim = pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == pool["pvc_name"]
    assert container["volumeMounts"] == [{"name": "shared", "mountPath": pool["shared_mount_path"]}]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PREFECT_API_URL"] == pool["prefect_api_url"]
    assert env["DASK_SCHEDULER_ADDRESS"] == (
        "tcp://image-search-dask-scheduler.image-search.svc.cluster.local:8786"
    )
    assert container["image"] == IMAGE
    assert container["args"][:4] == ["dask", "worker", "--nthreads", "1"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_scheduler_needs_no_gpu(spec: dict[str, Any]) -> None:
    scheduler = operator_objects(spec)["scheduler"]["spec"]["template"]
    (container,) = scheduler["spec"]["containers"]
    assert "limits" not in container["resources"]
    assert ECI_TYPE not in scheduler["metadata"]["annotations"]
    assert scheduler["spec"]["nodeSelector"] == {"type": "virtual-kubelet"}


@pytest.mark.parametrize(
    ("override", "check"),
    [
        (
            {"gpu_count": 2, "eci_instance_type": "ecs.gn6i-c24g1.12xlarge", "n_workers": 4},
            lambda s, pod: (
                pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
                and pod["metadata"]["annotations"][ECI_TYPE] == "ecs.gn6i-c24g1.12xlarge"
                and s["spec"]["worker"]["replicas"] == 4
            ),
        ),
        (
            {"eci_image_cache_id": "imc-2ze1234567890abcdef", "eci_auto_image_cache": None},
            lambda s, pod: (
                pod["metadata"]["annotations"]
                == {ECI_TYPE: "ecs.gn6i-c4g1.xlarge", ECI_IMC_ID: "imc-2ze1234567890abcdef"}
            ),
        ),
        (
            {"node_selector": {"gpu": "a10"}, "tolerations": [{"operator": "Exists"}]},
            lambda s, pod: (
                pod["spec"]["nodeSelector"] == {"gpu": "a10"}
                and pod["spec"]["tolerations"] == [{"operator": "Exists"}]
            ),
        ),
        (
            {"threads_per_worker": 4, "namespace": "search", "name": "big"},
            lambda s, pod: (
                pod["spec"]["containers"][0]["args"][3] == "4"
                and s["metadata"] == {"name": "big", "namespace": "search"}
            ),
        ),
    ],
    ids=["gpu-2", "pinned-cache", "selector", "threads-namespace"],
)
def test_variables_override_the_defaults(override: dict[str, Any], check: Any) -> None:
    spec = render_cluster_spec(DaskGpuVariables(image=IMAGE, **override))
    pod = operator_objects(spec)["worker"]["spec"]["template"]
    assert check(spec, pod)
    jsonschema.validate(spec, crd_schema())
    assert kubernetes_validate.validate(operator_objects(spec)["worker"], K8S_VERSION, strict=True)


def test_committed_cluster_is_the_rendered_one() -> None:
    """infra/dask/daskcluster.yaml is exactly what the renderer writes for its header's command."""
    committed = yaml.safe_load((INFRA / "dask" / "daskcluster.yaml").read_text())
    assert committed == yaml.safe_load(render_yaml({"image": PLACEHOLDER_IMAGE, "idle_timeout": 0}))
    assert committed["spec"]["idleTimeout"] == 0  # a standing cluster is never reaped


def test_rbac_lets_a_flow_pod_create_its_cluster() -> None:
    docs = list(yaml.safe_load_all((INFRA / "dask" / "rbac.yaml").read_text()))
    for doc in docs:
        assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    role = next(d for d in docs if d["kind"] == "Role")
    dask_rule = next(r for r in role["rules"] if r["apiGroups"] == ["kubernetes.dask.org"])
    assert "daskclusters" in dask_rule["resources"] and "create" in dask_rule["verbs"]
    assert role["metadata"]["namespace"] == "image-search"


def test_render_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    """Values of --set are JSON where they parse, else strings; bad input is one line, exit 2."""
    assert main(["--image", IMAGE, "--set", "n_workers=3", "--set", "eci_auto_image_cache=no"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["spec"]["worker"]["replicas"] == 3
    assert out["spec"]["worker"]["metadata"]["annotations"][ECI_AUTO_IMC] == "no"
    assert parse_sets(["tolerations=[]"]) == {"tolerations": []}
    assert main(["--set", "n_workers=0"]) == 2
    assert main(["--set", "gpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "--set 'gpu': expected KEY=VALUE" in err
    with pytest.raises(ImageSearchError, match=r"needs the flow-run image"):
        render_cluster_spec(DaskGpuVariables())
