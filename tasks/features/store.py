"""The Parquet feature files: ``image_id`` int64 and ``embedding`` fixed_size_list<float32>[2048]
per row, provenance (model, weights, input size) in the file metadata, page checksums verified
on every read. They are what the search backends, the query path and other tools read; the
embeddings themselves live in the content-addressed store (:mod:`tasks.features.content`)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.errors import ImageSearchError, param
from tasks.features.model import DIM
from tasks.storage import atomic_path

META_KEY = b"image_search"
ROWS_PER_PART = 4096  # one row group: 4096 × 2048 × 4 B = 32 MiB

SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("embedding", pa.list_(pa.float32(), DIM), nullable=False),
    ]
)
# One set of writer options for part files and merged files alike: raw float32 (it does not
# compress), zstd ids, statistics only where a reader can use them, a CRC per page.
WRITER_OPTIONS: dict[str, Any] = {
    "compression": {"image_id": "zstd", "embedding": "none"},
    "use_dictionary": False,
    "write_statistics": ["image_id"],
    "write_page_checksum": True,
}


def read_metadata(path: Path) -> dict[str, Any]:
    """The image-search metadata stored in a feature file's schema."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid) as exc:
        raise ImageSearchError(f"Cannot read feature file {path}: {exc}.") from exc
    try:
        return dict(json.loads(meta[META_KEY]))
    except (KeyError, ValueError) as exc:
        raise ImageSearchError(
            f"{path} carries no image-search metadata; it was not written by this pipeline."
        ) from exc


def refuse_foreign(path: Path) -> None:
    """Refuse to replace a readable Parquet file at ``path`` that this pipeline did not write.

    Our own features (stale, damaged or from other inputs) get replaced; another model's or
    tool's Parquet file is the user's data.
    """
    if not path.exists():
        return
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return  # not readable Parquet at all: a damaged file of ours (the stage record says so)
    if META_KEY not in meta:
        raise ImageSearchError(
            f"{path} exists but was not written by image-search (no image_search metadata); "
            f"move it away or choose another {param('out')}."
        )


def table(ids: np.ndarray, emb: np.ndarray) -> pa.Table:
    """Arrow table of ids (n,) int64 and embeddings (n, 2048) float32."""
    values = pa.array(np.ascontiguousarray(emb, dtype=np.float32).reshape(-1))
    return pa.Table.from_arrays(
        [pa.array(ids, type=pa.int64()), pa.FixedSizeListArray.from_arrays(values, DIM)],
        schema=SCHEMA,
    )


def write_part(tbl: pa.Table, path: Path) -> None:
    """Write one table of features (no provenance metadata) atomically: for tools and tests."""
    with atomic_path(path) as tmp:
        pq.write_table(tbl, tmp, row_group_size=ROWS_PER_PART, **WRITER_OPTIONS)


def write_tables(tables: Iterable[pa.Table], dest: Path, metadata: dict[str, Any]) -> None:
    """Write ``tables`` (each one row group) into ``dest`` atomically, with ``metadata``."""
    schema = SCHEMA.with_metadata({META_KEY: json.dumps(metadata).encode()})
    with (
        atomic_path(dest) as tmp,
        pq.ParquetWriter(tmp, schema, **WRITER_OPTIONS) as writer,
    ):
        for tbl in tables:
            writer.write_table(tbl.replace_schema_metadata(schema.metadata), ROWS_PER_PART)


def _row_groups(path: Path | str) -> Iterator[pa.Table]:
    source = pq.ParquetFile(path, page_checksum_verification=True)
    for group in range(source.num_row_groups):
        yield source.read_row_group(group, columns=["image_id", "embedding"])


def load_features(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """Read a feature file: (ids (n,) int64, embeddings (n, d) float32).

    Row group by row group into one preallocated array, so the peak is the array plus one row
    group. Every page's CRC is checked: a damaged file is a clear error, never data.
    """
    try:
        meta = pq.ParquetFile(path).metadata
        n = meta.num_rows
        dim = pq.read_schema(path).field("embedding").type.list_size
        ids = np.empty(n, dtype=np.int64)
        emb = np.empty((n, dim), dtype=np.float32)
        row = 0
        for tbl in _row_groups(path):
            m = tbl.num_rows
            ids[row : row + m] = tbl.column("image_id").to_numpy()
            for chunk in tbl.column("embedding").chunks:
                values = chunk.flatten().to_numpy(zero_copy_only=False)
                emb[row : row + len(chunk)] = values.reshape(-1, dim)
                row += len(chunk)
    except (OSError, pa.ArrowInvalid, KeyError, ValueError) as exc:
        raise ImageSearchError(
            f"Feature file {path} is damaged ({exc}); delete it and run again to recompute it."
        ) from exc
    return ids, emb
