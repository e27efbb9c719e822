"""Which reduced format a machine runs fastest, chosen by measuring each candidate engine's
rate on a block shaped like the search's, once per process and dimension."""

from __future__ import annotations

import functools
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tasks.hardware import cpu_features
from tasks.search.certified import engines
from tasks.search.certified.formats import INT8_MAX_DIM, reduce_rows
from tasks.search.core import is_numpy

# A reduced format is chosen automatically only when its GEMM beats float32 by this much:
# the certificate's passes and re-ranking must be paid for out of the difference.
MIN_SPEEDUP = 1.4


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


def probe_rate(xp: Any, fmt: str, dim: int, rows: int = 256, cols: int = 4096) -> float:
    """GFLOP per CPU-second (NumPy) or per second (CuPy) of one format's engine on a probe
    block shaped like the search's (``rows`` queries x ``cols`` index rows x ``dim``)."""
    rng = np.random.default_rng(0)
    index = xp.asarray(np.abs(rng.standard_normal((cols, dim), dtype=np.float32)))
    queries = xp.asarray(np.abs(rng.standard_normal((rows, dim), dtype=np.float32)))
    engine = engines.build_engine(xp, index, fmt)[0]
    q_values, _ = reduce_rows(xp, queries, fmt)
    out = xp.empty((rows, cols), dtype=engine.out_dtype)
    engine(q_values, 0, out)  # warm-up: libraries loaded, kernels chosen
    timings = []
    for _ in range(3):
        if is_numpy(xp):
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
    if is_numpy(xp):
        options = ["float32"]
        missing = engines.ort_available()
        if missing is None and dim <= INT8_MAX_DIM:
            options.append("int8")
    else:
        options, missing = ["float32", "float16"], None
    rates = {fmt: round(probe_rate(xp, fmt, dim), 1) for fmt in options}
    best = max(rates, key=lambda f: rates[f])
    speedup = rates[best] / rates["float32"]
    unit = "GFLOP per CPU-s" if is_numpy(xp) else "GFLOP/s"
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
    engine = engines.engine_name(xp, best)
    return FormatChoice(fmt=best, engine=engine, reason=reason, rates=rates, cpu=cpu)


def choose_format(xp: Any = np, dim: int = 2048) -> FormatChoice:
    """The reduced format this machine runs fastest, measured once per process and dimension.

    NumPy: float32 (OpenBLAS) against int8 (onnxruntime, where installed), in GFLOP per
    CPU-second; CuPy: float32 against float16. A reduced format wins only at
    ``MIN_SPEEDUP`` x float32 or more; otherwise float32 (the certificate still holds).
    """
    return _choose_cached("numpy" if is_numpy(xp) else "cupy", int(dim))
