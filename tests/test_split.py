"""The seeded index/query split and split.parquet."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from tasks.common import DataRef, ImageSearchError
from tasks.split import read_split, split_dataset, split_ids


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


def test_split_parquet_schema_and_rerun(tmp_path: Path) -> None:
    ref = DataRef(uri="x", rows=50, fingerprint="abc")
    out = split_dataset(ref, tmp_path, 0.8, 1)
    assert (out.n_index, out.n_query) == (40, 10)
    table = pq.read_table(tmp_path / "split.parquet")
    assert table.column_names == ["image_id", "split"]
    assert str(table.schema.field("image_id").type) == "int64"
    assert table.column("image_id").to_pylist() == list(range(50))
    path = tmp_path / "split.parquet"
    counts = duckdb.sql(
        f"select split::varchar s, count(*) n from '{path}' group by s order by s"
    ).fetchall()
    assert counts == [("index", 40), ("query", 10)]
    index_ids, _ = read_split(tmp_path / "split.parquet")
    np.testing.assert_array_equal(index_ids, split_ids(50, 0.8, 1)[0])
    mtime = (tmp_path / "split.parquet").stat().st_mtime_ns
    assert split_dataset(ref, tmp_path, 0.8, 1) == out
    assert (tmp_path / "split.parquet").stat().st_mtime_ns == mtime  # rerun: nothing written
    split_dataset(ref, tmp_path, 0.8, 2)
    assert (tmp_path / "split.parquet").stat().st_mtime_ns != mtime
