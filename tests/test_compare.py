"""Agreement of backends: deviations, ties versus real mismatches (decided by the float32 error
bound), and the written outputs.

Most features here are one-dimensional, so every exact distance is a plain difference; the
float32 tests use 2048 dimensions and norms like ResNet50's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.agreement import ExactReference, compare_one, exact_distances_from, tie_rows
from tasks.compare import Comparison, compare_runs
from tasks.search.backends import SearchRun
from tasks.search.core import U32, U_ACC, float32_distance_error
from tasks.storage import RunFolder
from tasks.types import DataRef, Features

QIDS = np.array([10, 11, 12], dtype=np.int64)
REF_D = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 2.0], [0.5, 0.5, 4.0]], dtype=np.float32)
REF_I = np.array([[7, 8, 9], [1, 2, 3], [4, 5, 6]], dtype=np.int64)
# Every query sits at 0; index images at these positions. 99 is as far as 2, 3 and 8.
POSITIONS = {
    7: 1.0,
    8: 2.0,
    9: 3.0,
    1: 1.0,
    2: 2.0,
    3: -2.0,
    4: 0.5,
    5: -0.5,
    6: 4.0,
    99: 2.0,
    77: 3.5,
}


def write_features(path: Path, ids: list[int], values: list[float]) -> None:
    table = pa.table(
        {
            "image_id": pa.array(ids, type=pa.int64()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(values, pa.float32()), 1),
        }
    )
    pq.write_table(table, path)


@pytest.fixture
def features(tmp_path: Path) -> Features:
    write_features(tmp_path / "index.parquet", list(POSITIONS), list(POSITIONS.values()))
    write_features(tmp_path / "query.parquet", QIDS.tolist(), [0.0] * len(QIDS))
    return Features(
        index=DataRef(uri=str(tmp_path / "index.parquet"), rows=len(POSITIONS), fingerprint="i"),
        query=DataRef(uri=str(tmp_path / "query.parquet"), rows=3, fingerprint="q"),
        model={},
        device="cpu",
    )


def test_exact_distances_look_up_ids_not_positions(features: Features) -> None:
    exact = exact_distances_from(features)
    np.testing.assert_array_equal(exact(QIDS, REF_I), REF_D)
    np.testing.assert_array_equal(exact(np.array([12]), np.array([[77, 3]])), [[3.5, 2.0]])


def test_identical_answers(features: Features) -> None:
    exact = exact_distances_from(features)
    result = compare_one(REF_D, REF_I, REF_D.copy(), REF_I.copy(), QIDS, 1.0, exact)
    assert result.passed and result.max_abs_deviation == 0.0
    assert result.index_agreement == 1.0 and result.rows_identical == 3


def test_ties_are_not_errors(features: Features) -> None:
    exact = exact_distances_from(features)
    got_i = REF_I.copy()
    got_i[1] = [1, 3, 2]  # 2 and 3 tie at distance 2: swapped order
    got_i[2] = [5, 4, 6]  # 4 and 5 tie at 0.5
    boundary = got_i.copy()
    boundary[1] = [1, 2, 99]  # another image at the same distance: a tie too
    ties = tie_rows(REF_I, boundary, QIDS, exact)
    assert ties.differs.tolist() == [False, True, True]
    assert ties.is_tie.tolist() == [False, True, True]
    assert ties.gap.tolist() == [0.0, 0.0, 0.0]
    result = compare_one(REF_D, REF_I, REF_D.copy(), got_i, QIDS, 1.0, exact)
    assert result.passed
    assert (result.rows_identical, result.rows_tied, result.rows_mismatched) == (1, 2, 0)
    assert (result.rows_tied_exact, result.rows_tied_float32) == (2, 0)
    assert result.index_agreement == pytest.approx(5 / 9)


def test_ties_use_exact_distances_not_reported_ones(features: Features) -> None:
    """A reference whose float32 distances are off (as scikit-learn's are for duplicates)
    still gets ties recognised: the reported numbers decide nothing about ties."""
    exact = exact_distances_from(features)
    noisy_ref = REF_D + np.float32(0.15)
    got_i = REF_I.copy()
    got_i[2] = [5, 4, 6]
    result = compare_one(noisy_ref, REF_I, REF_D.copy(), got_i, QIDS, 1.0, exact)
    assert result.passed and result.rows_tied == 1
    assert result.max_abs_deviation == pytest.approx(0.15, rel=1e-5)


def test_real_mismatch_names_the_worst_query(features: Features) -> None:
    exact = exact_distances_from(features)
    got_i = REF_I.copy()
    got_i[0] = [7, 77, 9]  # 77 is farther than 8: not a tie
    got_d = REF_D.copy()
    got_d[0] = [1.0, 3.0, 3.5]
    result = compare_one(REF_D, REF_I, got_d, got_i, QIDS, 1.0, exact)
    assert not result.passed and result.rows_mismatched == 1
    worst = result.worst_query
    assert worst is not None
    assert worst.query_id == 10
    assert worst.backend_exact_distances == [1.0, 3.5, 3.0]
    assert worst.reference_exact_distances == [1.0, 2.0, 3.0]


def test_distance_tolerance(features: Features) -> None:
    exact = exact_distances_from(features)
    got_d = REF_D + np.float32(0.01)
    assert compare_one(REF_D, REF_I, got_d, REF_I, QIDS, 1.0, exact).passed
    result = compare_one(REF_D, REF_I, got_d, REF_I, QIDS, 0.001, exact)
    assert not result.distances_pass and not result.passed
    assert result.max_abs_deviation == pytest.approx(0.01, rel=1e-3)
    assert result.max_rel_deviation == pytest.approx(0.02, rel=1e-3)


def test_relative_deviation_of_an_exact_duplicate_is_finite(tmp_path: Path) -> None:
    """A distance of 0 (an exact copy) that a float32 backend reports as 3e-4: the relative
    deviation is measured against the float32 bound there, never divided by zero."""
    exact = write_exact(tmp_path, {4: [0.5], 5: [1.5]}, {10: [0.5]})
    ids, qids = np.array([[4, 5]], dtype=np.int64), np.array([10], dtype=np.int64)
    ref_d = np.array([[0.0, 1.0]], dtype=np.float32)
    got_d = np.array([[3e-4, 1.0]], dtype=np.float32)
    result = compare_one(ref_d, ids, got_d, ids, qids, 1.0, exact)
    assert result.max_abs_deviation == pytest.approx(3e-4)
    assert 0.0 < result.max_rel_deviation < 1.0  # within what float32 can get wrong at 0
    assert compare_one(ref_d, ids, ref_d, ids, qids, 1.0, exact).max_rel_deviation == 0.0
    all_zero = compare_one(ref_d[:, :1], ids[:, :1], ref_d[:, :1], ids[:, :1], qids, 1.0, exact)
    assert all_zero.abs_deviation_over_median_distance is None  # median 0: no ratio


def write_exact(
    folder: Path,
    index: Mapping[int, Sequence[float] | np.ndarray],
    queries: Mapping[int, Sequence[float] | np.ndarray],
) -> ExactReference:
    """Feature files of ``index`` and ``queries`` (id -> vector), and their exact reference."""
    for name, rows in (("index", index), ("query", queries)):
        values = np.asarray(list(rows.values()), dtype=np.float32)
        table = pa.table(
            {
                "image_id": pa.array(list(rows), type=pa.int64()),
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(values.reshape(-1)), values.shape[1]
                ),
            }
        )
        pq.write_table(table, folder / f"{name}.parquet")
    return exact_distances_from(
        Features(
            index=DataRef(uri=str(folder / "index.parquet"), rows=len(index), fingerprint="i"),
            query=DataRef(uri=str(folder / "query.parquet"), rows=len(queries), fingerprint="q"),
            model={},
            device="cpu",
        )
    )


DIM, NORM, FAR = 2048, 340.0, 56.0  # ResNet50's width; norms and distances of real features


def planted_pair(tmp_path: Path, gap: float) -> tuple[ExactReference, float]:
    """A query of norm NORM with neighbours at 10 (id 1), 20 (id 2), FAR (id 3) and
    FAR + ``gap`` (id 4), each along its own axis. Returns the reference and the float32 bound
    at rank 3 for gap 0 (the bound changes by gap / (2 FAR) of itself with the gap)."""
    rng = np.random.default_rng(0)
    q = np.zeros(DIM)
    q[8:] = np.abs(rng.normal(size=DIM - 8))
    q *= NORM / np.linalg.norm(q)
    index = {}
    for image_id, (axis, dist) in enumerate([(0, 10.0), (1, 20.0), (2, FAR), (3, FAR + gap)], 1):
        x = q.copy()
        x[axis] = dist
        index[image_id] = x.tolist()
    exact = write_exact(tmp_path, index, {10: q.tolist()})
    qn = exact.query_norms(np.array([10]))
    x_norm = np.minimum(exact.max_norm, qn + FAR)
    bound = 2 * float32_distance_error(qn, x_norm, DIM, np.array([[FAR]]), u=U32)[0, 0]
    return exact, float(bound)


@pytest.mark.parametrize(("share", "tied"), [(0.9, True), (1.1, False)])
def test_float32_bound_separates_near_ties_from_wrong_neighbours(
    tmp_path: Path, share: float, tied: bool
) -> None:
    """A backend that returns image 4 instead of image 3 as the third neighbour: a tie when the
    two exact distances differ by 0.9 of the float32 bound, a wrong answer that fails the
    verdict at 1.1 of it."""
    _, bound = planted_pair(tmp_path, 0.0)
    assert 1.0 < bound < 3.0  # about 4 % of the distance at these norms: float32's worst case
    exact, _ = planted_pair(tmp_path, share * bound)
    qids = np.array([10], dtype=np.int64)
    ref_i = np.array([[1, 2, 3]], dtype=np.int64)
    got_i = np.array([[1, 2, 4]], dtype=np.int64)
    ref_d = exact(qids, ref_i).astype(np.float32)
    got_d = exact(qids, got_i).astype(np.float32)
    result = compare_one(ref_d, ref_i, got_d, got_i, qids, 10.0, exact)
    assert result.distances_pass  # the distances alone are within the tolerance of 10
    assert result.passed is tied
    assert (result.rows_tied_float32, result.rows_mismatched) == ((1, 0) if tied else (0, 1))
    worst = result.worst_query
    assert worst is not None and worst.rank == 3
    assert worst.gap == pytest.approx(share * bound, rel=1e-3)
    assert worst.gap / worst.bound == pytest.approx(share, rel=0.03)
    if tied:
        (row,) = result.float32_ties
        assert (row.query_id, row.rank, row.backend_ids) == (10, 3, [1, 2, 4])


def test_float32_answers_to_near_ties_pass(tmp_path: Path) -> None:
    """Neighbours 1.6e-4 apart at distance 56 (relative 2.9e-6, as on a real icon folder),
    ranked by float32 |q|² + |x|² − 2 q·x as FAISS and cuML do: float32 swaps some of them,
    and the verdict calls every such row a tie (a fixed relative tolerance of 1e-6 did not)."""
    rng = np.random.default_rng(1)
    n, gap = 200, 1.6e-4
    index, queries = {}, {}
    for i in range(n):
        q = np.abs(rng.normal(size=DIM))
        q *= NORM / np.linalg.norm(q)
        queries[100_000 + i] = q.astype(np.float32)
        for j, dist in enumerate([20.0, 40.0, FAR, FAR + gap]):
            direction = rng.normal(size=DIM)
            index[4 * i + j] = (q + dist * direction / np.linalg.norm(direction)).astype(np.float32)
    exact = write_exact(tmp_path, index, queries)
    x = np.stack(list(index.values()))
    qs = np.stack(list(queries.values()))
    qids, xids = np.array(list(queries)), np.array(list(index))
    sq32 = (
        (qs * qs).sum(1, dtype=np.float32)[:, None]
        + (x * x).sum(1, dtype=np.float32)[None, :]
        - np.float32(2) * (qs @ x.T)
    )
    got_pos = np.argsort(sq32, axis=1, kind="stable")[:, :3]
    got_i = xids[got_pos]
    got_d = np.sqrt(np.maximum(np.take_along_axis(sq32, got_pos, 1), 0)).astype(np.float32)
    x64 = x.astype(np.float64)
    true = np.stack([np.sqrt(((x64 - q) ** 2).sum(1)) for q in qs.astype(np.float64)])
    ref_pos = np.argsort(true, axis=1, kind="stable")[:, :3]
    ref_i = xids[ref_pos]
    ref_d = np.take_along_axis(true, ref_pos, 1).astype(np.float32)
    result = compare_one(ref_d, ref_i, got_d, got_i, qids, 1.0, exact)
    assert result.rows_tied_float32 > 5  # float32 really cannot order these
    assert result.rows_mismatched == 0 and result.passed
    assert all(t.rank == 3 and 1e-6 < t.gap / FAR < 1e-5 for t in result.float32_ties)
    assert np.isfinite(result.max_rel_deviation)


def _run(
    tmp_path: Path,
    name: str,
    d: np.ndarray,
    i: np.ndarray,
    search_s: float,
    device: str = "cpu",
) -> SearchRun:
    path = tmp_path / f"{name}.npz"
    np.savez(path, query_ids=QIDS, distances=d, neighbor_ids=i)
    return SearchRun(
        backend=name,
        device=device,
        available=True,
        path=str(path),
        n_queries=3,
        k=3,
        fit_seconds=0.5,
        search_seconds=search_s,
    )


def test_compare_runs_writes_json_and_neighbors(tmp_path: Path, features: Features) -> None:
    runs = [
        _run(tmp_path, "sklearn", REF_D + np.float32(0.001), REF_I, 4.0),
        _run(tmp_path, "faiss", REF_D, REF_I, 1.0),
        SearchRun(backend="cuml", device="gpu", available=False, reason="no CUDA device"),
    ]
    run = RunFolder(tmp_path / "out")
    summary = compare_runs(runs, features, run, tolerance=1.0)
    assert run.commit(["compare"]) == ["compare"]
    saved = json.loads((run.out / "compare.json").read_text())
    assert Comparison.model_validate(saved) == summary
    assert saved["passed"] is True and saved["compared"] == ["faiss"]
    faiss = saved["backends"]["faiss"]
    assert faiss["speedup_search"] == 4.0
    assert faiss["speedup_fit_search"] == pytest.approx(4.5 / 1.5)
    assert faiss["max_abs_error_vs_exact"] == 0.0
    assert faiss["agreement"]["rows_identical"] == 3
    assert saved["backends"]["sklearn"]["max_abs_error_vs_exact"] == pytest.approx(0.001, rel=1e-3)
    assert saved["backends"]["sklearn"]["agreement"] is None
    cuml = saved["backends"]["cuml"]
    assert (cuml["available"], cuml["device"], cuml["reason"]) == (False, "gpu", "no CUDA device")
    assert cuml["search_seconds"] is None and cuml["agreement"] is None
    rows = duckdb.sql(
        f"select backend::varchar, query_id, rank, neighbor_id, distance "
        f"from '{run.out / 'neighbors.parquet'}' order by backend, query_id, rank"
    ).fetchall()
    assert len(rows) == 18
    assert rows[0] == ("faiss", 10, 1, 7, 1.0)


def test_disagreement_is_a_failed_verdict_with_the_worst_query(
    tmp_path: Path, features: Features
) -> None:
    bad_i = REF_I.copy()
    bad_i[2] = [4, 77, 6]
    runs = [
        _run(tmp_path, "sklearn", REF_D, REF_I, 1.0),
        _run(tmp_path, "numpy", REF_D, bad_i, 1.0),
    ]
    run = RunFolder(tmp_path / "out")
    summary = compare_runs(runs, features, run, tolerance=1.0)
    assert summary.passed is False and summary.failure is not None
    assert re.search(
        r"numpy disagrees with scikit-learn.*Worst query: image 12: sklearn \[4, 5, 6\] "
        r"at exact distances \[0\.5, 0\.5, 4\], numpy \[4, 77, 6\] at \[0\.5, 3\.5, 4\]",
        summary.failure,
    )
    run.commit(["compare"])
    assert json.loads((run.out / "compare.json").read_text())["passed"] is False


def test_wrong_neighbours_fail_even_when_backends_agree(tmp_path: Path, features: Features) -> None:
    """Neighbours that are not at the distances reported for them fail the run, whatever the
    reference says: a folder that reads another folder's answers cannot pass."""
    wrong_i = np.array([[77, 6, 9], [1, 2, 3], [4, 5, 6]], dtype=np.int64)  # 77, 6: 3.5, 4.0
    runs = [
        _run(tmp_path, "sklearn", REF_D, wrong_i, 1.0),
        _run(tmp_path, "faiss", REF_D, wrong_i, 1.0),
    ]
    summary = compare_runs(runs, features, RunFolder(tmp_path / "out"), tolerance=1.0)
    assert summary.backends["faiss"].agreement is not None
    assert summary.backends["faiss"].agreement.passed  # they agree with each other ...
    assert summary.backends["sklearn"].max_abs_error_vs_exact == pytest.approx(2.5)
    assert summary.passed is False  # ... but not with the exact distances
    assert summary.failure is not None and "away from the exact" in summary.failure


def test_a_backend_that_returns_nan_fails_in_strict_json(
    tmp_path: Path, features: Features
) -> None:
    """NaN or infinite distances from a broken backend fail the run, and compare.json stays
    valid JSON (no NaN, no Infinity anywhere)."""
    bad_d = REF_D.copy()
    bad_d[1, 2] = np.nan
    bad_d[2, 0] = np.inf
    runs = [
        _run(tmp_path, "sklearn", REF_D, REF_I, 1.0),
        _run(tmp_path, "faiss", bad_d, REF_I, 0.0),  # no time at all: no speedup either
    ]
    run = RunFolder(tmp_path / "out")
    summary = compare_runs(runs, features, run, tolerance=1.0)
    run.commit(["compare"])

    def refuse(name: str) -> None:
        raise AssertionError(f"compare.json holds {name}")

    saved = json.loads((run.out / "compare.json").read_text(), parse_constant=refuse)
    assert saved["passed"] is False and summary.failure is not None
    faiss = saved["backends"]["faiss"]
    assert faiss["speedup_search"] is None and faiss["exact_error_pass"] is False


def test_a_gpu_backend_is_judged_with_the_gpu_roundoff(tmp_path: Path, features: Features) -> None:
    """cuML's float32 GEMM may truncate in its adders: its rows are judged with the exact
    core's U_ACC (2^-22), the reference's with 2^-24, and compare.json records both."""
    runs = [
        _run(tmp_path, "sklearn", REF_D, REF_I, 1.0),
        _run(tmp_path, "cuml", REF_D, REF_I, 0.1, device="gpu"),
    ]
    summary = compare_runs(runs, features, RunFolder(tmp_path / "out"), tolerance=1.0)
    agreement = summary.backends["cuml"].agreement
    assert agreement is not None and agreement.passed
    assert agreement.unit_roundoff == {"reference": U32, "backend": U_ACC}
