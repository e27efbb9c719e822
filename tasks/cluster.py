"""Where the sharded work runs: the ``cluster`` setting, the Prefect task runner it names, the
Kubernetes ``DaskCluster`` of GPU worker pods, and the two stages that run on it: the catalog
pass's embedding (contiguous shards of the listing) and the exact search (shards of index rows).

``cluster`` is one of: empty/None (in this process, shard after shard: nothing changes on a
laptop), ``local:N`` (a ``distributed.LocalCluster`` of N worker processes × 1 thread),
``tcp://HOST:PORT`` (a running Dask scheduler) or ``kubernetes`` (a ``DaskCluster`` created
through the dask-kubernetes operator from :class:`DaskGpuVariables`, read from the
``IMAGE_SEARCH_DASK_VARIABLES`` environment variable as JSON).
"""

from __future__ import annotations

import itertools
import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.catalog import PART_ROWS, Outcome, embed_items
from tasks.cluster_setting import ClusterSetting, parse_cluster
from tasks.errors import ImageSearchError
from tasks.features.content import EmbeddingStore
from tasks.features.embed import forward_factory
from tasks.layout import TEMP_PREFIX, knn_stage
from tasks.search.backends import SearchRun
from tasks.search.k import check_k as validate_k
from tasks.search.shards import Shard, ShardResult, merge_topk, plan_shards, search_shard
from tasks.sources.collection import Collection, Item, reopen
from tasks.storage import RunFolder, atomic_path
from tasks.types import Features, ModelSpec

SHARDED = "sharded"
VARIABLES_ENV = "IMAGE_SEARCH_DASK_VARIABLES"
# --- Kubernetes: the DaskCluster of GPU worker pods ------------------------------------------

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
    namespace: str = "image-search"
    image: str | None = Field(None, description="the flow-run image of the same commit")
    n_workers: int = Field(2, ge=1, description="worker pods")
    threads_per_worker: int = Field(1, ge=1)
    gpu_count: int = Field(1, ge=0, description="nvidia.com/gpu limit of each worker")
    eci_instance_type: str | None = "ecs.gn6i-c4g1.xlarge"
    cpu_request: str = "3"
    memory_request: str = "12Gi"
    node_selector: dict[str, str] = {"type": "virtual-kubelet"}
    tolerations: list[dict[str, Any]] = [
        {"key": "virtual-kubelet.io/provider", "operator": "Exists"}
    ]
    eci_auto_image_cache: str | None = "true"
    eci_image_cache_id: str | None = None
    eci_image_snapshot_id: str | None = None
    image_pull_secrets: list[dict[str, str]] = [{"name": "registry-credentials"}]
    pvc_name: str = "image-search-shared"
    shared_mount_path: str = "/shared"
    prefect_api_url: str = "http://prefect-server.prefect.svc.cluster.local:4200/api"
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


# --- The Prefect task runner for a setting ---------------------------------------------------


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
        v = kubernetes_variables()
        return v.n_workers * v.threads_per_worker
    if setting.kind == "in-process":
        return 1
    return None


# --- The sharded search as Prefect tasks in a nested flow ------------------------------------


def _blas_threads() -> int:
    """Threads BLAS may use here (Dask's nanny sets 1 per worker process)."""
    from threadpoolctl import threadpool_info

    found = [int(p.get("num_threads", 1)) for p in threadpool_info() if p.get("user_api") == "blas"]
    return max(found, default=1)


@task(cache_policy=NO_CACHE)
def shard_search(shard: Shard, query_path: str, k: int, trace_memory: bool = False) -> ShardResult:
    """Prefect task: one shard's top k of every query (its rows only)."""
    return search_shard(shard, query_path, k, threads=_blas_threads(), trace_memory=trace_memory)


@task(cache_policy=NO_CACHE)
def merge_shards(results: list[ShardResult], k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Prefect task: the global top k; returns (distances, ids, merge seconds)."""
    t0 = time.perf_counter()
    dist, ids = merge_topk(results, k)
    return dist, ids, time.perf_counter() - t0


@flow(name="image-search-sharded-search")
def sharded_search(
    index_path: str,
    query_path: str,
    k: int,
    n_shards: int | None = None,
    trace_memory: bool = False,
) -> dict[str, Any]:
    """Map the shard search over the index's shards on this flow's task runner, then merge.

    Returns query ids (n,), distances (n, k) float64, neighbour ids (n, k) and per-shard stats.
    """
    if n_shards is None:
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
        client = getattr(context.task_runner if context else None, "client", None)
        n_shards = max(1, sum(client.nthreads().values())) if client is not None else 1
    shards = plan_shards(index_path, n_shards)
    futures = shard_search.map(shards, unmapped(query_path), unmapped(k), unmapped(trace_memory))
    results = [f.result() for f in futures]
    dist, ids, merge_s = merge_shards(results, k)
    return {
        "query_ids": results[0].query_ids,
        "distances": dist,
        "neighbor_ids": ids,
        "merge_seconds": merge_s,
        "shards": [
            {
                "rows": r.index_rows,
                "index_bytes": r.index_bytes,
                "query_block_bytes": r.query_block_bytes,
                "seconds": round(r.seconds, 4),
                "peak_traced_bytes": r.peak_traced_bytes,
            }
            for r in results
        ],
    }


def run_sharded(
    index_path: Path,
    query_path: Path,
    k: int,
    dest: Path,
    cluster: str | None,
    n_shards: int | None = None,
) -> SearchRun:
    """The sharded search on the cluster the setting names; neighbours (image ids) to ``dest``.

    ``search_seconds`` is the nested flow's wall time, cluster start included (an honest cost
    of the Dask path); the merge's own time is in ``details``.
    """
    setting = parse_cluster(cluster)
    t0 = time.perf_counter()
    rows = int(sum(s.rows for s in plan_shards(index_path, 1)))
    validate_k(k, rows)
    load_s = time.perf_counter() - t0
    runner = task_runner(setting)
    n = n_shards if n_shards is not None else default_shards(setting)
    search = sharded_search if runner is None else sharded_search.with_options(task_runner=runner)
    t0 = time.perf_counter()
    out = search(str(index_path), str(query_path), k, n)
    search_s = time.perf_counter() - t0
    with atomic_path(dest) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            query_ids=out["query_ids"],
            distances=out["distances"].astype(np.float32),
            neighbor_ids=out["neighbor_ids"],
        )
    return SearchRun(
        backend=SHARDED,
        device="cpu",
        available=True,
        path=str(dest),
        n_queries=len(out["query_ids"]),
        k=k,
        load_seconds=load_s,
        fit_seconds=0.0,
        search_seconds=search_s,
        cores_used=None,  # spread over worker processes: this process's clock says nothing
        details={
            "cluster": setting.describe(),
            "shards": out["shards"],
            "merge_seconds": round(out["merge_seconds"], 4),
        },
    )


def search_features_sharded(
    features: Features, run: RunFolder, k: int, cluster: str | None
) -> SearchRun:
    """The ``sharded`` backend: like :func:`tasks.search.knn.search_features`, staged the same
    way. The answer does not depend on the cluster, so the cluster is not part of the key."""
    parse_cluster(cluster)  # a bad setting stops here, before anything runs
    layout = knn_stage(SHARDED)
    (rel,) = layout.outputs
    stage = run.stage(
        layout,
        [features.index.fingerprint, features.query.fingerprint, SHARDED, k],
        code=["tasks.search", "tasks.cluster"],
    )
    done = stage.done()
    if done is not None:
        result = SearchRun.model_validate(done["run"])
    else:
        result = run_sharded(features.index.path, features.query.path, k, stage.path(rel), cluster)
        result = result.model_copy(update={"path": rel})
        stage.finish(run=result.model_dump())
    return result.model_copy(update={"path": str(stage.path(rel).relative_to(run.out))})


# --- Sharded embedding: the catalog pass's unit of work on Dask workers ----------------------

SHARDS_PER_THREAD = 4  # a few shards per worker thread: a lost worker costs a small shard
MAX_SHARD_ITEMS = 16 * PART_ROWS  # and a shard stays a few parts long, however many images
PLAN_GROUPS = 256  # row groups of the shard plan file: the finest cut into shards
# One forward pass per worker process and model: built on a shard's first need, then reused by
# every later shard that process runs (a model build takes seconds).
_FORWARDS: dict[ModelSpec, tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any]]] = {}


def plan_item_shards(n_items: int, n_shards: int, unit: int = 1) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` ranges cutting ``n_items`` into about ``n_shards``
    near-equal shards, in order: none empty, none over :data:`MAX_SHARD_ITEMS`, every start a
    multiple of ``unit`` (the plan file's row group)."""
    if n_shards < 1:
        raise ImageSearchError(f"shards = {n_shards}; it must be a whole number >= 1.")
    units = -(-n_items // unit)
    n = max(n_shards, -(-units // max(1, MAX_SHARD_ITEMS // unit)))
    n = min(n, max(units, 1))
    bounds = [round(i * units / n) for i in range(n + 1)]
    return [(a * unit, min(b * unit, n_items)) for a, b in itertools.pairwise(bounds) if b > a]


def plan_unit(n_items: int) -> int:
    """Rows per row group of the plan file: fine enough to cut into many shards, at most a
    store part."""
    return max(1, min(PART_ROWS, -(-n_items // PLAN_GROUPS)))


def write_item_plan(items: list[Item], path: Path, unit: int) -> None:
    """The items to embed as a Parquet file of row groups of ``unit`` rows (uri, version,
    label, split): shards travel as row ranges of it, never as lists."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "uri": [i.uri for i in items],
            "version": [i.version for i in items],
            "label": pa.array([i.label for i in items], pa.string()),
            "split": pa.array([i.split for i in items], pa.string()),
        }
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=unit)


def read_item_plan(path: Path, start: int, stop: int, unit: int) -> list[Item]:
    """Items ``[start, stop)`` of a plan file, reading only their row groups."""
    import pyarrow.parquet as pq

    groups = list(range(start // unit, -(-stop // unit)))
    table = pq.ParquetFile(path).read_row_groups(groups)
    offset = start - groups[0] * unit
    rows = table.slice(offset, stop - start).to_pylist()
    return [Item(r["uri"], r["version"], r["label"], r["split"]) for r in rows]


def worker_forward(spec: ModelSpec) -> Callable[[], Callable[[np.ndarray], np.ndarray]]:
    """``make_forward`` for :func:`tasks.catalog.embed_items` that builds the model once per
    process and model spec; (B, S, S, 3) uint8 -> (B, 2048) float32."""

    def make() -> Callable[[np.ndarray], np.ndarray]:
        found = _FORWARDS.get(spec)
        if found is None:
            metadata: dict[str, Any] = {}
            found = (forward_factory(spec, metadata)(), metadata)
            _FORWARDS[spec] = found
        return found[0]

    return make


def embed_shard_items(
    described: dict[str, Any], items: list[Item], out: str, spec: ModelSpec, batch_size: int
) -> tuple[list[Outcome], int]:
    """One shard of the catalog pass where it runs: reopen the collection from its description,
    embed what the store lacks into new parts of the store, return outcomes and count."""
    store = EmbeddingStore(Path(out), spec.key())
    outcomes, embedded = embed_items(
        reopen(described),
        items,
        store,
        worker_forward(spec),
        input_size=spec.input_size,
        batch_size=batch_size,
        progress=False,
    )
    if spec in _FORWARDS:  # the model's description, once, for a person reading the store
        store.describe(_FORWARDS[spec][1])
    return outcomes, embedded


@dataclass(frozen=True)
class EmbedJob:
    """What every shard of one sharded pass shares: references only."""

    described: dict[str, Any]  # the collection, as :meth:`Collection.describe` gives it
    plan: str  # the plan file (items), on storage every worker reads
    unit: int  # its rows per row group
    out: str  # the output folder holding the embedding store
    spec: ModelSpec
    batch_size: int


# Dask reschedules the shard of a worker that died; a shard that raises is tried again too.
# Either way a retried shard embeds only what its finished parts left out.
@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def embed_shard(job: EmbedJob, start: int, stop: int) -> tuple[list[Outcome], int, float]:
    """Prefect task: items ``[start, stop)`` of the plan embedded (references in; outcomes, the
    number embedded and the shard's seconds out)."""
    t0 = time.perf_counter()
    items = read_item_plan(Path(job.plan), start, stop, job.unit)
    outcomes, embedded = embed_shard_items(job.described, items, job.out, job.spec, job.batch_size)
    return outcomes, embedded, time.perf_counter() - t0


@flow(name="image-search-sharded-embed")
def sharded_embed(job: EmbedJob, n_items: int, threads: int | None = None) -> dict[str, Any]:
    """Map :func:`embed_shard` over contiguous shards of the plan on this flow's task runner.

    Returns outcomes (concatenated in order), embedded (the count) and per-shard stats."""
    if threads is None:
        threads = _cluster_threads()
    shards = plan_item_shards(n_items, threads * SHARDS_PER_THREAD, job.unit)
    futures = embed_shard.map(unmapped(job), [a for a, _ in shards], [b for _, b in shards])
    outcomes: list[Outcome] = []
    embedded = 0
    stats = []
    for f in futures:
        part, count, seconds = f.result()
        outcomes.extend(part)
        embedded += count
        stats.append({"items": len(part), "embedded": count, "seconds": round(seconds, 3)})
    return {"outcomes": outcomes, "embedded": embedded, "shards": stats}


def _cluster_threads() -> int:
    """Worker threads of the cluster this flow's task runner is attached to (1 in-process)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    client = getattr(context.task_runner if context else None, "client", None)
    return max(1, sum(client.nthreads().values())) if client is not None else 1


def run_embed_sharded(
    collection: Collection,
    items: list[Item],
    out: Path,
    spec: ModelSpec,
    batch_size: int,
    cluster: str | None,
) -> dict[str, Any]:
    """:func:`sharded_embed` on the cluster the setting names, the items written to a plan file
    beside the store first (removed after); see :func:`embed_sharded`."""
    setting = parse_cluster(cluster)
    if not items:
        return {"outcomes": [], "embedded": 0, "shards": []}
    folder = EmbeddingStore(out, spec.key()).folder
    folder.mkdir(parents=True, exist_ok=True)
    plan = folder / f"{TEMP_PREFIX}shards-{uuid.uuid4().hex[:12]}.parquet"
    unit = plan_unit(len(items))
    write_item_plan(items, plan, unit)
    try:
        job = EmbedJob(collection.describe(), str(plan), unit, str(out), spec, batch_size)
        runner = task_runner(setting)
        embed = sharded_embed if runner is None else sharded_embed.with_options(task_runner=runner)
        return embed(job, len(items), default_shards(setting))
    finally:
        plan.unlink(missing_ok=True)


def embed_sharded(
    collection: Collection,
    items: list[Item],
    out: Path,
    spec: ModelSpec,
    batch_size: int,
    cluster: str | None,
) -> tuple[list[Outcome], int]:
    """:func:`tasks.catalog.embed_items` sharded over the cluster the setting names: the same
    outcomes (one per item, in order) and count, the embeddings appended to the same
    content-addressed store by the workers themselves.

    Shards travel as row ranges of a plan file, with the collection's description and the
    store's path; pixels and embeddings never leave the worker that made them. A content that
    two shards hold is embedded by each that runs before the other's part is stored.
    """
    done = run_embed_sharded(collection, items, out, spec, batch_size, cluster)
    return done["outcomes"], done["embedded"]
