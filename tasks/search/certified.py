"""Exact k-nearest-neighbour search at reduced-precision speed, with a proof per query.

A cheap pass scores every (query, index row) pair with a matrix product in a reduced format
(int8, float16 or bfloat16, or float32 where nothing faster runs), a worst-case bound on that
pass's error picks, per query, every row that *could* be among the ``k`` nearest, and those
candidates are measured exactly (float64 difference vectors, as ``tasks.search.exact`` does).
The answer is the exact top-``k`` with the same tie rule (equal distances: lower position
first). A query whose candidate set would cost more than the exact path (more than
``max_candidates`` rows) *falls back* to that path; the fraction is reported.

Works on NumPy and CuPy arrays alike (``xp``): the reduced-precision product is the only call
that differs (NumPy/OpenBLAS float32, onnxruntime's int8 ``MatMulInteger`` on the CPU,
cuBLAS ``GemmEx`` float16 with float32 accumulation on a GPU).

The bound (per query ``q`` and index row ``x``; ``|.|`` is the Euclidean norm)
-------------------------------------------------------------------------------
Reduced vectors are ``x~ = s_x X`` and ``q~ = s_q Q`` with ``X``, ``Q`` in the format and a
per-row scale ``s``. int8: index levels ``-127..127`` (``s = max|x|/127``), or ``0..254`` for
a non-negative index (``s = max/254``, stored as ``X - 127`` with the engine's zero point
-127); query levels ``0..127``, or ``-63..63`` stored as ``64 + Q`` with zero point 64 when a
block has negative values. float16: a power of two that puts the row's largest element in
[2^14, 2^15). float32 and bfloat16: ``s = 1``. Measured exactly in float64 and rounded up:
``e_x = |x - x~|`` for every index row (once, at prepare) and ``eps_q = |q - q~|``.

1. *Product.* The engine returns ``G ~ Q.X`` with ``|G - Q.X| <= gamma * sum_i |Q_i X_i|``.
   int8: ``gamma = 0``. int32 accumulation is exact: the stored uint8 and int8 inputs never
   exceed 127 in magnitude, so AVX2's int16 pair sums (``vpmaddubsw``, 2 * 127 * 127 < 2^15)
   cannot saturate, and ``d * 127 * 254 < 2^31`` for ``d <= 66,571``. Float formats:
   products of two 16-bit floats are exact in float32, float32 inputs round once per
   product; any summation order then gives
   ``gamma = (d+2) u_acc / (1 - (d+2) u_acc)`` (Higham, *Accuracy and Stability*, eq. 3.4).
   We take ``u_acc = 2^-22``, four times float32's unit roundoff ``u = 2^-24``, which also
   covers truncating tensor-core adders (Fasi et al., "Numerical behavior of NVIDIA tensor
   cores", PeerJ CS 2021).
2. *Score.* The pass computes ``t = fl(h - fl(fl(fl(G) s_x) s_q))`` with ``h = fl(|x~|^2 / 2)``
   (float32). Four more roundings give, with ``P = sum |q~_i x~_i| <= |q~||x~|
   <= (|q~|^2 + |x~|^2)/2``, against ``tau = |x~|^2/2 - q~.x~``:
   ``|t - tau| <= alpha |x~|^2 + beta |q~||x~| + eta`` where ``alpha = 1.01 u``,
   ``beta = gamma + 4.1 u (1 + gamma)`` and ``eta`` bounds flush-to-zero underflow
   (``(2d + 16) max(1, G_max) 2^-126``, ``G_max`` the largest ``|G|`` a format can produce).
3. *Reduced distance.* ``D~^2 = |q~ - x~|^2 = |q~|^2 + 2 tau``.
4. *Triangle inequality.* ``D = |q - x| >= D~ - eps_q - e_x``.
5. *Upper bound on the k-th distance.* Any ``k`` rows measured exactly give one: k rows with
   low ``t`` (the lowest, found from the minima of segments of 64 scores), measured in
   float64, have largest distance ``D^0 >= D_k``. Let
   ``W = D^0 (1 + 4 delta) + eps_q`` where ``delta = (d + 4) 2^-52`` bounds the relative error
   of a float64 distance.
6. *Threshold.* If ``t_x > theta_x = C_q + W e_x + g_x`` with
   ``C_q = (W^2 - |q~|^2 (1 - beta)) / 2 + eta`` and ``g_x = e_x^2/2 + (alpha + beta/2)|x~|^2``,
   then by 2. ``2 tau > (W + e_x)^2 - |q~|^2``, by 3. ``D~ > W + e_x``, by 4.
   ``D > D^0 (1 + 4 delta)``, so its float64 distance exceeds every distance of the k rows of
   5. as measured again with the candidates: ``x`` cannot be in the top k, nor tie with the
   k-th. Every row with ``t_x <= theta_x`` is a candidate; all are measured in float64 and
   ordered by (distance, position).
7. *Cheaper re-ranking.* Where there are many candidates, float32 difference vectors first
   drop those provably beyond the k-th: their squared distances ``s`` satisfy
   ``|s - D^2| <= gamma_{d+2} D^2 + eta`` (difference, square and sum each round; any order),
   so a row with ``s (1 - gamma) - eta`` above the k-th smallest ``s (1 + 2 gamma) + eta``
   (with step 5's float64 margin) cannot be in the top k nor tie the k-th.

The certificate, "the exact k-th distance is strictly below every non-candidate's lower bound",
thus holds by construction: a row whose score merely equals its threshold is a candidate, so
equality is never decided in reduced precision. A query is not certified when its candidate
set exceeds ``max_candidates`` (too close to call cheaply: many near-duplicates), when its
norms could overflow float32 scores, or, defensively, when fewer than ``k`` rows pass. It then
takes the exact path: the same pass in float32 (the index as given: ``e_x = 0``) with no cap on
the candidates, which the same proof makes exact, and a float64 brute force for a query whose
float32 scores could overflow. (Not ``tasks.search.exact``: its float32 selection may let
float32 noise choose between identical rows straddling the k-th place, where the tie rule
wants the lower position.) Thresholds are evaluated in float64 with a relative slack of 2^-40
over the terms' magnitudes (float64 rounding is ~2^-52 per operation).

Cost: one reduced GEMM per query block (the bulk), then per query a few passes over its score
row (in L2 cache on the CPU), and float64 re-measurement of its candidates (adaptive: tens of
rows when the format resolves the neighbourhood, more when it does not).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import resource
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from tasks.hardware import cpu_count, cpu_features
from tasks.search.exact import check_search, default_block

__all__ = [
    "FORMATS",
    "CertifiedIndex",
    "CertifiedStats",
    "FormatChoice",
    "choose_format",
    "prepare_certified",
    "search_certified",
]

Format = Literal["float32", "int8", "float16", "bfloat16"]
FORMATS: tuple[str, ...] = ("float32", "int8", "float16", "bfloat16")

_U = 2.0**-24  # float32 unit roundoff
_U_ACC = 2.0**-22  # unit roundoff assumed for float accumulation inside any GEMM (see 1.)
_TINY = 2.0**-126  # float32's smallest normal: what flush-to-zero may lose per operation
_SLACK = 2.0**-40  # relative slack on thresholds evaluated in float64
_SAFE_SQ = 2.0**120  # (|q~| + max|x~|)^2 above this could overflow float32 scores: fall back
_INT8_MAX = 127  # |X| <= 127, queries 0..127 (non-negative) or -63..63 stored as 64 + Q
_INT8_OFFSET = 64
_INT8_MAX_DIM = 2**31 // (_INT8_MAX * 2 * _INT8_MAX)  # int32 sums cannot overflow up to here
_FP16_TOP = 14  # float16 rows are scaled so their largest element lies in [2^14, 2^15)
# A reduced format is chosen automatically only when its GEMM beats float32 by this much:
# the certificate's passes and re-ranking must be paid for out of the difference.
MIN_SPEEDUP = 1.4
_ARGMIN_MAX_K = 32  # as in tasks.search.exact: k argmin passes beat a partition up to here
_SEGMENT = 64  # scores per segment when looking for k low ones in one pass
_ROW_BYTES_L2 = 768 * 2**10  # score rows post-processed together (two 90,000-wide rows)
_RERANK_ELEMS = 2**22  # float64 elements of difference vectors measured at once (32 MiB)
_GPU_SCRATCH_BYTES = 2**30  # score scratch per query block on a GPU
_PIECE = 1024  # index rows converted or checked at a time: float64 scratch stays ~16 MiB


@dataclass(frozen=True)
class FormatChoice:
    """Which reduced format a prepared index uses, through which engine, and why.

    Attributes
    ----------
    fmt : str
        One of :data:`FORMATS`.
    engine : str
        The library call that computes the reduced products.
    reason : str
        Why this format: measured rates, or the caller's explicit request.
    rates : dict of str to float
        GFLOP per CPU-second (NumPy; per second on a GPU) of each format measured, by format.
    cpu : dict of str to bool
        The CPU's matrix-relevant instruction-set flags (see ``tasks.hardware``).
    """

    fmt: str
    engine: str
    reason: str
    rates: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, bool] = field(default_factory=dict)


@dataclass
class CertifiedStats:
    """Counts accumulated over :func:`search_certified` calls that share this object."""

    queries: int = 0
    certified: int = 0
    candidates: int = 0  # rows measured exactly for the certified queries, summed
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
        """Mean candidates measured exactly per neighbour returned (``k'/k``), certified only."""
        return self.candidates / self.neighbours if self.neighbours else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "queries": self.queries,
            "certified": self.certified,
            "fallback": self.fallback,
            "fallback_fraction": round(self.fallback_fraction, 6),
            "candidate_factor": round(self.candidate_factor, 3),
            "max_candidates": self.max_candidates_seen,
        }


@dataclass(frozen=True)
class _Bound:
    """The constants of the error bound for one format and dimension (module docstring, 1-2)."""

    alpha: float
    beta: float
    eta: float
    delta: float

    @classmethod
    def of(cls, fmt: str, dim: int) -> _Bound:
        if fmt == "int8":
            gamma, g_max = 0.0, float(dim * _INT8_MAX * 2 * _INT8_MAX)
        else:
            n = (dim + 2) * _U_ACC
            gamma = n / (1.0 - n)
            g_max = float(dim) * 2.0 ** (2 * _FP16_TOP + 2) if fmt == "float16" else 1.0
        return cls(
            alpha=1.01 * _U,
            beta=gamma + 4.1 * _U * (1.0 + gamma),
            eta=(2 * dim + 16) * max(1.0, g_max) * _TINY,
            delta=(dim + 4) * 2.0**-52,
        )


def _namespace(a: Any) -> Any:
    """The array module of ``a``: CuPy for CuPy arrays, NumPy for everything else."""
    if type(a).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def _is_numpy(xp: Any) -> bool:
    return xp is np


def _overflow_is_handled() -> Any:
    """Silence NumPy's overflow warnings where the code handles them: scores of vectors near
    float32's range are flagged unsafe and those queries take the exact path."""
    return np.errstate(over="ignore", invalid="ignore")


def _round_up(x: Any, dim: int) -> Any:
    """A float64 norm computed with ``dim`` terms, rounded up past its rounding error."""
    return x * (1.0 + (dim + 8) * 2.0**-52)


# --- reduced formats: scales and rounding, written once for NumPy and CuPy ------------------


def _to_bfloat16(xp: Any, a: Any) -> Any:
    """float32 values rounded to the nearest bfloat16 (ties to even), kept as float32."""
    bits = xp.ascontiguousarray(a, dtype=xp.float32).view(xp.uint32)
    lsb = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lsb) >> 16) << 16
    return rounded.astype(xp.uint32).view(xp.float32)


def _reduce_rows(
    xp: Any, a: Any, fmt: str, top: int = _INT8_MAX, unsigned: bool = False
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
        return _to_bfloat16(xp, a), xp.ones(m, dtype=xp.float32)
    peak = xp.abs(a).max(axis=1) if a.shape[1] else xp.zeros(m, dtype=xp.float32)
    if fmt == "float16":
        exp = xp.floor(xp.log2(xp.where(peak > 0, peak, 1.0).astype(xp.float64)))
        scale = xp.exp2(xp.maximum(exp - _FP16_TOP, -126)).astype(xp.float32)  # never 0
        return (a / scale[:, None]).astype(xp.float16), scale
    if fmt != "int8":
        raise ValueError(f"Expected a format in {FORMATS}, but fmt = {fmt!r}")
    span = 2 * top if unsigned else top
    scale = xp.where(peak > 0, xp.maximum(peak / span, _TINY), 1.0).astype(xp.float32)
    levels = xp.clip(xp.rint(a / scale[:, None]), 0 if unsigned else -top, span)
    return levels.astype(xp.int16 if unsigned else xp.int8), scale


def _dequantize(xp: Any, values: Any, scale: Any) -> Any:
    """The reduced rows as float64 reals ``s X`` (exact: at most 24 x 24 significant bits)."""
    return values.astype(xp.float64) * scale.astype(xp.float64)[:, None]


# --- engines: the one backend-specific call -------------------------------------------------


class _Engine:
    """Computes ``G = Q . X`` for a block of reduced queries into ``out`` (rows, n_index)."""

    name = ""
    out_dtype: Any = np.float32

    def __call__(self, q_values: Any, zero_point: int, out: Any) -> None:
        raise NotImplementedError


class _MatmulEngine(_Engine):
    """float32 GEMM (NumPy/OpenBLAS or cuBLAS) of float32-held values: float32 itself, or
    float16/bfloat16 values held exactly in float32 (an emulation: same products, same
    float32 accumulation, float32 speed)."""

    def __init__(self, xp: Any, values_t: Any, name: str) -> None:
        self.xp, self.values_t, self.name = xp, values_t, name

    def __call__(self, q_values: Any, zero_point: int, out: Any) -> None:
        self.xp.matmul(q_values.astype(self.xp.float32, copy=False), self.values_t, out=out)


class _ExactInt8Engine(_Engine):
    """int8 products emulated in float64 (exact below 2^53): the int8 path where onnxruntime
    is absent; as correct as the real thing, and slower than float32."""

    out_dtype = np.int32

    def __init__(self, xp: Any, values: Any) -> None:
        self.xp, self.values = xp, values
        self.name = "NumPy float64 matmul of int8 levels (exact emulation, no speed-up)"

    def __call__(self, q_values: Any, zero_point: int, out: Any) -> None:
        xp = self.xp
        q = q_values.astype(xp.float64) - zero_point
        for s in range(0, self.values.shape[0], 8192):
            part = self.values[s : s + 8192].astype(xp.float64)
            out[:, s : s + 8192] = xp.matmul(q, part.T)


class _OrtInt8Engine(_Engine):
    """onnxruntime's ``MatMulInteger`` (MLAS: VNNI/AMX where present, AVX2 ``vpmaddubsw``
    otherwise), uint8 queries x int8 index -> int32, written straight into the scratch."""

    out_dtype = np.int32

    def __init__(self, values_t: Any, zero_point: int) -> None:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            [helper.make_node("MatMulInteger", ["a", "b", "za", "zb"], ["y"])],
            "certified_int8",
            [
                helper.make_tensor_value_info("a", TensorProto.UINT8, ["m", "d"]),
                helper.make_tensor_value_info("b", TensorProto.INT8, ["d", "n"]),
                helper.make_tensor_value_info("za", TensorProto.UINT8, []),
                helper.make_tensor_value_info("zb", TensorProto.INT8, []),
            ],
            [helper.make_tensor_value_info("y", TensorProto.INT32, ["m", "n"])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)])
        model.ir_version = 8
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = cpu_count()
        opts.inter_op_num_threads = 1
        # Idle workers sleep instead of spinning: spinning burns CPU time the rest of the
        # search (and anything else on the machine) could use.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
        self.values_t = values_t  # (d, n) int8, C-contiguous: bound as an input, never copied
        self.zero_point = np.array(zero_point, dtype=np.int8)  # -127: levels 0..254 stored
        self.name = f"onnxruntime {ort.__version__} MatMulInteger (uint8 x int8 -> int32)"

    def __call__(self, q_values: Any, zero_point: int, out: Any) -> None:
        binding = self.session.io_binding()
        binding.bind_cpu_input("a", np.ascontiguousarray(q_values, dtype=np.uint8))
        binding.bind_cpu_input("b", self.values_t)
        binding.bind_cpu_input("za", np.array(zero_point, dtype=np.uint8))
        binding.bind_cpu_input("zb", self.zero_point)
        binding.bind_output("y", "cpu", 0, np.int32, list(out.shape), out.ctypes.data)
        self.session.run_with_iobinding(binding)


class _CublasHalfEngine(_Engine):
    """cuBLAS ``GemmEx``: float16 inputs, float32 accumulation and output (tensor cores)."""

    # Enum values from cublas_api.h / library_types.h (stable across CUDA 11-13).
    _OP_N, _OP_T, _R_16F, _R_32F, _COMPUTE_32F, _GEMM_DEFAULT = 0, 1, 2, 0, 68, -1

    def __init__(self, xp: Any, values: Any) -> None:
        self.xp, self.values = xp, values  # (n, d) float16, C-contiguous
        self.name = "cuBLAS GemmEx float16 x float16 -> float32 (compute 32F)"
        self._one = np.array(1.0, dtype=np.float32)
        self._zero = np.array(0.0, dtype=np.float32)

    def __call__(self, q_values: Any, zero_point: int, out: Any) -> None:
        from cupy.cuda import cublas, device

        q = self.xp.ascontiguousarray(q_values, dtype=self.xp.float16)
        n, d = self.values.shape
        m = q.shape[0]
        # Row-major out (m, n) is column-major out^T (n, m) = X (n, d) . Q^T (d, m).
        cublas.gemmEx(
            device.get_cublas_handle(),
            self._OP_T,
            self._OP_N,
            n,
            m,
            d,
            self._one.ctypes.data,
            self.values.data.ptr,
            self._R_16F,
            d,
            q.data.ptr,
            self._R_16F,
            d,
            self._zero.ctypes.data,
            out.data.ptr,
            self._R_32F,
            n,
            self._COMPUTE_32F,
            self._GEMM_DEFAULT,
        )


def _ort_available() -> str | None:
    """None when onnxruntime (and onnx, to build its one-node graph) import; else why not."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"onnxruntime/onnx not installed ({exc})"
    return None


# --- the prepared index ---------------------------------------------------------------------


@dataclass(frozen=True)
class CertifiedIndex:
    """An index ready for certified search: the exact float32 rows, their reduced copy, and the
    per-row terms of the bound.

    Attributes
    ----------
    data : array of shape (n_index, d), float32
        The rows as given: re-ranking and the exact fallback read them.
    choice : FormatChoice
        The reduced format, its engine and why it was chosen.
    scale, half_sq : arrays of shape (n_index,), float32
        ``s_x`` and ``fl(|x~|^2 / 2)``.
    err, g : arrays of shape (n_index,), float64
        ``e_x = |x - x~|`` and ``g_x`` of the bound, rounded up.
    """

    xp: Any
    data: Any
    choice: FormatChoice
    engine: _Engine
    scale: Any
    half_sq: Any
    err: Any
    g: Any
    err_max: float
    g_max: float
    reduced_norm_max: float
    bound: _Bound
    reduced_nbytes: int
    fallback_index: CertifiedIndex | None = None  # float32 over the same rows: the exact path

    @property
    def fmt(self) -> str:
        return self.choice.fmt

    @property
    def n_index(self) -> int:
        return int(self.data.shape[0])

    @property
    def dim(self) -> int:
        return int(self.data.shape[1])


def _check_matrix(xp: Any, x: Any, name: str) -> Any:
    """``x`` as a C-contiguous float32 matrix, or a ValueError that names what is wrong."""
    arr = xp.asarray(x)
    if arr.ndim != 2:
        raise ValueError(
            f"Expected {name} to be a 2-D array of shape (n_{name}, d), "
            f"but {name}.ndim = {arr.ndim}, {name}.shape = {arr.shape}"
        )
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"Expected {name} to hold real numbers, but {name}.dtype = {arr.dtype}")
    arr = xp.ascontiguousarray(arr, dtype=xp.float32)
    if not _all_rows(xp, arr, xp.isfinite):
        raise ValueError(f"Expected finite values, but {name} contains NaN or infinity")
    return arr


def _all_rows(xp: Any, arr: Any, test: Any) -> bool:
    """Whether ``test`` holds for every element, in pieces (no (n, d) boolean temporary)."""
    return all(bool(test(arr[s : s + _PIECE]).all()) for s in range(0, arr.shape[0], _PIECE))


def _probe_rate(xp: Any, fmt: str, dim: int, rows: int = 256, cols: int = 4096) -> float:
    """GFLOP per CPU-second (NumPy) or per second (CuPy) of one format's engine on a probe
    block shaped like the search's (``rows`` queries x ``cols`` index rows x ``dim``)."""
    rng = np.random.default_rng(0)
    index = xp.asarray(np.abs(rng.standard_normal((cols, dim), dtype=np.float32)))
    queries = xp.asarray(np.abs(rng.standard_normal((rows, dim), dtype=np.float32)))
    engine = _build_engine(xp, index, fmt)[0]
    q_values, _ = _reduce_rows(xp, queries, fmt)
    out = xp.empty((rows, cols), dtype=engine.out_dtype)
    engine(q_values, 0, out)  # warm-up: libraries loaded, kernels chosen
    timings = []
    for _ in range(3):
        if _is_numpy(xp):
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            engine(q_values, 0, out)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            spent = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        else:
            xp.cuda.Device().synchronize()
            t0 = time.perf_counter()
            engine(q_values, 0, out)
            xp.cuda.Device().synchronize()
            spent = time.perf_counter() - t0
        timings.append(max(spent, 1e-6))
    return 2.0 * rows * cols * dim / 1e9 / sorted(timings)[1]


@functools.lru_cache(maxsize=8)
def _choose_cached(xp_name: str, dim: int) -> FormatChoice:
    xp = np if xp_name == "numpy" else __import__("cupy")
    cpu = cpu_features().summary()
    if _is_numpy(xp):
        options = ["float32"]
        missing = _ort_available()
        if missing is None and dim <= _INT8_MAX_DIM:
            options.append("int8")
    else:
        options, missing = ["float32", "float16"], None
    rates = {fmt: round(_probe_rate(xp, fmt, dim), 1) for fmt in options}
    best = max(rates, key=lambda f: rates[f])
    speedup = rates[best] / rates["float32"]
    unit = "GFLOP per CPU-s" if _is_numpy(xp) else "GFLOP/s"
    measured = ", ".join(f"{f} {r} {unit}" for f, r in rates.items())
    if best != "float32" and speedup >= MIN_SPEEDUP:
        reason = f"fastest measured ({measured}): {speedup:.2f}x float32"
    else:
        best = "float32"
        reason = (
            f"no reduced format reached {MIN_SPEEDUP}x float32 here ({measured}); "
            "float32 candidates, still certified"
        )
    if missing:
        reason += f"; int8 not measured: {missing}"
    engine = _engine_name(xp, best)
    return FormatChoice(fmt=best, engine=engine, reason=reason, rates=rates, cpu=cpu)


def _engine_name(xp: Any, fmt: str) -> str:
    if fmt == "float32":
        return "cuBLAS float32 GEMM" if not _is_numpy(xp) else "NumPy/OpenBLAS float32 GEMM"
    if fmt == "int8":
        return "onnxruntime MatMulInteger" if _ort_available() is None else "NumPy exact emulation"
    if fmt == "float16" and not _is_numpy(xp):
        return "cuBLAS GemmEx float16 -> float32"
    return f"NumPy float32 GEMM of {fmt}-rounded values (emulation)"


def choose_format(xp: Any = np, dim: int = 2048) -> FormatChoice:
    """The reduced format this machine runs fastest, measured once per process and dimension.

    NumPy: float32 (OpenBLAS) against int8 (onnxruntime, where installed), in GFLOP per
    CPU-second; CuPy: float32 against float16. A reduced format wins only at
    ``MIN_SPEEDUP`` x float32 or more; otherwise float32 (the certificate still holds).
    """
    return _choose_cached("numpy" if _is_numpy(xp) else "cupy", int(dim))


def _reduce_index(xp: Any, data: Any, fmt: str, layout: str) -> tuple[Any, Any, Any, Any, int]:
    """The index (n, d) in the reduced format, piece by piece: (values, scales (n,),
    ``e_x`` (n,) float64 and ``|x~|^2`` (n,) float64, both before rounding up, and the
    engine's zero point for the stored values).

    ``layout``: "rows" keeps values (n, d) in the format's own dtype, "held" (n, d) as float32
    (float16/bfloat16 values are exact in float32), "columns" (d, n) for onnxruntime.
    """
    n, d = data.shape
    unsigned = fmt == "int8" and _all_rows(xp, data, lambda a: a >= 0)
    shift = _INT8_MAX if unsigned and layout == "columns" else 0
    scale = xp.ones(n, dtype=xp.float32)
    err = xp.zeros(n, dtype=xp.float64)
    reduced_sq = xp.empty(n, dtype=xp.float64)
    if fmt == "float32":
        values = data
    elif layout == "columns":
        values = xp.empty((d, n), dtype=xp.int8)
    else:
        dtype = {"int8": xp.int16 if unsigned else xp.int8, "float16": xp.float16}.get(fmt)
        dtype = xp.float32 if layout == "held" else dtype
        values = xp.empty((n, d), dtype=dtype)
    for s in range(0, n, _PIECE):
        part = data[s : s + _PIECE]
        if fmt == "float32":
            approx = part.astype(xp.float64)
            reduced_sq[s : s + _PIECE] = xp.einsum("ij,ij->i", approx, approx)
            continue
        v, sc = _reduce_rows(xp, part, fmt, unsigned=unsigned)
        if layout == "columns":
            values[:, s : s + _PIECE] = (v - shift).T
        else:
            values[s : s + _PIECE] = v
        scale[s : s + _PIECE] = sc
        approx = _dequantize(xp, v, sc)
        reduced_sq[s : s + _PIECE] = xp.einsum("ij,ij->i", approx, approx)
        approx -= part
        err[s : s + _PIECE] = xp.sqrt(xp.einsum("ij,ij->i", approx, approx))
    return values, scale, err, reduced_sq, -shift


def _build_engine(xp: Any, data: Any, fmt: str) -> tuple[_Engine, Any, Any, Any, int]:
    """The engine for ``fmt`` over ``data`` (n, d) float32, with the rows' scales, ``e_x``,
    ``|x~|^2`` and the bytes of the reduced copy."""
    engine: _Engine
    if fmt == "int8":
        if not _is_numpy(xp):
            raise ValueError(
                "Expected float32 or float16 on a GPU; int8 runs on the CPU through onnxruntime"
            )
        if data.shape[1] > _INT8_MAX_DIM:
            raise ValueError(
                f"Expected d <= {_INT8_MAX_DIM} for int8 (int32 sums), but d = {data.shape[1]}; "
                "use fmt='float32'"
            )
        if _ort_available() is None:
            values, scale, err, sq, zero_point = _reduce_index(xp, data, fmt, "columns")
            engine = _OrtInt8Engine(values, zero_point)
        else:
            values, scale, err, sq, _ = _reduce_index(xp, data, fmt, "rows")
            engine = _ExactInt8Engine(xp, values)
    elif fmt == "float16" and not _is_numpy(xp):
        values, scale, err, sq, _ = _reduce_index(xp, data, fmt, "rows")
        engine = _CublasHalfEngine(xp, values)
    else:
        values, scale, err, sq, _ = _reduce_index(xp, data, fmt, "held")
        engine = _MatmulEngine(xp, values.T, _engine_name(xp, fmt))
    nbytes = 0 if fmt == "float32" else int(values.nbytes)
    return engine, scale, err, sq, nbytes


def prepare_certified(index: Any, fmt: str = "auto") -> CertifiedIndex:
    """Convert ``index`` (n_index, d) once: float32 rows, the reduced copy, the bound's terms.

    Parameters
    ----------
    index : array of shape (n_index, d)
        NumPy (CPU) or CuPy (GPU); converted to float32 C-contiguous.
    fmt : {"auto", "float32", "int8", "float16", "bfloat16"}
        "auto" measures what this machine runs fastest (:func:`choose_format`). On NumPy,
        float16/bfloat16 are emulated in float32 (for tests: same bound, no speed-up) and int8
        runs through onnxruntime (exactly emulated where it is not installed).

    Raises ValueError for an array that is not 2-D, is empty, holds NaN or infinity, or an
    unknown format.
    """
    xp = _namespace(index)
    data = _check_matrix(xp, index, "index")
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise ValueError(f"Expected a non-empty index, but index.shape = {data.shape}")
    dim = int(data.shape[1])
    if fmt == "auto":
        choice = choose_format(xp, dim)
    elif fmt in FORMATS:
        if fmt == "int8" and not _is_numpy(xp):
            raise ValueError(
                "Expected fmt in ('auto', 'float32', 'float16') for a GPU index, but "
                "fmt = 'int8'; int8 runs on the CPU"
            )
        choice = FormatChoice(
            fmt=fmt,
            engine=_engine_name(xp, fmt),
            reason="requested",
            cpu=cpu_features().summary(),
        )
    else:
        raise ValueError(f"Expected fmt in {('auto', *FORMATS)}, but fmt = {fmt!r}")
    with _overflow_is_handled():
        return _prepare(xp, data, choice)


def _prepare(
    xp: Any, data: Any, choice: FormatChoice, with_fallback: bool = True
) -> CertifiedIndex:
    fmt, dim = choice.fmt, int(data.shape[1])
    engine, scale, err, reduced_sq, reduced_nbytes = _build_engine(xp, data, fmt)
    choice = FormatChoice(choice.fmt, engine.name, choice.reason, choice.rates, choice.cpu)
    bound = _Bound.of(fmt, dim)
    err = _round_up(err, dim)
    reduced_sq = _round_up(reduced_sq, dim)
    g = _round_up(err * err / 2 + (bound.alpha + bound.beta / 2) * reduced_sq, dim)
    prepared = CertifiedIndex(
        xp=xp,
        data=data,
        choice=choice,
        engine=engine,
        scale=scale,
        half_sq=(reduced_sq / 2).astype(xp.float32),
        err=err,
        g=g,
        err_max=float(err.max()),
        g_max=float(g.max()),
        reduced_norm_max=float(xp.sqrt(reduced_sq.max())),
        bound=bound,
        reduced_nbytes=reduced_nbytes,
    )
    if with_fallback:
        fallback = prepared
        if fmt != "float32":
            fallback = _prepare(xp, data, FormatChoice("float32", "", "exact path"), False)
        prepared = dataclasses.replace(prepared, fallback_index=fallback)
    return prepared


# --- search ---------------------------------------------------------------------------------


@dataclass
class _QueryBlock:
    """One block of queries in float32 and in the reduced format, with their bound terms."""

    q: Any  # (m, d) float32
    values: Any  # (m, d) reduced
    zero_point: int
    scale: Any  # (m,) float32
    eps: Any  # (m,) float64, |q - q~| rounded up
    reduced_norm: Any  # (m,) float64, |q~|
    safe: Any  # (m,) bool: float32 scores cannot overflow


def _reduce_queries(ix: CertifiedIndex, q: Any) -> _QueryBlock:
    xp, fmt = ix.xp, ix.fmt
    # int8 queries are uint8 for the engine: 0..127 when non-negative, else 64 + (-63..63)
    # with zero point 64; never above 127, so AVX2's int16 pair sums cannot saturate.
    signed = fmt == "int8" and bool((q < 0).any())
    values, scale = _reduce_rows(xp, q, fmt, _INT8_OFFSET - 1 if signed else _INT8_MAX)
    approx = _dequantize(xp, values, scale)
    zero_point = _INT8_OFFSET if signed else 0
    if fmt == "int8":
        values = (values.astype(xp.int16) + zero_point).astype(xp.uint8)
    reduced_norm = xp.sqrt(xp.einsum("ij,ij->i", approx, approx))
    approx -= q
    eps = _round_up(xp.sqrt(xp.einsum("ij,ij->i", approx, approx)), ix.dim)
    safe = (reduced_norm + ix.reduced_norm_max) ** 2 < _SAFE_SQ
    return _QueryBlock(q, values, zero_point, scale, eps, reduced_norm, safe)


_local = threading.local()


def _buffer(xp: Any, name: str, shape: tuple[int, ...], dtype: Any) -> Any:
    """A scratch array of ``shape``, reused by this thread from call to call (NumPy): fresh
    multi-MiB temporaries cost a page fault per 4 KiB every time. CuPy has its memory pool."""
    size = int(np.prod(shape))
    if not _is_numpy(xp):
        return xp.empty(shape, dtype=dtype)
    held = getattr(_local, name, None)
    if held is None or held.size < size:
        held = np.empty(max(size, 2**16), dtype=dtype)
        setattr(_local, name, held)
    return held[:size].reshape(shape)


def _gathered(xp: Any, data: Any, pos: Any) -> Iterator[tuple[slice, slice, Any]]:
    """Yield (rows slice, cols slice, ``data[pos[rows, cols]]`` as float32 (r, c, d)) over
    ``pos`` (rows, m) in pieces whose scratch stays within ``_RERANK_ELEMS`` elements."""
    rows, m = pos.shape
    dim = data.shape[1]
    cols = max(1, min(m, _RERANK_ELEMS // dim))
    step = max(1, _RERANK_ELEMS // (cols * dim))
    for r0 in range(0, rows, step):
        for c0 in range(0, m, cols):
            r, c = slice(r0, r0 + step), slice(c0, c0 + cols)
            sel = pos[r, c]
            picked = _buffer(xp, "picked", (*sel.shape, dim), xp.float32)
            xp.take(data, sel, axis=0, out=picked)
            yield r, c, picked


def _distances(xp: Any, data: Any, q: Any, pos: Any) -> Any:
    """float64 Euclidean distances (rows, m) of ``q`` (rows, d) to ``data[pos]``, ``pos``
    (rows, m) >= 0, from the difference vectors, in pieces of bounded scratch."""
    out = xp.empty(pos.shape, dtype=xp.float64)
    for r, c, picked in _gathered(xp, data, pos):
        diff = _buffer(xp, "diff", picked.shape, xp.float64)
        xp.subtract(picked, q[r, None, :], out=diff, dtype=xp.float64)
        out[r, c] = xp.sqrt(xp.einsum("ijk,ijk->ij", diff, diff))
    return out


def _scores(ix: CertifiedIndex, raw: Any, scale_q: Any) -> Any:
    """``t = h - s_q s_x G`` in place, as float32 (rows, n): the ranking score of step 2."""
    xp = ix.xp
    t = raw.view(xp.float32) if raw.dtype != xp.float32 else raw
    if ix.fmt in ("int8", "float16"):
        xp.multiply(raw, ix.scale[None, :], out=t, dtype=xp.float32)
        t *= scale_q[:, None]
    xp.subtract(ix.half_sq[None, :], t, out=t)
    return t


def _low_k(xp: Any, t: Any, k: int) -> Any:
    """Positions (rows, k) of ``k`` rows with low scores: any k rows bound the k-th distance
    (step 5); the lower their scores, the tighter. One pass takes the minimum of each segment
    of 64 scores; the k segments with the lowest minima hold the k lowest scores (of all but
    the last ``n mod 64``), found there."""
    rows, n = t.shape
    n_seg = n // _SEGMENT
    if n_seg < 4 * k:
        return _lowest_k(xp, t, k)
    mins = t[:, : n_seg * _SEGMENT].reshape(rows, n_seg, _SEGMENT).min(axis=2)
    seg = xp.argpartition(mins, k - 1, axis=1)[:, :k]
    cols = (seg[:, :, None] * _SEGMENT + xp.arange(_SEGMENT)).reshape(rows, k * _SEGMENT)
    best = xp.argpartition(xp.take_along_axis(t, cols, axis=1), k - 1, axis=1)[:, :k]
    return xp.take_along_axis(cols, best, axis=1)


def _lowest_k(xp: Any, t: Any, k: int) -> Any:
    """Positions (rows, k) of ``k`` lowest scores per row; ``t`` is left as it was."""
    rows = t.shape[0]
    if k > _ARGMIN_MAX_K:
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


def _certify_rows(
    ix: CertifiedIndex, qb: _QueryBlock, t: Any, k: int, cap: int
) -> tuple[Any, Any, Any, Any]:
    """Steps 5-6 and the exact re-rank for rows of one block.

    Returns (distances (rows, k) float64, positions (rows, k) int64, certified (rows,) bool,
    candidates (rows,) int64); rows that are not certified hold garbage.
    """
    xp, b = ix.xp, ix.bound
    rows = t.shape[0]
    first = _low_k(xp, t, k)
    d0 = _distances(xp, ix.data, qb.q, first).max(axis=1)
    w = d0 * (1.0 + 4.0 * b.delta) + qb.eps
    qn2 = qb.reduced_norm**2
    c_q = (w * w - qn2 * (1.0 - b.beta)) / 2.0 + b.eta
    slack = _SLACK * (w * w + qn2 + w * ix.err_max + ix.g_max + b.eta)
    c_q = c_q + slack
    coarse = c_q + w * ix.err_max + ix.g_max
    # Rounded up to float32: the coarse filter may only let more rows through.
    coarse32 = coarse.astype(xp.float32)
    coarse32 = xp.where(
        coarse32.astype(xp.float64) < coarse, xp.nextafter(coarse32, xp.inf), coarse32
    )
    n = t.shape[1]
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
    width = max(int(counts.max()) if rows else 0, k)
    start = xp.cumsum(counts) - counts
    slot = xp.arange(r.shape[0]) - start[r]
    cand = xp.zeros((rows, width), dtype=xp.int64)
    cand[r, slot] = c  # ascending positions per row: nonzero() walks rows, then columns
    if width > 2 * k:
        cand, width, kept = _prefilter(ix, qb.q, cand, counts, k)
    else:
        kept = counts
    dist = _distances(xp, ix.data, qb.q, cand)
    dist[xp.arange(width)[None, :] >= kept[:, None]] = xp.inf
    order = xp.argsort(dist, axis=1, kind="stable")[:, :k]  # ties: lower position first
    pos = xp.take_along_axis(cand, order, axis=1)
    dist = xp.take_along_axis(dist, order, axis=1)
    # Defensive: the k rows of step 5 are candidates, so the k-th can only have come down.
    ok &= dist[:, k - 1] <= d0 * (1.0 + 4.0 * b.delta)
    return dist, pos, ok, counts


def _prefilter(ix: CertifiedIndex, q: Any, cand: Any, counts: Any, k: int) -> tuple[Any, int, Any]:
    """Drop candidates that float32 difference vectors already prove to be farther than the
    k-th: (candidates (rows, width'), width', kept per row), positions still ascending.

    float32 squared distances ``s`` from difference vectors satisfy
    ``|s - D^2| <= eps D^2 + eta`` (each difference, square and sum rounds once; any order:
    ``eps = gamma_{d+2}`` at ``u_acc``; ``eta`` covers underflow). A row whose lower bound
    ``s (1 - eps) - eta`` exceeds the k-th smallest upper bound ``s (1 + 2 eps) + eta`` (with
    the float64 margin of step 6) cannot be among the k nearest nor tie the k-th.
    """
    xp = ix.xp
    rows, width = cand.shape
    dim = ix.dim
    n = (dim + 2) * _U_ACC
    eps = n / (1.0 - n)
    eta = (dim + 3) * _TINY
    valid = xp.arange(width)[None, :] < counts[:, None]
    sq = _sq_distances32(xp, ix.data, q, cand).astype(xp.float64)
    upper = xp.where(valid, sq * (1.0 + 2.0 * eps) + eta, xp.inf)
    kth = xp.partition(upper, k - 1, axis=1)[:, k - 1] * (1.0 + 4.0 * ix.bound.delta)
    keep = valid & (sq * (1.0 - eps) - eta <= kth[:, None])
    r, s = xp.nonzero(keep)  # row-major: ascending positions per row are kept in order
    kept = xp.bincount(r, minlength=rows)
    width = max(int(kept.max()) if rows else 0, k)
    start = xp.cumsum(kept) - kept
    out = xp.zeros((rows, width), dtype=cand.dtype)
    out[r, xp.arange(r.shape[0]) - start[r]] = cand[r, s]
    return out, width, kept


def _sq_distances32(xp: Any, data: Any, q: Any, pos: Any) -> Any:
    """float32 squared Euclidean distances (rows, m) from float32 difference vectors."""
    out = xp.empty(pos.shape, dtype=xp.float32)
    for r, c, picked in _gathered(xp, data, pos):
        picked -= q[r, None, :]
        out[r, c] = xp.einsum("ijk,ijk->ij", picked, picked)
    return out


def _default_block(xp: Any, n_index: int, fmt: str = "float32") -> int:
    """Queries per reduced GEMM: ~128 MiB of scores on the CPU (as the exact path), 1 GiB on
    a GPU. int8 takes half: its product runs as fast on half the queries (measured), and the
    scratch saved pays for the int8 copy's engine (onnxruntime) in memory."""
    if not _is_numpy(xp):
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
        Same array module as the index (NumPy or CuPy).
    k : int
        ``1 <= k <= n_index``.
    block : int, optional
        Queries per reduced GEMM (default: ~128 MiB of scores on the CPU, 64 MiB for int8,
        1 GiB on a GPU).
    max_candidates : int, optional
        Largest candidate set re-measured exactly before a query falls back to the exact path
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
    q = _check_matrix(xp, queries, "queries")
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
    distances = xp.empty((n_queries, k), dtype=xp.float32)
    indices = xp.empty((n_queries, k), dtype=xp.int64)
    certified = xp.zeros(n_queries, dtype=bool)
    n_cand = xp.zeros(n_queries, dtype=xp.int64)
    if n_queries:
        with _overflow_is_handled():
            _run_blocks(
                prepared, q, k, min(block, n_queries), cap, distances, indices, certified, n_cand
            )
    failed = xp.flatnonzero(~certified)
    if failed.size:
        with _overflow_is_handled():
            distances[failed], indices[failed] = _fallback(prepared, q[failed], k)
    if stats is not None:
        n_ok = int(certified.sum())
        stats.queries += n_queries
        stats.certified += n_ok
        stats.neighbours += n_ok * k
        stats.candidates += int(n_cand[certified].sum())
        if n_ok:
            stats.max_candidates_seen = max(stats.max_candidates_seen, int(n_cand[certified].max()))
    if not _is_numpy(xp):
        return xp.asnumpy(distances), xp.asnumpy(indices)
    return distances, indices


def _fallback(ix: CertifiedIndex, q: Any, k: int) -> tuple[Any, Any]:
    """The exact path for queries whose certificate failed: float32 scores, no candidate cap
    (exact by the same proof), float64 brute force where float32 scores could overflow."""
    assert ix.fallback_index is not None
    xp = ix.xp
    n = q.shape[0]
    dist = xp.empty((n, k), dtype=xp.float32)
    pos = xp.empty((n, k), dtype=xp.int64)
    ok = xp.zeros(n, dtype=bool)
    cnt = xp.zeros(n, dtype=xp.int64)
    block = _default_block(xp, ix.n_index)
    _run_blocks(ix.fallback_index, q, k, min(block, n), ix.n_index, dist, pos, ok, cnt)
    if not bool(ok.all()):  # float32 scores out of range: nothing cheaper is left
        bad = xp.flatnonzero(~ok)
        full = _distances(xp, ix.data, q[bad], xp.tile(xp.arange(ix.n_index), (bad.size, 1)))
        order = xp.argsort(full, axis=1, kind="stable")[:, :k]
        pos[bad] = order
        dist[bad] = xp.take_along_axis(full, order, axis=1)
    return dist, pos


def _run_blocks(
    ix: CertifiedIndex,
    q: Any,
    k: int,
    block: int,
    cap: int,
    dist_out: Any,
    pos_out: Any,
    ok_out: Any,
    cand_out: Any,
) -> None:
    """Reduced GEMM per query block, then certification of its rows (threads on the CPU)."""
    xp = ix.xp
    scratch = xp.empty((block, ix.n_index), dtype=ix.engine.out_dtype)

    def finish(qb: _QueryBlock, raw: Any, lo: int, hi: int, b0: int) -> None:
        with _overflow_is_handled():  # NumPy's error state is per thread
            finish_rows(qb, raw, lo, hi, b0)

    def finish_rows(qb: _QueryBlock, raw: Any, lo: int, hi: int, b0: int) -> None:
        step = hi - lo if not _is_numpy(xp) else max(1, _ROW_BYTES_L2 // (4 * ix.n_index))
        for r0 in range(lo, hi, step):
            r1 = min(hi, r0 + step)
            sub = _QueryBlock(
                qb.q[r0:r1],
                None,
                0,
                qb.scale[r0:r1],
                qb.eps[r0:r1],
                qb.reduced_norm[r0:r1],
                qb.safe[r0:r1],
            )
            t = _scores(ix, raw[r0:r1], sub.scale)
            d, p, ok, cnt = _certify_rows(ix, sub, t, k, cap)
            dist_out[b0 + r0 : b0 + r1] = d
            pos_out[b0 + r0 : b0 + r1] = p
            ok_out[b0 + r0 : b0 + r1] = ok
            cand_out[b0 + r0 : b0 + r1] = cnt

    workers = min(cpu_count(), block) if _is_numpy(xp) else 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for b0 in range(0, q.shape[0], block):
            qb = _reduce_queries(ix, q[b0 : b0 + block])
            raw = scratch[: qb.q.shape[0]]
            ix.engine(qb.values, qb.zero_point, raw)
            if not _is_numpy(xp):
                finish(qb, raw, 0, raw.shape[0], b0)
                continue
            bounds = np.linspace(0, raw.shape[0], workers + 1).astype(int)
            jobs = [
                pool.submit(finish, qb, raw, int(s), int(e), b0)
                for s, e in itertools.pairwise(bounds)
                if e > s
            ]
            for job in jobs:
                job.result()
