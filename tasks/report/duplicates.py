"""Near-duplicate report: pairs of index images closer than a threshold, exact copies (distance 0)
included, found by the project's exact kernel searching the index against itself.

Cost: this is an n × n exact search, ``n² · d`` multiply-adds in float32 GEMM blocks (the work of
searching n queries in an index of n, e.g. 9× the query search of a 9:1 split), with the
kernel's ~128 MiB scratch and (n, per_image + 1) results as the only memory beyond the index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from tasks.report.pictures import image_grid, text_picture
from tasks.search.exact import prepare_index, search_prepared
from tasks.storage import atomic_path

MAX_GALLERY_PAIRS = 12
GALLERY_SIDE = 96  # image_grid's tile size
META_KEY = b"image_search.duplicates"
SCHEMA = pa.schema(
    [
        pa.field("image_id_a", pa.int64(), nullable=False),
        pa.field("image_id_b", pa.int64(), nullable=False),
        pa.field("distance", pa.float64(), nullable=False),
    ]
)


@dataclass(frozen=True)
class Duplicates:
    """Near-duplicate pairs of an index, ``image_id_a < image_id_b``, by distance then ids.

    Attributes
    ----------
    threshold : float
        Largest distance reported (the given one, or ``ratio`` × ``median_nearest_distance``).
    median_nearest_distance : float or None
        Median over images of the distance to the nearest *other* image; None below 2 images.
    per_image : int
        Each image's search saw its ``per_image`` nearest other images: a pair is listed when
        either image found the other there, so a group of more than ``per_image + 1`` copies
        is reported in part.
    n_images_at_limit : int
        Images all of whose ``per_image`` partners were within the threshold: they may have
        more near-duplicates than listed.
    image_id_a, image_id_b : ndarray of shape (n_pairs,), int64
    distance : ndarray of shape (n_pairs,), float64
    """

    threshold: float
    median_nearest_distance: float | None
    ratio: float | None
    per_image: int
    n_images: int
    n_images_at_limit: int
    image_id_a: np.ndarray = field(repr=False)
    image_id_b: np.ndarray = field(repr=False)
    distance: np.ndarray = field(repr=False)

    @property
    def n_pairs(self) -> int:
        return len(self.distance)

    @property
    def n_exact(self) -> int:
        """Pairs of identical embeddings (distance exactly 0)."""
        return int(np.count_nonzero(self.distance == 0.0))

    def summary(self) -> dict[str, Any]:
        """The counts and settings, JSON-ready (for a report or the Parquet metadata)."""
        return {
            "n_images": self.n_images,
            "n_pairs": self.n_pairs,
            "n_exact": self.n_exact,
            "threshold": self.threshold,
            "median_nearest_distance": self.median_nearest_distance,
            "ratio": self.ratio,
            "per_image": self.per_image,
            "n_images_at_limit": self.n_images_at_limit,
        }


def near_duplicates(
    ids: np.ndarray,
    emb: np.ndarray,
    ratio: float = 0.1,
    threshold: float | None = None,
    per_image: int = 10,
) -> Duplicates:
    """Pairs of images whose embeddings lie within a threshold of each other.

    Parameters
    ----------
    ids : ndarray of shape (n,), int64, unique image ids
    emb : ndarray of shape (n, d), float32
    ratio : float, default 0.1
        Without ``threshold``: the threshold is ``ratio`` × the median distance from an image
        to its nearest other image (scale-free, so it suits any model's features).
    threshold : float, optional
        An absolute distance instead; ``ratio`` is then unused.
    per_image : int, default 10
        At most this many partners per image are looked at (the self-search's k is
        ``min(n, per_image + 1)``); see :class:`Duplicates`.

    Exact duplicates (distance 0) are always within the threshold. Cost: an n × n exact search
    (see the module docstring).
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"Expected ids of shape (n,) of integers, but got {ids.dtype} {ids.shape}")
    ids = ids.astype(np.int64)
    if np.unique(ids).size != ids.size:
        raise ValueError("Expected unique image ids, but ids repeat")
    if isinstance(per_image, bool) or not isinstance(per_image, int) or per_image < 1:
        raise ValueError(f"Expected per_image >= 1, but per_image = {per_image!r}")
    if threshold is None and not ratio >= 0:
        raise ValueError(f"Expected ratio >= 0, but ratio = {ratio}")
    if threshold is not None and not threshold >= 0:
        raise ValueError(f"Expected threshold >= 0, but threshold = {threshold}")
    n = len(ids)
    if len(emb) != n:
        raise ValueError(f"Expected one embedding per id, but {n} ids and {len(emb)} embeddings")
    empty_i, empty_d = np.zeros(0, np.int64), np.zeros(0, np.float64)
    if n < 2:
        return Duplicates(
            float(threshold or 0.0), None, ratio, per_image, n, 0, empty_i, empty_i, empty_d
        )

    prepared = prepare_index(emb)
    k = min(n, per_image + 1)
    dist, pos = search_prepared(prepared, prepared.data, k)
    # Drop each row's own position. With more identical rows than k, the row itself may lose
    # the tie to copies at lower positions and be absent: then drop the last column instead.
    is_self = pos == np.arange(n)[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k - 1)
    keep = np.ones((n, k), dtype=bool)
    keep[np.arange(n), drop] = False
    others_pos = pos[keep].reshape(n, k - 1)
    others_d = dist[keep].reshape(n, k - 1).astype(np.float64)

    median = float(np.median(others_d[:, 0]))
    used = float(threshold) if threshold is not None else ratio * median
    close = others_d <= used
    rows, cols = np.nonzero(close)
    a, b = ids[rows], ids[others_pos[rows, cols]]
    lo, hi, d = np.minimum(a, b), np.maximum(a, b), others_d[rows, cols]
    order = np.lexsort((hi, lo, d))
    lo, hi, d = lo[order], hi[order], d[order]
    # Both images of a pair may have found each other: keep the first (closest) of each pair.
    key = np.stack([lo, hi], axis=1)
    _, first = np.unique(key, axis=0, return_index=True)
    first = np.sort(first)
    return Duplicates(
        threshold=used,
        median_nearest_distance=median,
        ratio=None if threshold is not None else ratio,
        per_image=per_image,
        n_images=n,
        n_images_at_limit=int(np.count_nonzero(close.all(axis=1))) if k - 1 == per_image else 0,
        image_id_a=lo[first],
        image_id_b=hi[first],
        distance=d[first],
    )


def write_duplicates(path: Path, dup: Duplicates) -> None:
    """Write the pairs as Parquet atomically: image_id_a int64, image_id_b int64, distance
    float64; the summary (threshold, counts, limit) goes in the file metadata."""
    table = pa.table(
        {"image_id_a": dup.image_id_a, "image_id_b": dup.image_id_b, "distance": dup.distance},
        schema=SCHEMA.with_metadata({META_KEY: json.dumps(dup.summary()).encode()}),
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _tiles(pixels: np.ndarray) -> np.ndarray:
    """(m, S, S, 3) uint8 as (m, 96, 96, 3), resized when S differs (image_grid's tile size)."""
    pixels = np.asarray(pixels, dtype=np.uint8)
    if pixels.shape[1:3] == (GALLERY_SIDE, GALLERY_SIDE):
        return pixels
    size = (GALLERY_SIDE, GALLERY_SIDE)
    return np.stack(
        [np.asarray(Image.fromarray(p).resize(size, Image.Resampling.BILINEAR)) for p in pixels]
    )


def gallery_caption(n_pairs: int, shown: int, threshold: float) -> list[str]:
    """What the gallery shows, in words: how many pairs of how many, and the threshold."""
    if n_pairs == 0:
        return ["no near-duplicate pairs", f"(no two index images within distance {threshold:.3g})"]
    count = f"{n_pairs} near-duplicate pair{'s' if n_pairs != 1 else ''}"
    if shown < n_pairs:
        count = f"{shown} of {n_pairs} near-duplicate pairs shown, closest first"
    return [count, f"distance <= {threshold:.3g}"]


def duplicates_gallery(
    pixels_a: np.ndarray,
    pixels_b: np.ndarray,
    distances: np.ndarray,
    ids: np.ndarray,
    n_pairs: int | None = None,
    threshold: float = 0.0,
) -> Image.Image:
    """A picture of the first ``MAX_GALLERY_PAIRS`` pairs, one row each: image a | image b,
    under a caption that says how many of the ``n_pairs`` (default: as many as given) it shows.

    pixels_a, pixels_b : (m, S, S, 3) uint8, shown at 96 × 96; distances : (m,);
    ids : (m, 2) image ids (a, b). Titles: a's id; b's id and the distance. Without pairs, a
    picture that says so.
    """
    total = len(distances) if n_pairs is None else n_pairs
    m = min(len(distances), MAX_GALLERY_PAIRS)
    caption = gallery_caption(total, m, threshold)
    if m == 0:
        return text_picture(caption)
    ids = np.asarray(ids).reshape(-1, 2)
    a, b = _tiles(pixels_a[:m]), _tiles(pixels_b[:m])
    tiles = np.empty((2 * m, GALLERY_SIDE, GALLERY_SIDE, 3), dtype=np.uint8)
    tiles[0::2], tiles[1::2] = a, b
    titles: list[str] = []
    for (ia, ib), dist in zip(ids[:m].tolist(), np.asarray(distances)[:m].tolist(), strict=True):
        titles += [f"#{ia}", f"#{ib} d={dist:.3g}"]
    return image_grid(tiles, titles, columns=2, caption=caption)
