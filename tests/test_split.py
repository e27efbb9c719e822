"""The two modes: STL-10's seeded index/query split, a collection's every image in the index with
a seeded sample of them as leave-one-out queries; split.parquet."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.errors import ImageSearchError
from tasks.split import (
    check_collection,
    read_split,
    run_mode,
    sample_queries,
    split_dataset,
    split_ids,
)
from tasks.storage import RunFolder
from tasks.types import DataRef


def test_same_seed_same_split_and_ratio() -> None:
    a_index, a_query = split_ids(1000, 0.9, seed=3)
    b_index, b_query = split_ids(1000, 0.9, seed=3)
    np.testing.assert_array_equal(a_index, b_index)
    np.testing.assert_array_equal(a_query, b_query)
    assert (len(a_index), len(a_query)) == (900, 100)
    assert set(a_index.tolist()).isdisjoint(a_query.tolist())
    assert sorted([*a_index.tolist(), *a_query.tolist()]) == list(range(1000))
    c_index, _ = split_ids(1000, 0.9, seed=4)
    assert not np.array_equal(a_index, c_index)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.5, 1.5])
def test_ratio_outside_zero_one(ratio: float) -> None:
    with pytest.raises(ImageSearchError, match=f"split_ratio = {ratio}; it must lie strictly"):
        split_ids(100, ratio, 0)


def test_ratio_that_empties_a_side() -> None:
    with pytest.raises(ImageSearchError, match="leaves 10 index and 0 query images"):
        split_ids(10, 0.99, 0)
    with pytest.raises(ImageSearchError, match="leaves 0 index and 10 query images"):
        split_ids(10, 0.01, 0)


def _catalog(folder: Path, ids: list[int]) -> DataRef:
    """A catalog file holding just the image ids the split reads."""
    path = folder / "cat.parquet"
    pq.write_table(pa.table({"image_id": pa.array(ids, pa.int64())}), path)
    return DataRef(uri=str(path), rows=len(ids), fingerprint=f"abc-{len(ids)}")


def test_catalog_ids_that_are_not_a_range_split_the_same_way(tmp_path: Path) -> None:
    """Ids of a catalog with gaps (deleted images) are shuffled like positions: the split of
    ids 0..n-1 is today's STL-10 split, and any other id set maps through its sorted order."""
    ids = np.array([3, 7, 8, 20, 21, 40, 41, 42, 90, 100], dtype=np.int64)
    index, query = split_ids(ids, 0.7, seed=5)
    pos_index, pos_query = split_ids(10, 0.7, seed=5)
    np.testing.assert_array_equal(index, ids[pos_index])
    np.testing.assert_array_equal(query, ids[pos_query])
    ref = _catalog(tmp_path, ids[::-1].tolist())  # file order does not matter
    run = RunFolder(tmp_path / "out")
    out = split_dataset(ref, run, 0.7, 5)
    np.testing.assert_array_equal(read_split(Path(out.uri))[0], index)


def test_split_parquet_schema_and_rerun(tmp_path: Path) -> None:
    ref = _catalog(tmp_path, list(range(50)))
    run = RunFolder(tmp_path)
    out = split_dataset(ref, run, 0.8, 1)
    assert (out.n_index, out.n_query) == (40, 10)
    assert not (tmp_path / "split.parquet").exists()  # staged until the run commits
    assert run.commit(["split"]) == ["split"]
    path = tmp_path / "split.parquet"
    table = pq.read_table(path)
    assert table.column_names == ["image_id", "split", "query"]
    assert table.column("query").to_pylist() == [s == "query" for s in table["split"].to_pylist()]
    assert str(table.schema.field("image_id").type) == "int64"
    assert table.column("image_id").to_pylist() == list(range(50))
    counts = duckdb.sql(
        f"select split::varchar s, count(*) n from '{path}' group by s order by s"
    ).fetchall()
    assert counts == [("index", 40), ("query", 10)]
    index_ids, _ = read_split(path)
    np.testing.assert_array_equal(index_ids, split_ids(50, 0.8, 1)[0])
    mtime = path.stat().st_mtime_ns
    again = split_dataset(ref, run, 0.8, 1)
    assert (again.uri, again.fingerprint) == (str(path), out.fingerprint)
    assert run.commit(["split"]) == []  # rerun: nothing written, nothing to switch
    assert path.stat().st_mtime_ns == mtime
    split_dataset(ref, run, 0.8, 2)
    run.commit(["split"])
    assert path.stat().st_mtime_ns != mtime


def test_a_damaged_split_is_recomputed_or_named(tmp_path: Path) -> None:
    ref = _catalog(tmp_path, list(range(20)))
    run = RunFolder(tmp_path)
    first = split_dataset(ref, run, 0.5, 0)
    run.commit(["split"])
    path = tmp_path / "split.parquet"
    # A duplicated id written over our file: the stage notices the changed bytes and rewrites.
    pq.write_table(pa.table({"image_id": [0, 0], "split": ["index", "query"]}), path)
    with pytest.raises(ImageSearchError, match="appears more than once"):
        read_split(path)
    again = split_dataset(ref, run, 0.5, 0)
    assert again.fingerprint == first.fingerprint
    run.commit(["split"])
    index_ids, query_ids = read_split(path)
    assert len(index_ids) == len(query_ids) == 10


def test_stl10_sources_are_the_benchmark_everything_else_a_collection() -> None:
    assert run_mode("stl10") == run_mode("stl10-labelled") == "benchmark"
    for kind in ("folder", "archive", "list", "collection"):
        assert run_mode(kind) == "collection"


def test_a_collection_indexes_every_image_and_samples_its_queries(tmp_path: Path) -> None:
    ids = list(range(0, 300, 3))  # 100 images with gaps in their ids
    ref = _catalog(tmp_path, ids)
    run = RunFolder(tmp_path / "out")
    out = split_dataset(ref, run, 0.9, 7, mode="collection", n_queries=30)
    assert (out.n_index, out.n_query) == (100, 30)
    index_ids, query_ids = read_split(Path(out.uri))
    assert index_ids.tolist() == ids  # every image is findable
    assert len(query_ids) == 30 and set(query_ids.tolist()) <= set(ids)
    np.testing.assert_array_equal(query_ids, sample_queries(np.array(ids), 30, 7))
    run.commit(["split"])
    counts = duckdb.sql(
        f"select split::varchar, query, count(*) from '{tmp_path / 'out' / 'split.parquet'}' "
        f"group by all order by all"
    ).fetchall()
    assert counts == [("index", False, 70), ("index", True, 30)]
    meta = pq.read_schema(tmp_path / "out" / "split.parquet").metadata
    assert b'"collection"' in meta[b"image_search.split"]
    # Fewer images than n_queries: every one of them is a query; the ratio plays no part.
    every = split_dataset(ref, run, 0.5, 7, mode="collection", n_queries=1000)
    assert (every.n_index, every.n_query) == (100, 100)
    assert split_dataset(ref, run, 0.8, 7, mode="collection", n_queries=1000) == every


def test_a_collection_needs_k_other_images() -> None:
    check_collection(4, 3)
    with pytest.raises(ImageSearchError, match="among 3 image\\(s\\) each one has 2 other"):
        check_collection(3, 3)
    with pytest.raises(ImageSearchError, match="has 0 other\\(s\\) to find; lower k or add"):
        check_collection(1, 1)
