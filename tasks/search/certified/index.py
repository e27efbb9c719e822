"""The prepared index of certified search: the float32 rows as given (a memory map stays a
memory map), their reduced copy behind an engine, and the per-row terms of the bound."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.hardware import cpu_features
from tasks.search.certified.bound import Bound
from tasks.search.certified.choice import FormatChoice, choose_format
from tasks.search.certified.engines import Engine, MatmulEngine, build_engine, engine_name
from tasks.search.certified.formats import FORMATS, ReducedIndex, round_up
from tasks.search.core import as_matrix, is_numpy, namespace


@dataclass(frozen=True)
class CertifiedIndex:
    """An index ready for certified search: the exact float32 rows, their reduced copy, and the
    per-row terms of the bound.

    Attributes
    ----------
    data : array of shape (n_index, d), float32
        The rows as given (not copied: a memory map is read only where candidates are
        re-measured, and by the exact fallback).
    choice : FormatChoice
        The reduced format, its engine and why it was chosen.
    scale, half_sq : arrays of shape (n_index,), float32
        ``s_x`` and ``fl(|x~|^2 / 2)``.
    err, g : arrays of shape (n_index,), float64
        ``e_x = |x - x~|`` and ``g_x`` of the bound, rounded up.
    data_sq : array of shape (n_index,), float64
        ``|x|^2`` of the float32 rows: the dot-product stage's norms.
    """

    xp: Any
    data: Any
    choice: FormatChoice
    engine: Engine
    scale: Any
    half_sq: Any
    err: Any
    g: Any
    data_sq: Any
    err_max: float
    g_max: float
    reduced_norm_max: float
    bound: Bound
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


def overflow_is_handled() -> Any:
    """Silence NumPy's overflow warnings where the code handles them: scores of vectors near
    float32's range are flagged unsafe and those queries take the exact path."""
    return np.errstate(over="ignore", invalid="ignore")


def prepare_certified(index: Any, fmt: str = "auto") -> CertifiedIndex:
    """Convert ``index`` (n_index, d) once: the reduced copy and the bound's terms.

    Parameters
    ----------
    index : array of shape (n_index, d)
        NumPy (CPU) or CuPy (GPU). A C-contiguous float32 array (a memory map too) is kept as
        it is, never copied whole; anything else is converted to one.
    fmt : {"auto", "float32", "int8", "float16", "bfloat16"}
        "auto" measures what this machine runs fastest (:func:`choose_format`). On NumPy,
        float16/bfloat16 are emulated in float32 (for tests: same bound, no speed-up) and int8
        runs through onnxruntime (exactly emulated where it is not installed).

    Raises ValueError for an array that is not 2-D, is empty, holds NaN or infinity, or an
    unknown format.
    """
    xp = namespace(index)
    data = as_matrix(index, "index", xp)
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise ValueError(f"Expected a non-empty index, but index.shape = {data.shape}")
    dim = int(data.shape[1])
    if fmt == "auto":
        choice = choose_format(xp, dim)
    elif fmt in FORMATS:
        if fmt == "int8" and not is_numpy(xp):
            raise ValueError(
                "Expected fmt in ('auto', 'float32', 'float16') for a GPU index, but "
                "fmt = 'int8'; int8 runs on the CPU"
            )
        choice = FormatChoice(
            fmt=fmt,
            engine=engine_name(xp, fmt),
            reason="requested",
            cpu=cpu_features().summary(),
        )
    else:
        raise ValueError(f"Expected fmt in {('auto', *FORMATS)}, but fmt = {fmt!r}")
    with overflow_is_handled():
        return _prepare(xp, data, choice)


def _prepare(xp: Any, data: Any, choice: FormatChoice) -> CertifiedIndex:
    """The index in ``choice``'s format, with the float32 index over the same rows (the exact
    path) built from the same pass over ``data``."""
    engine, reduced, nbytes = build_engine(xp, data, choice.fmt)
    return assemble(xp, data, choice, engine, reduced, nbytes)


def assemble(
    xp: Any, data: Any, choice: FormatChoice, engine: Engine, reduced: ReducedIndex, nbytes: int
) -> CertifiedIndex:
    """The index over rows ``data`` (n, d) from their reduced terms and the engine that
    multiplies by them, with the float32 index of the exact path over the same rows; also how
    a stored reduced copy (the query core's int8 file) becomes an index."""
    prepared = _assemble(xp, data, choice, engine, reduced, nbytes)
    fallback = prepared
    if choice.fmt != "float32":
        n = data.shape[0]
        exact = ReducedIndex(
            data,
            xp.ones(n, xp.float32),
            xp.zeros(n, xp.float64),
            reduced.data_sq,
            reduced.data_sq,
            0,
        )
        f32 = MatmulEngine(xp, data.T, engine_name(xp, "float32"))
        fallback = _assemble(xp, data, FormatChoice("float32", "", "exact path"), f32, exact, 0)
    return dataclasses.replace(prepared, fallback_index=fallback)


def _assemble(
    xp: Any, data: Any, choice: FormatChoice, engine: Engine, reduced: ReducedIndex, nbytes: int
) -> CertifiedIndex:
    dim = int(data.shape[1])
    bound = Bound.of(choice.fmt, dim)
    err = round_up(reduced.err, dim)
    reduced_sq = round_up(reduced.reduced_sq, dim)
    g = round_up(err * err / 2 + (bound.alpha + bound.beta / 2) * reduced_sq, dim)
    return CertifiedIndex(
        xp=xp,
        data=data,
        choice=FormatChoice(choice.fmt, engine.name, choice.reason, choice.rates, choice.cpu),
        engine=engine,
        scale=reduced.scale,
        half_sq=(reduced_sq / 2).astype(xp.float32),
        err=err,
        g=g,
        data_sq=reduced.data_sq,
        err_max=float(err.max()),
        g_max=float(g.max()),
        reduced_norm_max=float(xp.sqrt(reduced_sq.max())),
        bound=bound,
        reduced_nbytes=nbytes,
    )
