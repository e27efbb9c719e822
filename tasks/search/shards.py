"""Exact search sharded by index rows: each shard holds only its rows of the index feature file
(whole row groups), searches every query block against them with the exact kernel and returns
its top k; one merge picks the global top k by (float64 distance, image id).

The feature files are sorted by image id, so a shard's positions are the global ones shifted
by its first row, and "lower position" and "lower image id" are the same tie rule. Each shard's
kernel returns exactly the first k of a stable sort of its float64 distances, and the global
first k of that order are among the shards' firsts, so the merge returns the single-process
answer to the last bit. Shards and results are small records: paths, row ranges, (n_queries, k)
arrays; no task ever receives the index.
"""

from __future__ import annotations

import itertools
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from tasks.errors import ImageSearchError
from tasks.search.exact import prepare_index, search_prepared

__all__ = [
    "Shard",
    "ShardResult",
    "iter_blocks",
    "load_rows",
    "merge_topk",
    "plan_shards",
    "search_shard",
    "search_sharded_local",
]


class Shard(BaseModel):
    """Rows ``[row_start, row_stop)`` of a feature file: its row groups ``[group_start,
    group_stop)``. What a shard task receives instead of the rows themselves."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    group_start: int
    group_stop: int
    row_start: int
    row_stop: int

    @property
    def rows(self) -> int:
        return self.row_stop - self.row_start


@dataclass
class ShardResult:
    """One shard's top k of every query.

    distances : ndarray of shape (n_queries, k_shard), float64, ascending per row
    ids : ndarray of shape (n_queries, k_shard), int64 image ids
    """

    distances: np.ndarray
    ids: np.ndarray
    query_ids: np.ndarray
    index_rows: int
    index_bytes: int
    query_block_bytes: int
    seconds: float
    peak_traced_bytes: int | None = None


def _feature_file(path: str | Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path, page_checksum_verification=True)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ImageSearchError(f"Cannot read feature file {path}: {exc}.") from exc


def plan_shards(path: str | Path, n_shards: int) -> list[Shard]:
    """Cut a feature file into at most ``n_shards`` runs of whole row groups, balanced by rows.

    A file of G row groups gives min(n_shards, G) shards; no shard is empty.
    """
    if isinstance(n_shards, bool) or not isinstance(n_shards, int) or n_shards < 1:
        raise ImageSearchError(f"shards = {n_shards!r}; it must be a whole number >= 1.")
    meta = _feature_file(path).metadata
    sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    total = int(starts[-1])
    if total == 0:
        raise ImageSearchError(f"Feature file {path} has no rows; there is nothing to search.")
    n = min(n_shards, len(sizes))
    # Group boundaries nearest to equal row counts; each shard keeps at least one group.
    cuts = [0]
    for s in range(1, n):
        g = int(np.argmin(np.abs(starts - total * s / n)))
        cuts.append(min(max(g, cuts[-1] + 1), len(sizes) - (n - s)))
    cuts.append(len(sizes))
    return [
        Shard(
            path=str(path),
            group_start=g0,
            group_stop=g1,
            row_start=int(starts[g0]),
            row_stop=int(starts[g1]),
        )
        for g0, g1 in itertools.pairwise(cuts)
    ]


def _to_numpy(tbl: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(ids (n,) int64, embeddings (n, d) float32) of a feature table, one copy of the values."""
    ids = tbl.column("image_id").to_numpy()
    emb_col = tbl.column("embedding")
    dim = emb_col.type.list_size
    emb = np.empty((tbl.num_rows, dim), dtype=np.float32)
    row = 0
    for chunk in emb_col.chunks:
        emb[row : row + len(chunk)] = chunk.flatten().to_numpy().reshape(-1, dim)
        row += len(chunk)
    return np.ascontiguousarray(ids, dtype=np.int64), emb


def load_rows(shard: Shard) -> tuple[np.ndarray, np.ndarray]:
    """Only the shard's rows: (ids (rows,) int64, embeddings (rows, d) float32), read row group
    by row group into one preallocated array (the peak is the shard plus one row group)."""
    source = _feature_file(shard.path)
    dim = source.schema_arrow.field("embedding").type.list_size
    ids = np.empty(shard.rows, dtype=np.int64)
    emb = np.empty((shard.rows, dim), dtype=np.float32)
    row = 0
    try:
        for g in range(shard.group_start, shard.group_stop):
            tbl = source.read_row_group(g, columns=["image_id", "embedding"])
            if row + tbl.num_rows > shard.rows:
                break
            ids[row : row + tbl.num_rows] = tbl.column("image_id").to_numpy()
            for chunk in tbl.column("embedding").chunks:
                emb[row : row + len(chunk)] = chunk.flatten().to_numpy().reshape(-1, dim)
                row += len(chunk)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ImageSearchError(
            f"Feature file {shard.path} is damaged ({exc}); delete it and run again."
        ) from exc
    if row != shard.rows:
        raise ImageSearchError(
            f"Feature file {shard.path} changed while it was searched: rows "
            f"[{shard.row_start}, {shard.row_stop}) are no longer {shard.rows} rows; run again."
        )
    return ids, emb


def iter_blocks(path: str | Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A feature file one row group at a time: (ids (m,) int64, embeddings (m, d) float32)."""
    source = _feature_file(path)
    for g in range(source.metadata.num_row_groups):
        try:
            tbl = source.read_row_group(g, columns=["image_id", "embedding"])
        except (OSError, pa.ArrowInvalid) as exc:
            raise ImageSearchError(
                f"Feature file {path} is damaged ({exc}); delete it and run again."
            ) from exc
        yield _to_numpy(tbl)


def search_shard(
    shard: Shard,
    query_path: str | Path,
    k: int,
    *,
    threads: int | None = None,
    trace_memory: bool = False,
) -> ShardResult:
    """Search every query block of ``query_path`` against the shard's rows; its top k.

    Returns per query the shard's min(k, rows) nearest by (float64 distance, image id), with
    global image ids. ``trace_memory`` records the peak of traced (NumPy) allocations, to show
    what a worker holds: its shard, one query block, the scores of one block and the outputs.
    """
    if trace_memory:
        tracemalloc.start()
    t0 = time.perf_counter()
    ids, emb = load_rows(shard)
    index_bytes = ids.nbytes + emb.nbytes
    prepared = prepare_index(emb)
    del emb  # prepare_index keeps the same float32 C-contiguous array
    kk = min(k, shard.rows)
    dist_parts, pos_parts, qid_parts = [], [], []
    block_bytes = 0
    for qids, queries in iter_blocks(query_path):
        block_bytes = max(block_bytes, qids.nbytes + queries.nbytes)
        d, p = search_prepared(prepared, queries, kk, float64=True, threads=threads)
        dist_parts.append(d)
        pos_parts.append(p)
        qid_parts.append(qids)
        del queries
    dist = np.concatenate(dist_parts) if dist_parts else np.empty((0, kk))
    pos = np.concatenate(pos_parts) if pos_parts else np.empty((0, kk), dtype=np.int64)
    neighbor_ids = ids[pos]
    rows = int(ids.shape[0])
    peak = None
    if trace_memory:
        # The most the task's traced (NumPy) allocations held at once; the tracing began with
        # the task, so whatever else lives in the worker is not counted. (Subtracting what was
        # still held at the end undercounted whenever the shard outlived the task a moment.)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return ShardResult(
        distances=dist,
        ids=neighbor_ids,
        query_ids=np.concatenate(qid_parts) if qid_parts else np.empty(0, dtype=np.int64),
        index_rows=rows,
        index_bytes=int(index_bytes),
        query_block_bytes=int(block_bytes),
        seconds=time.perf_counter() - t0,
        peak_traced_bytes=peak,
    )


def merge_topk(results: Sequence[ShardResult], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The global top k of every query from the shards' top k: ascending float64 distance,
    ties by the lower image id (the single-process rule).

    Returns (distances (n_queries, k) float64, ids (n_queries, k) int64).
    """
    if not results:
        raise ValueError("Expected at least one shard result, but got none")
    first = results[0].query_ids
    for r in results[1:]:
        if not np.array_equal(r.query_ids, first):
            raise ValueError("Expected every shard to answer the same queries in the same order")
    dist = np.concatenate([r.distances for r in results], axis=1)
    ids = np.concatenate([r.ids for r in results], axis=1)
    if dist.shape[1] < k:
        raise ValueError(f"Expected k <= n_index, but n_index = {dist.shape[1]}, k = {k}")
    order = np.lexsort((ids, dist), axis=-1)[:, :k]
    return np.take_along_axis(dist, order, axis=1), np.take_along_axis(ids, order, axis=1)


def search_sharded_local(
    index_path: str | Path, query_path: str | Path, k: int, n_shards: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sharded search in this process, shard after shard (no cluster): (query ids (n,),
    distances (n, k) float64, neighbour ids (n, k) int64)."""
    results = [search_shard(s, query_path, k) for s in plan_shards(index_path, n_shards)]
    dist, ids = merge_topk(results, k)
    return results[0].query_ids, dist, ids
