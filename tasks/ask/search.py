"""Ask an index: the query images that the user's arguments name, each read and decoded by the
one rule at the index's input size, embedded, and searched (true Euclidean distance, nearest
first). A query that cannot be used is an answer with its reason; the others are answered.

Tiers: an index with an approximate index answers from it unless the query asks for exact
(``exact=True``); exact answers come from the certified scan of the int8 copy, else from the
float32 rows. Every answer carries its :class:`Tier`: exact, or approximate with the recall@10
its index measured against exact search on the run's own images."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.ask.embedding import Forward
from tasks.ask.index import THUMB, Index
from tasks.search.certified import search_certified
from tasks.search.exact import search_prepared
from tasks.search.k import check_k
from tasks.sources.collection import open_collection, read_uri
from tasks.sources.images import BadImage, decode_image

EMBED_BATCH = 32  # query images per forward pass when a folder is asked


@dataclass(frozen=True)
class Neighbour:
    """One result: its rank (1 = nearest), true Euclidean distance and where the image is."""

    rank: int
    image_id: int
    distance: float
    uri: str
    label: str | None


@dataclass(frozen=True)
class Tier:
    """How an answer was found. ``exact``: the true k nearest (by the certified scan of the
    int8 copy or the float32 rows, ``method`` says which). ``approximate``: from the approximate
    index, whose answers held ``recall`` of the true ``recall_k`` nearest on average when
    measured on ``recall_queries`` of the run's own images; its distances are still exact."""

    name: str
    method: str
    recall: float | None = None
    recall_k: int | None = None
    recall_queries: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The fields every answer shows (JSON, the service)."""
        return {"tier": self.name, "method": self.method, "recall_at_10": self.recall}

    def describe(self) -> str:
        """One line for a person."""
        if self.recall is None:
            return f"{self.name} ({self.method})"
        return (
            f"{self.name} ({self.method}): recall@{self.recall_k} {self.recall:.4f}, measured "
            f"against exact search on {self.recall_queries} of the index's own images"
        )


def tier(index: Index, exact: bool = False) -> Tier:
    """The tier a search of ``index`` answers from (``exact``: the query asks for exact)."""
    ann = index.approximate
    if not exact and ann is not None and ann.recall is not None:
        return Tier(
            "approximate",
            f"IVF-PQ, {ann.probe.nprobe} lists probed, {ann.probe.rerank} candidates re-ranked "
            f"exactly",
            ann.recall.value,
            ann.recall.k,
            ann.recall.queries,
        )
    if index.certified is not None:
        return Tier("exact", "certified scan of the int8 copy")
    return Tier("exact", "scan of the float32 rows")


@dataclass
class Answer:
    """The neighbours of one query image, or why it could not be asked, and how they were
    found."""

    query: str
    neighbours: list[Neighbour] = field(default_factory=list)
    error: str | None = None
    pixels: np.ndarray | None = field(default=None, repr=False)  # (96, 96, 3) uint8, to show
    tier: Tier | None = None


def index_k(k: int, index: Index) -> int:
    """``k``, checked against ``index`` (see :func:`tasks.search.k.check_k`)."""
    return check_k(k, len(index), index=f"the index in {index.folder}")


def _exact(index: Index, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if index.certified is not None:
        return search_certified(index.certified, embeddings, k, stats=index.stats)
    return search_prepared(index.prepared, embeddings, k)


def search(
    index: Index, embeddings: np.ndarray, k: int, *, exact: bool = False
) -> list[tuple[list[Neighbour], Tier]]:
    """The ``k`` nearest index images of each embedding ((q, 2048) float32), nearest first,
    with the tier each answer came from (see :func:`tier`; ``exact``: never approximate)."""
    k = index_k(k, index)
    chosen = tier(index, exact)
    tiers = [chosen] * len(embeddings)
    if chosen.name == "approximate" and index.approximate is not None:
        distances, positions = index.approximate.search(index.take, embeddings, k)
        short = np.flatnonzero((positions >= len(index)).any(axis=1))
        if len(short):  # fewer candidates than k: those queries are answered exactly
            distances[short], positions[short] = _exact(index, embeddings[short], k)
            for i in short:
                tiers[i] = tier(index, exact=True)
    else:
        distances, positions = _exact(index, embeddings, k)
    found = [
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
    return list(zip(found, tiers, strict=True))


def query_sources(sources: Sequence[str]) -> list[Answer]:
    """One pending answer per query image that ``sources`` name: files, http(s)/fsspec URLs,
    and every image under a folder (recursively, sorted). A path that does not exist, or a
    folder without images, is an answer with that error: the other sources are still asked."""
    found: list[Answer] = []
    for source in sources:
        if "://" in source and not source.startswith("file://"):
            found.append(Answer(query=source))
            continue
        path = Path(source.removeprefix("file://")).expanduser()
        if path.is_dir():
            images = [item.uri for item in open_collection(str(path)).listing()]
            if not images:
                found.append(
                    Answer(
                        query=source,
                        error="a folder without images (.jpg .jpeg .png .webp .gif .bmp .tif "
                        ".tiff files)",
                    )
                )
            found.extend(Answer(query=uri) for uri in images)
        elif path.exists():
            found.append(Answer(query=str(path)))
        else:
            found.append(
                Answer(
                    query=source,
                    error="no such file or folder; give an image file, a folder of images or "
                    "an http(s) URL",
                )
            )
    return found


def ask(
    index: Index,
    forward: Forward,
    answers: Sequence[Answer],
    k: int,
    *,
    reader: Callable[[str], bytes] = read_uri,
    batch: int = EMBED_BATCH,
    exact: bool = False,
) -> list[Answer]:
    """Answer the pending ``answers`` (see :func:`query_sources`) in place: read, decode by the
    one rule at the index's input size, embed with ``forward``, search (``exact``: never from
    the approximate index). A query that cannot be read or decoded gets its reason in
    ``Answer.error``; returns ``answers``.
    """
    k = index_k(k, index)
    pending_all = [a for a in answers if a.error is None and not a.neighbours]
    for start in range(0, len(pending_all), batch):
        pending: list[tuple[Answer, np.ndarray]] = []
        for answer in pending_all[start : start + batch]:
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
        found = search(index, embeddings, k, exact=exact)
        for (answer, _), (neighbours, how) in zip(pending, found, strict=True):
            answer.neighbours, answer.tier = neighbours, how
    return list(answers)
