"""Which Prefect task runner runs the sharded work for a ``cluster`` setting: none (this
process), a ``distributed.LocalCluster``, a running scheduler, or Dask worker pods on the GPU
node (dask-kubernetes' operator), and how many shards to cut for it."""

from __future__ import annotations

import socket
from typing import Any
from urllib.parse import urlsplit

from tasks.cluster_setting import ClusterSetting, parse_cluster
from tasks.errors import ImageSearchError, param

# How long a scheduler may take to accept a connection before the run is refused; Dask's own
# connect timeout (30 s, then an OSError) would otherwise decide, after the listing.
SCHEDULER_CONNECT_TIMEOUT = 5.0


def check_scheduler(address: str, timeout: float = SCHEDULER_CONNECT_TIMEOUT) -> None:
    """Refuse, naming the setting and the fix, a scheduler address nothing answers on."""
    parts = urlsplit(address)
    host, port = parts.hostname or "", parts.port or 0
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except TimeoutError:
        reason = f"no answer within {timeout:.0f} s"
    except OSError as exc:
        reason = exc.strerror or str(exc)
    raise ImageSearchError(
        f"Cannot reach the Dask scheduler at {address} ({reason}). Start it (`dask scheduler`), "
        f"or set {param('cluster')} to local:N to start N workers on this machine, or to none."
    )


def task_runner(setting: ClusterSetting | str | None) -> Any:
    """prefect-dask's ``DaskTaskRunner`` for the setting; None for in-process."""
    from prefect_dask import DaskTaskRunner

    s = setting if isinstance(setting, ClusterSetting) else parse_cluster(setting)
    if s.kind == "in-process":
        return None
    if s.kind == "address":
        return DaskTaskRunner(address=s.address)
    if s.kind == "local":
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": s.workers,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,
            },
        )
    from infra.dask.cluster import kubernetes_variables, render_cluster_spec

    v = kubernetes_variables()
    return DaskTaskRunner(
        cluster_class="dask_kubernetes.operator.KubeCluster",
        cluster_kwargs={
            "custom_cluster_spec": render_cluster_spec(v),
            "namespace": v.namespace,
            "shutdown_on_close": True,
        },
    )


def default_shards(setting: ClusterSetting) -> int | None:
    """One shard per worker thread where the setting says how many; None: ask the cluster."""
    if setting.kind == "local":
        return setting.workers
    if setting.kind == "kubernetes":
        from infra.dask.cluster import kubernetes_variables

        v = kubernetes_variables()
        return v.n_workers * v.threads_per_worker
    if setting.kind == "in-process":
        return 1
    return None


def cluster_threads() -> int:
    """Worker threads of the cluster this flow's task runner is attached to (1 in-process)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    client = getattr(context.task_runner if context else None, "client", None)
    return max(1, sum(client.nthreads().values())) if client is not None else 1
