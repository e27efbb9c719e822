"""Building the approximate index a block at a time: the seeded samples (held out of training),
a PCA by subspace iteration, the inverted lists and codes trained on a sample, the rows added
block by block (memory: one block, the sample and the codes)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np

from tasks.search.ann.index import Design, threads

TRAIN_ROWS = 50_000  # rows the lists and codes are trained on
PCA_TRAIN_ROWS = 10_000  # of them, rows the PCA is trained on (its top 256 axes settle early)
ADD_ROWS = 16_384  # rows read and added at a time (128 MiB of float32 at d = 2048)
NITER = 10  # k-means iterations (lists and codes): enough on a sample of this size


class Rows(Protocol):
    """The float32 rows of an index, read on demand: ``shape`` (n, d), ``rows(start, stop)``,
    ``take(positions)`` and ``blocks(rows, start)`` (see :class:`tasks.ask.files.MatrixFile`)."""

    shape: tuple[int, int]

    def rows(self, start: int, stop: int) -> np.ndarray: ...

    def take(self, positions: np.ndarray) -> np.ndarray: ...

    def blocks(self, rows: int, start: int = 0) -> Iterator[tuple[int, np.ndarray]]: ...


def sample_positions(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded, disjoint, sorted row positions: (tuning sample, recall sample, training rows).
    The samples are held out of training; training takes what is left, up to the design's."""
    rng = np.random.default_rng(seed)
    measured = min(500, max(50, n // 20))
    tuning = min(250, max(50, n // 40))
    order = rng.permutation(n)
    tune = np.sort(order[:tuning])
    recall = np.sort(order[tuning : tuning + measured])
    rest = order[tuning + measured :]
    train = np.sort(rest[:TRAIN_ROWS])
    return tune, recall, train


def _orthonormal(z: np.ndarray) -> np.ndarray:
    """Orthonormal columns spanning those of ``z`` (d, r): Cholesky QR, twice for accuracy
    (a few small products; LAPACK's QR is many times slower on a busy machine)."""
    for _ in range(2):
        lower = np.linalg.cholesky(z.T @ z)
        z = np.linalg.solve(lower, z.T).T
    return z


def pca(sample: np.ndarray, dims: int, seed: int = 0, iterations: int = 6) -> Any:
    """The projection of ``sample`` (m, d) float32 onto its ``dims`` principal axes, as a
    FAISS linear transform (centred). Subspace iteration on the covariance with 64 extra
    columns: a few products of (d, d) by (d, dims + 64), not a full eigendecomposition."""
    import faiss

    d = sample.shape[1]
    mean = sample.mean(axis=0, dtype=np.float64)
    centred = sample - mean.astype(np.float32)
    cov = (centred.T @ centred).astype(np.float64)
    width = min(d, dims + 64)
    basis = _orthonormal(cov @ np.random.default_rng(seed).standard_normal((d, width)))
    for _ in range(iterations):
        basis = _orthonormal(cov @ basis)
    _, vectors = np.linalg.eigh(basis.T @ cov @ basis)
    axes = (basis @ vectors[:, ::-1])[:, :dims].T.astype(np.float32)  # (dims, d)
    transform = faiss.LinearTransform(d, dims, True)
    faiss.copy_array_to_vector(np.ascontiguousarray(axes).ravel(), transform.A)
    bias = -(axes.astype(np.float64) @ mean).astype(np.float32)
    faiss.copy_array_to_vector(bias, transform.b)
    transform.is_trained = True
    return transform


def train(rows: Rows, design: Design, train_rows: np.ndarray, seed: int = 0) -> Any:
    """An empty index of ``design`` trained on ``rows`` at ``train_rows`` (sorted): the PCA
    on ``PCA_TRAIN_ROWS`` of them spread evenly, the lists and codes on all (in PCA space)."""
    import faiss

    sample = rows.take(train_rows)
    transform = pca(sample[:: max(1, len(sample) // PCA_TRAIN_ROWS)][:PCA_TRAIN_ROWS], design.pca)
    reduced = transform.apply(sample)
    del sample
    quantizer = faiss.IndexFlatL2(design.pca)
    ivf = faiss.IndexIVFPQ(quantizer, design.pca, design.nlist, design.m, design.nbits)
    ivf.use_precomputed_table = -1  # per list tables: nlist x m x 256 floats saved
    lists = faiss.Kmeans(
        design.pca,
        design.nlist,
        niter=NITER,
        seed=seed,
        min_points_per_centroid=1,
        max_points_per_centroid=32,  # 32,768 rows place 1,024 lists well enough to probe
    )
    lists.train(reduced)
    quantizer.add(lists.centroids)  # trained: the index trains only its codes below
    ivf.pq.cp.niter = NITER
    ivf.pq.cp.seed = seed
    ivf.pq.cp.max_points_per_centroid = 32  # 8,192 rows train each byte's 256 centroids
    ivf.pq.cp.min_points_per_centroid = 1  # fewer on small indexes: no warning for them
    with threads(1):  # m small k-means in 4 dimensions: more threads only wait on each other
        ivf.train(reduced)
    return faiss.IndexPreTransform(transform, ivf)  # FAISS's wrapper keeps its parts referenced


def add(
    index: Any,
    rows: Rows,
    start: int = 0,
    on_block: Callable[[int], None] | None = None,
) -> Any:
    """Add ``rows`` from row ``start`` on to ``index`` (positions are the row numbers), a
    block at a time; ``on_block(rows_added)`` after each."""
    if int(index.ntotal) != start:
        raise ValueError(f"the index holds {index.ntotal} rows, not the {start} to resume from")
    for s, block in rows.blocks(ADD_ROWS, start):
        index.add(block)
        if on_block is not None:
            on_block(s + len(block))
    return index
