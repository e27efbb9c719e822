"""Prove the answers agree: distances against scikit-learn within a tolerance, indices equal
except where distances tie (STL-10 holds duplicate images), and the speed of each backend."""

from __future__ import annotations

import json
from collections.abc import Callable
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
from tasks.embed import Features, load_features
from tasks.knn import REFERENCE, SearchRun, load_neighbors

COMPARE_FILE = "compare.json"
NEIGHBORS_FILE = "neighbors.parquet"
TIE_RTOL = 1e-6  # exact (float64) distances this close are equal: duplicates, not neighbours
EXACT_CHUNK = 512

ExactDistances = Callable[[np.ndarray, np.ndarray], np.ndarray]


def exact_distances_from(features: Features) -> ExactDistances:
    """A function giving exact float64 distances between queries and chosen index images.

    ``exact(query_ids (m,), neighbor_ids (m, k)) -> (m, k)`` float64, computed from the stored
    float32 features. Used to decide ties and to measure each backend's own error.
    """
    index_ids, index = load_features(features.index.path)
    query_ids, queries = load_features(features.query.path)
    index_order, query_order = np.argsort(index_ids), np.argsort(query_ids)

    def rows(ids: np.ndarray, all_ids: np.ndarray, order: np.ndarray) -> np.ndarray:
        """Row positions of ``ids`` in ``all_ids`` (sorted by ``order``)."""
        pos = order[np.clip(np.searchsorted(all_ids, ids, sorter=order), 0, len(order) - 1)]
        if not np.array_equal(all_ids[pos], ids):
            raise ImageSearchError("a backend returned image ids that are not in the features")
        return np.asarray(pos)

    def exact(qids: np.ndarray, nids: np.ndarray) -> np.ndarray:
        out = np.empty(nids.shape, dtype=np.float64)
        for start in range(0, len(qids), EXACT_CHUNK):
            stop = start + EXACT_CHUNK
            q = queries[rows(qids[start:stop], query_ids, query_order)].astype(np.float64)
            x = index[rows(nids[start:stop], index_ids, index_order)].astype(np.float64)
            out[start:stop] = np.sqrt(((x - q[:, None, :]) ** 2).sum(axis=-1))
        return out

    return exact


def tie_rows(
    ref_i: np.ndarray, got_i: np.ndarray, query_ids: np.ndarray, exact: ExactDistances
) -> tuple[np.ndarray, np.ndarray]:
    """Classify rows whose neighbour ids differ, on exact distances.

    ref_i, got_i: (n_queries, k) neighbour ids; query_ids: (n_queries,). A differing row is a
    *tie* when both id lists are equally close to the query: their exact distances, sorted,
    agree within ``TIE_RTOL``. Reported float32 distances are not used here, because their own
    rounding (scikit-learn's reached 0.15 for identical images) would hide or invent ties.
    Returns (differs (n,) bool, is_tie (n,) bool).
    """
    differs = np.any(ref_i != got_i, axis=1)
    is_tie = np.zeros(len(ref_i), dtype=bool)
    rows = np.flatnonzero(differs)
    if rows.size:
        e_ref = np.sort(exact(query_ids[rows], ref_i[rows]), axis=1)
        e_got = np.sort(exact(query_ids[rows], got_i[rows]), axis=1)
        is_tie[rows] = np.all(np.isclose(e_got, e_ref, rtol=TIE_RTOL, atol=1e-9), axis=1)
    return differs, is_tie


def error_vs_exact(
    distances: np.ndarray, ids: np.ndarray, query_ids: np.ndarray, exact: ExactDistances
) -> float:
    """Largest absolute error of a backend's reported distances (n, k) against exact ones."""
    if not distances.size:
        return 0.0
    return float(np.abs(distances.astype(np.float64) - exact(query_ids, ids)).max())


def compare_one(
    ref_d: np.ndarray,
    ref_i: np.ndarray,
    got_d: np.ndarray,
    got_i: np.ndarray,
    query_ids: np.ndarray,
    tolerance: float,
    exact: ExactDistances,
) -> dict[str, Any]:
    """Deviation, agreement and ties of one backend against the reference, JSON-ready.

    ref_*/got_*: (n_queries, k) distances (float32) and neighbour ids (int64).
    """
    if ref_d.shape != got_d.shape:
        raise ValueError(f"shapes differ: reference {ref_d.shape}, backend {got_d.shape}")
    dev = np.abs(got_d.astype(np.float64) - ref_d.astype(np.float64))
    scale = float(np.median(ref_d)) if ref_d.size else 0.0
    rel = dev / np.maximum(np.abs(ref_d.astype(np.float64)), np.finfo(np.float32).tiny)
    differs, is_tie = tie_rows(ref_i, got_i, query_ids, exact)
    mismatched = differs & ~is_tie
    worst_row = int(np.argmax(dev.max(axis=1))) if dev.size else 0
    if mismatched.any():
        worst_row = int(np.flatnonzero(mismatched)[np.argmax(dev[mismatched].max(axis=1))])
    max_abs = float(dev.max()) if dev.size else 0.0
    worst: dict[str, Any] = {"query_id": None}
    if len(query_ids):
        q = query_ids[worst_row : worst_row + 1]
        worst = {
            "query_id": int(q[0]),
            "reference_ids": ref_i[worst_row].tolist(),
            "reference_distances": ref_d[worst_row].tolist(),
            "reference_exact_distances": exact(q, ref_i[worst_row : worst_row + 1])[0].tolist(),
            "backend_ids": got_i[worst_row].tolist(),
            "backend_distances": got_d[worst_row].tolist(),
            "backend_exact_distances": exact(q, got_i[worst_row : worst_row + 1])[0].tolist(),
        }
    return {
        "max_abs_deviation": max_abs,
        "max_rel_deviation": float(rel.max()) if rel.size else 0.0,
        "median_neighbor_distance": scale,
        "abs_deviation_over_median_distance": max_abs / scale if scale else 0.0,
        "index_agreement": float(np.mean(ref_i == got_i)) if ref_i.size else 1.0,
        "rows_identical": int((~differs).sum()),
        "rows_tied": int(is_tie.sum()),
        "rows_mismatched": int(mismatched.sum()),
        "tie_rtol": TIE_RTOL,
        "tolerance": tolerance,
        "distances_pass": bool(max_abs <= tolerance),
        "passed": bool(max_abs <= tolerance and not mismatched.any()),
        "worst_query": worst,
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


def compare_runs(
    runs: list[SearchRun], features: Features, out: Path, tolerance: float
) -> dict[str, Any]:
    """Compare every backend that ran with scikit-learn; write compare.json and neighbors.parquet.

    Ties are decided on exact distances from ``features``, and each backend's own distance
    error is measured against them. Raises ImageSearchError naming the worst query when a
    backend really disagrees.
    """
    key = fingerprint("compare-v2", [r.model_dump() for r in runs], tolerance)
    done = stage_is_done(out, "compare", key, [out / COMPARE_FILE, out / NEIGHBORS_FILE])
    if done is not None:
        return dict(json.loads((out / COMPARE_FILE).read_text()))
    ran = {r.backend: r for r in runs if r.available}
    if REFERENCE not in ran:
        raise ImageSearchError("the scikit-learn reference did not run; nothing to compare with")
    loaded = {name: load_neighbors(run) for name, run in ran.items()}
    ref_q, ref_d, ref_i = loaded[REFERENCE]
    ref = ran[REFERENCE]
    exact = exact_distances_from(features)
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
            entry["max_abs_error_vs_exact"] = error_vs_exact(d, i, ref_q, exact)
            if run.backend != REFERENCE:
                entry.update(compare_one(ref_d, ref_i, d, i, ref_q, tolerance, exact))
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
            f"{w['query_id']}: sklearn {w['reference_ids']} at exact distances "
            f"{_fmt(w['reference_exact_distances'])}, {failed[0]} {w['backend_ids']} at "
            f"{_fmt(w['backend_exact_distances'])}. See {out / COMPARE_FILE}."
        )
    return summary


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


@task(cache_policy=NO_CACHE)
def compare(
    runs: list[SearchRun], features: Features, out: str, tolerance: float
) -> dict[str, Any]:
    """Prefect task: the agreement verdict; a real disagreement fails the flow run."""
    return compare_runs(runs, features, Path(out), tolerance)
