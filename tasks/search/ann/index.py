"""The approximate index as it is searched and stored: its design (from the index's size), the
search setting, the recall measured for it, the search with its exact re-rank, and its files."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tasks.hardware import cpu_count
from tasks.search.core import first_k, measure

AnnMode = Literal["auto", "on", "off"]

AUTO_ROWS = 250_000
"""From this many index images a run's ``ann=auto`` builds the approximate index: there the
exact single-query search passes ~25 ms on 2 cores (11 ms at 100,000, 88 ms at 1,000,000 in
BENCHMARKS.md) and a build of a minute or two pays for itself; below it exact answers come fast
enough to need no trade."""
RECALL_K = 10  # recall is measured at 10 neighbours
TARGET = 0.99  # the recall@10 the cheapest setting must reach
MIN_ROWS = 1000  # below this an approximate index saves nothing worth its errors
PCA_DIMS = 256
DIMS_PER_CODE = 4  # dimensions per product-quantiser byte


Take = Callable[[np.ndarray], np.ndarray]
"""Rows (m, d) float32 at positions (m,): what the exact re-rank reads."""


@dataclass(frozen=True)
class Design:
    """What an index is built as: its FAISS description and how many rows train it."""

    dim: int
    pca: int  # dimensions after the PCA
    nlist: int  # inverted lists
    m: int  # product-quantiser bytes per row
    nbits: int  # bits per code
    train: int  # training rows

    @property
    def factory(self) -> str:
        return f"PCA{self.pca},IVF{self.nlist},PQ{self.m}x{self.nbits}"

    @classmethod
    def of(cls, n: int, dim: int, train: int) -> Design:
        """The design for ``n`` rows of ``dim`` trained on ``train`` of them: about 4 sqrt(n)
        lists, a power of two with at least 39 training rows each (so at most 1,024 from the
        50,000 training rows: ~1,000 rows a list at 10^6), 4 dimensions per code byte, 8-bit
        codes where the sample trains 256 centroids, fewer bits on small indexes."""
        pca = min(PCA_DIMS, dim - dim % DIMS_PER_CODE) or dim
        nlist = 2 ** round(math.log2(max(4.0, 4 * math.sqrt(n))))
        while nlist > 4 and nlist * 39 > train:
            nlist //= 2
        nbits = max(4, min(8, int(math.log2(max(16, train // 39)))))
        return cls(dim, pca, nlist, max(1, pca // DIMS_PER_CODE), nbits, train)


@dataclass(frozen=True)
class Probe:
    """A search setting: lists probed and candidates re-ranked exactly."""

    nprobe: int
    rerank: int


@dataclass(frozen=True)
class Recall:
    """How often the approximate answer was the exact one, measured at build time.

    ``value`` is the mean over ``sample`` (index row positions, each asked with itself left out)
    of the share of the ``k`` returned rows whose distance is at most the exact k-th distance.
    ``tuning`` is the disjoint sample the setting was chosen on, ``tuned`` its recall there.
    """

    k: int
    value: float
    target: float
    sample: list[int]
    tuning: list[int]
    tuned: float
    seed: int

    @property
    def queries(self) -> int:
        return len(self.sample)

    @property
    def met(self) -> bool:
        return self.value >= self.target


@contextmanager
def threads(count: int) -> Iterator[None]:
    """FAISS's OpenMP threads for the calling thread, restored afterwards. One query's search
    and small k-means have too little work per parallel region for more than one: on a busy
    machine the others make it wait (measured ~8x slower for one query on 2 shared cores)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, count))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


@dataclass
class AnnIndex:
    """A built approximate index: the FAISS index, its design, the setting its answers use and
    the recall measured for that setting."""

    index: Any  # faiss.Index
    design: Design
    probe: Probe
    recall: Recall | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def candidates(self, queries: np.ndarray, count: int, nprobe: int) -> np.ndarray:
        """Positions (m, count) int64 of the rows the lists propose, -1 where fewer exist."""
        import faiss

        faiss.extract_index_ivf(self.index).nprobe = min(nprobe, self.design.nlist)
        q = np.ascontiguousarray(queries, dtype=np.float32)
        with threads(1 if len(q) < 16 else cpu_count()):
            _, pos = self.index.search(q, min(count, len(self)))
        return np.asarray(pos, dtype=np.int64)

    def search(
        self, take: Take, queries: np.ndarray, k: int, probe: Probe | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The approximate k nearest rows of every query, their distances measured exactly.

        Parameters
        ----------
        take : callable
            Rows (m, d) float32 at positions (m,): the index's float32 rows.
        queries : array of shape (n_queries, d), float32
        k : int
            Neighbours per query; ``max(rerank, 2k)`` candidates are re-ranked.

        Returns
        -------
        distances : ndarray of shape (n_queries, k), float64
            True Euclidean distances, ascending; ``inf`` past the candidates found.
        positions : ndarray of shape (n_queries, k), int64
            Row positions, ties by lower position; ``len(self)`` past the candidates found.
        """
        probe = probe or self.probe
        q = np.ascontiguousarray(queries, dtype=np.float32)
        cand = self.candidates(q, max(probe.rerank, 2 * k), probe.nprobe)
        return rerank(take, q, cand, k, len(self))


def rerank(
    take: Take, queries: np.ndarray, cand: np.ndarray, k: int, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` of each row of candidates ``cand`` (m, r) (-1: none) by exact float64
    distance, then position; padded with (inf, ``n``)."""
    m = cand.shape[0]
    dist = np.full((m, max(k, cand.shape[1])), np.inf)
    pos = np.full(dist.shape, n, dtype=np.int64)
    for i in range(m):
        valid = np.unique(cand[i][cand[i] >= 0])  # ascending: rows read in file order
        if not len(valid):
            continue
        rows = take(valid)
        dist[i, : len(valid)] = measure(rows, queries[i : i + 1], np.arange(len(valid))[None])[0]
        pos[i, : len(valid)] = valid
    return first_k(dist, pos, k)


def describe(ann: AnnIndex) -> dict[str, Any]:
    """What is stored beside the index (JSON): design, setting, recall and its samples."""
    recall = asdict(ann.recall) if ann.recall else None
    return {
        "kind": "ivf-pq",
        "factory": ann.design.factory,
        "design": asdict(ann.design),
        "rows": len(ann),
        "probe": asdict(ann.probe),
        "recall": recall,
        **ann.info,
    }


def write_index(index: Any, path: Path) -> None:
    """Write a FAISS index (a built one, or one part-way through :func:`add`) to ``path``."""
    import faiss

    faiss.write_index(index, str(path))


def read_index(path: Path) -> Any:
    """The FAISS index at ``path``; ValueError when it cannot be read."""
    import faiss

    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:  # FAISS reports a damaged or truncated file so
        raise ValueError(f"{path} is not a readable FAISS index ({exc})") from exc


def load(path: Path, described: dict[str, Any]) -> AnnIndex:
    """The index at ``path`` with what :func:`describe` stored for it.

    Raises ValueError when the file is not a FAISS index of the design described.
    """
    import faiss

    design = Design(**described["design"])
    index = read_index(path)
    if index.d != design.dim or int(index.ntotal) != int(described["rows"]):
        raise ValueError(
            f"{path} holds {index.ntotal} rows of {index.d}, not {described['rows']} of "
            f"{design.dim}"
        )
    try:
        ivf: Any = faiss.downcast_index(faiss.extract_index_ivf(index))
        # Reading precomputes nlist x m x 256 floats (268 MB at 10^6 rows); the per-list
        # tables it saves cost ~0.5 MFLOP per query: not worth the memory.
        ivf.use_precomputed_table = -1
        ivf.precomputed_table.resize(0)
    except (RuntimeError, AttributeError) as exc:
        raise ValueError(f"{path} is not an IVF-PQ index ({exc})") from exc
    recall = described.get("recall")
    return AnnIndex(
        index,
        design,
        Probe(**described["probe"]),
        Recall(**recall) if recall else None,
        {k: v for k, v in described.items() if k not in ("design", "probe", "recall")},
    )
