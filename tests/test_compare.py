"""Agreement of backends: deviations, ties versus real mismatches, and the written outputs.

The features here are one-dimensional, so every exact distance is a plain difference.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.compare import (
    Comparison,
    compare_one,
    compare_runs,
    exact_distances_from,
    tie_rows,
)
from tasks.search.backends import SearchRun
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
    differs, is_tie = tie_rows(REF_I, boundary, QIDS, exact)
    assert differs.tolist() == [False, True, True]
    assert is_tie.tolist() == [False, True, True]
    result = compare_one(REF_D, REF_I, REF_D.copy(), got_i, QIDS, 1.0, exact)
    assert result.passed
    assert (result.rows_identical, result.rows_tied, result.rows_mismatched) == (1, 2, 0)
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


def _run(tmp_path: Path, name: str, d: np.ndarray, i: np.ndarray, search_s: float) -> SearchRun:
    path = tmp_path / f"{name}.npz"
    np.savez(path, query_ids=QIDS, distances=d, neighbor_ids=i)
    return SearchRun(
        backend=name,
        device="cpu",
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
