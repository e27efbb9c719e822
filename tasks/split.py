"""Seeded split of the images into an index (searched) and queries (searching)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.errors import ImageSearchError, param
from tasks.layout import SPLIT, SPLIT_FILE
from tasks.storage import RunFolder, atomic_path
from tasks.types import DataRef, SplitRef


def check_split(n: int, ratio: float) -> tuple[int, int]:
    """(n_index, n_query) for ``n`` images; a clear error when either side would be empty.

    Cheap, so a flow can call it before it writes anything.
    """
    if not 0.0 < ratio < 1.0:
        raise ImageSearchError(
            f"{param('split_ratio')} = {ratio}; it must lie strictly between 0 and 1."
        )
    n_index = round(n * ratio)
    n_query = n - n_index
    if n_index < 1 or n_query < 1:
        raise ImageSearchError(
            f"{param('split_ratio')} = {ratio} of {n} images leaves {n_index} index and "
            f"{n_query} query "
            f"images; both need at least one. Use more images or a ratio nearer 0.5."
        )
    return n_index, n_query


def split_ids(ids: np.ndarray | int, ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle image ``ids`` ((n,) int64, sorted; an int n means ``range(n)``) with ``seed``;
    the first ``round(n * ratio)`` form the index.

    Returns (index_ids, query_ids), each int64 and sorted so reads follow the file order.
    """
    ids = np.arange(ids, dtype=np.int64) if isinstance(ids, int) else np.asarray(ids, np.int64)
    n_index, _ = check_split(len(ids), ratio)
    perm = ids[np.random.default_rng(seed).permutation(len(ids))]
    return np.sort(perm[:n_index]), np.sort(perm[n_index:])


def write_split(path: Path, index_ids: np.ndarray, query_ids: np.ndarray) -> None:
    """Write ``split.parquet``: one row per image, (image_id int64, split 'index'|'query')."""
    ids = np.concatenate([index_ids, query_ids])
    labels = np.array(["index"] * len(index_ids) + ["query"] * len(query_ids))
    order = np.argsort(ids, kind="stable")
    table = pa.table(
        {
            "image_id": pa.array(ids[order], type=pa.int64()),
            "split": pa.array(labels[order]).dictionary_encode(),
        }
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``split.parquet`` back into sorted (index_ids, query_ids), checked: unique ids, each
    on one side, both sides non-empty. A damaged file is a clear error naming it."""
    try:
        table = pq.read_table(path)
        ids = table.column("image_id").to_numpy()
        labels = np.asarray(table.column("split").to_pylist())
    except (OSError, pa.ArrowInvalid, KeyError) as exc:
        raise ImageSearchError(f"Cannot read {path} ({exc}); delete it and run again.") from exc
    index_ids, query_ids = ids[labels == "index"], ids[labels == "query"]
    problem = None
    if len(np.unique(ids)) != len(ids):
        problem = "an image id appears more than once"
    elif len(index_ids) + len(query_ids) != len(ids):
        problem = "a row is neither 'index' nor 'query'"
    elif not len(index_ids) or not len(query_ids):
        problem = "one side is empty"
    if problem:
        raise ImageSearchError(f"{path} is damaged: {problem}; delete it and run again.")
    return np.sort(index_ids), np.sort(query_ids)


def catalog_ids(catalog: DataRef) -> np.ndarray:
    """The sorted image ids (n,) int64 of a catalog file."""
    try:
        ids = pq.read_table(catalog.uri, columns=["image_id"]).column("image_id").to_numpy()
    except (OSError, pa.ArrowInvalid, KeyError) as exc:
        raise ImageSearchError(f"Cannot read {catalog.uri} ({exc}); run again.") from exc
    return np.sort(ids).astype(np.int64)


def prescribed_split(catalog: DataRef) -> tuple[np.ndarray, np.ndarray] | None:
    """(index_ids, query_ids) where the collection itself says which image is which (STL-10's
    labelled sets: train is the index, test the queries); None for a seeded split."""
    try:
        table = pq.read_table(catalog.uri, columns=["image_id", "split"])
    except (OSError, pa.ArrowInvalid, KeyError):
        return None
    roles = np.asarray(table.column("split").to_pylist(), dtype=object)
    if all(r is None for r in roles):
        return None
    ids = table.column("image_id").to_numpy()
    index_ids, query_ids = np.sort(ids[roles == "index"]), np.sort(ids[roles == "query"])
    if not len(index_ids) or not len(query_ids):
        raise ImageSearchError(f"{catalog.uri} prescribes an empty index or query side.")
    return index_ids.astype(np.int64), query_ids.astype(np.int64)


def split_dataset(catalog: DataRef, run: RunFolder, ratio: float, seed: int) -> SplitRef:
    """Split the catalog's images into ``split.parquet`` unless the same split is there."""
    stage = run.stage(SPLIT, [catalog.fingerprint, catalog.rows, ratio, seed], code=["tasks.split"])
    if stage.done() is None:
        prescribed = prescribed_split(catalog)
        index_ids, query_ids = prescribed or split_ids(catalog_ids(catalog), ratio, seed)
        write_split(stage.path(SPLIT_FILE), index_ids, query_ids)
        stage.finish(n_index=len(index_ids), n_query=len(query_ids))
    done = stage.info or {}
    return SplitRef(
        uri=str(stage.path(SPLIT_FILE)),
        rows=catalog.rows,
        fingerprint=stage.digest(),
        n_index=int(done.get("n_index", 0)),
        n_query=int(done.get("n_query", 0)),
    )


@task(cache_policy=NO_CACHE)
def split(catalog: DataRef, out: str, ratio: float, seed: int) -> SplitRef:
    """Prefect task: the index/query split as a reference to ``split.parquet``."""
    return split_dataset(catalog, RunFolder(Path(out)), ratio, seed)
