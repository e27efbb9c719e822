"""The catalog stage: list a collection, give every image a stable id, hash its bytes, and embed
the contents the embedding store lacks — in one streaming pass, so memory stays flat.

Outputs ``catalog.parquet`` (image_id, uri, sha256, width, height, label, version) and
``errors.parquet`` (image_id, uri, reason): a per-image problem is a row there and the run goes
on; more problems than ``max_error_rate`` allows stop the run with the first reasons. Ids are
stable: an image keeps its id for as long as its URI exists, and an id is never reused.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from tasks.columns import numbers
from tasks.errors import ImageSearchError, param
from tasks.features.content import EmbeddingStore
from tasks.hardware import cpu_count
from tasks.layout import ERRORS_FILE
from tasks.sources.collection import Collection, Item, reopen, say_versions_extended
from tasks.sources.images import BadImage, Decoded
from tasks.storage import atomic_path
from tasks.types import CatalogRef

log = logging.getLogger(__name__)

META_KEY = b"image_search_catalog"
PART_ROWS = 1024  # embeddings per store part: what a kill can lose at most
CATALOG_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("version", pa.string(), nullable=False),
        pa.field("split", pa.string()),
    ]
)
ERRORS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ]
)


@dataclass
class Catalog:
    """A catalog in memory: columns as arrays, plus its metadata."""

    image_id: np.ndarray
    uri: list[str]
    sha256: list[str]
    width: np.ndarray
    height: np.ndarray
    label: list[str | None]
    version: list[str]
    split: list[str | None]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image_id)


def read_catalog(path: Path) -> Catalog:
    """Read ``catalog.parquet``; a damaged file is a clear error naming it."""
    try:
        table = pq.ParquetFile(path).read()  # not read_table: its dataset layer loads pandas
        meta = (table.schema.metadata or {}).get(META_KEY)
        cols = {name: table.column(name) for name in CATALOG_SCHEMA.names}
    except (OSError, pa.ArrowInvalid, KeyError) as exc:
        raise ImageSearchError(f"Cannot read {path} ({exc}); delete it and run again.") from exc
    import json

    return Catalog(
        image_id=numbers(cols["image_id"]).copy(),
        uri=cols["uri"].to_pylist(),
        sha256=cols["sha256"].to_pylist(),
        width=numbers(cols["width"]).copy(),
        height=numbers(cols["height"]).copy(),
        label=cols["label"].to_pylist(),
        version=cols["version"].to_pylist(),
        split=cols["split"].to_pylist(),
        meta=json.loads(meta) if meta else {},
    )


def read_errors(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ImageSearchError(f"Cannot read {path} ({exc}); delete it and run again.") from exc


@dataclass
class Stats:
    """Counters of one catalog pass (also written to the stage record and the report)."""

    listed: int = 0
    unchanged: int = 0  # catalogued before with the same version: not read at all
    read: int = 0
    embedded: int = 0  # forward passes run, one per new content
    duplicates: int = 0  # same content as another image: embedded once
    errors: int = 0
    removed: int = 0  # catalogued before, gone now

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Prepared:
    """One read image on its way to the catalog: digest, size, and pixels if it needs embedding."""

    digest: bytes
    width: int
    height: int
    pixels: np.ndarray | None


def _prepare(
    collection: Collection, data: bytes | BadImage, size: int, known: Callable[[bytes], bool]
) -> _Prepared | BadImage:
    if isinstance(data, BadImage):
        return data
    digest = hashlib.sha256(data).digest()
    try:
        if known(digest):  # already embedded: only its size is needed
            width, height = collection.measure(data)
            return _Prepared(digest, width, height, None)
        decoded: Decoded = collection.decode(data, size)
    except BadImage as exc:
        return exc
    return _Prepared(digest, decoded.width, decoded.height, decoded.pixels)


def _ordered(
    pool: ThreadPoolExecutor, fn: Callable[[Any], Any], inputs: Iterator[Any], window: int
) -> Iterator[Any]:
    """``map`` with at most ``window`` results in flight: parallel, in order, flat memory."""
    pending: list[Any] = []
    for x in inputs:
        pending.append(pool.submit(fn, x))
        if len(pending) >= window:
            yield pending.pop(0).result()
    while pending:
        yield pending.pop(0).result()


def assign_ids(items: list[Item], previous: dict[str, int], next_id: int) -> tuple[np.ndarray, int]:
    """Ids for ``items`` (sorted by URI): the previous id of a URI, else new ones counting up
    from ``next_id`` in URI order. Returns (ids (n,) int64, the next unused id)."""
    ids = np.empty(len(items), dtype=np.int64)
    for i, item in enumerate(items):
        known = previous.get(item.uri)
        if known is None:
            known, next_id = next_id, next_id + 1
        ids[i] = known
    return ids, next_id


Outcome = tuple[str, int, int] | str  # (sha256 hex, width, height), or why the image failed


def embed_items(
    collection: Collection,
    items: list[Item],
    store: EmbeddingStore,
    make_forward: Callable[[], Callable[[np.ndarray], np.ndarray]],
    *,
    input_size: int,
    batch_size: int,
    progress: bool = True,
) -> tuple[list[Outcome], int]:
    """Read, hash and decode ``items`` (in parallel, in order), embedding every content the
    store lacks through ``make_forward()`` (built on first need: (B, S, S, 3) uint8 ->
    (B, 2048) float32) and appending it in parts of :data:`PART_ROWS`.

    Returns one outcome per item and the number of images embedded. A content met twice is
    embedded once. This is the unit of work a Dask worker runs on its shard.
    """
    known = store.load()
    outcomes: list[Outcome] = []
    batch_pixels: list[np.ndarray] = []
    batch_digests: list[bytes] = []
    part_digests: list[bytes] = []
    part_rows: list[np.ndarray] = []
    pending: set[bytes] = set()
    forward: Callable[[np.ndarray], np.ndarray] | None = None
    embedded = 0

    def run_batch() -> None:
        nonlocal forward, embedded
        if not batch_pixels:
            return
        if forward is None:
            forward = make_forward()
        part_rows.append(forward(np.stack(batch_pixels)))
        part_digests.extend(batch_digests)
        embedded += len(batch_digests)
        batch_pixels.clear()
        batch_digests.clear()

    def flush_part() -> None:
        run_batch()
        if part_digests:
            store.append(list(part_digests), np.concatenate(part_rows))
            pending.difference_update(part_digests)
            part_digests.clear()
            part_rows.clear()

    def seen(digest: bytes) -> bool:
        return digest in known or digest in pending

    workers = max(2, cpu_count())
    bar = tqdm(total=len(items), unit="img", desc="catalog", disable=not progress)
    with bar, ThreadPoolExecutor(max_workers=workers) as pool:
        stream = collection.stream(items, workers)

        def prepare(data: bytes | BadImage) -> _Prepared | BadImage:
            return _prepare(collection, data, input_size, seen)

        for item, prepared in zip(items, _ordered(pool, prepare, stream, workers * 4), strict=True):
            bar.update(1)
            if isinstance(prepared, BadImage):
                outcomes.append(prepared.reason)
                continue
            digest = prepared.digest
            if not seen(digest):
                if prepared.pixels is None:  # known when read, compacted since: impossible
                    raise RuntimeError(f"content of {item.uri} vanished from the store")
                pending.add(digest)
                batch_pixels.append(prepared.pixels)
                batch_digests.append(digest)
                if len(batch_pixels) >= batch_size:
                    run_batch()
                if len(part_digests) >= PART_ROWS:
                    flush_part()
            outcomes.append((digest.hex(), prepared.width, prepared.height))
        flush_part()
    return outcomes, embedded


def build_catalog(
    items: list[Item],
    store: EmbeddingStore,
    process: Callable[[list[Item]], tuple[list[Outcome], int]],
    *,
    previous: Catalog | None,
    previous_errors: dict[str, int],
) -> tuple[pa.Table, pa.Table, Stats, int]:
    """The catalog of ``items``: stable ids; unchanged images (same URI and version, content in
    the store) taken from ``previous`` without a read; the rest handed to ``process`` (e.g.
    :func:`embed_items`, in this process or sharded over a cluster).

    Returns (catalog table, errors table, counters, next unused id).
    """
    stats = Stats(listed=len(items))
    prev_ids = dict(previous_errors)
    prev_rows: dict[str, int] = {}
    next_id = 0
    if previous is not None:
        prev_ids.update(zip(previous.uri, previous.image_id.tolist(), strict=True))
        prev_rows = {uri: i for i, uri in enumerate(previous.uri)}
        next_id = int(previous.meta.get("next_id", 0))
    next_id = max([next_id, *[v + 1 for v in prev_ids.values()]])
    ids, next_id = assign_ids(items, prev_ids, next_id)
    listed = {item.uri for item in items}
    stats.removed = sum(1 for uri in prev_rows if uri not in listed)

    known = store.load()
    rows: list[tuple[int, str, str, int, int, str | None, str, str | None] | None]
    rows = [None] * len(items)
    errors: list[tuple[int, str, str]] = []
    todo: list[int] = []
    older, versions = 0, (previous.version if previous is not None else [])
    for i, item in enumerate(items):
        p = prev_rows.get(item.uri)
        older += p is not None and item.version.startswith(f"{versions[p]}:")
        if (
            p is not None
            and previous is not None
            and previous.version[p] == item.version
            and item.version != "missing"
            and bytes.fromhex(previous.sha256[p]) in known
        ):
            sha, width, height = previous.sha256[p], previous.width[p], previous.height[p]
            rows[i] = (int(ids[i]), item.uri, sha, int(width), int(height), *_tail(item))
            stats.unchanged += 1
        else:
            todo.append(i)

    if older:
        say_versions_extended(older)
    outcomes, stats.embedded = process([items[i] for i in todo])
    stats.read = len(todo)
    for i, outcome in zip(todo, outcomes, strict=True):
        item = items[i]
        if isinstance(outcome, str):
            errors.append((int(ids[i]), item.uri, outcome))
            stats.errors += 1
        else:
            sha, width, height = outcome
            rows[i] = (int(ids[i]), item.uri, sha, width, height, *_tail(item))

    done = [r for r in rows if r is not None]
    stats.duplicates = len(done) - len({r[2] for r in done})
    catalog = pa.Table.from_pylist(
        [dict(zip(CATALOG_SCHEMA.names, r, strict=True)) for r in done], schema=CATALOG_SCHEMA
    )
    errs = pa.Table.from_pylist(
        [dict(zip(ERRORS_SCHEMA.names, e, strict=True)) for e in errors], schema=ERRORS_SCHEMA
    )
    return catalog.sort_by("image_id"), errs.sort_by("image_id"), stats, next_id


def _tail(item: Item) -> tuple[str | None, str, str | None]:
    return item.label, item.version, item.split


def write_catalog(path: Path, table: pa.Table, meta: dict[str, Any]) -> None:
    """Write ``catalog.parquet`` atomically with the pass's metadata (collection, next id...)."""
    import json

    table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def write_errors(path: Path, table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def check_error_rate(catalog: CatalogRef, max_error_rate: float) -> None:
    """Stop the run when more images failed than ``max_error_rate`` allows, or when none at all
    can be used (whatever the rate allows: there is nothing to index), naming the first."""
    listed = catalog.stats.get("listed", 0)
    if listed and catalog.n_errors >= listed:
        errors = read_errors(Path(catalog.uri).parent / ERRORS_FILE)
        raise ImageSearchError(
            f"None of the {listed} images could be used. First: "
            f"{'; '.join(first_errors(errors, 3))}. Every reason is in {ERRORS_FILE} in the "
            f"output folder; fix or remove those files."
        )
    if not listed or catalog.n_errors / listed <= max_error_rate:
        return
    errors = read_errors(Path(catalog.uri).parent / ERRORS_FILE)
    raise ImageSearchError(
        f"{catalog.n_errors} of {listed} images ({catalog.n_errors / listed:.1%}) could not be "
        f"used, more than {param('max_error_rate')} = {max_error_rate:.1%} allows. First: "
        f"{'; '.join(first_errors(errors, 3))}. Every reason is in {ERRORS_FILE} in the output "
        f"folder; fix or remove those files, or raise {param('max_error_rate')}."
    )


def first_errors(errors: pa.Table, n: int = 5) -> list[str]:
    """The first ``n`` problems as 'uri: reason' lines, for the report."""
    return [
        f"{u}: {r}"
        for u, r in zip(
            errors.column("uri").to_pylist()[:n],
            errors.column("reason").to_pylist()[:n],
            strict=True,
        )
    ]


def load_pixels(catalog: Catalog, ids: np.ndarray, size: int = 96) -> np.ndarray:
    """Images ``ids`` of a catalog as (n, size, size, 3) uint8, read again from the collection
    (for pictures: a few dozen images). An image that no longer decodes shows as grey."""
    collection = reopen(catalog.meta["collection"])
    row_of = {int(i): r for r, i in enumerate(catalog.image_id.tolist())}
    out = np.full((len(ids), size, size, 3), 128, dtype=np.uint8)
    for n, image_id in enumerate(np.asarray(ids).tolist()):
        try:
            data = collection.read(catalog.uri[row_of[int(image_id)]])
            out[n] = collection.decode(data, size).pixels
        except (BadImage, KeyError):
            continue
    return out


def digests_of(catalog: Catalog, ids: np.ndarray) -> list[bytes]:
    """The content digests of image ``ids`` (each must be in the catalog)."""
    row_of = {int(i): r for r, i in enumerate(catalog.image_id.tolist())}
    return [bytes.fromhex(catalog.sha256[row_of[int(i)]]) for i in np.asarray(ids).tolist()]
