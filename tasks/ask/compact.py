"""The compact copy of an index: its rows in int8 for the scan of certified search, which
returns the exact answer from a quarter of the float32 bytes (docs/certified.md). A stage of
the run writes it once; the query core opens it in about a second.

Two files beside the float32 copy: the int8 values as the int8 engine reads them, (d, n), in a
``.npy`` whose data starts at byte 4096 (a page: onnxruntime maps them from the file and packs
them once), and per row the terms of the bound as
:func:`tasks.search.certified.formats.reduce_index` computes them (scale, quantisation error,
reduced and exact squared norms). Reopening assembles a
:class:`~tasks.search.certified.CertifiedIndex` from them over the memory-mapped float32 copy,
which is then read only for each query's candidates and by the exact fallback.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tasks.ask.files import MatrixFile, write_at
from tasks.hardware import cpu_features
from tasks.search.certified import CertifiedIndex, FormatChoice
from tasks.search.certified.engines import Engine, OrtInt8Engine, session_options
from tasks.search.certified.formats import (
    INT8_MAX,
    INT8_MAX_DIM,
    PIECE,
    ReducedIndex,
    dequantize,
    reduce_rows,
)
from tasks.search.certified.index import assemble as certified_index

log = logging.getLogger(__name__)

FORMAT = "int8"
HEADER_BYTES = 4096  # the values start on a page boundary
ROW_TERMS = np.dtype([("scale", "<f4"), ("err", "<f8"), ("reduced_sq", "<f8"), ("data_sq", "<f8")])
BLOCK_ROWS = 16 * PIECE  # float32 rows read at a time: 128 MiB, plus ~50 MiB of scratch


def _header(shape: tuple[int, int], dtype: np.dtype[Any]) -> bytes:
    """A ``.npy`` (version 1.0) header padded to :data:`HEADER_BYTES`."""
    text = repr(
        {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    )
    magic = np.lib.format.magic(1, 0)
    pad = HEADER_BYTES - len(magic) - 2 - len(text) - 1
    body = (text + " " * pad + "\n").encode("latin1")
    return magic + struct.pack("<H", len(body)) + body


def non_negative(source: MatrixFile) -> bool:
    """Whether every element of ``source`` is >= 0 (one pass, a block at a time): such an
    index takes int8 levels 0..254, one more bit than a signed one."""
    return all(bool((block >= 0).all()) for _, block in source.blocks(BLOCK_ROWS))


def write_compact(
    matrix: Path,
    values: Path,
    rows: Path,
    *,
    unsigned: bool,
    start: int = 0,
    on_block: Callable[[int], None] | None = None,
) -> int:
    """Write the compact copy of the (n, d) float32 ``.npy`` file ``matrix``: ``values``
    (d, n) int8 and ``rows`` (n,) of :data:`ROW_TERMS`, reading ``BLOCK_ROWS`` rows at a time
    (memory stays flat). ``unsigned``: levels 0..254 stored shifted by -127 (a non-negative
    index, see :func:`non_negative`), else -127..127. From row ``start`` on when the files
    already hold the rows before it (a resumed write); ``on_block(rows_done)`` after each
    block, once its rows are on disk. Returns the zero point of the stored values.
    """
    source = MatrixFile(matrix)
    n, d = source.shape
    if source.dtype != np.float32:
        raise ValueError(f"{matrix} holds {source.dtype}, not float32")
    if d > INT8_MAX_DIM:
        raise ValueError(f"d = {d} exceeds the int8 engine's {INT8_MAX_DIM}")
    shift = INT8_MAX if unsigned else 0
    if start == 0 or not values.exists() or not rows.exists():
        start = 0
        with open(values, "wb") as f:
            f.write(_header((d, n), np.dtype(np.int8)))
            f.truncate(HEADER_BYTES + d * n)
        np.lib.format.open_memmap(rows, mode="w+", dtype=ROW_TERMS, shape=(n,)).flush()
    terms = np.lib.format.open_memmap(rows, mode="r+")
    fd = os.open(values, os.O_WRONLY)
    try:
        for s, block in source.blocks(BLOCK_ROWS, start):
            m = len(block)
            slab = np.empty((d, m), dtype=np.int8)
            for p in range(0, m, PIECE):  # as reduce_index does it, piece by piece
                part = block[p : p + PIECE]
                exact = part.astype(np.float64)
                out = terms[s + p : s + p + len(part)]
                out["data_sq"] = np.einsum("ij,ij->i", exact, exact)
                v, sc = reduce_rows(np, part, FORMAT, unsigned=unsigned)
                slab[:, p : p + len(part)] = (v - shift).T
                out["scale"] = sc
                approx = dequantize(np, v, sc)
                out["reduced_sq"] = np.einsum("ij,ij->i", approx, approx)
                approx -= exact
                out["err"] = np.sqrt(np.einsum("ij,ij->i", approx, approx))
            for r in range(d):  # column slab s:s+m of every stored row
                write_at(fd, slab[r].data, HEADER_BYTES + r * n + s)
            terms.flush()
            os.fsync(fd)
            if on_block is not None:
                on_block(s + m)
    finally:
        os.close(fd)
    del terms
    return -shift


class PackedInt8Engine(Engine):
    """onnxruntime's ``MatMulInteger`` with the index as a constant read from the compact
    file: packed once when the session is made, so a single query streams only the packed
    int8 values (the engine that binds the index per call re-packs it on every call, about
    four times slower for one query). Same products, exact in int32."""

    out_dtype = np.int32

    def __init__(self, values: Path, shape: tuple[int, int], zero_point: int) -> None:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        d, n = shape
        index = TensorProto(name="b", data_type=TensorProto.INT8, dims=[d, n])
        index.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", values.name),
            ("offset", str(HEADER_BYTES)),
            ("length", str(d * n)),
        ):
            entry = index.external_data.add()
            entry.key, entry.value = key, value
        graph = helper.make_graph(
            [helper.make_node("MatMulInteger", ["a", "b", "za", "zb"], ["y"])],
            "compact_int8",
            [
                helper.make_tensor_value_info("a", TensorProto.UINT8, ["m", d]),
                helper.make_tensor_value_info("za", TensorProto.UINT8, []),
            ],
            [helper.make_tensor_value_info("y", TensorProto.INT32, ["m", n])],
            initializer=[index, numpy_helper.from_array(np.array(zero_point, np.int8), "zb")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)])
        model.ir_version = 8
        opts = session_options()
        opts.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(values.parent)
        )
        self.session = ort.InferenceSession(
            model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
        self.name = f"onnxruntime {ort.__version__} MatMulInteger, index packed once (int8)"

    def __call__(self, q_values: Any, zero_point: int, out: Any) -> None:
        binding = self.session.io_binding()
        binding.bind_cpu_input("a", np.ascontiguousarray(q_values, dtype=np.uint8))
        binding.bind_cpu_input("za", np.array(zero_point, dtype=np.uint8))
        binding.bind_output("y", "cpu", 0, np.int32, list(out.shape), out.ctypes.data)
        self.session.run_with_iobinding(binding)


def _engine(values: Path, shape: tuple[int, int], zero_point: int) -> Engine:
    """The packed engine; where this onnxruntime cannot read the file as a constant, the
    engine that binds the values per call (read into memory)."""
    try:
        return PackedInt8Engine(values, shape, zero_point)
    except Exception as exc:  # onnxruntime's own error types differ between versions
        log.info("the int8 index is bound per call, not packed once (%s)", exc)
        return OrtInt8Engine(np.load(values), zero_point)


def assemble(
    data: np.ndarray, reduced: ReducedIndex, engine: Engine, reason: str
) -> CertifiedIndex:
    """A CertifiedIndex over the float32 rows ``data`` (n, d) from their reduced terms, as
    :func:`tasks.search.certified.prepare_certified` makes it from the rows themselves; a test
    holds the two equal field by field."""
    choice = FormatChoice(FORMAT, engine.name, reason, {}, cpu_features().summary())
    return certified_index(np, data, choice, engine, reduced, data.shape[0] * data.shape[1])


def open_compact(values: Path, rows: Path, data: np.ndarray, zero_point: int) -> CertifiedIndex:
    """The certified index of the float32 rows ``data`` (n, d) (a memory map stays one) from
    their compact copy, without reading ``data``.

    Raises ValueError when the files are not a compact copy of n rows of d values.
    """
    n, d = data.shape
    stored = MatrixFile(values)
    if stored.shape != (d, n) or stored.dtype != np.int8 or stored.offset != HEADER_BYTES:
        raise ValueError(f"{values} holds {stored.dtype} {stored.shape}, not int8 ({d}, {n})")
    if os.path.getsize(values) != HEADER_BYTES + d * n:
        raise ValueError(f"{values} is {os.path.getsize(values)} bytes, not {HEADER_BYTES + d * n}")
    terms = np.load(rows)
    if terms.dtype != ROW_TERMS or terms.shape != (n,):
        raise ValueError(f"{rows} holds {terms.dtype} {terms.shape}, not ({n},) row terms")
    if zero_point not in (0, -INT8_MAX):
        raise ValueError(f"zero point {zero_point} is not 0 or {-INT8_MAX}")
    reduced = ReducedIndex(
        None,
        np.ascontiguousarray(terms["scale"]),
        np.ascontiguousarray(terms["err"]),
        np.ascontiguousarray(terms["reduced_sq"]),
        np.ascontiguousarray(terms["data_sq"]),
        zero_point,
    )
    engine = _engine(values, (d, n), zero_point)
    return assemble(data, reduced, engine, f"the run's compact copy ({values.name})")
