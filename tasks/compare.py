"""The verdict of a run: every backend that ran against the scikit-learn reference and against
exact distances (:mod:`tasks.agreement` decides each row), the speed of each, written as
``compare.json`` and ``neighbors.parquet``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.agreement import (
    Agreement,
    compare_one,
    error_vs_exact,
    exact_distances_from,
    unit_roundoff,
)
from tasks.errors import ImageSearchError
from tasks.layout import COMPARE, COMPARE_FILE, NEIGHBORS_FILE
from tasks.search.backends import REFERENCE, SearchRun
from tasks.search.knn import load_neighbors
from tasks.split import Mode
from tasks.storage import RunFolder, atomic_path, write_json_atomic
from tasks.types import Features


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
    ``compare.json`` is this model's JSON.

    ``mode``: 'benchmark' (STL-10: the queries are held out of the index) or 'collection'
    (every image is in the index; the queries are index images, each left out of its own
    answer).
    """

    reference: str
    mode: Mode = "benchmark"
    n_queries: int
    k: int
    tolerance: float
    compared: list[str]
    passed: bool
    failure: str | None = None
    backends: dict[str, BackendResult]


def _finite(
    neighbours: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A backend's (query ids, distances, ids) with a NaN or infinite distance read as the
    largest float32: as wrong as a distance can be (it fails the verdict), yet a number that
    compare.json, strict JSON, can hold."""
    qids, dist, nids = neighbours
    top = float(np.finfo(np.float32).max)
    return qids, np.nan_to_num(dist, nan=top, posinf=top, neginf=top), nids


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def summarise(
    runs: list[SearchRun], features: Features, out: Path, tolerance: float, mode: Mode
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
    loaded = {name: _finite(load_neighbors(run, out)) for name, run in ran.items()}
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
                    else compare_one(
                        ref_d,
                        ref_i,
                        d,
                        i,
                        ref_q,
                        tolerance,
                        exact,
                        unit_roundoff(ref.device),
                        unit_roundoff(run.device),
                    ),
                }
            )
        backends[run.backend] = entry
    others = [b for b in backends if b != REFERENCE and backends[b].available]
    failed = [b for b, r in backends.items() if not r.passed]
    summary = Comparison(
        reference=REFERENCE,
        mode=mode,
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
        f"(tolerance {tolerance}), {a.rows_mismatched} queries with different neighbours "
        f"whose exact distances differ by more than float32 arithmetic can explain."
    )
    if w := a.worst_query:
        msg += (
            f" Worst query: image {w.query_id}: sklearn {w.reference_ids} at exact distances "
            f"{_fmt(w.reference_exact_distances)}, {name} {w.backend_ids} at "
            f"{_fmt(w.backend_exact_distances)}"
        )
        if w.rank:
            msg += f" (rank {w.rank}: {w.gap:.6g} apart, float32 bound {w.bound:.3g})"
        msg += "."
    return msg


def compare_runs(
    runs: list[SearchRun],
    features: Features,
    run: RunFolder,
    tolerance: float,
    mode: Mode = "benchmark",
) -> Comparison:
    """Write ``compare.json`` and ``neighbors.parquet`` unless the same comparison is there.

    A failed comparison is a result too (the flow fails the run after its outputs are in
    place, so the user can read why).
    """
    searched = [r.model_dump(exclude={"path"}) for r in runs]
    stage = run.stage(
        COMPARE,
        [features.index.fingerprint, features.query.fingerprint, searched, tolerance, mode],
        code=["tasks.compare", "tasks.agreement"],
    )
    if stage.done() is not None:
        try:
            return Comparison.model_validate_json(stage.path(COMPARE_FILE).read_text())
        except ValueError:
            pass  # unreadable although its hash matched: recompute below
    summary, loaded = summarise(runs, features, run.out, tolerance, mode)
    payload = summary.model_dump(mode="json")
    json.dumps(payload, allow_nan=False)  # compare.json is strict JSON: no Infinity, no NaN
    write_json_atomic(stage.path(COMPARE_FILE), payload)
    write_neighbors(stage.path(NEIGHBORS_FILE), loaded)
    stage.finish()
    return summary


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


@task(cache_policy=NO_CACHE)
def compare(
    runs: list[SearchRun], features: Features, out: str, tolerance: float, mode: Mode
) -> Comparison:
    """Prefect task: the agreement verdict (the flow fails the run when it did not pass)."""
    return compare_runs(runs, features, RunFolder(Path(out)), tolerance, mode)
