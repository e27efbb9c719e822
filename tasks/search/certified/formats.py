"""Rows in a reduced format (int8, float16, bfloat16, or float32 itself) with a per-row scale,
and the exact float64 size of what the reduction lost (``e_x = |x - x~|``, ``eps_q``): the
terms the bound of docs/certified.md needs. Written once for NumPy and CuPy (``xp``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.search.core import TINY

FORMATS: tuple[str, ...] = ("float32", "int8", "float16", "bfloat16")

INT8_MAX = 127  # |X| <= 127, queries 0..127 (non-negative) or -63..63 stored as 64 + Q
INT8_OFFSET = 64
INT8_MAX_DIM = 2**31 // (INT8_MAX * 2 * INT8_MAX)  # int32 sums cannot overflow up to here
FP16_TOP = 14  # float16 rows are scaled so their largest element lies in [2^14, 2^15)
SAFE_SQ = 2.0**120  # (|q~| + max|x~|)^2 above this could overflow float32 scores
PIECE = 1024  # index rows converted at a time: float64 scratch stays ~16 MiB


def round_up(x: Any, dim: int) -> Any:
    """A float64 norm computed with ``dim`` terms, rounded up past its rounding error."""
    return x * (1.0 + (dim + 8) * 2.0**-52)


def to_bfloat16(xp: Any, a: Any) -> Any:
    """float32 values rounded to the nearest bfloat16 (ties to even), kept as float32."""
    bits = xp.ascontiguousarray(a, dtype=xp.float32).view(xp.uint32)
    lsb = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lsb) >> 16) << 16
    return rounded.astype(xp.uint32).view(xp.float32)


def reduce_rows(
    xp: Any, a: Any, fmt: str, top: int = INT8_MAX, unsigned: bool = False
) -> tuple[Any, Any]:
    """Rows of ``a`` (m, d) float32 in the reduced format: (values, scales (m,) float32).

    int8 levels lie in ``[-top, top]`` (int8), or in ``[0, 2 top]`` (int16) when ``unsigned``
    (non-negative rows: the engine stores them shifted by -127 with zero point -127, one more
    bit of resolution); float16 comes back as float16 with a power-of-two scale; bfloat16
    and float32 as float32 values with scale 1.
    """
    m = a.shape[0]
    if fmt == "float32":
        return a, xp.ones(m, dtype=xp.float32)
    if fmt == "bfloat16":
        return to_bfloat16(xp, a), xp.ones(m, dtype=xp.float32)
    peak = xp.abs(a).max(axis=1) if a.shape[1] else xp.zeros(m, dtype=xp.float32)
    if fmt == "float16":
        exp = xp.floor(xp.log2(xp.where(peak > 0, peak, 1.0).astype(xp.float64)))
        scale = xp.exp2(xp.maximum(exp - FP16_TOP, -126)).astype(xp.float32)  # never 0
        return (a / scale[:, None]).astype(xp.float16), scale
    if fmt != "int8":
        raise ValueError(f"Expected a format in {FORMATS}, but fmt = {fmt!r}")
    span = 2 * top if unsigned else top
    scale = xp.where(peak > 0, xp.maximum(peak / span, TINY), 1.0).astype(xp.float32)
    levels = xp.clip(xp.rint(a / scale[:, None]), 0 if unsigned else -top, span)
    return levels.astype(xp.int16 if unsigned else xp.int8), scale


def dequantize(xp: Any, values: Any, scale: Any) -> Any:
    """The reduced rows as float64 reals ``s X`` (exact: at most 24 x 24 significant bits)."""
    return values.astype(xp.float64) * scale.astype(xp.float64)[:, None]


@dataclass(frozen=True)
class ReducedIndex:
    """The index (n, d) in a reduced format, with what the bound needs per row.

    ``values`` is laid out for the engine ("rows" (n, d) in the format's dtype, "held" (n, d)
    as float32, "columns" (d, n) int8); ``err`` = ``e_x`` and ``reduced_sq`` = ``|x~|^2``,
    ``data_sq`` = ``|x|^2``, all float64 (n,) and not yet rounded up.
    """

    values: Any
    scale: Any
    err: Any
    reduced_sq: Any
    data_sq: Any
    zero_point: int


def reduce_index(xp: Any, data: Any, fmt: str, layout: str) -> ReducedIndex:
    """The index (n, d) in the reduced format, ``PIECE`` rows at a time (a memory-mapped
    ``data`` is read once, never copied whole)."""
    n, d = data.shape
    unsigned = fmt == "int8" and all(
        bool((data[s : s + PIECE] >= 0).all()) for s in range(0, n, PIECE)
    )
    shift = INT8_MAX if unsigned and layout == "columns" else 0
    scale = xp.ones(n, dtype=xp.float32)
    err = xp.zeros(n, dtype=xp.float64)
    reduced_sq = xp.empty(n, dtype=xp.float64)
    data_sq = xp.empty(n, dtype=xp.float64)
    if fmt == "float32":
        values = data
    elif layout == "columns":
        values = xp.empty((d, n), dtype=xp.int8)
    else:
        dtype = {"int8": xp.int16 if unsigned else xp.int8, "float16": xp.float16}.get(fmt)
        dtype = xp.float32 if layout == "held" else dtype
        values = xp.empty((n, d), dtype=dtype)
    for s in range(0, n, PIECE):
        part = data[s : s + PIECE]
        exact = part.astype(xp.float64)
        data_sq[s : s + PIECE] = xp.einsum("ij,ij->i", exact, exact)
        if fmt == "float32":
            reduced_sq[s : s + PIECE] = data_sq[s : s + PIECE]
            continue
        v, sc = reduce_rows(xp, part, fmt, unsigned=unsigned)
        if layout == "columns":
            values[:, s : s + PIECE] = (v - shift).T
        else:
            values[s : s + PIECE] = v
        scale[s : s + PIECE] = sc
        approx = dequantize(xp, v, sc)
        reduced_sq[s : s + PIECE] = xp.einsum("ij,ij->i", approx, approx)
        approx -= exact
        err[s : s + PIECE] = xp.sqrt(xp.einsum("ij,ij->i", approx, approx))
    return ReducedIndex(values, scale, err, reduced_sq, data_sq, -shift)


@dataclass
class QueryBlock:
    """One block of queries in float32 and in the reduced format, with their bound terms."""

    q: Any  # (m, d) float32
    values: Any  # (m, d) reduced
    zero_point: int
    scale: Any  # (m,) float32
    eps: Any  # (m,) float64, |q - q~| rounded up
    reduced_norm: Any  # (m,) float64, |q~|
    safe: Any  # (m,) bool: float32 scores cannot overflow

    def rows(self, lo: int, hi: int) -> QueryBlock:
        """Queries ``lo:hi`` of the block (their reduced values are not kept)."""
        return QueryBlock(
            self.q[lo:hi],
            None,
            0,
            self.scale[lo:hi],
            self.eps[lo:hi],
            self.reduced_norm[lo:hi],
            self.safe[lo:hi],
        )


def reduce_queries(xp: Any, fmt: str, q: Any, reduced_norm_max: float) -> QueryBlock:
    """Queries (m, d) float32 in the index's format, ready for its engine."""
    # int8 queries are uint8 for the engine: 0..127 when non-negative, else 64 + (-63..63)
    # with zero point 64; never above 127, so AVX2's int16 pair sums cannot saturate.
    signed = fmt == "int8" and bool((q < 0).any())
    values, scale = reduce_rows(xp, q, fmt, INT8_OFFSET - 1 if signed else INT8_MAX)
    approx = dequantize(xp, values, scale)
    zero_point = INT8_OFFSET if signed else 0
    if fmt == "int8":
        values = (values.astype(xp.int16) + zero_point).astype(xp.uint8)
    reduced_norm = xp.sqrt(xp.einsum("ij,ij->i", approx, approx))
    approx -= q
    eps = round_up(xp.sqrt(xp.einsum("ij,ij->i", approx, approx)), q.shape[1])
    safe = (reduced_norm + reduced_norm_max) ** 2 < SAFE_SQ
    return QueryBlock(q, values, zero_point, scale, eps, reduced_norm, safe)
