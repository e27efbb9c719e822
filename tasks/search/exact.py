"""Exact k-nearest-neighbour search on the CPU at the speed of float32 GEMM.

Squared Euclidean distance is ``|q|² − 2 q·x + |x|²``: the ``q·x`` term is one float32 matrix
product, the rest is cheap. Queries go through in blocks so that the scratch matrix of
``block × n_index`` scores stays small (one monolithic 10,000 × 90,000 product would write
3.4 GB). Selection never sorts a whole row: ``k`` passes of ``argmin`` (each a SIMD scan of a
row that sits in L2 cache) for small ``k``, a value-only partition for larger ``k``. The ``k``
winners of every query are then re-measured exactly from their difference vectors in float64,
so the distances agree with a float64 reference to rounding, not to float32 cancellation.

Ranking uses ``|x|²/2 − q·x`` (``|q|²`` and the factor 2 do not change the order); ties are
broken by the lower index position, as a stable sort of the distances would. Float32 GEMM may
round two *identical* rows differently (their columns fall in different BLAS tiles), so the
refined search selects a few extra candidates, re-measures them in float64 and orders them by
(distance, position); a row whose extra candidates are not provably beyond the k-th winner's
float32 error bound re-measures every row inside that bound. The answer is thus the first k of
a stable sort of the float64 distances, whatever the tiling.
"""

from __future__ import annotations

import itertools
import operator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from tasks.hardware import cpu_count

__all__ = ["PreparedIndex", "check_search", "exact_knn", "prepare_index", "search_prepared"]

# Scratch for one query block: block × n_index float32 scores. 128 MiB keeps the block at a few
# hundred queries for 90,000 images, enough for GEMM to amortise packing the index.
_SCRATCH_BYTES = 128 * 2**20
_MIN_BLOCK, _MAX_BLOCK = 16, 1024
# Rows post-processed together: two 90,000-wide float32 rows fit one core's L2 cache.
_ROW_BYTES_L2 = 768 * 2**10
# Up to this k, k argmin passes (~10 µs each per 90,000-wide row in L2) beat one partition
# (~800 µs per row); measured on the benchmark machine.
_ARGMIN_MAX_K = 32
# Candidates beyond k that the refined search re-measures in float64 before it needs a proof.
_EXTRA = 2
_MEASURE_ROWS = (
    128  # candidates measured together in the proven path (2 MiB: float32 gather + float64)
)
_U32 = float(np.finfo(np.float32).eps) / 2  # unit roundoff of float32


@dataclass(frozen=True)
class PreparedIndex:
    """An index ready for search.

    Attributes
    ----------
    data : ndarray of shape (n_index, d), float32, C-contiguous
    half_sq_norms : ndarray of shape (n_index,), float32
        ``|x|² / 2`` per row, the index's share of the ranking score.
    """

    data: np.ndarray
    half_sq_norms: np.ndarray
    max_norm: float = 0.0
    """Largest ``|x|`` (float64): scales the float32 error bound of every score."""

    @property
    def n_index(self) -> int:
        return int(self.data.shape[0])

    @property
    def dim(self) -> int:
        return int(self.data.shape[1])


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 matrix, or a ValueError that names what is wrong."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(
            f"Expected {name} to be a 2-D array of shape (n_{name}, d), "
            f"but {name}.ndim = {arr.ndim}, {name}.shape = {arr.shape}"
        )
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"Expected {name} to hold real numbers, but {name}.dtype = {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    flat = arr.reshape(-1)
    step = 1 << 20  # checked a slice at a time: no mask the size of the input
    if not all(np.isfinite(flat[i : i + step]).all() for i in range(0, flat.size, step)):
        raise ValueError(f"Expected finite values, but {name} contains NaN or infinity")
    return arr


def prepare_index(index: np.ndarray) -> PreparedIndex:
    """Keep ``index`` of shape (n_index, d) as float32 C-contiguous, with its half squared norms.

    Raises ValueError for an array that is not 2-D, is empty, or holds NaN or infinity.
    """
    data = _as_matrix(index, "index")
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise ValueError(f"Expected a non-empty index, but index.shape = {data.shape}")
    half = np.einsum("ij,ij->i", data, data, dtype=np.float64) * 0.5
    max_norm = float(np.sqrt(2.0 * half.max()))
    return PreparedIndex(data=data, half_sq_norms=half.astype(np.float32), max_norm=max_norm)


def check_search(n_index: int, dim: int, query_dim: int, k: object, block: object) -> int:
    """Check a search's arguments the way scikit-learn words it; return ``k`` as an int.

    Shared by every exact search kernel. Raises ValueError naming the value and the bound.
    """
    if query_dim != dim:
        raise ValueError(
            f"Expected queries with the index's dimension, but index has d = {dim}, "
            f"queries have d = {query_dim}"
        )
    if isinstance(k, bool):
        raise ValueError(f"Expected an integer k, but k = {k!r}")
    try:
        k = operator.index(k)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"Expected an integer k, but k = {k!r}") from None
    assert isinstance(k, int)
    if k < 1:
        raise ValueError(f"Expected k >= 1, but k = {k}")
    if k > n_index:
        raise ValueError(f"Expected k <= n_index, but n_index = {n_index}, k = {k}")
    if block is not None and (
        isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1
    ):
        raise ValueError(f"Expected block >= 1 (queries per block), but block = {block!r}")
    return k


def default_block(n_index: int) -> int:
    """Queries per block: the score scratch (block × n_index float32) stays near 128 MiB."""
    block = _SCRATCH_BYTES // (4 * max(n_index, 1))
    return int(min(_MAX_BLOCK, max(_MIN_BLOCK, block // 16 * 16)))


def _select(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` smallest scores per row, ascending, ties by lower position.

    ``scores`` of shape (rows, n) is overwritten. Returns (positions int64, scores), each of
    shape (rows, k).
    """
    rows, n = scores.shape
    pos = np.empty((rows, k), dtype=np.int64)
    val = np.empty((rows, k), dtype=scores.dtype)
    if k <= _ARGMIN_MAX_K and k < n:
        r = np.arange(rows)
        for j in range(k):
            a = scores.argmin(axis=1)  # first occurrence: the lower position wins a tie
            pos[:, j] = a
            val[:, j] = scores[r, a]
            scores[r, a] = np.inf
        return pos, val
    for i in range(rows):
        row = scores[i]
        kth = np.partition(row, k - 1)[k - 1]
        cand = np.flatnonzero(row <= kth)  # every tie with the k-th value, lowest position first
        order = np.lexsort((cand, row[cand]))[:k]
        pos[i] = cand[order]
        val[i] = row[pos[i]]
    return pos, val


def _exact_distances(data: np.ndarray, queries: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Euclidean distances (rows, m) in float64 from the difference vectors.

    Each distance is a sum over one contiguous difference vector of length d, so its bits
    depend only on the query and the row, never on how many rows are measured together.
    """
    diff = data[pos].astype(np.float64)
    diff -= queries[:, None, :].astype(np.float64)
    diff *= diff
    return np.sqrt(diff.sum(axis=-1))


def score_error_bound(prepared: PreparedIndex, queries: np.ndarray) -> np.ndarray:
    """Upper bound (rows,) on |float32 score − exact score| of ``|x|²/2 − q·x`` for every row.

    A float32 dot product of length d errs by at most ``d·u·|q|·|x|`` (Cauchy–Schwarz on the
    standard bound); the rounded half norm and the subtraction add ``u·(|x|² + |q|·|x|)``.
    """
    d = prepared.dim
    qn = np.sqrt(np.einsum("ij,ij->i", queries, queries, dtype=np.float64))
    xn = prepared.max_norm
    return (d + 4) * _U32 * (qn * xn + xn * xn) * 1.01


def _refine_exact(
    prepared: PreparedIndex,
    queries: np.ndarray,
    scores: np.ndarray,
    pos: np.ndarray,
    sel: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The exact k nearest by (float64 distance, position) from float32 candidates.

    ``pos``/``sel`` (rows, m >= k) are the m lowest float32 scores, ascending; ``scores`` are
    the rows' float32 scores (selected entries may be overwritten). Rows whose m-th candidate is
    not provably beyond the k-th winner re-measure every row within the error bound.
    """
    dist = _exact_distances(prepared.data, queries, pos)
    order = np.lexsort((pos, dist), axis=-1)  # float64 order, ties by position
    pos = np.take_along_axis(pos, order, axis=1)
    dist = np.take_along_axis(dist, order, axis=1)
    n = scores.shape[1]
    if pos.shape[1] >= n:
        return dist[:, :k], pos[:, :k]
    qq = np.einsum("ij,ij->i", queries, queries, dtype=np.float64)
    kth_score = (dist[:, k - 1] ** 2 - qq) / 2  # the k-th winner's exact score
    bound = score_error_bound(prepared, queries)
    # Every row not selected has a float32 score >= the m-th selected one.
    unsure = np.flatnonzero(sel[:, -1].astype(np.float64) - bound <= kth_score + bound)
    out_d, out_p = dist[:, :k].copy(), pos[:, :k].copy()
    for i in unsure:
        q = queries[i : i + 1]
        # Selection overwrote the picked scores with +inf; they are candidates already.
        cand = np.flatnonzero(scores[i] <= np.float32(kth_score[i] + 2 * bound[i]))
        cand = np.union1d(cand, pos[i])
        # Measured a slice at a time: a row with thousands of equal candidates stays small.
        cd = np.concatenate(
            [
                _exact_distances(prepared.data, q, cand[None, j : j + _MEASURE_ROWS])[0]
                for j in range(0, cand.size, _MEASURE_ROWS)
            ]
        )
        best = np.lexsort((cand, cd))[:k]
        out_d[i], out_p[i] = cd[best], cand[best]
    return out_d, out_p


def _finish_rows(
    prepared: PreparedIndex,
    queries: np.ndarray,
    scores: np.ndarray,
    k: int,
    refine: bool,
    dist_out: np.ndarray,
    pos_out: np.ndarray,
) -> None:
    """Turn ``q·x`` rows into the k nearest: score, select, measure, order. Writes the outputs."""
    n = scores.shape[1]
    # Rows per pass: their scores fit L2, and their candidates' float32 gather + float64
    # difference vectors stay within one measurement slice.
    per_row = min(n, k + _EXTRA) * prepared.dim * 12
    step = max(1, min(_ROW_BYTES_L2 // (4 * n), _MEASURE_ROWS * prepared.dim * 12 // per_row))
    half = prepared.half_sq_norms
    for r0 in range(0, scores.shape[0], step):
        sub = scores[r0 : r0 + step]
        np.subtract(half, sub, out=sub)  # |x|²/2 − q·x: the ranking score, in place
        q = queries[r0 : r0 + step]
        if refine:
            pos, sel = _select(sub, min(n, k + _EXTRA))
            dist, pos = _refine_exact(prepared, q, sub, pos, sel, k)
        else:
            pos, best = _select(sub, k)
            qq = np.einsum("ij,ij->i", q, q)[:, None]
            dist = np.sqrt(np.maximum(qq + 2.0 * best, 0.0))  # clamp cancellation below zero
        dist_out[r0 : r0 + step] = dist
        pos_out[r0 : r0 + step] = pos


def search_prepared(
    prepared: PreparedIndex,
    queries: np.ndarray,
    k: int,
    block: int | None = None,
    *,
    refine: bool = True,
    float64: bool = False,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest rows of the prepared index for every query.

    Parameters
    ----------
    prepared : PreparedIndex
        From :func:`prepare_index`, of shape (n_index, d).
    queries : ndarray of shape (n_queries, d)
        Converted to float32 C-contiguous when it is not already.
    k : int
        Neighbours per query, ``1 <= k <= n_index``.
    block : int, optional
        Queries per GEMM block; by default sized so the block's scores take ~128 MiB.
    refine : bool, default True
        Re-measure the k winners exactly in float64; False returns the float32 GEMM distances
        (negative squared values clamped to zero before the root).
    float64 : bool, default False
        Return the refined distances in float64 as measured (a merge of shards orders by them).
    threads : int, optional
        Threads for selection and re-measurement (default: every core this process may use).

    Returns
    -------
    distances : ndarray of shape (n_queries, k), float32 (float64 when asked)
        True Euclidean distances, ascending per row.
    indices : ndarray of shape (n_queries, k), int64
        Row positions into the index; with ``refine`` they are the first k of a stable sort of
        the float64 distances, so equal distances are ordered by lower position.
    """
    q = _as_matrix(queries, "queries")
    n_index = prepared.n_index
    k = check_search(n_index, prepared.dim, q.shape[1], k, block)
    if block is None:
        block = default_block(n_index)

    n_queries = q.shape[0]
    distances = np.empty((n_queries, k), dtype=np.float64 if float64 else np.float32)
    indices = np.empty((n_queries, k), dtype=np.int64)
    if n_queries == 0:
        return distances, indices
    block = min(block, n_queries)
    scratch = np.empty((block, n_index), dtype=np.float32)  # reused: no page faults per block
    workers = min(threads or cpu_count(), block)
    data_t = prepared.data.T
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for b0 in range(0, n_queries, block):
            qb = q[b0 : b0 + block]
            scores = scratch[: qb.shape[0]]
            np.matmul(qb, data_t, out=scores)  # the GEMM: all BLAS threads
            # Selection is row-independent: split the block across cores (NumPy drops the GIL).
            bounds = np.linspace(0, qb.shape[0], workers + 1).astype(int)
            jobs = [
                pool.submit(
                    _finish_rows,
                    prepared,
                    qb[s:e],
                    scores[s:e],
                    k,
                    refine,
                    distances[b0 + s : b0 + e],
                    indices[b0 + s : b0 + e],
                )
                for s, e in itertools.pairwise(bounds)
                if e > s
            ]
            for job in jobs:
                job.result()
    return distances, indices


def exact_knn(
    index: np.ndarray,
    queries: np.ndarray,
    k: int,
    *,
    block: int | None = None,
    refine: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of ``queries`` among the rows of ``index`` (Euclidean).

    Parameters
    ----------
    index : ndarray of shape (n_index, d), float32
    queries : ndarray of shape (n_queries, d), float32
    k : int
        ``1 <= k <= n_index``.
    block : int, optional
        Queries per GEMM block (default: sized to the index, see :func:`default_block`).
    refine : bool, default True
        See :func:`search_prepared`.

    Returns
    -------
    distances : ndarray of shape (n_queries, k), float32, ascending per row
    indices : ndarray of shape (n_queries, k), int64, row positions into ``index``;
        equal distances are ordered by lower position.
    """
    return search_prepared(prepare_index(index), queries, k, block, refine=refine)
