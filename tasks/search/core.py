"""The exact core under every exact search kernel (``tasks.search.exact``, the float32 GEMM, and
``tasks.search.certified``, reduced precision with a proof): argument checks, the k lowest
scores of a row, float64 re-measurement of candidates from their difference vectors, the
(distance, position) order of an answer, the float32 error bounds and the threading of query
blocks. Written once for NumPy and CuPy arrays (``xp``). The bounds are derived in
docs/certified.md.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from tasks.hardware import cpu_count

__all__ = [
    "U32",
    "U_ACC",
    "as_matrix",
    "check_search",
    "default_block",
    "first_k",
    "float32_distance_error",
    "float32_score_error",
    "float32_score_terms",
    "gamma",
    "lowest_k",
    "measure",
    "namespace",
    "per_row",
    "run_blocks",
    "select_k",
]

U32 = 2.0**-24  # float32 unit roundoff (IEEE round to nearest: NumPy and BLAS on a CPU)
U_ACC = 2.0**-22  # assumed for accumulation inside any GEMM whose adders may truncate (GPUs)
TINY = 2.0**-126  # float32's smallest normal: what flush-to-zero may lose per operation
U64 = 2.0**-53  # float64 unit roundoff

# Scratch for one query block: block × n_index float32 scores. 128 MiB keeps the block at a few
# hundred queries for 90,000 images, enough for GEMM to amortise packing the index.
_SCRATCH_BYTES = 128 * 2**20
_MIN_BLOCK, _MAX_BLOCK = 16, 1024
# Up to this k, k argmin passes (~10 µs each per 90,000-wide row in L2) beat one partition
# (~800 µs per row); measured on the benchmark machine.
_ARGMIN_MAX_K = 32
# float64 elements of difference vectors measured at once: 2 MiB stays in a core's L2 cache.
_MEASURE_ELEMS = 2**18
_CHECK_ELEMS = 2**20  # elements checked for NaN at a time: no mask the size of the input


def namespace(a: Any) -> Any:
    """The array module of ``a``: CuPy for CuPy arrays, NumPy for everything else."""
    if type(a).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def is_numpy(xp: Any) -> bool:
    return xp is np


def gamma(n: int, u: float = U_ACC) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: the relative error of n rounded operations."""
    return n * u / (1.0 - n * u)


def as_matrix(x: Any, name: str, xp: Any = np) -> Any:
    """``x`` as a C-contiguous float32 matrix, or a ValueError that names what is wrong.

    A C-contiguous float32 array (a memory map too) is used as it is, never copied; NaN and
    infinity are looked for a slice at a time.
    """
    arr = xp.asarray(x)  # a memory map stays a view of its file
    if arr.ndim != 2:
        raise ValueError(
            f"Expected {name} to be a 2-D array of shape (n_{name}, d), "
            f"but {name}.ndim = {arr.ndim}, {name}.shape = {arr.shape}"
        )
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"Expected {name} to hold real numbers, but {name}.dtype = {arr.dtype}")
    arr = xp.ascontiguousarray(arr, dtype=xp.float32)
    rows = max(1, _CHECK_ELEMS // max(1, arr.shape[1]))
    for s in range(0, arr.shape[0], rows):
        if not bool(xp.isfinite(arr[s : s + rows]).all()):
            raise ValueError(f"Expected finite values, but {name} contains NaN or infinity")
    return arr


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


def select_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` smallest scores per row, ascending, ties by lower position (NumPy).

    ``scores`` of shape (rows, n) is overwritten where selected (with +inf). Returns
    (positions int64, scores), each of shape (rows, k).
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


def lowest_k(xp: Any, t: Any, k: int) -> Any:
    """Positions (rows, k) of ``k`` lowest scores per row, in no promised order; ``t`` is
    left as it was."""
    rows = t.shape[0]
    if k > _ARGMIN_MAX_K or k >= t.shape[1]:
        return xp.argpartition(t, k - 1, axis=1)[:, :k]
    r = xp.arange(rows)
    pos = xp.empty((rows, k), dtype=xp.int64)
    saved = xp.empty((rows, k), dtype=t.dtype)
    for j in range(k):
        a = t.argmin(axis=1)
        pos[:, j] = a
        saved[:, j] = t[r, a]
        t[r, a] = xp.inf
    for j in range(k):
        t[r, pos[:, j]] = saved[:, j]
    return pos


def measure(data: Any, queries: Any, pos: Any, xp: Any = np) -> Any:
    """Euclidean distances (rows, m) float64 of ``queries`` (rows, d) to ``data[pos]``, ``pos``
    (rows, m) of valid positions, from the difference vectors.

    Each distance is one float64 sum over the contiguous difference vector of one (query, row)
    pair, so its bits depend only on the pair: never on the batch, the kernel or the shard
    that measured it. ``data`` may be a memory map: only the rows in ``pos`` are read.
    """
    rows, m = pos.shape
    out = xp.empty((rows, m), dtype=xp.float64)
    if rows == 0 or m == 0:
        return out
    dim = data.shape[1]
    cols = max(1, min(m, _MEASURE_ELEMS // dim))
    step = max(1, _MEASURE_ELEMS // (cols * dim))
    for r0 in range(0, rows, step):
        q = queries[r0 : r0 + step, None, :]
        for c0 in range(0, m, cols):
            picked = data[pos[r0 : r0 + step, c0 : c0 + cols]]
            diff = xp.subtract(picked, q, dtype=xp.float64)
            out[r0 : r0 + step, c0 : c0 + cols] = xp.sqrt(xp.einsum("ijk,ijk->ij", diff, diff))
    return out


def first_k(dist: Any, pos: Any, k: int, xp: Any = np) -> tuple[Any, Any]:
    """The first ``k`` of every row by (distance, position): the answer's order everywhere.

    ``dist``, ``pos`` of shape (rows, m >= k); returns (distances, positions) (rows, k).
    """
    by_pos = xp.argsort(pos, axis=1)
    pos = xp.take_along_axis(pos, by_pos, axis=1)
    dist = xp.take_along_axis(dist, by_pos, axis=1)
    order = xp.argsort(dist, axis=1, kind="stable")[:, :k]  # equal distances: lower position
    return xp.take_along_axis(dist, order, axis=1), xp.take_along_axis(pos, order, axis=1)


def per_row(xp: Any, r: Any, values: Any, rows: int, fill: float) -> tuple[Any, Any]:
    """Pairs sorted by row ``r`` -> a (rows, width) matrix of ``values`` padded with ``fill``
    (width at least 1), and the count per row."""
    counts = xp.bincount(r, minlength=rows)
    width = int(counts.max()) if r.shape[0] else 0
    out = xp.full((rows, max(width, 1)), fill, dtype=values.dtype)
    start = xp.cumsum(counts) - counts
    out[r, xp.arange(r.shape[0]) - start[r]] = values
    return out, counts


def float32_score_error(q_norms: Any, x_norm: Any, dim: int, u: float = U32) -> Any:
    """Upper bound on |fl(h - fl(q.x)) - (|x|^2/2 - q.x)|, ``h = fl32(|x|^2/2)``: the error
    of the exact kernel's float32 ranking score, per query (broadcast against ``x_norm``).

    The dot product of length d errs by at most ``gamma_d |q||x|`` (any summation order;
    Cauchy-Schwarz on ``sum |q_i x_i|``); rounding ``h`` and the subtraction add
    ``u (|x|^2 + |q||x|)``. With ``gamma_d <= 1.01 d u`` this is below
    ``(d + 4) u (|q||x| + |x|^2) 1.01``.
    """
    per_q, fixed = float32_score_terms(x_norm, dim, u)
    return q_norms * per_q + fixed


def float32_score_terms(x_norms: Any, dim: int, u: float = U32) -> tuple[Any, Any]:
    """``(c |x|, c |x|^2)``, ``c = (d + 4) u 1.01``: :func:`float32_score_error` is
    ``|q| c |x| + c |x|^2``, so a row's own bound costs two operations per query."""
    c = (dim + 4) * u * 1.01
    return c * x_norms, c * x_norms * x_norms


def float32_distance_error(
    q_norms: Any,
    x_norms: Any,
    dim: int,
    distances: Any = None,
    *,
    u: float = U32,
) -> np.ndarray:
    """Upper bound on |computed - exact| Euclidean distance for a backend that computes squared
    distances in float32 by the expansion ``|q|^2 + |x|^2 - 2 q.x`` (FAISS IndexFlatL2, cuML
    brute force, scikit-learn's float32 path), clamps below zero and takes the square root.

    Parameters
    ----------
    q_norms : array of shape (n,)
        ``|q|`` per query.
    x_norms : array of shape (n, k) or (n,)
        ``|x|`` of each candidate row (one per query when 1-D).
    dim : int
        The vectors' dimension ``d``.
    distances : array of shape (n, k), optional
        The exact distances ``D``; given, the bound shrinks to ``E / D`` where that is smaller.
    u : float
        The unit roundoff of the backend's float32 arithmetic (2^-24; TF32 would need 2^-11).

    Returns
    -------
    ndarray of shape (n, k) (or (n, 1)), float64

    Derivation: the three float32 dot products (``|q|^2``, ``|x|^2``, ``q.x``, each of length
    d, any summation order) err by at most ``gamma_d`` times ``|q|^2``, ``|x|^2`` and
    ``2 |q||x|``; adding the three terms rounds twice more. Hence ``|s - D^2| <= E`` with
    ``E = gamma_{d+2} (|q| + |x|)^2``. Clamping ``s`` at zero only moves it towards
    ``D^2 >= 0``, and for ``a, b >= 0``, ``|sqrt(a) - sqrt(b)| <= sqrt(|a - b|)`` and
    ``= |a - b| / (sqrt(a) + sqrt(b)) <= |a - b| / sqrt(b)``: so ``r = sqrt(max(s, 0))``
    satisfies ``|r - D| <= rho = min(sqrt(E), E / D)``. The square root and a conversion
    round twice more, relative ``u`` each: ``|d~ - D| <= rho (1 + 2.01 u) + 2.01 u D``, and
    ``D <= |q| + |x|`` where ``D`` is not given. Cancellation is why the bound is
    ``sqrt(E)`` near ``D = 0``: a duplicate's distance may come back as ``sqrt(E)``.
    """
    q = np.asarray(q_norms, dtype=np.float64)[:, None]
    x = np.asarray(x_norms, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    total = q + x
    e = gamma(dim + 2, u) * total * total
    rho = np.sqrt(e)
    d_up = total
    if distances is not None:
        d = np.asarray(distances, dtype=np.float64)
        with np.errstate(divide="ignore"):
            rho = np.minimum(rho, np.where(d > 0, e / np.where(d > 0, d, 1.0), np.inf))
        d_up = np.minimum(d, total)
    return rho * (1.0 + 2.01 * u) + 2.01 * u * d_up + math.ulp(1.0) * total


def run_blocks(
    n_queries: int,
    block: int,
    product: Callable[[int, int], Any],
    finish: Callable[[Any, int, int, int], None],
    threads: int | None = None,
) -> None:
    """Score queries a block at a time and finish each block's rows on several cores.

    ``product(b0, b1)`` scores queries ``b0:b1`` (one GEMM: all BLAS threads) and returns what
    ``finish(scored, b0, lo, hi)`` needs to turn rows ``lo:hi`` of the block into answers.
    Finishing is row-independent, and NumPy releases the GIL, so the rows are split across
    ``threads`` workers (default: every core this process may use); with one worker, or one
    query, the calling thread finishes them (no pool to start: the single-query path).
    """
    workers = max(1, min(threads or cpu_count(), block))
    if workers == 1 or n_queries <= 1:
        for b0 in range(0, n_queries, block):
            b1 = min(n_queries, b0 + block)
            finish(product(b0, b1), b0, 0, b1 - b0)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for b0 in range(0, n_queries, block):
            b1 = min(n_queries, b0 + block)
            scored = product(b0, b1)
            bounds = np.linspace(0, b1 - b0, workers + 1).astype(int)
            jobs = [
                pool.submit(finish, scored, b0, int(s), int(e))
                for s, e in itertools.pairwise(bounds)
                if e > s
            ]
            for job in jobs:
                job.result()
