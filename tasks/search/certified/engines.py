"""The one backend-specific call of certified search: ``G = Q . X`` for a block of reduced
queries against the reduced index, into a score scratch. NumPy/OpenBLAS float32 (also for
float16/bfloat16 values held exactly in float32), onnxruntime's int8 ``MatMulInteger`` on the
CPU, and cuBLAS ``GemmEx`` float16 on a GPU. The cuBLAS path is written and has a ``gpu`` test,
but it has not yet been run on a GPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tasks.hardware import cpu_count
from tasks.search.certified.formats import INT8_MAX_DIM, ReducedIndex, reduce_index
from tasks.search.core import is_numpy


class Engine:
    """Computes ``G = Q . X`` for a block of reduced queries into ``out`` (rows, n_index)."""

    name = ""
    out_dtype: Any = np.float32

    def __call__(self, q_values: Any, zero_point: int, out: Any) -> None:
        raise NotImplementedError


class MatmulEngine(Engine):
    """float32 GEMM (NumPy/OpenBLAS or cuBLAS) of float32-held values: float32 itself, or
    float16/bfloat16 values held exactly in float32 (an emulation: same products, same
    float32 accumulation, float32 speed)."""

    def __init__(self, xp: Any, values_t: Any, name: str) -> None:
        self.xp, self.values_t, self.name = xp, values_t, name

    def __call__(self, q_values: Any, zero_point: int, out: Any) -> None:
        self.xp.matmul(q_values.astype(self.xp.float32, copy=False), self.values_t, out=out)


class ExactInt8Engine(Engine):
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


def session_options() -> Any:
    """onnxruntime options of the int8 product: every core in one operator, and idle workers
    that sleep instead of spinning (spinning burns CPU time the rest of the search, and
    anything else on the machine, could use)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = cpu_count()
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


class OrtInt8Engine(Engine):
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
        self.session = ort.InferenceSession(
            model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"]
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


class CublasHalfEngine(Engine):
    """cuBLAS ``GemmEx``: float16 inputs, float32 accumulation and output (tensor cores).

    Written against cuBLAS's documented interface and tested only where a GPU is present: it
    has not yet been run on a GPU."""

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


def ort_available() -> str | None:
    """None when onnxruntime (and onnx, to build its one-node graph) import; else why not."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"onnxruntime/onnx not installed ({exc})"
    return None


def engine_name(xp: Any, fmt: str) -> str:
    """The library call that computes ``fmt``'s products for array module ``xp``."""
    if fmt == "float32":
        return "cuBLAS float32 GEMM" if not is_numpy(xp) else "NumPy/OpenBLAS float32 GEMM"
    if fmt == "int8":
        return "onnxruntime MatMulInteger" if ort_available() is None else "NumPy exact emulation"
    if fmt == "float16" and not is_numpy(xp):
        return "cuBLAS GemmEx float16 -> float32"
    return f"NumPy float32 GEMM of {fmt}-rounded values (emulation)"


def build_engine(xp: Any, data: Any, fmt: str) -> tuple[Engine, ReducedIndex, int]:
    """The engine for ``fmt`` over ``data`` (n, d) float32, the reduced index's per-row terms,
    and the bytes of the reduced copy (0 for float32: the rows themselves)."""
    engine: Engine
    if fmt == "int8":
        if not is_numpy(xp):
            raise ValueError(
                "Expected float32 or float16 on a GPU; int8 runs on the CPU through onnxruntime"
            )
        if data.shape[1] > INT8_MAX_DIM:
            raise ValueError(
                f"Expected d <= {INT8_MAX_DIM} for int8 (int32 sums), but d = {data.shape[1]}; "
                "use fmt='float32'"
            )
        if ort_available() is None:
            reduced = reduce_index(xp, data, fmt, "columns")
            engine = OrtInt8Engine(reduced.values, reduced.zero_point)
        else:
            reduced = reduce_index(xp, data, fmt, "rows")
            engine = ExactInt8Engine(xp, reduced.values)
    elif fmt == "float16" and not is_numpy(xp):
        reduced = reduce_index(xp, data, fmt, "rows")
        engine = CublasHalfEngine(xp, reduced.values)
    else:
        reduced = reduce_index(xp, data, fmt, "held")
        engine = MatmulEngine(xp, reduced.values.T, engine_name(xp, fmt))
    nbytes = 0 if fmt == "float32" else int(reduced.values.nbytes)
    return engine, reduced, nbytes
