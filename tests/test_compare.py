"""Agreement of backends: deviations, ties versus real mismatches, and the written outputs."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pytest

from tasks.common import ImageSearchError
from tasks.compare import compare_one, compare_runs, tie_rows
from tasks.knn import SearchRun

QIDS = np.array([10, 11, 12], dtype=np.int64)
REF_D = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 2.0], [0.5, 0.5, 4.0]], dtype=np.float32)
REF_I = np.array([[7, 8, 9], [1, 2, 3], [4, 5, 6]], dtype=np.int64)


def test_identical_answers() -> None:
    result = compare_one(REF_D, REF_I, REF_D.copy(), REF_I.copy(), QIDS, tolerance=1.0)
    assert result["passed"] and result["max_abs_deviation"] == 0.0
    assert result["index_agreement"] == 1.0 and result["rows_identical"] == 3


def test_ties_are_not_errors() -> None:
    got_i = REF_I.copy()
    got_i[1] = [1, 3, 2]  # 2 and 3 tie at distance 2.0: swapped order
    got_i[2] = [5, 4, 6]  # 4 and 5 tie at 0.5
    got_d = REF_D.copy()
    got_i_boundary = got_i.copy()
    got_i_boundary[1] = [1, 2, 99]  # a different image at the boundary distance: a tie too
    differs, is_tie = tie_rows(REF_D, REF_I, got_d, got_i_boundary, 1e-6)
    assert differs.tolist() == [False, True, True]
    assert is_tie.tolist() == [False, True, True]
    result = compare_one(REF_D, REF_I, got_d, got_i, QIDS, tolerance=1.0)
    assert result["passed"]
    assert (result["rows_identical"], result["rows_tied"], result["rows_mismatched"]) == (1, 2, 0)
    assert result["index_agreement"] == pytest.approx(5 / 9)


def test_real_mismatch_names_the_worst_query() -> None:
    got_i = REF_I.copy()
    got_i[0] = [7, 99, 9]  # a different image at distance 2.0 that is not the boundary
    result = compare_one(REF_D, REF_I, REF_D.copy(), got_i, QIDS, tolerance=1.0)
    assert not result["passed"] and result["rows_mismatched"] == 1
    assert result["worst_query"]["query_id"] == 10


def test_distance_tolerance() -> None:
    got_d = REF_D + np.float32(0.01)
    assert compare_one(REF_D, REF_I, got_d, REF_I, QIDS, tolerance=1.0)["passed"]
    result = compare_one(REF_D, REF_I, got_d, REF_I, QIDS, tolerance=0.001)
    assert not result["distances_pass"] and not result["passed"]
    assert result["max_abs_deviation"] == pytest.approx(0.01, rel=1e-3)
    assert result["max_rel_deviation"] == pytest.approx(0.02, rel=1e-3)


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


def test_compare_runs_writes_json_and_neighbors(tmp_path: Path) -> None:
    runs = [
        _run(tmp_path, "sklearn", REF_D, REF_I, 4.0),
        _run(tmp_path, "faiss", REF_D, REF_I, 1.0),
        SearchRun(backend="cuml", device="gpu", available=False, reason="no CUDA device"),
    ]
    summary = compare_runs(runs, tmp_path, tolerance=1.0)
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["passed"] is True and saved["compared"] == ["faiss"]
    assert saved["backends"]["faiss"]["speedup_search"] == 4.0
    assert saved["backends"]["faiss"]["speedup_fit_search"] == pytest.approx(4.5 / 1.5)
    assert saved["backends"]["cuml"] == {
        "available": False,
        "device": "gpu",
        "reason": "no CUDA device",
    }
    rows = duckdb.sql(
        f"select backend::varchar, query_id, rank, neighbor_id, distance "
        f"from '{tmp_path / 'neighbors.parquet'}' order by backend, query_id, rank"
    ).fetchall()
    assert len(rows) == 18
    assert rows[0] == ("faiss", 10, 1, 7, 1.0)


def test_disagreement_fails_with_message(tmp_path: Path) -> None:
    bad_i = REF_I.copy()
    bad_i[2] = [4, 77, 6]
    runs = [
        _run(tmp_path, "sklearn", REF_D, REF_I, 1.0),
        _run(tmp_path, "numpy", REF_D, bad_i, 1.0),
    ]
    with pytest.raises(
        ImageSearchError, match=r"numpy disagrees with scikit-learn.*Worst query: image 12"
    ):
        compare_runs(runs, tmp_path, tolerance=1.0)
    assert json.loads((tmp_path / "compare.json").read_text())["passed"] is False
