"""Every KNN backend against a float64 NumPy brute-force reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.errors import ImageSearchError
from tasks.features.store import table, write_part
from tasks.search.backends import (
    BACKENDS,
    CumlBackend,
    choose_backends,
    make_backend,
    run_backend,
    to_euclidean,
)
from tasks.search.k import check_k as validate_k
from tasks.search.knn import leave_one_out, load_neighbors, search_features
from tasks.storage import RunFolder
from tasks.types import DataRef, Features


def reference(index: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact float64 brute force: (distances (nq, k), positions (nq, k)), ties by lower index."""
    d = np.sqrt(((queries[:, None, :].astype(np.float64) - index[None, :, :]) ** 2).sum(-1))
    pos = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, pos, axis=1), pos


def features(n: int, d: int, seed: int) -> np.ndarray:
    """Non-negative float32 features shaped like ResNet max-pool outputs, with duplicates."""
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.normal(size=(n, d)), 0).astype(np.float32) * 3
    x[5] = x[4]  # exact duplicates make ties
    return x


def assert_matches_reference(
    dist: np.ndarray,
    ids: np.ndarray,
    ref_d: np.ndarray,
    index: np.ndarray,
    index_ids: np.ndarray,
    queries: np.ndarray,
) -> None:
    """The k distances equal the float64 reference, and every returned id really lies at the
    distance reported for it (so a tie may reorder ids, but never swap in a farther image).

    dist, ids, ref_d: (nq, k); index (n, d) with image ids ``index_ids`` (n,); queries (nq, d).
    """
    np.testing.assert_allclose(dist, ref_d, rtol=1e-4, atol=1e-3)
    rows = np.searchsorted(index_ids, ids)  # index_ids are sorted
    assert np.array_equal(index_ids[rows], ids), "a backend returned an id not in the index"
    true = np.linalg.norm(index[rows].astype(np.float64) - queries[:, None, :], axis=-1)
    np.testing.assert_allclose(dist, true, rtol=1e-4, atol=1e-3)
    assert all(len(set(row)) == len(row) for row in ids.tolist()), "an id returned twice"


def test_to_euclidean_converts_squared_distances() -> None:
    sq = np.array([[0.0, 4.0, 9.0], [-1e-6, 2.25, 1e4]], dtype=np.float32)
    np.testing.assert_array_equal(to_euclidean(sq), [[0, 2, 3], [0, 1.5, 100]])
    assert to_euclidean(sq).dtype == np.float32


@pytest.mark.parametrize("name", ["sklearn", "faiss", "numpy", "certified"])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_cpu_backends_equal_float64_reference(name: str, k: int, tmp_path: Path) -> None:
    index = features(300, 64, seed=1)
    queries = np.concatenate([features(40, 64, seed=2), index[4:6]])  # queries that hit ties
    ids_index = np.arange(1000, 1300, dtype=np.int64)  # image ids are not row positions
    ids_query = np.arange(5000, 5042, dtype=np.int64)
    ipath, qpath = tmp_path / "index.parquet", tmp_path / "query.parquet"
    _write_dim(index, ids_index, ipath)
    _write_dim(queries, ids_query, qpath)
    backend = make_backend(name)
    assert backend.unavailable_reason() is None  # CPU backends are core dependencies
    run = run_backend(backend, ipath, qpath, k, tmp_path / f"{name}.npz")
    assert run.available and run.k == k and run.n_queries == 42
    assert run.fit_seconds >= 0 and run.search_seconds > 0
    qids, dist, nids = load_neighbors(run, tmp_path)
    np.testing.assert_array_equal(qids, ids_query)
    assert dist.dtype == np.float32 and nids.dtype == np.int64 and dist.shape == (42, k)
    ref_d, _ = reference(index, queries, k)
    assert_matches_reference(dist, nids, ref_d, index, ids_index, queries)
    # A query identical to an index image finds it at distance zero.
    assert dist[-2, 0] == pytest.approx(0, abs=1e-3)


def _write_dim(x: np.ndarray, ids: np.ndarray, path: Path) -> None:
    """Write features of any width (the pipeline's schema fixes 2048) for small tests."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = pa.array(x.reshape(-1))
    table = pa.table(
        {
            "image_id": pa.array(ids),
            "embedding": pa.FixedSizeListArray.from_arrays(values, x.shape[1]),
        }
    )
    pq.write_table(table, path)


def test_pipeline_width_features_round_trip(tmp_path: Path) -> None:
    x = features(20, 2048, seed=3)
    write_part(table(np.arange(20), x), tmp_path / "f.parquet")
    run = run_backend(
        make_backend("sklearn"),
        tmp_path / "f.parquet",
        tmp_path / "f.parquet",
        2,
        tmp_path / "s.npz",
    )
    _, dist, nids = load_neighbors(run, tmp_path)
    # Each image is its own nearest neighbour; images 4 and 5 are duplicates, so a tie.
    unique = [i for i in range(20) if i not in (4, 5)]
    np.testing.assert_array_equal(nids[unique, 0], unique)
    assert set(nids[[4, 5], 0].tolist()) <= {4, 5}
    assert set(nids[[4, 5], :2].reshape(-1).tolist()) == {4, 5}
    assert np.all(dist[:, 0] < 1e-2)


def test_validate_k_message() -> None:
    with pytest.raises(ImageSearchError, match="Expected k <= n_index, but n_index = 5, k = 6"):
        validate_k(6, 5)
    with pytest.raises(ImageSearchError, match="k = 0; it must be at least 1"):
        validate_k(0, 5)


def test_unknown_backend_and_default_choice() -> None:
    with pytest.raises(
        ImageSearchError,
        match="Unknown backend 'annoy'; choose from certified, cuml, faiss, numpy, sklearn",
    ):
        make_backend("annoy")
    assert choose_backends(["faiss", "sklearn"]) == ["sklearn", "faiss"]
    auto = choose_backends(None)
    assert auto[0] == "sklearn"
    if CumlBackend().unavailable_reason() is None:
        assert auto == ["sklearn", "cuml"]
    else:
        assert auto == ["sklearn", "cuml", "faiss"]
    assert set(BACKENDS) == {"sklearn", "faiss", "numpy", "cuml", "certified"}


def test_unavailable_backend_is_reported_not_fatal(tmp_path: Path) -> None:
    reason = CumlBackend().unavailable_reason()
    if reason is None:
        pytest.skip("cuML can run here")
    ref = DataRef(uri=str(tmp_path / "none.parquet"), rows=10, fingerprint="x")
    features = Features(index=ref, query=ref, model={}, device="cpu")
    run = search_features(features, RunFolder(tmp_path), "cuml", 3)
    assert not run.available and run.path is None
    assert run.reason == reason
    assert "CUDA" in reason or "not installed" in reason
    assert not (tmp_path / ".staging").exists()  # nothing recorded for a backend that never ran


@pytest.mark.gpu
def test_cuml_equals_float64_reference(tmp_path: Path) -> None:
    index = features(2000, 2048, seed=5)
    queries = features(100, 2048, seed=6)
    ipath, qpath = tmp_path / "index.parquet", tmp_path / "query.parquet"
    write_part(table(np.arange(2000), index), ipath)
    write_part(table(np.arange(2000, 2100), queries), qpath)
    run = run_backend(CumlBackend(), ipath, qpath, 3, tmp_path / "cuml.npz")
    assert run.available, run.reason
    _, dist, nids = load_neighbors(run, tmp_path)
    ref_d, _ = reference(index, queries, 3)
    assert_matches_reference(dist, nids, ref_d, index, np.arange(2000), queries)


@pytest.mark.slow
def test_faiss_loads_after_sklearn_so_neither_starves() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from tasks.search.backends import FaissBackend; "
        "FaissBackend().unavailable_reason(); "
        "mods = list(sys.modules); print(mods.index('sklearn') < mods.index('faiss'))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "True", proc.stderr[-2000:]


def test_leave_one_out_drops_the_query_itself() -> None:
    qids = np.array([10, 11, 12], dtype=np.int64)
    nids = np.array([[10, 3, 4, 5], [3, 11, 4, 5], [7, 8, 9, 6]], dtype=np.int64)
    dist = np.array([[0, 1, 2, 3], [0, 0, 2, 3], [0, 0, 0, 0]], dtype=np.float32)
    d, n = leave_one_out(qids, dist, nids)
    # 11 sorted after its exact copy 3; 12 has four copies before itself: the last one goes.
    assert n.tolist() == [[3, 4, 5], [3, 4, 5], [7, 8, 9]]
    assert d.tolist() == [[1, 2, 3], [0, 2, 3], [0, 0, 0]]
    with pytest.raises(ValueError, match="k \\+ 1 >= 2"):
        leave_one_out(qids, dist[:, :1], nids[:, :1])


@pytest.mark.parametrize("name", ["sklearn", "faiss"])
def test_the_search_stage_leaves_each_index_image_out_of_its_own_answer(
    name: str, tmp_path: Path
) -> None:
    """Queries that are index images (a collection): k neighbours other than the query, equal
    to the float64 reference among the other images; exact copies find each other at 0."""
    x = features(200, 32, seed=7)  # rows 4 and 5 are exact copies
    ids = np.arange(100, 300, dtype=np.int64)
    ipath, qpath = tmp_path / "index.parquet", tmp_path / "query.parquet"
    _write_dim(x, ids, ipath)
    sample = np.array([0, 4, 5, 17, 199])
    _write_dim(x[sample], ids[sample], qpath)
    refs = {
        side: DataRef(uri=str(path), rows=n, fingerprint=side)
        for side, path, n in (("index", ipath, 200), ("query", qpath, 5))
    }
    feats = Features(index=refs["index"], query=refs["query"], model={}, device="cpu")
    run = search_features(feats, RunFolder(tmp_path / "out"), name, 3, exclude_self=True)
    assert run.k == 3 and run.details["leave_one_out"] is True
    qids, dist, nids = load_neighbors(run, tmp_path / "out")
    assert dist.shape == (5, 3) and not np.any(nids == qids[:, None])
    assert nids[1, 0] == ids[5] and nids[2, 0] == ids[4]  # the copies, at distance 0
    assert dist[1, 0] == pytest.approx(0, abs=1e-3)
    for row, r in enumerate(sample):
        others = np.delete(np.arange(200), r)
        ref_d, _ = reference(x[others], x[r : r + 1], 3)
        np.testing.assert_allclose(dist[row], ref_d[0], rtol=1e-4, atol=1e-3)
