"""Prove the answers agree: distances against scikit-learn within a tolerance, indices equal
except where distances tie (STL-10 holds duplicate images), and the speed of each backend."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common import (
    ImageSearchError,
    atomic_path,
    fingerprint,
    mark_stage_done,
    stage_is_done,
    write_json_atomic,
)
from tasks.knn import REFERENCE, SearchRun, load_neighbors

COMPARE_FILE = "compare.json"
NEIGHBORS_FILE = "neighbors.parquet"
TIE_RTOL = 1e-4  # distances this close (relative to the median neighbour distance) are ties


def tie_rows(
    ref_d: np.ndarray, ref_i: np.ndarray, got_d: np.ndarray, got_i: np.ndarray, tie_atol: float
) -> tuple[np.ndarray, np.ndarray]:
    """Classify rows whose neighbour ids differ.

    All arrays have shape (n_queries, k), sorted by distance. A differing row is a *tie* when the
    two distance lists agree position by position within ``tie_atol`` and every id found by only
    one side sits at the boundary distance (the k-th), where equally distant images can swap in;
    reordering within a row is a tie when the swapped positions have equal distances.
    Returns (differs (n,) bool, is_tie (n,) bool).
    """
    differs = np.any(ref_i != got_i, axis=1)
    is_tie = np.zeros(len(ref_i), dtype=bool)
    for row in np.flatnonzero(differs):
        if np.any(np.abs(ref_d[row] - got_d[row]) > tie_atol):
            continue
        only_ref = set(ref_i[row].tolist()) - set(got_i[row].tolist())
        only_got = set(got_i[row].tolist()) - set(ref_i[row].tolist())
        boundary = ref_d[row, -1]
        ok = all(
            abs(float(ref_d[row, j]) - boundary) <= tie_atol
            for j in range(ref_i.shape[1])
            if ref_i[row, j] in only_ref
        ) and all(
            abs(float(got_d[row, j]) - boundary) <= tie_atol
            for j in range(got_i.shape[1])
            if got_i[row, j] in only_got
        )
        if ok:
            # Within the shared ids, a different order must come from equal distances.
            pos_ref = {int(v): j for j, v in enumerate(ref_i[row])}
            for j, v in enumerate(got_i[row]):
                jr = pos_ref.get(int(v))
                if (
                    jr is not None
                    and jr != j
                    and abs(float(ref_d[row, jr] - got_d[row, j])) > tie_atol
                ):
                    ok = False
                    break
        is_tie[row] = ok
    return differs, is_tie


def compare_one(
    ref_d: np.ndarray,
    ref_i: np.ndarray,
    got_d: np.ndarray,
    got_i: np.ndarray,
    query_ids: np.ndarray,
    tolerance: float,
) -> dict[str, Any]:
    """Deviation, agreement and ties of one backend against the reference, JSON-ready.

    ref_*/got_*: (n_queries, k) distances (float32) and neighbour ids (int64).
    """
    if ref_d.shape != got_d.shape:
        raise ValueError(f"shapes differ: reference {ref_d.shape}, backend {got_d.shape}")
    dev = np.abs(got_d.astype(np.float64) - ref_d.astype(np.float64))
    scale = float(np.median(ref_d)) if ref_d.size else 0.0
    rel = dev / np.maximum(np.abs(ref_d.astype(np.float64)), np.finfo(np.float32).tiny)
    tie_atol = max(TIE_RTOL * scale, 1e-6)
    differs, is_tie = tie_rows(ref_d, ref_i, got_d, got_i, tie_atol)
    mismatched = differs & ~is_tie
    worst_row = int(np.argmax(dev.max(axis=1))) if dev.size else 0
    if mismatched.any():
        worst_row = int(np.flatnonzero(mismatched)[np.argmax(dev[mismatched].max(axis=1))])
    max_abs = float(dev.max()) if dev.size else 0.0
    return {
        "max_abs_deviation": max_abs,
        "max_rel_deviation": float(rel.max()) if rel.size else 0.0,
        "median_neighbor_distance": scale,
        "abs_deviation_over_median_distance": max_abs / scale if scale else 0.0,
        "index_agreement": float(np.mean(ref_i == got_i)) if ref_i.size else 1.0,
        "rows_identical": int((~differs).sum()),
        "rows_tied": int(is_tie.sum()),
        "rows_mismatched": int(mismatched.sum()),
        "tie_atol": tie_atol,
        "tolerance": tolerance,
        "distances_pass": bool(max_abs <= tolerance),
        "passed": bool(max_abs <= tolerance and not mismatched.any()),
        "worst_query": {
            "query_id": int(query_ids[worst_row]) if len(query_ids) else None,
            "reference_ids": ref_i[worst_row].tolist() if len(ref_i) else [],
            "reference_distances": ref_d[worst_row].tolist() if len(ref_d) else [],
            "backend_ids": got_i[worst_row].tolist() if len(got_i) else [],
            "backend_distances": got_d[worst_row].tolist() if len(got_d) else [],
        },
    }


def write_neighbors(
    path: Path, results: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
) -> None:
    """``neighbors.parquet``: (backend, query_id, rank, neighbor_id, distance), one row per hit."""
    tables = []
    for name, (qids, dist, nids) in results.items():
        n, k = dist.shape
        tables.append(
            pa.table(
                {
                    "backend": pa.array([name] * (n * k)).dictionary_encode(),
                    "query_id": pa.array(np.repeat(qids, k), type=pa.int64()),
                    "rank": pa.array(np.tile(np.arange(1, k + 1), n), type=pa.int32()),
                    "neighbor_id": pa.array(nids.reshape(-1), type=pa.int64()),
                    "distance": pa.array(dist.reshape(-1), type=pa.float32()),
                }
            )
        )
    with atomic_path(path) as tmp:
        pq.write_table(pa.concat_tables(tables, promote_options="permissive"), tmp)


def compare_runs(runs: list[SearchRun], out: Path, tolerance: float) -> dict[str, Any]:
    """Compare every backend that ran with scikit-learn; write compare.json and neighbors.parquet.

    Raises ImageSearchError naming the worst query when a backend really disagrees.
    """
    key = fingerprint("compare-v1", [r.model_dump() for r in runs], tolerance)
    done = stage_is_done(out, "compare", key, [out / COMPARE_FILE, out / NEIGHBORS_FILE])
    if done is not None:
        return dict(json.loads((out / COMPARE_FILE).read_text()))
    ran = {r.backend: r for r in runs if r.available}
    if REFERENCE not in ran:
        raise ImageSearchError("the scikit-learn reference did not run; nothing to compare with")
    loaded = {name: load_neighbors(run) for name, run in ran.items()}
    ref_q, ref_d, ref_i = loaded[REFERENCE]
    ref = ran[REFERENCE]
    backends: dict[str, Any] = {}
    for run in runs:
        entry: dict[str, Any] = {
            "device": run.device,
            "available": run.available,
            "reason": run.reason,
        }
        if run.available:
            q, d, i = loaded[run.backend]
            if not np.array_equal(q, ref_q):
                raise ImageSearchError(f"backend {run.backend} searched other queries than sklearn")
            entry.update(
                {
                    "fit_seconds": run.fit_seconds,
                    "search_seconds": run.search_seconds,
                    "load_seconds": run.load_seconds,
                    "cores_used": run.cores_used,
                    "threads": run.threads,
                    "speedup_search": ref.search_seconds / run.search_seconds
                    if run.search_seconds
                    else None,
                    "speedup_fit_search": (ref.fit_seconds + ref.search_seconds)
                    / (run.fit_seconds + run.search_seconds)
                    if run.fit_seconds + run.search_seconds
                    else None,
                }
            )
            if run.backend != REFERENCE:
                entry.update(compare_one(ref_d, ref_i, d, i, ref_q, tolerance))
        backends[run.backend] = entry
    others = [b for b in backends if b != REFERENCE and backends[b]["available"]]
    summary = {
        "reference": REFERENCE,
        "n_queries": len(ref_q),
        "k": int(ref_d.shape[1]),
        "tolerance": tolerance,
        "compared": others,
        "passed": all(backends[b]["passed"] for b in others) if others else None,
        "backends": backends,
    }
    write_json_atomic(out / COMPARE_FILE, summary)
    write_neighbors(out / NEIGHBORS_FILE, loaded)
    failed = [b for b in others if not backends[b]["passed"]]
    if not failed:
        mark_stage_done(out, "compare", key)
    if failed:
        b = backends[failed[0]]
        w = b["worst_query"]
        raise ImageSearchError(
            f"{failed[0]} disagrees with scikit-learn: max distance deviation "
            f"{b['max_abs_deviation']:.3g} (tolerance {tolerance}), {b['rows_mismatched']} "
            f"queries with different neighbours that are not ties. Worst query: image "
            f"{w['query_id']}: sklearn {w['reference_ids']} at {w['reference_distances']}, "
            f"{failed[0]} {w['backend_ids']} at {w['backend_distances']}. See {out / COMPARE_FILE}."
        )
    return summary


@task(cache_policy=NO_CACHE)
def compare(runs: list[SearchRun], out: str, tolerance: float) -> dict[str, Any]:
    """Prefect task: the agreement verdict; a real disagreement fails the flow run."""
    return compare_runs(runs, Path(out), tolerance)
