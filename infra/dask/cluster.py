"""The Dask cluster of GPU worker pods for ``cluster = kubernetes``: its settings
(:class:`DaskGpuVariables`, read from ``IMAGE_SEARCH_DASK_VARIABLES`` as JSON) and the
``DaskCluster`` resource that dask-kubernetes' own ``make_cluster_spec`` renders from them, with
the placement of the work pool's GPU job (node selector, tolerations, GPU limit, ECI annotations:
defaults read from the pool's template, :mod:`infra.pod`)."""

from __future__ import annotations

import json
import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from infra.pod import job_defaults
from tasks.errors import ImageSearchError

VARIABLES_ENV = "IMAGE_SEARCH_DASK_VARIABLES"
_POD = job_defaults()
ECI_TYPE = "k8s.aliyun.com/eci-use-specs"
ECI_AUTO_IMC = "k8s.aliyun.com/eci-auto-imc"
ECI_IMC_ID = "k8s.aliyun.com/eci-imc-id"
ECI_SNAPSHOT = "k8s.aliyun.com/eci-image-snapshot-id"
RUN_AS = 10001  # the image's user, as in the flow-run pod


class DaskGpuVariables(BaseModel):
    """Every setting of the Dask cluster's pods; defaults are those of the work pool's GPU job
    (node selector, tolerations, GPU limit, ECI annotations), so workers land where runs do."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("image-search-dask", description="DaskCluster name (a DNS label)")
    image: str | None = Field(None, description="the flow-run image of the same commit")
    n_workers: int = Field(2, ge=1, description="worker pods")
    threads_per_worker: int = Field(1, ge=1)
    # The GPU pod's shape: the work pool's own variables and defaults (infra/pod.py).
    namespace: str = _POD["namespace"]
    gpu_count: int = Field(_POD["gpu_count"], ge=0, description="nvidia.com/gpu of each worker")
    eci_instance_type: str | None = _POD["eci_instance_type"]
    cpu_request: str = _POD["cpu_request"]
    memory_request: str = _POD["memory_request"]
    node_selector: dict[str, str] = _POD["node_selector"]
    tolerations: list[dict[str, Any]] = _POD["tolerations"]
    eci_auto_image_cache: str | None = _POD["eci_auto_image_cache"]
    eci_image_cache_id: str | None = _POD["eci_image_cache_id"]
    eci_image_snapshot_id: str | None = _POD["eci_image_snapshot_id"]
    image_pull_secrets: list[dict[str, str]] = _POD["image_pull_secrets"]
    pvc_name: str = _POD["pvc_name"]
    shared_mount_path: str = _POD["shared_mount_path"]
    prefect_api_url: str = _POD["prefect_api_url"]
    scheduler_cpu: str = "1"
    scheduler_memory: str = "2Gi"
    idle_timeout: int = Field(3600, ge=0, description="seconds idle before the operator deletes")


def _pod_annotations(v: DaskGpuVariables, gpu: bool) -> dict[str, str]:
    """ECI annotations of a pod; empty ones left out, not sent empty."""
    found = {
        ECI_TYPE: v.eci_instance_type if gpu else None,
        ECI_AUTO_IMC: v.eci_auto_image_cache,
        ECI_IMC_ID: v.eci_image_cache_id,
        ECI_SNAPSHOT: v.eci_image_snapshot_id,
    }
    return {key: value for key, value in found.items() if value}


def _place(pod: dict[str, Any], v: DaskGpuVariables) -> None:
    """Node, tolerations, pull secrets, shared volume and non-root user of one pod spec."""
    pod["nodeSelector"] = dict(v.node_selector)
    pod["tolerations"] = [dict(t) for t in v.tolerations]
    pod["imagePullSecrets"] = [dict(s) for s in v.image_pull_secrets]
    pod["securityContext"] = {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS}
    pod["volumes"] = [{"name": "shared", "persistentVolumeClaim": {"claimName": v.pvc_name}}]
    for c in pod["containers"]:
        c["volumeMounts"] = [{"name": "shared", "mountPath": v.shared_mount_path}]


def render_cluster_spec(v: DaskGpuVariables) -> dict[str, Any]:
    """The ``DaskCluster`` resource, from dask-kubernetes' own ``make_cluster_spec``, with the
    GPU pod's placement added: (apiVersion kubernetes.dask.org/v1, kind DaskCluster)."""
    from dask_kubernetes.operator import make_cluster_spec

    if not v.image:
        raise ImageSearchError(
            "The Dask cluster needs the flow-run image: set image in "
            f"{VARIABLES_ENV} (the gpu deployment passes its build's image)."
        )
    env = {
        "PREFECT_API_URL": v.prefect_api_url,
        "PREFECT_LOGGING_EXTRA_LOGGERS": "tasks",
        "IMAGE_SEARCH_DATA": f"{v.shared_mount_path.rstrip('/')}/cache",
    }
    # A quantity as a string: the operator's CRD types resource values as strings.
    limits = {"nvidia.com/gpu": str(v.gpu_count)}
    spec: dict[str, Any] = make_cluster_spec(
        name=v.name,
        image=v.image,
        n_workers=v.n_workers,
        resources={
            "requests": {"cpu": v.cpu_request, "memory": v.memory_request},
            "limits": limits,
        },
        env=env,
        worker_command=f"dask worker --nthreads {v.threads_per_worker}",
        idle_timeout=v.idle_timeout,
    )
    spec["metadata"]["namespace"] = v.namespace
    worker, scheduler = spec["spec"]["worker"], spec["spec"]["scheduler"]
    worker["metadata"] = {"annotations": _pod_annotations(v, gpu=True)}
    scheduler["metadata"] = {"annotations": _pod_annotations(v, gpu=False)}
    scheduler["spec"]["containers"][0]["resources"] = {
        "requests": {"cpu": v.scheduler_cpu, "memory": v.scheduler_memory}
    }
    _place(worker["spec"], v)
    _place(scheduler["spec"], v)
    return spec


def kubernetes_variables(environ: dict[str, str] | None = None) -> DaskGpuVariables:
    """The cluster's variables from ``IMAGE_SEARCH_DASK_VARIABLES`` (JSON), defaults elsewhere."""
    raw = (os.environ if environ is None else environ).get(VARIABLES_ENV, "") or "{}"
    try:
        return DaskGpuVariables.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        first = str(exc).splitlines()
        detail = " ".join(first[:3]) if first else repr(exc)
        raise ImageSearchError(f"{VARIABLES_ENV} is not valid ({detail}); fix the JSON.") from None
