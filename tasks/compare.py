"""Prove the answers agree: distances against scikit-learn within a tolerance, indices equal
except where distances tie (STL-10 holds duplicate images), and the speed of each backend."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.errors import ImageSearchError
from tasks.features.store import load_features
from tasks.layout import COMPARE, COMPARE_FILE, NEIGHBORS_FILE
from tasks.search.backends import REFERENCE, SearchRun
from tasks.search.knn import load_neighbors
from tasks.storage import RunFolder, atomic_path, write_json_atomic
from tasks.types import Features

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


class WorstQuery(BaseModel):
    """The query whose answer deviates most, with both answers and their exact distances."""

    query_id: int
    reference_ids: list[int]
    reference_distances: list[float]
    reference_exact_distances: list[float]
    backend_ids: list[int]
    backend_distances: list[float]
    backend_exact_distances: list[float]


class Agreement(BaseModel):
    """How one backend's answer compares with the reference's, on the same queries."""

    max_abs_deviation: float
    max_rel_deviation: float
    median_neighbor_distance: float
    abs_deviation_over_median_distance: float
    index_agreement: float
    rows_identical: int
    rows_tied: int
    rows_mismatched: int
    tie_rtol: float
    tolerance: float
    distances_pass: bool
    passed: bool
    worst_query: WorstQuery | None


def compare_one(
    ref_d: np.ndarray,
    ref_i: np.ndarray,
    got_d: np.ndarray,
    got_i: np.ndarray,
    query_ids: np.ndarray,
    tolerance: float,
    exact: ExactDistances,
) -> Agreement:
    """Deviation, agreement and ties of one backend against the reference.

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
    worst = None
    if len(query_ids):
        q = query_ids[worst_row : worst_row + 1]
        worst = WorstQuery(
            query_id=int(q[0]),
            reference_ids=ref_i[worst_row].tolist(),
            reference_distances=ref_d[worst_row].tolist(),
            reference_exact_distances=exact(q, ref_i[worst_row : worst_row + 1])[0].tolist(),
            backend_ids=got_i[worst_row].tolist(),
            backend_distances=got_d[worst_row].tolist(),
            backend_exact_distances=exact(q, got_i[worst_row : worst_row + 1])[0].tolist(),
        )
    return Agreement(
        max_abs_deviation=max_abs,
        max_rel_deviation=float(rel.max()) if rel.size else 0.0,
        median_neighbor_distance=scale,
        abs_deviation_over_median_distance=max_abs / scale if scale else 0.0,
        index_agreement=float(np.mean(ref_i == got_i)) if ref_i.size else 1.0,
        rows_identical=int((~differs).sum()),
        rows_tied=int(is_tie.sum()),
        rows_mismatched=int(mismatched.sum()),
        tie_rtol=TIE_RTOL,
        tolerance=tolerance,
        distances_pass=bool(max_abs <= tolerance),
        passed=bool(max_abs <= tolerance and not mismatched.any()),
        worst_query=worst,
    )


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


class BackendResult(BaseModel):
    """One backend in ``compare.json``: what ran, how fast, how exact, and the verdict."""

    device: str
    available: bool
    reason: str | None = None
    fit_seconds: float | None = None
    search_seconds: float | None = None
    load_seconds: float | None = None
    cores_used: float | None = None
    threads: dict[str, int] = {}
    details: dict[str, Any] = {}
    speedup_search: float | None = None
    speedup_fit_search: float | None = None
    max_abs_error_vs_exact: float | None = None
    exact_error_pass: bool | None = None
    agreement: Agreement | None = None

    @property
    def passed(self) -> bool:
        """Within tolerance of the exact distances, and (if compared) agreeing with the
        reference; an unavailable backend neither passes nor fails."""
        if not self.available:
            return True
        return bool(self.exact_error_pass) and (self.agreement is None or self.agreement.passed)


class Comparison(BaseModel):
    """The verdict of a run: every backend against the reference and the exact distances.
    ``compare.json`` is this model's JSON."""

    reference: str
    n_queries: int
    k: int
    tolerance: float
    compared: list[str]
    passed: bool
    failure: str | None = None
    backends: dict[str, BackendResult]


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def summarise(
    runs: list[SearchRun], features: Features, out: Path, tolerance: float
) -> tuple[Comparison, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Compare every backend that ran with scikit-learn and with exact distances.

    Ties are decided on exact distances from ``features``, and each backend's own distance
    error is measured against them: an error above ``tolerance`` fails the backend even when
    it agrees with the reference (wrong neighbours cannot pass by agreeing with each other).
    Returns the comparison and the loaded neighbours of each backend.
    """
    ran = {r.backend: r for r in runs if r.available}
    if REFERENCE not in ran:
        raise ImageSearchError("the scikit-learn reference did not run; nothing to compare with")
    loaded = {name: load_neighbors(run, out) for name, run in ran.items()}
    ref_q, ref_d, ref_i = loaded[REFERENCE]
    ref = ran[REFERENCE]
    exact = exact_distances_from(features)
    backends: dict[str, BackendResult] = {}
    for run in runs:
        entry = BackendResult(device=run.device, available=run.available, reason=run.reason)
        if run.available:
            q, d, i = loaded[run.backend]
            if not np.array_equal(q, ref_q):
                raise ImageSearchError(f"backend {run.backend} searched other queries than sklearn")
            error = error_vs_exact(d, i, ref_q, exact)
            entry = entry.model_copy(
                update={
                    "fit_seconds": run.fit_seconds,
                    "search_seconds": run.search_seconds,
                    "load_seconds": run.load_seconds,
                    "cores_used": run.cores_used,
                    "threads": run.threads,
                    "details": run.details,
                    "speedup_search": _ratio(ref.search_seconds, run.search_seconds),
                    "speedup_fit_search": _ratio(
                        ref.fit_seconds + ref.search_seconds, run.fit_seconds + run.search_seconds
                    ),
                    "max_abs_error_vs_exact": error,
                    "exact_error_pass": error <= tolerance,
                    "agreement": None
                    if run.backend == REFERENCE
                    else compare_one(ref_d, ref_i, d, i, ref_q, tolerance, exact),
                }
            )
        backends[run.backend] = entry
    others = [b for b in backends if b != REFERENCE and backends[b].available]
    failed = [b for b, r in backends.items() if not r.passed]
    summary = Comparison(
        reference=REFERENCE,
        n_queries=len(ref_q),
        k=int(ref_d.shape[1]),
        tolerance=tolerance,
        compared=others,
        passed=not failed,
        failure=_failure(failed[0], backends[failed[0]], tolerance) if failed else None,
        backends=backends,
    )
    return summary, loaded


def _failure(name: str, b: BackendResult, tolerance: float) -> str:
    """One paragraph that says which backend failed, how, and on which query."""
    a = b.agreement
    if a is None or a.passed:
        return (
            f"{name} reports distances up to {b.max_abs_error_vs_exact:.3g} away from the exact "
            f"distances of the neighbours it returned (tolerance {tolerance}): its answer is "
            f"wrong, whatever it agrees with."
        )
    msg = (
        f"{name} disagrees with scikit-learn: max distance deviation {a.max_abs_deviation:.3g} "
        f"(tolerance {tolerance}), {a.rows_mismatched} queries with different neighbours that "
        f"are not ties."
    )
    if w := a.worst_query:
        msg += (
            f" Worst query: image {w.query_id}: sklearn {w.reference_ids} at exact distances "
            f"{_fmt(w.reference_exact_distances)}, {name} {w.backend_ids} at "
            f"{_fmt(w.backend_exact_distances)}."
        )
    return msg


def compare_runs(
    runs: list[SearchRun], features: Features, run: RunFolder, tolerance: float
) -> Comparison:
    """Write ``compare.json`` and ``neighbors.parquet`` unless the same comparison is there.

    A failed comparison is a result too (the flow fails the run after its outputs are in
    place, so the user can read why).
    """
    searched = [r.model_dump(exclude={"path"}) for r in runs]
    stage = run.stage(
        COMPARE,
        [features.index.fingerprint, features.query.fingerprint, searched, tolerance],
        code=["tasks.compare"],
    )
    if stage.done() is not None:
        try:
            return Comparison.model_validate_json(stage.path(COMPARE_FILE).read_text())
        except ValueError:
            pass  # unreadable although its hash matched: recompute below
    summary, loaded = summarise(runs, features, run.out, tolerance)
    write_json_atomic(stage.path(COMPARE_FILE), summary.model_dump(mode="json"))
    write_neighbors(stage.path(NEIGHBORS_FILE), loaded)
    stage.finish()
    return summary


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


@task(cache_policy=NO_CACHE)
def compare(runs: list[SearchRun], features: Features, out: str, tolerance: float) -> Comparison:
    """Prefect task: the agreement verdict (the flow fails the run when it did not pass)."""
    return compare_runs(runs, features, RunFolder(Path(out)), tolerance)
