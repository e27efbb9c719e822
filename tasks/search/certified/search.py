"""Certified search: a reduced-precision score for every (query, row), a threshold per row
that no possible neighbour exceeds, float32 dot products that drop candidates provably beyond
the k-th, and float64 re-measurement of the rest (docs/certified.md, steps 5-7). Queries whose
certificate does not hold take the exact path: the same passes in float32, uncapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.search.certified.bound import dot_interval, thresholds
from tasks.search.certified.formats import QueryBlock, reduce_queries
from tasks.search.certified.index import CertifiedIndex, overflow_is_handled
from tasks.search.core import (
    as_matrix,
    check_search,
    default_block,
    first_k,
    is_numpy,
    lowest_k,
    measure,
    per_row,
    run_blocks,
)

_SEGMENT = 64  # scores per segment when looking for k low ones in one pass
_ROW_BYTES_L2 = 768 * 2**10  # score rows post-processed together (two 90,000-wide rows)
_GPU_SCRATCH_BYTES = 2**30  # score scratch per query block on a GPU
_DOT_ELEMS = 2**18  # float32 elements gathered at once for the dot-product stage (1 MiB)


@dataclass
class CertifiedStats:
    """Counts accumulated over :func:`search_certified` calls that share this object."""

    queries: int = 0
    certified: int = 0
    candidates: int = 0  # rows the reduced scores could not rule out, certified queries
    remeasured: int = 0  # of those, rows measured in float64 (the rest: float32 dot products)
    max_candidates_seen: int = 0
    neighbours: int = 0  # k summed over the certified queries

    @property
    def fallback(self) -> int:
        """Queries answered by the exact path because their certificate did not hold."""
        return self.queries - self.certified

    @property
    def fallback_fraction(self) -> float:
        return self.fallback / self.queries if self.queries else 0.0

    @property
    def candidate_factor(self) -> float:
        """Mean candidates per neighbour returned (``k'/k``), certified queries only."""
        return self.candidates / self.neighbours if self.neighbours else 0.0

    @property
    def remeasure_factor(self) -> float:
        """Mean rows measured in float64 per neighbour returned, certified queries only."""
        return self.remeasured / self.neighbours if self.neighbours else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "queries": self.queries,
            "certified": self.certified,
            "fallback": self.fallback,
            "fallback_fraction": round(self.fallback_fraction, 6),
            "candidate_factor": round(self.candidate_factor, 3),
            "remeasure_factor": round(self.remeasure_factor, 3),
            "max_candidates": self.max_candidates_seen,
        }


def scores(ix: CertifiedIndex, raw: Any, scale_q: Any) -> Any:
    """``t = h - s_q s_x G`` in place, as float32 (rows, n): the ranking score of step 2."""
    xp = ix.xp
    t = raw.view(xp.float32) if raw.dtype != xp.float32 else raw
    if ix.fmt in ("int8", "float16"):
        xp.multiply(raw, ix.scale[None, :], out=t, dtype=xp.float32)
        t *= scale_q[:, None]
    xp.subtract(ix.half_sq[None, :], t, out=t)
    return t


def low_k(xp: Any, t: Any, k: int) -> Any:
    """Positions (rows, k) of ``k`` rows with low scores: any k rows bound the k-th distance
    (step 5); the lower their scores, the tighter. One pass takes the minimum of each segment
    of 64 scores; the k segments with the lowest minima hold the k lowest scores (of all but
    the last ``n mod 64``), found there."""
    rows, n = t.shape
    n_seg = n // _SEGMENT
    if n_seg < 4 * k:
        return lowest_k(xp, t, k)
    mins = t[:, : n_seg * _SEGMENT].reshape(rows, n_seg, _SEGMENT).min(axis=2)
    seg = xp.argpartition(mins, k - 1, axis=1)[:, :k]
    cols = (seg[:, :, None] * _SEGMENT + xp.arange(_SEGMENT)).reshape(rows, k * _SEGMENT)
    best = xp.argpartition(xp.take_along_axis(t, cols, axis=1), k - 1, axis=1)[:, :k]
    return xp.take_along_axis(cols, best, axis=1)


def dots(xp: Any, data: Any, q: Any, r: Any, c: Any) -> Any:
    """float32 dot products ``q[r_i] . data[c_i]`` (p,) of pairs sorted by ``r``, a query's
    rows gathered a piece at a time (the gather from the index is this stage's cost)."""
    out = xp.empty(c.shape[0], dtype=xp.float32)
    if not c.shape[0]:
        return out
    edges = [int(e) for e in xp.searchsorted(r, xp.arange(q.shape[0] + 1))]
    step = max(1, _DOT_ELEMS // data.shape[1])
    for i in range(q.shape[0]):
        for s in range(edges[i], edges[i + 1], step):
            e = min(edges[i + 1], s + step)
            out[s:e] = xp.einsum("ij,j->i", data[c[s:e]], q[i])
    return out


def certify_rows(
    ix: CertifiedIndex, qb: QueryBlock, t: Any, k: int, cap: int
) -> tuple[Any, Any, Any, Any, Any]:
    """Steps 5-7 and the exact re-rank for rows of one block.

    Returns (distances (rows, k) float64, positions (rows, k) int64, certified (rows,) bool,
    candidates (rows,), float64-measured (rows,)); rows not certified hold garbage.
    """
    xp, b, dim = ix.xp, ix.bound, ix.dim
    rows, n = t.shape
    q = qb.q
    q_sq = xp.einsum("ij,ij->i", q, q, dtype=xp.float64)
    # Step 5: an upper bound on the k-th distance from any k rows, by float32 dot products.
    first = low_k(xp, t, k).reshape(-1)
    fr = xp.repeat(xp.arange(rows), k)
    _, up = dot_interval(xp, dots(xp, ix.data, q, fr, first), q_sq[fr], ix.data_sq[first], dim)
    w0 = up.reshape(rows, k).max(axis=1)
    # Step 6: every row whose score is within its threshold is a candidate.
    w = w0 * (1.0 + 4.0 * b.delta) + qb.eps
    c_q, coarse32 = thresholds(xp, b, w, qb.reduced_norm, ix.err_max, ix.g_max)
    hit = xp.flatnonzero(t <= coarse32[:, None])  # row-major: rows, then ascending positions
    r, c = hit // n, hit % n
    ok = qb.safe & (xp.bincount(r, minlength=rows) <= 4 * cap)
    sel = ok[r]
    r, c = r[sel], c[sel]
    keep = t[r, c] <= c_q[r] + w[r] * ix.err[c] + ix.g[c]
    r, c = r[keep], c[keep]
    counts = xp.bincount(r, minlength=rows)
    ok &= (counts >= k) & (counts <= cap)
    sel = ok[r]
    r, c = r[sel], c[sel]
    counts = xp.where(ok, counts, 0)
    # Step 7: float32 dot products drop candidates provably beyond the k-th.
    lower, upper = dot_interval(xp, dots(xp, ix.data, q, r, c), q_sq[r], ix.data_sq[c], dim)
    up_rows, _ = per_row(xp, r, upper, rows, np.inf)
    j = min(k, up_rows.shape[1]) - 1  # rows with fewer than k candidates are not certified
    kth = xp.partition(up_rows, j, axis=1)[:, j]
    keep = lower <= kth[r] * (1.0 + 4.0 * b.delta)
    r, c = r[keep], c[keep]
    # The rest are measured in float64 and ordered by (distance, position).
    d64 = measure(ix.data, q[r], c[:, None], xp)[:, 0]
    dist, measured = per_row(xp, r, d64, rows, np.inf)
    pos, _ = per_row(xp, r, c, rows, n)
    if dist.shape[1] < k:
        pad = k - dist.shape[1]
        dist = xp.concatenate([dist, xp.full((rows, pad), np.inf)], axis=1)
        pos = xp.concatenate([pos, xp.full((rows, pad), n, dtype=pos.dtype)], axis=1)
    dist, pos = first_k(dist, pos, k, xp)
    # Defensive: the k rows of step 5 are candidates, so the k-th can only have come down.
    ok &= dist[:, k - 1] <= w0 * (1.0 + 4.0 * b.delta)
    return dist, pos, ok, counts, measured


def _default_block(xp: Any, n_index: int, fmt: str = "float32") -> int:
    """Queries per reduced GEMM: ~128 MiB of scores on the CPU (as the exact path), 1 GiB on
    a GPU. int8 takes half: its product runs as fast on half the queries (measured), and the
    scratch saved pays for the int8 copy's engine (onnxruntime) in memory."""
    if not is_numpy(xp):
        return max(16, min(16384, _GPU_SCRATCH_BYTES // (4 * n_index)))
    block = default_block(n_index)
    return max(16, block // 32 * 16) if fmt == "int8" else block


def _default_cap(n_index: int, k: int) -> int:
    """Candidates worth re-measuring before the exact path is cheaper: the float64 re-rank of
    one row costs about 1/64 of a float32 GEMM pass over the index per query."""
    return max(8 * k, n_index // 64, 256)


def search_certified(
    prepared: CertifiedIndex,
    queries: Any,
    k: int,
    *,
    block: int | None = None,
    max_candidates: int | None = None,
    stats: CertifiedStats | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The exact ``k`` nearest rows of the prepared index for every query, certified per query.

    Parameters
    ----------
    prepared : CertifiedIndex
        From :func:`prepare_certified`.
    queries : array of shape (n_queries, d)
        Same array module as the index (NumPy or CuPy); one query is a (1, d) array.
    k : int
        ``1 <= k <= n_index``.
    block : int, optional
        Queries per reduced GEMM (default: ~128 MiB of scores on the CPU, 64 MiB for int8,
        1 GiB on a GPU).
    max_candidates : int, optional
        Largest candidate set checked before a query falls back to the exact path
        (default ``max(8k, n_index/64, 256)``).
    stats : CertifiedStats, optional
        Incremented with this call's queries, certified queries and candidates.

    Returns
    -------
    distances : ndarray of shape (n_queries, k), float32
        True Euclidean distances (float64 re-measured), ascending per row.
    indices : ndarray of shape (n_queries, k), int64
        Row positions; equal distances are ordered by lower position. Host (NumPy) arrays.
    """
    xp = prepared.xp
    q = as_matrix(queries, "queries", xp)
    n_index, dim = prepared.n_index, prepared.dim
    k = check_search(n_index, dim, q.shape[1], k, block)
    if block is None:
        block = _default_block(xp, n_index, prepared.fmt)
    cap = _default_cap(n_index, k) if max_candidates is None else int(max_candidates)
    if cap < k:
        raise ValueError(
            f"Expected max_candidates >= k, but max_candidates = {cap}, k = {k}; "
            "raise it or leave it unset"
        )

    n_queries = q.shape[0]
    out = _Outputs.empty(xp, n_queries, k)
    if n_queries:
        with overflow_is_handled():
            _run(prepared, q, k, min(block, n_queries), cap, out)
    failed = xp.flatnonzero(~out.ok)
    if failed.size:
        with overflow_is_handled():
            out.dist[failed], out.pos[failed] = _fallback(prepared, q[failed], k)
    if stats is not None:
        good = out.ok
        n_ok = int(good.sum())
        stats.queries += n_queries
        stats.certified += n_ok
        stats.neighbours += n_ok * k
        stats.candidates += int(out.candidates[good].sum())
        stats.remeasured += int(out.measured[good].sum())
        if n_ok:
            stats.max_candidates_seen = max(
                stats.max_candidates_seen, int(out.candidates[good].max())
            )
    if not is_numpy(xp):
        return xp.asnumpy(out.dist), xp.asnumpy(out.pos)
    return out.dist, out.pos


@dataclass
class _Outputs:
    """Per query: the answer, whether it is certified, and what it cost."""

    dist: Any
    pos: Any
    ok: Any
    candidates: Any
    measured: Any

    @classmethod
    def empty(cls, xp: Any, n: int, k: int) -> _Outputs:
        return cls(
            xp.empty((n, k), dtype=xp.float32),
            xp.empty((n, k), dtype=xp.int64),
            xp.zeros(n, dtype=bool),
            xp.zeros(n, dtype=xp.int64),
            xp.zeros(n, dtype=xp.int64),
        )


def _fallback(ix: CertifiedIndex, q: Any, k: int) -> tuple[Any, Any]:
    """The exact path for queries whose certificate failed: float32 scores, no candidate cap
    (exact by the same proof), float64 brute force where float32 scores could overflow."""
    assert ix.fallback_index is not None
    xp = ix.xp
    out = _Outputs.empty(xp, q.shape[0], k)
    block = _default_block(xp, ix.n_index)
    _run(ix.fallback_index, q, k, min(block, q.shape[0]), ix.n_index, out)
    if not bool(out.ok.all()):  # float32 scores out of range: nothing cheaper is left
        bad = xp.flatnonzero(~out.ok)
        everything = xp.tile(xp.arange(ix.n_index), (bad.size, 1))
        out.dist[bad], out.pos[bad] = first_k(
            measure(ix.data, q[bad], everything, xp), everything, k, xp
        )
    return out.dist, out.pos


def _run(ix: CertifiedIndex, q: Any, k: int, block: int, cap: int, out: _Outputs) -> None:
    """Reduced GEMM per query block, then certification of its rows (threads on the CPU)."""
    xp = ix.xp
    scratch = xp.empty((block, ix.n_index), dtype=ix.engine.out_dtype)

    def product(b0: int, b1: int) -> tuple[QueryBlock, Any]:
        qb = reduce_queries(xp, ix.fmt, q[b0:b1], ix.reduced_norm_max)
        raw = scratch[: b1 - b0]
        ix.engine(qb.values, qb.zero_point, raw)
        return qb, raw

    def finish(scored: tuple[QueryBlock, Any], b0: int, lo: int, hi: int) -> None:
        qb, raw = scored
        step = hi - lo if not is_numpy(xp) else max(1, _ROW_BYTES_L2 // (4 * ix.n_index))
        with overflow_is_handled():  # NumPy's error state is per thread
            for r0 in range(lo, hi, step):
                r1 = min(hi, r0 + step)
                sub = qb.rows(r0, r1)
                t = scores(ix, raw[r0:r1], sub.scale)
                d, p, ok, cnt, meas = certify_rows(ix, sub, t, k, cap)
                s = slice(b0 + r0, b0 + r1)
                out.dist[s], out.pos[s], out.ok[s] = d, p, ok
                out.candidates[s], out.measured[s] = cnt, meas

    run_blocks(q.shape[0], block, product, finish, None if is_numpy(xp) else 1)
