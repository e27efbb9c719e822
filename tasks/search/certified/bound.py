"""The error bound of certified search: which rows a reduced-precision score cannot rule out,
and which candidates float32 dot products already place beyond the k-th. The derivation, step
by step, is in docs/certified.md; the step numbers below refer to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.search.certified.formats import FP16_TOP, INT8_MAX
from tasks.search.core import TINY, U32, U_ACC, gamma, is_numpy

SLACK = 2.0**-40  # relative slack on thresholds evaluated in float64


@dataclass(frozen=True)
class Bound:
    """The constants of the error bound for one format and dimension (steps 1-2).

    ``alpha``, ``beta`` weigh ``|x~|^2`` and ``|q~||x~|`` in the score's error, ``eta`` bounds
    flush-to-zero underflow, ``delta`` the relative error of a float64 distance.
    """

    alpha: float
    beta: float
    eta: float
    delta: float

    @classmethod
    def of(cls, fmt: str, dim: int) -> Bound:
        if fmt == "int8":
            g, g_max = 0.0, float(dim * INT8_MAX * 2 * INT8_MAX)  # int32 sums are exact
        else:
            g = gamma(dim + 2, U_ACC)
            g_max = float(dim) * 2.0 ** (2 * FP16_TOP + 2) if fmt == "float16" else 1.0
        return cls(
            alpha=1.01 * U32,
            beta=g + 4.1 * U32 * (1.0 + g),
            eta=(2 * dim + 16) * max(1.0, g_max) * TINY,
            delta=(dim + 4) * 2.0**-52,
        )


def thresholds(
    xp: Any, bound: Bound, w: Any, reduced_norm: Any, err_max: float, g_max: float
) -> tuple[Any, Any]:
    """Per query (step 6): ``C_q`` (float64) of the per-row threshold
    ``theta_x = C_q + W e_x + g_x``, and the coarse threshold ``C_q + W max e + max g``
    rounded up to float32, for a first pass that may only let more rows through.

    ``w`` (m,) is ``W``: an upper bound on the k-th distance, plus ``eps_q``.
    """
    qn2 = reduced_norm * reduced_norm
    c_q = (w * w - qn2 * (1.0 - bound.beta)) / 2.0 + bound.eta
    c_q = c_q + SLACK * (w * w + qn2 + w * err_max + g_max + bound.eta)
    coarse = c_q + w * err_max + g_max
    coarse32 = coarse.astype(xp.float32)
    coarse32 = xp.where(
        coarse32.astype(xp.float64) < coarse, xp.nextafter(coarse32, xp.inf), coarse32
    )
    return c_q, coarse32


def dot_interval(xp: Any, dots: Any, q_sq: Any, x_sq: Any, dim: int) -> tuple[Any, Any]:
    """Bounds (lower, upper) on exact distances ``|q - x|`` from float32 dot products (step 7).

    ``dots`` (m, c) float32 ``fl(q.x)``, any summation order; ``q_sq`` (m, 1) and ``x_sq``
    (m, c) float64 ``|q|^2``, ``|x|^2``. ``s = |q|^2 + |x|^2 - 2 fl(q.x)`` errs by at most
    ``E = 2 gamma_d |q||x| + 4 (d + 2) 2^-126 + (d + 8) 2^-52 (|q| + |x|)^2`` (the dot
    product, its underflow, the float64 norms and sums), so ``D`` lies within
    ``sqrt(max(s - E, 0))`` and ``sqrt(s + E)``. NumPy's own arithmetic rounds to nearest
    (``u = 2^-24``); on a GPU the accumulation assumption of step 1 (``2^-22``) is kept.
    """
    u = U32 if is_numpy(xp) else U_ACC
    qn, xn = xp.sqrt(q_sq), xp.sqrt(x_sq)
    total = qn + xn
    e = 2.0 * gamma(dim, u) * qn * xn + 4.0 * (dim + 2) * TINY
    e = e + (dim + 8) * 2.0**-52 * total * total
    s = q_sq + x_sq - 2.0 * dots.astype(xp.float64)
    lower = xp.sqrt(xp.maximum(s - e, 0.0)) * (1.0 - SLACK)
    upper = xp.sqrt(s + e) * (1.0 + SLACK)
    return lower, upper
