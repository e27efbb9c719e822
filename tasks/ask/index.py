"""Open an index: the output folder of a finished ``image-search run``, read as one committed set
(:mod:`tasks.ask.files`): its features (the memory-mapped copy when it is current, else the
Parquet file of record), the catalog (where each image is, its label and content hash), the
metadata that says which model built it, the exported model when there is a current one, and
the files of its faster tiers when they are current: the int8 copy that exact answers scan
(:mod:`tasks.ask.compact`) and the approximate index with its measured recall
(:mod:`tasks.search.ann`). A derived file that is missing, stale or damaged is passed over with
a log line saying why; answers then come from the next tier down, labelled as what they are."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.ask.compact import open_compact
from tasks.ask.files import (
    being_written,
    copy_paths,
    copy_source,
    damage,
    damaged,
    derived_problem,
    index_identity,
    open_copy,
)
from tasks.catalog import META_KEY as CATALOG_META_KEY
from tasks.columns import int64_array, numbers
from tasks.errors import ImageSearchError, param
from tasks.features import store
from tasks.features.model import DIM
from tasks.layout import (
    ANN,
    ANN_INDEX,
    ANN_INFO,
    CATALOG_FILE,
    INDEX_COMPACT,
    INDEX_COMPACT_ROWS,
    INDEX_COMPACT_STAGE,
    INDEX_COPY,
    INDEX_DERIVED,
    INDEX_FEATURES,
    INDEX_FILES,
    QUERY_MODEL,
    QUERY_MODEL_STAGE,
    StageLayout,
)
from tasks.search.certified import CertifiedIndex, CertifiedStats
from tasks.search.exact import PreparedIndex, prepare_index
from tasks.sources.collection import Collection, reopen
from tasks.sources.images import BadImage
from tasks.storage import read_record, unsettled

if TYPE_CHECKING:
    from tasks.search.ann import AnnIndex

log = logging.getLogger(__name__)

THUMB = 96  # side of the pictures' tiles


def _jpeg(pixels: np.ndarray, quality: int = 85) -> bytes:
    """JPEG bytes of one (h, w, 3) uint8 image."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def how_to_build(folder: Path) -> str:
    """The command that makes ``folder`` an index."""
    return f"build one: image-search run {param('source')} YOUR_IMAGES {param('out')} {folder}"


@dataclass
class Index:
    """One loaded index: ids (n,) int64 sorted, their prepared embeddings (n, 2048) float32
    (memory-mapped when read from the copy), where each image is (catalog columns kept as Arrow
    arrays, not Python objects), the metadata of the features (model, weights, input size) and
    the exported model file when the folder holds a current one.

    ``features_from`` says which file the embeddings came from (the copy or the Parquet file).
    ``certified``: the exact tier over the int8 copy (None: exact answers scan the float32
    rows); ``approximate``: the approximate index (None: every answer is exact); ``passed_over``
    says, per derived file that is not used, why.
    """

    folder: Path
    ids: np.ndarray
    prepared: PreparedIndex
    uris: pa.Array
    labels: pa.Array
    digests: pa.Array
    meta: dict[str, Any]
    collection_meta: dict[str, Any]
    identity: str
    features_from: str
    model_file: Path | None = None
    certified: CertifiedIndex | None = None
    approximate: AnnIndex | None = None
    passed_over: dict[str, str] = field(default_factory=dict)
    stats: CertifiedStats = field(default_factory=CertifiedStats)
    loaded_at: float = field(default_factory=time.time)

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, positions: np.ndarray) -> np.ndarray:
        """The float32 rows (m, 2048) at ``positions`` (m,): only those are read."""
        return np.asarray(self.prepared.data[positions])

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

    def read(self, image_id: int) -> bytes:
        """The stored bytes of image ``image_id``, checked to be the content that was indexed.

        Raises KeyError for an id the index does not hold, BadImage when it cannot be read or
        its content changed since the run that indexed it.
        """
        pos = self.position(image_id)
        if pos is None:
            raise KeyError(image_id)
        data = self.collection.read(self.uri(pos))
        if hashlib.sha256(data).hexdigest() != self.digests[pos].as_py():
            raise BadImage("its file changed since the index was built")
        return data

    def image(self, image_id: int) -> tuple[bytes, str]:
        """The stored image ``image_id`` as a file to show: (bytes, media type)."""
        return self.collection.picture(self.read(image_id))

    def thumbnail(self, image_id: int, size: int) -> bytes:
        """Image ``image_id`` as a ``size``-pixel square JPEG (short side resized, centre crop,
        by the one decode rule): what a page shows in a tile, a few kB whatever the original."""
        return _jpeg(self.collection.decode(self.read(image_id), size).pixels)

    def thumbnails(self, image_ids: Iterable[int]) -> np.ndarray:
        """Images ``image_ids`` as (n, 96, 96, 3) uint8 tiles; grey where one cannot be read."""
        ids = list(image_ids)
        out = np.full((len(ids), THUMB, THUMB, 3), 128, dtype=np.uint8)
        for n, image_id in enumerate(ids):
            try:
                out[n] = self.collection.decode(self.read(image_id), THUMB).pixels
            except (KeyError, BadImage):
                continue
        return out


def open_index(folder: str | Path, attempts: int = 5, wait_s: float = 0.5) -> Index:
    """Load the index in ``folder``: its files of record and current derived files, checked to
    be one committed set (a run committing meanwhile makes it read again, up to ``attempts``
    times).

    Raises ImageSearchError naming the folder and the fix when it is not an index.
    """
    path = Path(folder).expanduser().resolve()
    if not path.is_dir():
        raise ImageSearchError(f"Index folder {path} does not exist; {how_to_build(path)}.")
    reason = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(wait_s)
        before = index_identity(path)
        if before is None:
            raise ImageSearchError(
                f"{path} holds no {INDEX_FEATURES}: it is not the output folder of a finished run; "
                f"{how_to_build(path)}."
            )
        if not (path / CATALOG_FILE).is_file():
            raise ImageSearchError(
                f"{path} holds {INDEX_FEATURES} but no {CATALOG_FILE}; run image-search "
                f"again with {param('out')} {path} to write it."
            )
        reason = unsettled(path, INDEX_FILES) or ""
        changed = {r: why for r in INDEX_DERIVED if (why := unsettled(path, {r: INDEX_DERIVED[r]}))}
        if (reason or changed) and not being_written(path):
            # Nobody is writing the folder: a file that differs from its record stays so. A
            # file of record that does is an error; a derived one is passed over below.
            damaged(path, INDEX_FILES)
            reason = ""  # touched, not changed (a copy that did not keep the files' times)
            changed = {r: why for r in changed if (why := damage(path, r, INDEX_DERIVED[r]))}
        elif reason or (changed and attempt < attempts - 1):
            reason = reason or next(iter(changed.values()))
            continue
        # Derived files still unlike their records after every attempt are damaged, not being
        # committed: they are passed over, the files of record answer.
        index = _load(path, before, changed)
        if index_identity(path) == before:
            return index
        reason = "its files changed while they were read"
    raise ImageSearchError(
        f"Index folder {path} is being written by a run right now ({reason}); try again when "
        f"that run has finished."
    )


def _derived_problem(path: Path, stage: StageLayout, changed: dict[str, str]) -> str | None:
    """Why the files of derived ``stage`` cannot be used (see :func:`derived_problem`), also
    when one of them is among ``changed`` (unlike its record: damaged)."""
    damaged = [changed[rel] for rel in stage.outputs if rel in changed]
    if damaged:
        return damaged[0]
    source = copy_source(path)
    if source is None:
        return "no record of the features"
    return derived_problem(path, stage.name, source)


def _features(path: Path, n: int, changed: dict[str, str]) -> tuple[np.ndarray, PreparedIndex, str]:
    """The index's embeddings: from the memory-mapped copy when it was made from the features
    in place, else read from the Parquet file (seconds for large indexes), saying why."""
    problem = _derived_problem(path, INDEX_COPY, changed)
    if problem is None:
        try:
            ids, prepared = open_copy(*copy_paths(path), n)
            return ids, prepared, INDEX_COPY.outputs[0]
        except (OSError, ValueError) as exc:
            problem = str(exc)
    log.info("reading %s, not its memory-mapped copy: %s", INDEX_FEATURES, problem)
    ids, emb = store.load_features(path / INDEX_FEATURES)
    order = np.argsort(ids, kind="stable")
    if np.any(order != np.arange(len(ids))):  # written sorted; keep lookups by binary search
        ids, emb = ids[order], emb[order]
    return ids, prepare_index(emb), INDEX_FEATURES


def _certified(
    path: Path, prepared: PreparedIndex, changed: dict[str, str]
) -> tuple[CertifiedIndex | None, str | None]:
    """The exact tier over the int8 copy when it is current (else None and why: exact answers
    then scan the float32 rows)."""
    problem = _derived_problem(path, INDEX_COMPACT_STAGE, changed)
    if problem is None:
        record = read_record(path, INDEX_COMPACT_STAGE.name) or {}
        try:
            zero_point = int((record.get("info") or {})["zero_point"])
            prepared_int8 = open_compact(
                path / INDEX_COMPACT, path / INDEX_COMPACT_ROWS, prepared.data, zero_point
            )
            return prepared_int8, None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problem = str(exc)
    log.info("exact answers scan the float32 rows, not their int8 copy: %s", problem)
    return None, problem


def _approximate(path: Path, n: int, changed: dict[str, str]) -> tuple[AnnIndex | None, str]:
    """The approximate index when it is current, else None and why (every answer is then
    exact). A run that built none says so quietly; one whose files are missing, stale or
    damaged is named in a warning."""
    from tasks.search import ann as approximate

    if read_record(path, ANN.name) is None:
        return None, "the run built no approximate index (its ann parameter)"
    problem = _derived_problem(path, ANN, changed)
    if problem is None:
        try:
            described = json.loads((path / ANN_INFO).read_text())
            found = approximate.load(path / ANN_INDEX, described)
            if len(found) != n:
                raise ValueError(f"it holds {len(found)} rows, the index {n}")
            return found, ""
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problem = str(exc)
    log.warning("the approximate index is not used, answers are exact: %s", problem)
    return None, problem


def _model_file(path: Path, meta: dict[str, Any], changed: dict[str, str]) -> Path | None:
    """The exported model when its record says it is the model of these features."""
    problem = changed.get(QUERY_MODEL) or derived_problem(
        path, QUERY_MODEL_STAGE.name, {"model_key": meta.get("model_key")}
    )
    if problem is not None:
        log.info("no exported model for this index (%s)", problem)
        return None
    return path / QUERY_MODEL


def _load(path: Path, identity: str, changed: dict[str, str]) -> Index:
    features = path / INDEX_FEATURES
    meta = store.read_metadata(features)
    try:
        parquet = pq.ParquetFile(features)
        n = parquet.metadata.num_rows
        dim = parquet.schema_arrow.field("embedding").type.list_size
    except (OSError, pa.ArrowInvalid, KeyError) as exc:
        raise ImageSearchError(
            f"Feature file {features} is damaged ({exc}); run image-search again with "
            f"{param('out')} {path} to recompute it."
        ) from exc
    if dim != DIM:
        raise ImageSearchError(f"{features} holds {dim}-d embeddings, not {DIM}-d.")
    if n == 0:
        raise ImageSearchError(f"{features} holds no images; index at least one image.")
    ids, prepared, features_from = _features(path, n, changed)
    catalog_path = path / CATALOG_FILE
    try:
        catalog = pq.ParquetFile(catalog_path)  # not read_table: its dataset layer loads pandas
        schema_meta = catalog.schema_arrow.metadata or {}
        table = catalog.read(columns=["image_id", "uri", "label", "sha256"])
        collection_meta = json.loads(schema_meta[CATALOG_META_KEY])["collection"]
    except (OSError, pa.ArrowInvalid, KeyError, ValueError) as exc:
        raise ImageSearchError(
            f"Cannot read {catalog_path} ({exc}); run image-search again with "
            f"{param('out')} {path}."
        ) from exc
    cat_ids = numbers(table.column("image_id")).astype(np.int64)
    take = np.searchsorted(cat_ids, ids)
    take = np.minimum(take, len(cat_ids) - 1)
    missing = ids[cat_ids[take] != ids] if len(cat_ids) else ids
    if len(missing):
        raise ImageSearchError(
            f"{len(missing)} images of {features} (first: id {int(missing[0])}) are not in "
            f"{catalog_path}: the two files come from different runs; run image-search "
            f"again with {param('out')} {path}."
        )
    indices = int64_array(take)
    certified, no_certified = _certified(path, prepared, changed)
    approximate, no_approximate = _approximate(path, n, changed)
    passed_over = {INDEX_COMPACT: no_certified or "", ANN_INDEX: no_approximate}
    return Index(
        folder=path,
        ids=ids,
        prepared=prepared,
        uris=pc.take(table.column("uri"), indices).combine_chunks(),
        labels=pc.take(table.column("label"), indices).combine_chunks(),
        digests=pc.take(table.column("sha256"), indices).combine_chunks(),
        meta=meta,
        collection_meta=dict(collection_meta),
        identity=identity,
        features_from=features_from,
        model_file=_model_file(path, meta, changed),
        certified=certified,
        approximate=approximate,
        passed_over={rel: why for rel, why in passed_over.items() if why},
    )
