"""The sharded work as Prefect flows on a Dask task runner: the catalog pass's embedding
mapped over contiguous shards of the listing, and the exact search mapped over shards of index
rows. Each is handed to its stage as a runner (the stages never import this module), so the
stage cache, the staging area and the comparison are the in-process ones."""

from __future__ import annotations

import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE

from flows.runners import check_scheduler, cluster_threads, default_shards, task_runner
from tasks.catalog import Outcome
from tasks.cluster_setting import parse_cluster
from tasks.features.content import EmbeddingStore
from tasks.features.embed import EmbedRunner
from tasks.features.shards import (
    SHARDS_PER_THREAD,
    EmbedJob,
    embed_shard_items,
    plan_item_shards,
    plan_unit,
    read_item_plan,
    write_item_plan,
)
from tasks.layout import TEMP_PREFIX
from tasks.search.backends import SearchRun
from tasks.search.k import check_k
from tasks.search.knn import Searcher
from tasks.search.shards import Shard, ShardResult, merge_topk, plan_shards, search_shard
from tasks.sources.collection import Collection, Item
from tasks.storage import atomic_path
from tasks.types import ModelSpec

SHARDED = "sharded"

# --- The sharded search ---------------------------------------------------------------------


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
    check_k(k, rows)
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


# --- Sharded embedding -----------------------------------------------------------------------


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
        threads = cluster_threads()
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


def embed_runner(cluster: str) -> EmbedRunner:
    """The catalog pass's embedding sharded over ``cluster`` (see :func:`embed_sharded`); a
    scheduler address nothing answers on is refused here, before the catalog pass."""
    setting = parse_cluster(cluster)
    if setting.kind == "address" and setting.address:
        check_scheduler(setting.address)

    def run(
        collection: Collection,
        items: list[Item],
        content: EmbeddingStore,
        spec: ModelSpec,
        batch_size: int,
        progress: bool = True,
    ) -> tuple[list[Outcome], int]:
        return embed_sharded(collection, items, content.out, spec, batch_size, cluster)

    return run


# The code that decides the sharded backend's answer: part of its stage's key.
SEARCH_CODE = ("tasks.search", __name__)


def searcher(cluster: str | None) -> Searcher:
    """The ``sharded`` backend's search on ``cluster``, for the one search stage."""
    parse_cluster(cluster)  # a bad setting stops here, before anything runs
    return partial(run_sharded, cluster=cluster)
