"""Which images form the index and which are searched as queries, in one of two modes.

- ``benchmark`` (STL-10 sources, the seed's benchmark): a seeded split, 9:1 by default, or the
  one the collection prescribes (STL-10's labelled train/test sets); the queries are held out
  of the index.
- ``collection`` (your folders, archives, lists, object stores): every usable image is in the
  index, so each one can be found; the backends are compared, and quality measured, by searching
  a seeded sample of index images (``n_queries``, all of them when the collection is smaller),
  each left out of its own answer (leave-one-out).

``split.parquet``: one row per image, ``image_id`` int64, ``split`` ('index' or 'query': held
out of the index) and ``query`` bool (searched as a query); the mode is in the file metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.errors import ImageSearchError, param
from tasks.layout import SPLIT, SPLIT_FILE
from tasks.storage import RunFolder, atomic_path
from tasks.types import DataRef, SplitRef

Mode = Literal["collection", "benchmark"]
META_KEY = b"image_search.split"
BENCHMARK_KINDS = ("stl10", "stl10-labelled")  # collection kinds of the seed's benchmark


def run_mode(kind: str) -> Mode:
    """The mode of a run on a collection of ``kind`` (``Collection.kind``): STL-10 sources are
    the seed's benchmark, everything else is the user's collection."""
    return "benchmark" if kind in BENCHMARK_KINDS else "collection"


def check_collection(n: int, k: int) -> None:
    """A clear error when ``n`` images cannot give every query ``k`` neighbours other than
    itself. Cheap, so a flow can call it before it writes anything."""
    if n < 2 or k > n - 1:
        raise ImageSearchError(
            f"{param('k')} = {k}, but among {n} image(s) each one has {max(n - 1, 0)} other(s) "
            f"to find; lower {param('k')} or add images."
        )


def sample_queries(ids: np.ndarray, n_queries: int | None, seed: int) -> np.ndarray:
    """The leave-one-out queries of a collection: ``n_queries`` of image ``ids`` ((n,) int64)
    drawn with ``seed``, or all of them when ``n_queries`` is None or not smaller. Sorted."""
    ids = np.sort(np.asarray(ids, dtype=np.int64))
    if n_queries is None or n_queries >= len(ids):
        return ids
    pick = np.random.default_rng(seed).choice(len(ids), size=n_queries, replace=False)
    return np.sort(ids[pick])


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


def write_split(
    path: Path, index_ids: np.ndarray, query_ids: np.ndarray, mode: Mode = "benchmark"
) -> None:
    """Write ``split.parquet`` (see the module docstring). ``benchmark``: ``index_ids`` and
    ``query_ids`` are disjoint; ``collection``: the queries are some of the index images."""
    if mode == "collection":
        ids = np.sort(index_ids)
        labels = np.full(len(ids), "index")
        queried = np.isin(ids, query_ids)
    else:
        ids = np.concatenate([index_ids, query_ids])
        order = np.argsort(ids, kind="stable")
        labels = np.array(["index"] * len(index_ids) + ["query"] * len(query_ids))[order]
        ids = ids[order]
        queried = labels == "query"
    table = pa.table(
        {
            "image_id": pa.array(ids, type=pa.int64()),
            "split": pa.array(labels).dictionary_encode(),
            "query": pa.array(queried, type=pa.bool_()),
        }
    ).replace_schema_metadata({META_KEY: json.dumps({"mode": mode}).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``split.parquet`` back into sorted (index_ids, query_ids), checked: unique ids, each
    on one side, both non-empty. In collection mode the queries are index images too. A
    damaged file is a clear error naming it."""
    try:
        table = pq.read_table(path)
        ids = table.column("image_id").to_numpy()
        labels = np.asarray(table.column("split").to_pylist())
        queried = (
            np.asarray(table.column("query").to_pylist(), dtype=bool)
            if "query" in table.column_names
            else labels == "query"  # written before collections had a mode
        )
    except (OSError, pa.ArrowInvalid, KeyError) as exc:
        raise ImageSearchError(f"Cannot read {path} ({exc}); delete it and run again.") from exc
    index_ids, query_ids = ids[labels == "index"], ids[queried]
    problem = None
    if len(np.unique(ids)) != len(ids):
        problem = "an image id appears more than once"
    elif np.count_nonzero(labels == "index") + np.count_nonzero(labels == "query") != len(ids):
        problem = "a row is neither 'index' nor 'query'"
    elif np.any(queried != (labels == "query")) and np.any(labels == "query"):
        problem = "an image held out of the index is not a query, or the other way round"
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


def split_dataset(
    catalog: DataRef,
    run: RunFolder,
    ratio: float,
    seed: int,
    mode: Mode = "benchmark",
    n_queries: int | None = None,
) -> SplitRef:
    """Choose the index and the queries of the catalog's images (see the module docstring) into
    ``split.parquet``, unless the same choice is there. ``ratio`` applies to the benchmark,
    ``n_queries`` to a collection."""
    chosen = [ratio] if mode == "benchmark" else [n_queries]
    stage = run.stage(
        SPLIT, [catalog.fingerprint, catalog.rows, seed, mode, *chosen], code=["tasks.split"]
    )
    if stage.done() is None:
        if mode == "collection":
            index_ids = catalog_ids(catalog)
            query_ids = sample_queries(index_ids, n_queries, seed)
        else:
            prescribed = prescribed_split(catalog)
            index_ids, query_ids = prescribed or split_ids(catalog_ids(catalog), ratio, seed)
        write_split(stage.path(SPLIT_FILE), index_ids, query_ids, mode)
        stage.finish(n_index=len(index_ids), n_query=len(query_ids), mode=mode)
    done = stage.info or {}
    return SplitRef(
        uri=str(stage.path(SPLIT_FILE)),
        rows=catalog.rows,
        fingerprint=stage.digest(),
        n_index=int(done.get("n_index", 0)),
        n_query=int(done.get("n_query", 0)),
    )


@task(cache_policy=NO_CACHE)
def split(
    catalog: DataRef, out: str, ratio: float, seed: int, mode: Mode, n_queries: int | None
) -> SplitRef:
    """Prefect task: the index and the queries as a reference to ``split.parquet``."""
    return split_dataset(catalog, RunFolder(Path(out)), ratio, seed, mode, n_queries)
