"""The embedding stages.

``catalog``: list the collection, hash every image and embed each content the store lacks
(see :mod:`tasks.catalog` and :mod:`tasks.features.content`). ``embed``: gather the embeddings
of the split's index and query images from the store into ``features/index.parquet`` and
``features/query.parquet`` (row group by row group, so memory stays flat).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.catalog import (
    Outcome,
    build_catalog,
    digests_of,
    embed_items,
    read_catalog,
    read_errors,
    write_catalog,
    write_errors,
)
from tasks.errors import ImageSearchError, param
from tasks.features import store
from tasks.features.content import EmbeddingStore
from tasks.features.model import (
    DIM,
    MIN_INPUT_SIZE,
    build_model,
    configure_gpu_memory,
    make_forward,
)
from tasks.layout import CATALOG, CATALOG_FILE, EMBED, ERRORS_FILE, INDEX_FEATURES, QUERY_FEATURES
from tasks.report import artifact_key
from tasks.sources.collection import Collection, FolderCollection, Item, reopen, said_already
from tasks.split import read_split
from tasks.storage import RunFolder
from tasks.types import CatalogRef, DataRef, Features, ModelSpec, SplitRef

log = logging.getLogger(__name__)

OUTPUTS = {"index": INDEX_FEATURES, "query": QUERY_FEATURES}
MAX_INPUT_SIZE = 1024


def check_input_size(size: int) -> int:
    """The model input size, checked: ResNet50 needs at least 32 pixels."""
    if not MIN_INPUT_SIZE <= size <= MAX_INPUT_SIZE:
        raise ImageSearchError(
            f"{param('input_size')} = {size}; use {MIN_INPUT_SIZE} to {MAX_INPUT_SIZE} pixels "
            f"(96 matches STL-10, 224 suits photos)."
        )
    return size


def forward_factory(
    spec: ModelSpec, metadata: dict[str, Any]
) -> Callable[[], Callable[[np.ndarray], np.ndarray]]:
    """A function that builds the model on first call (a pass with nothing new builds none) and
    records its metadata into ``metadata``."""

    def make() -> Callable[[np.ndarray], np.ndarray]:
        device = configure_gpu_memory(spec.gpu_memory_fraction)
        model, info = build_model(spec.weights, spec.seed, spec.precision)
        metadata.update(info.metadata(spec.input_size), device=device)
        log.info("embedding with ResNet50 (%s weights) on %s", info.weights, device)
        return make_forward(model)

    return make


# How the catalog pass embeds what is new: (collection, items, store, model, batch size,
# progress bar) -> (one outcome per item, in order; how many contents were embedded). The flow
# hands one in: :func:`embed_in_process`, or a sharded one that runs on a Dask cluster.
EmbedRunner = Callable[
    [Collection, list[Item], EmbeddingStore, ModelSpec, int, bool], tuple[list[Outcome], int]
]


def embed_in_process(
    collection: Collection,
    items: list[Item],
    content: EmbeddingStore,
    spec: ModelSpec,
    batch_size: int,
    progress: bool = True,
) -> tuple[list[Outcome], int]:
    """The catalog pass's embedding in this process: one model, built only when something is
    new, its description recorded in the store."""
    model_meta: dict[str, Any] = {}
    done = embed_items(
        collection,
        items,
        content,
        forward_factory(spec, model_meta),
        input_size=spec.input_size,
        batch_size=batch_size,
        progress=progress,
    )
    if model_meta:
        content.describe(model_meta)
    return done


def listing_fingerprint(items: Iterable[Any]) -> str:
    """Content of a listing (URIs, versions, labels) as one fingerprint."""
    import hashlib

    h = hashlib.sha256()
    for item in items:
        h.update(f"{item.uri}\0{item.version}\0{item.label}\n".encode())
    return h.hexdigest()[:32]


def catalog_collection(
    collection: Collection,
    run: RunFolder,
    spec: ModelSpec,
    *,
    batch_size: int,
    progress: bool = True,
    embed: EmbedRunner = embed_in_process,
) -> CatalogRef:
    """``catalog.parquet`` and ``errors.parquet`` of ``collection``, every new content embedded
    into the store; nothing at all is read when the listing and model are those of the last run."""
    items = collection.items()  # a source without one usable image was refused by its listing
    key = spec.key()
    content = EmbeddingStore(run.out, key)
    stage = run.stage(
        CATALOG,
        [collection.describe(), listing_fingerprint(items), key],
        code=["tasks.catalog", "tasks.sources.collection", "tasks.features.content"],
    )
    done = stage.done()
    if done is not None and not _store_complete(stage.path(CATALOG_FILE), content):
        done = None  # the store lost contents the catalog names: embed them again
    if done is not None:  # nothing changed: this run read and embedded nothing
        before = dict(done["stats"])
        unchanged = before["listed"] - before["errors"]
        done = {"stats": {**before, "unchanged": unchanged, "read": 0, "embedded": 0, "removed": 0}}
    else:
        started = time.perf_counter()
        previous = run.out / CATALOG_FILE
        prev = read_catalog(previous) if previous.is_file() else None
        prev_errors: dict[str, int] = {}
        if (run.out / ERRORS_FILE).is_file():
            errs = read_errors(run.out / ERRORS_FILE)
            prev_errors = dict(
                zip(
                    errs.column("uri").to_pylist(), errs.column("image_id").to_pylist(), strict=True
                )
            )

        def process(todo: list[Item]) -> tuple[list[Outcome], int]:
            return embed(collection, todo, content, spec, batch_size, progress)

        table, errors, stats, next_id = build_catalog(
            items, content, process, previous=prev, previous_errors=prev_errors
        )
        meta = {
            "collection": collection.describe(),
            "next_id": next_id,
            "model_key": key,
            "input_size": spec.input_size,
            "skipped": collection.skipped,
        }
        write_catalog(stage.path(CATALOG_FILE), table, meta)
        write_errors(stage.path(ERRORS_FILE), errors)
        dropped = content.compact(set(bytes.fromhex(h) for h in table.column("sha256").to_pylist()))
        seconds = time.perf_counter() - started
        log.info(
            "catalogued %d images in %.1f s: %d unchanged, %d read, %d embedded, %d duplicates, "
            "%d errors, %d removed",
            stats.listed,
            seconds,
            stats.unchanged,
            stats.read,
            stats.embedded,
            stats.duplicates,
            stats.errors,
            stats.removed,
        )
        done = stage.finish(
            stats=stats.as_dict(), skipped=collection.skipped, seconds=seconds, compacted=dropped
        )
    stats_now = dict(done["stats"])
    return CatalogRef(
        uri=str(stage.path(CATALOG_FILE)),
        rows=stats_now["listed"] - stats_now["errors"],
        fingerprint=stage.digest(),
        n_errors=stats_now["errors"],
        labelled=any(item.label is not None for item in items),
        stats=stats_now,
    )


def _store_complete(catalog_path: Path, content: EmbeddingStore) -> bool:
    """Whether the store still holds every content the catalog names. Read as one file, not
    through pyarrow's dataset layer, which imports pandas (a quarter second of every rerun)."""
    table = pq.ParquetFile(catalog_path).read(columns=["sha256"])
    digests = table.column("sha256").to_pylist()
    have = content.load()
    return all(bytes.fromhex(d) in have for d in digests)


def assemble_features(
    catalog: CatalogRef, split: SplitRef, run: RunFolder, spec: ModelSpec
) -> Features:
    """``features/index.parquet`` and ``features/query.parquet`` of ``split``, gathered from the
    embedding store, unless a run already made them from the same catalog, split and model."""
    key = spec.key()
    stage = run.stage(
        EMBED,
        [catalog.fingerprint, split.fingerprint, key],
        code=["tasks.features"],
    )
    device = "cached"
    if stage.done() is None:
        for rel in OUTPUTS.values():
            store.refuse_foreign(run.out / rel)
        cat = read_catalog(Path(catalog.uri))
        content = EmbeddingStore(run.out, key)
        model = content.model()
        device = str(model.pop("device", "cached"))
        metadata = {
            **model,
            "model_key": key,
            "input_size": spec.input_size,
            "source_fingerprint": catalog.fingerprint,
        }
        index_ids, query_ids = read_split(split.path)
        for name, ids in (("index", index_ids), ("query", query_ids)):
            write_features(
                content, cat, ids, stage.path(OUTPUTS[name]), {**metadata, "split": name}
            )
        stage.finish(images=len(index_ids) + len(query_ids))
    digest = stage.digest()
    paths = {name: stage.path(rel) for name, rel in OUTPUTS.items()}
    rows = {"index": split.n_index, "query": split.n_query}
    refs = {
        name: DataRef(uri=str(paths[name]), rows=rows[name], fingerprint=f"{digest}-{name}")
        for name in OUTPUTS
    }
    return Features(
        index=refs["index"],
        query=refs["query"],
        model=store.read_metadata(paths["index"]),
        device=device,
    )


def write_features(
    content: EmbeddingStore, cat: Any, ids: np.ndarray, dest: Path, metadata: dict[str, Any]
) -> None:
    """Write the embeddings of image ``ids`` ((n,) int64, sorted) into ``dest``, one row group
    of :data:`store.ROWS_PER_PART` at a time."""
    try:
        digests = digests_of(cat, ids)
    except KeyError as exc:
        raise ImageSearchError(f"image id {exc} of the split is not in the catalog") from exc
    rows = store.ROWS_PER_PART
    try:
        chunks = (
            store.table(ids[s : s + rows], content.gather(digests[s : s + rows]))
            for s in range(0, len(ids), rows)
        )
        store.write_tables(chunks, dest, {**metadata, "rows": len(ids)})
    except KeyError as exc:
        raise ImageSearchError(
            f"The embedding store {content.folder} lacks an image of the catalog; run again "
            f"to embed it."
        ) from exc


def catalog(
    collection: Collection,
    out: str,
    spec: ModelSpec,
    batch_size: int,
    embed: EmbedRunner | None = None,
) -> CatalogRef:
    """List, hash and embed what is new: in a task of this flow, or with ``embed`` (a sharded
    runner whose nested flow must be started by the flow itself, not inside a task). The task
    receives the collection's description, a few strings, never the collection (it may hold a
    memory map of gigabytes)."""
    if embed is not None:
        return catalog_pass(collection, out, spec, batch_size, embed)
    skip = [out] if isinstance(collection, FolderCollection) else []
    return catalog_task(collection.describe(), skip, out, spec, batch_size)


@task(cache_policy=NO_CACHE, name="catalog")
def catalog_task(
    described: dict[str, Any], skip: list[str], out: str, spec: ModelSpec, batch_size: int
) -> CatalogRef:
    """Prefect task: the catalog pass in this process. The flow listed the source just before
    and logged what it saw; this second listing (from the description) says nothing again."""
    with said_already():
        return catalog_pass(reopen(described, skip), out, spec, batch_size, embed_in_process)


def catalog_pass(
    collection: Collection, out: str, spec: ModelSpec, batch_size: int, embed: EmbedRunner
) -> CatalogRef:
    """The catalog pass, with its counts as an artifact."""
    ref = catalog_collection(
        collection, RunFolder(Path(out)), spec, batch_size=batch_size, embed=embed
    )
    create_table_artifact(
        key=artifact_key("catalog"),
        table=[ref.stats],
        description=f"Catalog of {collection.source}: what this run read and embedded",
    )
    return ref


@task(cache_policy=NO_CACHE)
def embed(catalog: CatalogRef, split: SplitRef, out: str, spec: ModelSpec) -> Features:
    """Prefect task: the feature files of both sides of the split, listed as an artifact."""
    features = assemble_features(catalog, split, RunFolder(Path(out)), spec)
    rows = [
        {"file": Path(ref.uri).name, "rows": ref.rows, "bytes": Path(ref.uri).stat().st_size}
        for ref in (features.index, features.query)
    ]
    create_table_artifact(
        key=artifact_key("features"),
        table=rows,
        description=f"ResNet50 features ({features.model.get('weights')} weights), {DIM}-d",
    )
    return features
