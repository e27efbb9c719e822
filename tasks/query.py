"""Ask an index: embed query images exactly as the index's images were embedded, and find their
nearest index images by exact Euclidean search.

An index is the output folder of a finished ``image-search run``: ``features/index.parquet``
(ids and embeddings, with the model, weights and input size in its metadata) and
``catalog.parquet`` (where each image lives). A query uses the index's own model settings; an
index this installation cannot reproduce (another weights file's content, another model or
resize code, another preprocessing) is refused with what differs. The same functions serve the
``image-search query`` command, the ``image-search-query`` flow and the HTTP service.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.catalog import META_KEY as CATALOG_META_KEY
from tasks.errors import ImageSearchError, param
from tasks.features import store
from tasks.features.model import DIM, PREPROCESSING, build_model, make_forward
from tasks.layout import CATALOG_FILE, EMBED, INDEX_FEATURES, INDEX_FILES
from tasks.report import artifact_key
from tasks.report.pictures import image_grid, markdown_image
from tasks.search.exact import PreparedIndex, prepare_index, search_prepared
from tasks.sources.collection import Collection, open_collection, read_uri, reopen
from tasks.sources.images import RESIZE_RULE, BadImage, decode_image
from tasks.storage import unsettled
from tasks.types import ModelSpec

log = logging.getLogger(__name__)

MODEL = "keras.applications.ResNet50"
THUMB = 96  # side of the pictures' tiles
EMBED_BATCH = 32  # query images per forward pass when a folder is asked
Forward = Callable[[np.ndarray], np.ndarray]


def _how_to_build(folder: Path) -> str:
    return f"build one: run image-search with {param('source')} YOUR_IMAGES {param('out')} {folder}"


def index_identity(folder: Path) -> str | None:
    """What changes whenever a run commits a new index into ``folder``: inode, size and mtime of
    the features file and of its stage record (a commit renames each into place, the catalog
    before them, the record last). None when the folder holds no features file."""
    parts = []
    for rel in (INDEX_FEATURES, EMBED.record):
        try:
            st = os.stat(folder / rel)
        except OSError:
            if rel == INDEX_FEATURES:
                return None
            parts.append(f"{rel}:-")
            continue
        parts.append(f"{rel}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


@dataclass
class Index:
    """One loaded index: ids (n,) int64 and their prepared embeddings (n, 2048) float32, where
    each image is (catalog columns kept as Arrow arrays, not Python objects), and the metadata
    of the features (model, weights, input size)."""

    folder: Path
    ids: np.ndarray
    prepared: PreparedIndex
    uris: pa.Array
    labels: pa.Array
    meta: dict[str, Any]
    collection_meta: dict[str, Any]
    identity: str
    loaded_at: float = field(default_factory=time.time)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def input_size(self) -> int:
        return int(self.meta["input_size"])

    @property
    def model_key(self) -> str:
        return str(self.meta.get("model_key", ""))

    def position(self, image_id: int) -> int | None:
        """Row of ``image_id`` in the index, or None when the index does not hold it."""
        pos = int(np.searchsorted(self.ids, image_id))
        return pos if pos < len(self.ids) and int(self.ids[pos]) == image_id else None

    def uri(self, pos: int) -> str:
        return str(self.uris[pos].as_py())

    def label(self, pos: int) -> str | None:
        value = self.labels[pos].as_py()
        return None if value is None else str(value)

    @cached_property
    def collection(self) -> Collection:
        """The collection the index was built from, opened again to read its images."""
        return reopen(self.collection_meta)

    def image(self, image_id: int) -> tuple[bytes, str]:
        """The stored image ``image_id`` as a file to show: (bytes, media type).

        Raises KeyError for an id the index does not hold, BadImage when it cannot be read.
        """
        pos = self.position(image_id)
        if pos is None:
            raise KeyError(image_id)
        return self.collection.picture(self.collection.read(self.uri(pos)))

    def thumbnails(self, image_ids: Iterable[int]) -> np.ndarray:
        """Images ``image_ids`` as (n, 96, 96, 3) uint8 tiles; grey where one cannot be read."""
        ids = list(image_ids)
        out = np.full((len(ids), THUMB, THUMB, 3), 128, dtype=np.uint8)
        for n, image_id in enumerate(ids):
            pos = self.position(image_id)
            if pos is None:
                continue
            try:
                data = self.collection.read(self.uri(pos))
                out[n] = self.collection.decode(data, THUMB).pixels
            except BadImage:
                continue
        return out


def open_index(folder: str | Path, attempts: int = 5, wait_s: float = 0.5) -> Index:
    """Load the index in ``folder`` whole: features, then catalog, both checked to be one
    committed set (a run committing meanwhile makes it read again, up to ``attempts`` times).

    Raises ImageSearchError naming the folder and the fix when it is not an index.
    """
    path = Path(folder).expanduser().resolve()
    if not path.is_dir():
        raise ImageSearchError(f"Index folder {path} does not exist; {_how_to_build(path)}.")
    reason = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(wait_s)
        before = index_identity(path)
        if before is None:
            raise ImageSearchError(
                f"{path} holds no {INDEX_FEATURES}: it is not the output folder of a finished run; "
                f"{_how_to_build(path)}."
            )
        if not (path / CATALOG_FILE).is_file():
            raise ImageSearchError(
                f"{path} holds {INDEX_FEATURES} but no {CATALOG_FILE}; run image-search "
                f"again with {param('out')} {path} to write it."
            )
        reason = unsettled(path, INDEX_FILES) or ""
        if reason:
            continue
        index = _load(path, before)
        if index_identity(path) == before:
            return index
        reason = "its files changed while they were read"
    raise ImageSearchError(
        f"Index folder {path} is being updated ({reason}); try again when the run that writes "
        f"it has finished."
    )


def _load(path: Path, identity: str) -> Index:
    features = path / INDEX_FEATURES
    meta = store.read_metadata(features)
    ids, emb = store.load_features(features)
    if emb.shape[1] != DIM:
        raise ImageSearchError(f"{features} holds {emb.shape[1]}-d embeddings, not {DIM}-d.")
    if len(ids) == 0:
        raise ImageSearchError(f"{features} holds no images; index at least one image.")
    order = np.argsort(ids, kind="stable")
    if np.any(order != np.arange(len(ids))):  # written sorted; keep lookups by binary search
        ids, emb = ids[order], emb[order]
    catalog_path = path / CATALOG_FILE
    try:
        schema_meta = pq.read_schema(catalog_path).metadata or {}
        table = pq.read_table(catalog_path, columns=["image_id", "uri", "label"])
        collection_meta = json.loads(schema_meta[CATALOG_META_KEY])["collection"]
    except (OSError, pa.ArrowInvalid, KeyError, ValueError) as exc:
        raise ImageSearchError(
            f"Cannot read {catalog_path} ({exc}); run image-search again with "
            f"{param('out')} {path}."
        ) from exc
    cat_ids = table.column("image_id").to_numpy()
    take = np.searchsorted(cat_ids, ids)
    take = np.minimum(take, len(cat_ids) - 1)
    missing = ids[cat_ids[take] != ids] if len(cat_ids) else ids
    if len(missing):
        raise ImageSearchError(
            f"{len(missing)} images of {features} (first: id {int(missing[0])}) are not in "
            f"{catalog_path}: the two files come from different runs; run image-search "
            f"again with {param('out')} {path}."
        )
    indices = pa.array(take)
    return Index(
        folder=path,
        ids=ids,
        prepared=prepare_index(emb),
        uris=pc.take(table.column("uri"), indices).combine_chunks(),
        labels=pc.take(table.column("label"), indices).combine_chunks(),
        meta=meta,
        collection_meta=dict(collection_meta),
        identity=identity,
    )


def _same_weights(given: str, recorded: str) -> bool:
    if given == recorded:
        return True
    if given in ("imagenet", "none") or recorded in ("imagenet", "none"):
        return False
    return Path(given).expanduser().resolve() == Path(recorded).expanduser().resolve()


def model_spec(meta: dict[str, Any], weights: str | None = None) -> ModelSpec:
    """The model that embeds queries like the index's images: the settings in the index's
    metadata, checked to give this installation's key for them.

    ``weights``: what the user asked for, refused when it is not what built the index. Raises
    ImageSearchError naming what differs.
    """
    recorded = meta.get("weights")
    if not recorded or "input_size" not in meta or "model_key" not in meta:
        raise ImageSearchError(
            "The index's features carry no model description (weights, input size, model key); "
            "run `image-search run` on the collection again to rebuild them."
        )
    if weights is not None and not _same_weights(weights, str(recorded)):
        raise ImageSearchError(
            f"{param('weights')} {weights} differs from the weights the index was built with "
            f"({recorded}); leave {param('weights')} out to use the index's own, or rebuild the "
            f"index with {param('weights')} {weights}."
        )
    differs = [
        f"{name} {meta.get(key)!r} (here: {ours!r})"
        for name, key, ours in (
            ("model", "model", MODEL),
            ("pooling", "pooling", "max"),
            ("dimension", "dim", DIM),
            ("preprocessing", "preprocessing", PREPROCESSING),
            ("resize rule", "resize", RESIZE_RULE),
        )
        if key in meta and meta[key] != ours
    ]
    if differs:
        raise ImageSearchError(
            "The index was built with another model: " + "; ".join(differs) + ". Rebuild it "
            "with this version of image-search (`image-search run` on the same collection)."
        )
    spec = ModelSpec(
        weights=str(recorded),
        seed=int(meta.get("seed", 0)),
        precision=str(meta.get("precision", "float32")),
        input_size=int(meta["input_size"]),
    )
    key = spec.key()  # hashes the weights file: a missing one is named here
    if key != meta["model_key"]:
        raise ImageSearchError(
            f"The index was built with model key {meta['model_key']}, but weights "
            f"{spec.weights!r} (seed {spec.seed}, {spec.precision}, input size "
            f"{spec.input_size}) give {key} here: the weights file's content or image-search's "
            f"model or resize code changed since. Rebuild the index with `image-search run` on "
            f"the same collection, or query with the weights and version that built it."
        )
    return spec


def load_forward(spec: ModelSpec) -> Forward:
    """The compiled forward pass of ``spec``'s model: (B, S, S, 3) uint8 -> (B, 2048) float32."""
    model, _ = build_model(spec.weights, spec.seed, spec.precision)
    return make_forward(model)


@dataclass(frozen=True)
class Neighbour:
    """One result: its rank (1 = nearest), true Euclidean distance and where the image is."""

    rank: int
    image_id: int
    distance: float
    uri: str
    label: str | None


@dataclass
class Answer:
    """The neighbours of one query image, or why it could not be asked."""

    query: str
    neighbours: list[Neighbour] = field(default_factory=list)
    error: str | None = None
    pixels: np.ndarray | None = field(default=None, repr=False)  # (96, 96, 3) uint8, to show


def check_k(k: int, index: Index) -> int:
    """``k``, checked against the index: 1 <= k <= number of index images."""
    if not 1 <= k <= len(index):
        raise ImageSearchError(
            f"{param('k')} = {k}, but the index in {index.folder} holds {len(index)} images; use "
            f"{param('k')} between 1 and {len(index)}."
        )
    return k


def search(index: Index, embeddings: np.ndarray, k: int) -> list[list[Neighbour]]:
    """The ``k`` nearest index images of each embedding ((q, 2048) float32), nearest first."""
    k = check_k(k, index)
    distances, positions = search_prepared(index.prepared, embeddings, k)
    return [
        [
            Neighbour(
                rank=r + 1,
                image_id=int(index.ids[p]),
                distance=float(d),
                uri=index.uri(int(p)),
                label=index.label(int(p)),
            )
            for r, (d, p) in enumerate(zip(drow, prow, strict=True))
        ]
        for drow, prow in zip(distances, positions, strict=True)
    ]


def query_sources(sources: Sequence[str]) -> list[str]:
    """The query images ``sources`` name: files, http(s)/fsspec URLs, and every image under a
    folder (recursively, sorted). Raises ImageSearchError for a path that does not exist or a
    folder without images."""
    found: list[str] = []
    for source in sources:
        if "://" in source and not source.startswith("file://"):
            found.append(source)
            continue
        path = Path(source.removeprefix("file://")).expanduser()
        if path.is_dir():
            images = [item.uri for item in open_collection(str(path)).listing()]
            if not images:
                raise ImageSearchError(
                    f"Query folder {path} holds no images (.jpg .jpeg .png .webp .gif .bmp .tif "
                    f".tiff files)."
                )
            found.extend(images)
        elif path.exists():
            found.append(str(path))
        else:
            raise ImageSearchError(
                f"Query image {source!r}: no such file or folder; give an image file, a folder "
                f"of images or an http(s) URL."
            )
    return found


def ask(
    index: Index,
    forward: Forward,
    sources: Sequence[str],
    k: int,
    *,
    reader: Callable[[str], bytes] = read_uri,
    batch: int = EMBED_BATCH,
) -> list[Answer]:
    """Answer every query image of ``sources`` (see :func:`query_sources`): read, decode by the
    one rule at the index's input size, embed with ``forward``, search. A query that cannot be
    read or decoded gets its reason in ``Answer.error``; the others are answered."""
    k = check_k(k, index)
    uris = query_sources(sources)
    answers = [Answer(query=uri) for uri in uris]
    for start in range(0, len(uris), batch):
        pending: list[tuple[Answer, np.ndarray]] = []
        for answer in answers[start : start + batch]:
            try:
                data = reader(answer.query)
                pixels = decode_image(data, index.input_size).pixels
                answer.pixels = (
                    pixels if index.input_size == THUMB else decode_image(data, THUMB).pixels
                )
            except BadImage as exc:
                answer.error = f"not usable as a query image: {exc.reason}"
                continue
            pending.append((answer, pixels))
        if not pending:
            continue
        embeddings = forward(np.stack([p for _, p in pending]))
        for (answer, _), neighbours in zip(pending, search(index, embeddings, k), strict=True):
            answer.neighbours = neighbours
    return answers


def answer_rows(answers: Iterable[Answer]) -> list[dict[str, Any]]:
    """One row per (query, neighbour), and one per query that failed (``error`` set)."""
    rows: list[dict[str, Any]] = []
    for a in answers:
        if a.error is not None:
            rows.append({"query": a.query, "rank": None, "error": a.error})
            continue
        rows.extend(
            {
                "query": a.query,
                "rank": n.rank,
                "distance": n.distance,
                "image_id": n.image_id,
                "uri": n.uri,
                "label": n.label,
            }
            for n in a.neighbours
        )
    return rows


def format_table(answers: Iterable[Answer]) -> str:
    """The answers as text: per query, a table of rank, distance, image id and URI."""
    lines: list[str] = []
    for a in answers:
        lines.append(f"query: {a.query}")
        if a.error is not None:
            lines.append(f"  error: {a.error}")
            continue
        width = max(8, *(len(str(n.image_id)) for n in a.neighbours))
        lines.append(f"  {'rank':>4}  {'distance':>10}  {'image_id':>{width}}  uri")
        lines.extend(
            f"  {n.rank:>4}  {n.distance:>10.4f}  {n.image_id:>{width}}  {n.uri}"
            for n in a.neighbours
        )
    return "\n".join(lines)


def picture(index: Index, answers: Sequence[Answer], shown: int = 10, max_queries: int = 20) -> Any:
    """A grid: per answered query (at most ``max_queries``), the query image, then its first
    ``shown`` neighbours titled with their distances. Returns a PIL image."""
    answered = [a for a in answers if a.error is None and a.pixels is not None][:max_queries]
    if not answered:
        raise ImageSearchError("No query could be answered, so there is nothing to draw.")
    columns = 1 + min(shown, max(len(a.neighbours) for a in answered))
    tiles = np.full((len(answered) * columns, THUMB, THUMB, 3), 255, dtype=np.uint8)
    titles = [""] * len(tiles)
    for row, a in enumerate(answered):
        base = row * columns
        assert a.pixels is not None
        tiles[base] = a.pixels
        titles[base] = "query"
        near = a.neighbours[: columns - 1]
        tiles[base + 1 : base + 1 + len(near)] = index.thumbnails(n.image_id for n in near)
        for j, n in enumerate(near, start=1):
            titles[base + j] = f"{n.distance:.4g}"
    return image_grid(tiles, titles, columns=columns)


@task(cache_policy=NO_CACHE)
def query_images(images: list[str], index_folder: str, k: int) -> list[dict[str, Any]]:
    """Prefect task: answer ``images`` from the index in ``index_folder``; the neighbours as a
    picture and a table artifact. Returns the table's rows."""
    index = open_index(index_folder)
    forward = load_forward(model_spec(index.meta))
    answers = ask(index, forward, images, k)
    rows = answer_rows(answers)
    failed = [a for a in answers if a.error is not None]
    for a in failed:
        log.warning("%s: %s", a.query, a.error)
    if len(failed) < len(answers):
        create_markdown_artifact(
            key=artifact_key("query-neighbours"),
            markdown=markdown_image(
                picture(index, answers), "queries and their nearest index images"
            ),
            description=f"Each query (left) with its {k} nearest images of {index.folder}",
        )
    create_table_artifact(
        key=artifact_key("query-results"),
        table=rows,
        description=f"Nearest images of {index.folder} ({len(index)} images), exact Euclidean",
    )
    if len(failed) == len(answers):
        raise ImageSearchError(
            f"No query image could be used: {'; '.join(f'{a.query}: {a.error}' for a in failed)}"
        )
    return rows
