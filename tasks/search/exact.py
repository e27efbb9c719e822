"""Exact k-nearest-neighbour search on the CPU at the speed of float32 GEMM.

Squared Euclidean distance is ``|q|² − 2 q·x + |x|²``: the ``q·x`` term is one float32 matrix
product per query block (``tasks.search.core.run_blocks``), the rest is cheap. Ranking uses
``|x|²/2 − q·x``. The ``k + 1`` lowest float32 scores of every query are selected without
sorting the row; when the (k+1)-th is provably beyond the k-th (the float32 error bound of
``core.float32_score_error``, the common case), only the k winners are re-measured in float64
from their difference vectors. Otherwise every row within the bound is re-measured. The answer
is ordered by (float64 distance, position): the first k of a stable sort of the float64
distances, whatever BLAS's tiling did to identical rows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from tasks.search.core import (
    as_matrix,
    check_search,
    default_block,
    first_k,
    float32_score_error,
    float32_score_terms,
    measure,
    per_row,
    run_blocks,
    select_k,
)

__all__ = [
    "PreparedIndex",
    "check_search",
    "default_block",
    "exact_knn",
    "prepare_index",
    "search_prepared",
]

# Rows post-processed together: two 90,000-wide float32 rows fit one core's L2 cache.
_ROW_BYTES_L2 = 768 * 2**10


@dataclass(frozen=True)
class PreparedIndex:
    """An index ready for search.

    Attributes
    ----------
    data : ndarray of shape (n_index, d), float32, C-contiguous
    half_sq_norms : ndarray of shape (n_index,), float32
        ``|x|² / 2`` per row, the index's share of the ranking score.
    max_norm : float
        Largest ``|x|`` (float64): scales the float32 error bound of every score.
    """

    data: np.ndarray
    half_sq_norms: np.ndarray
    max_norm: float = 0.0

    @functools.cached_property
    def norms_bound(self) -> tuple[np.ndarray, np.ndarray]:
        """``(c |x|, c |x|²)`` (n_index,) float32, ``c = (d + 4) u 1.01``: each row's own score
        bound is ``|q| c |x| + c |x|²`` (``core.float32_score_error``). Derived on first use
        (the half norms' float32 rounding is far inside the bound's 1 % slack)."""
        norms = np.sqrt(2.0 * self.half_sq_norms.astype(np.float64))
        per_q, fixed = float32_score_terms(norms, self.dim)
        return per_q.astype(np.float32), fixed.astype(np.float32)

    @property
    def n_index(self) -> int:
        return int(self.data.shape[0])

    @property
    def dim(self) -> int:
        return int(self.data.shape[1])


def prepare_index(index: np.ndarray) -> PreparedIndex:
    """Keep ``index`` of shape (n_index, d) as float32 C-contiguous, with its half squared norms.

    Raises ValueError for an array that is not 2-D, is empty, or holds NaN or infinity.
    """
    data = as_matrix(index, "index")
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise ValueError(f"Expected a non-empty index, but index.shape = {data.shape}")
    half = np.einsum("ij,ij->i", data, data, dtype=np.float64) * 0.5
    max_norm = float(np.sqrt(2.0 * half.max()))
    return PreparedIndex(data=data, half_sq_norms=half.astype(np.float32), max_norm=max_norm)


def _refine(
    prepared: PreparedIndex, queries: np.ndarray, scores: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The exact k nearest by (float64 distance, position) from float32 ranking scores.

    ``scores`` (rows, n) are overwritten. Returns (distances float64, positions), (rows, k).
    """
    n, dim = scores.shape[1], prepared.dim
    m = min(n, k + 1)
    pos, sel = select_k(scores, m)  # ascending float32 scores; selected ones now +inf
    if m < k + 1:  # the whole index is the candidate set
        return first_k(measure(prepared.data, queries, pos), pos, k)
    dist, out = first_k(measure(prepared.data, queries, pos[:, :k]), pos[:, :k], k)
    qq = np.einsum("ij,ij->i", queries, queries, dtype=np.float64)
    qn = np.sqrt(qq)
    # The k-th winner's exact score |x|²/2 − q·x, rounded up past float64's error.
    d2 = dist[:, -1] ** 2
    kth = (d2 - qq) / 2 + 4 * (dim + 4) * 2.0**-52 * (d2 + qq)
    # Every unselected row scores >= the (k+1)-th; beyond the bound, it is provably farther
    # than the k-th winner (the common case): the first k are the answer.
    unsure = np.flatnonzero(sel[:, k] - float32_score_error(qn, prepared.max_norm, dim) <= kth)
    if unsure.size:
        dist[unsure], out[unsure] = _widen(
            prepared,
            queries[unsure],
            scores[unsure],
            pos[unsure],
            qn[unsure],
            kth[unsure],
            dist[unsure],
            out[unsure],
        )
    return dist, out


def _widen(
    prepared: PreparedIndex,
    queries: np.ndarray,
    scores: np.ndarray,
    pos: np.ndarray,
    qn: np.ndarray,
    kth: np.ndarray,
    dist: np.ndarray,
    out: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose k winners are not provably apart: re-measure every row whose exact score
    may reach the k-th winner's (each row by its own norm's bound) and merge it in."""
    rows, n = scores.shape
    k = out.shape[1]
    # One pass with the bound at the largest norm finds a superset; each of its rows is then
    # held to its own norm's bound (evaluated in float64).
    b_max = float32_score_error(qn, prepared.max_norm, prepared.dim)
    limit = (kth + b_max).astype(np.float32)
    limit = np.nextafter(limit, np.float32(np.inf))  # rounded up: never fewer rows
    hit = scores <= limit[:, None]  # the k+1 selected rows scored +inf here
    r = np.arange(rows)
    hit[r, pos[:, k]] = True  # the (k+1)-th selected one is always looked at
    hit[r[:, None], out] = False  # the k winners are measured already
    flat = np.flatnonzero(hit)  # far cheaper than a 2-D nonzero
    hr, hc = flat // n, flat % n
    per_q, fixed = prepared.norms_bound
    own = qn[hr] * per_q[hc] + fixed[hc]
    keep = scores[hr, hc] - own <= kth[hr]
    keep |= hc == pos[hr, k]
    hr, hc = hr[keep], hc[keep]
    d = measure(prepared.data, queries[hr], hc[:, None])[:, 0]
    more_d, _ = per_row(np, hr, d, rows, np.inf)
    more_p, _ = per_row(np, hr, hc, rows, n)
    return first_k(np.concatenate([dist, more_d], axis=1), np.concatenate([out, more_p], axis=1), k)


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
    step = max(1, _ROW_BYTES_L2 // (4 * n))
    half = prepared.half_sq_norms
    for r0 in range(0, scores.shape[0], step):
        sub = scores[r0 : r0 + step]
        np.subtract(half, sub, out=sub)  # |x|²/2 − q·x: the ranking score, in place
        q = queries[r0 : r0 + step]
        if refine:
            dist, pos = _refine(prepared, q, sub, k)
        else:
            pos, best = select_k(sub, k)
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
    q = as_matrix(queries, "queries")
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
    data_t = prepared.data.T

    def product(b0: int, b1: int) -> np.ndarray:
        scores = scratch[: b1 - b0]
        np.matmul(q[b0:b1], data_t, out=scores)  # the GEMM: all BLAS threads
        return scores

    def finish(scores: np.ndarray, b0: int, lo: int, hi: int) -> None:
        _finish_rows(
            prepared,
            q[b0 + lo : b0 + hi],
            scores[lo:hi],
            k,
            refine,
            distances[b0 + lo : b0 + hi],
            indices[b0 + lo : b0 + hi],
        )

    run_blocks(n_queries, block, product, finish, threads)
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
