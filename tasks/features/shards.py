"""Sharded embedding, the pure part: the catalog pass's items cut into contiguous shards that
travel as row ranges of a plan file, and one shard embedded where it runs (a Dask worker)
into the same content-addressed store. The Prefect flow that maps shards over a cluster is
:mod:`flows.sharded`."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.catalog import PART_ROWS, Outcome, embed_items
from tasks.errors import ImageSearchError
from tasks.features.content import EmbeddingStore
from tasks.features.embed import forward_factory
from tasks.sources.collection import Item, reopen
from tasks.storage import atomic_path
from tasks.types import ModelSpec

SHARDS_PER_THREAD = 4  # a few shards per worker thread: a lost worker costs a small shard
MAX_SHARD_ITEMS = 16 * PART_ROWS  # and a shard stays a few parts long, however many images
PLAN_GROUPS = 256  # row groups of the shard plan file: the finest cut into shards
# One forward pass per worker process and model: built on a shard's first need, then reused by
# every later shard that process runs (a model build takes seconds).
_FORWARDS: dict[ModelSpec, tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any]]] = {}


def plan_item_shards(n_items: int, n_shards: int, unit: int = 1) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` ranges cutting ``n_items`` into about ``n_shards``
    near-equal shards, in order: none empty, none over :data:`MAX_SHARD_ITEMS`, every start a
    multiple of ``unit`` (the plan file's row group)."""
    if n_shards < 1:
        raise ImageSearchError(f"shards = {n_shards}; it must be a whole number >= 1.")
    units = -(-n_items // unit)
    n = max(n_shards, -(-units // max(1, MAX_SHARD_ITEMS // unit)))
    n = min(n, max(units, 1))
    bounds = [round(i * units / n) for i in range(n + 1)]
    return [(a * unit, min(b * unit, n_items)) for a, b in itertools.pairwise(bounds) if b > a]


def plan_unit(n_items: int) -> int:
    """Rows per row group of the plan file: fine enough to cut into many shards, at most a
    store part."""
    return max(1, min(PART_ROWS, -(-n_items // PLAN_GROUPS)))


def write_item_plan(items: list[Item], path: Path, unit: int) -> None:
    """The items to embed as a Parquet file of row groups of ``unit`` rows (uri, version,
    label, split): shards travel as row ranges of it, never as lists."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "uri": [i.uri for i in items],
            "version": [i.version for i in items],
            "label": pa.array([i.label for i in items], pa.string()),
            "split": pa.array([i.split for i in items], pa.string()),
        }
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=unit)


def read_item_plan(path: Path, start: int, stop: int, unit: int) -> list[Item]:
    """Items ``[start, stop)`` of a plan file, reading only their row groups."""
    import pyarrow.parquet as pq

    groups = list(range(start // unit, -(-stop // unit)))
    table = pq.ParquetFile(path).read_row_groups(groups)
    offset = start - groups[0] * unit
    rows = table.slice(offset, stop - start).to_pylist()
    return [Item(r["uri"], r["version"], r["label"], r["split"]) for r in rows]


def worker_forward(spec: ModelSpec) -> Callable[[], Callable[[np.ndarray], np.ndarray]]:
    """``make_forward`` for :func:`tasks.catalog.embed_items` that builds the model once per
    process and model spec; (B, S, S, 3) uint8 -> (B, 2048) float32."""

    def make() -> Callable[[np.ndarray], np.ndarray]:
        found = _FORWARDS.get(spec)
        if found is None:
            metadata: dict[str, Any] = {}
            found = (forward_factory(spec, metadata)(), metadata)
            _FORWARDS[spec] = found
        return found[0]

    return make


def embed_shard_items(
    described: dict[str, Any], items: list[Item], out: str, spec: ModelSpec, batch_size: int
) -> tuple[list[Outcome], int]:
    """One shard of the catalog pass where it runs: reopen the collection from its description,
    embed what the store lacks into new parts of the store, return outcomes and count."""
    store = EmbeddingStore(Path(out), spec.key())
    outcomes, embedded = embed_items(
        reopen(described),
        items,
        store,
        worker_forward(spec),
        input_size=spec.input_size,
        batch_size=batch_size,
        progress=False,
    )
    if spec in _FORWARDS:  # the model's description, once, for a person reading the store
        store.describe(_FORWARDS[spec][1])
    return outcomes, embedded


@dataclass(frozen=True)
class EmbedJob:
    """What every shard of one sharded pass shares: references only."""

    described: dict[str, Any]  # the collection, as :meth:`Collection.describe` gives it
    plan: str  # the plan file (items), on storage every worker reads
    unit: int  # its rows per row group
    out: str  # the output folder holding the embedding store
    spec: ModelSpec
    batch_size: int
