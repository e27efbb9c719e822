"""Ask an index: the query images that the user's arguments name, each read and decoded by the
one rule at the index's input size, embedded, and searched exactly (true Euclidean distance,
nearest first). A query that cannot be used is an answer with its reason; the others are
answered."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tasks.ask.embedding import Forward
from tasks.ask.index import THUMB, Index
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


@dataclass
class Answer:
    """The neighbours of one query image, or why it could not be asked."""

    query: str
    neighbours: list[Neighbour] = field(default_factory=list)
    error: str | None = None
    pixels: np.ndarray | None = field(default=None, repr=False)  # (96, 96, 3) uint8, to show


def index_k(k: int, index: Index) -> int:
    """``k``, checked against ``index`` (see :func:`tasks.search.k.check_k`)."""
    return check_k(k, len(index), index=f"the index in {index.folder}")


def search(index: Index, embeddings: np.ndarray, k: int) -> list[list[Neighbour]]:
    """The ``k`` nearest index images of each embedding ((q, 2048) float32), nearest first."""
    k = index_k(k, index)
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
) -> list[Answer]:
    """Answer the pending ``answers`` (see :func:`query_sources`) in place: read, decode by the
    one rule at the index's input size, embed with ``forward``, search. A query that cannot be
    read or decoded gets its reason in ``Answer.error``; returns ``answers``.
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
        for (answer, _), neighbours in zip(pending, search(index, embeddings, k), strict=True):
            answer.neighbours = neighbours
    return list(answers)
