"""What this CPU gives for matrix products in each format: GFLOP per CPU-second of float32
(NumPy/OpenBLAS), bfloat16/float16 (TensorFlow's oneDNN/Eigen kernels, onnxruntime) and int8
(onnxruntime's MLAS ``MatMulInteger``; PyTorch's kernels where PyTorch is installed), on blocks
shaped like the exact search's (a query block x the index x d).

Each library runs in its own child process, its formats interleaved there; repeats are fresh
children. The rate per CPU-second divides out load from other processes on a shared machine.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.harness import Skip, cpu_seconds, run_child
from tasks.hardware import cpu_count, cpu_features

FULL = {"rows": 368, "cols": 20_000, "dim": 2048, "repeats": 3, "calls": 3}
QUICK = {"rows": 64, "cols": 2_000, "dim": 256, "repeats": 1, "calls": 1}
LIBRARIES = ["numpy", "onnxruntime", "tensorflow", "torch"]
# A call of a slow kernel is shrunk (fewer index columns) to take about this long.
_CALL_SECONDS = 4.0
# The reduced formats the certified search may use must beat float32 by this per CPU-second.
TARGET = 1.4


def _operands(rows: int, cols: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative float32 queries (rows, d) and index (cols, d), like ReLU features."""
    rng = np.random.default_rng(0)
    q = np.abs(rng.standard_normal((rows, dim), dtype=np.float32))
    x = np.abs(rng.standard_normal((cols, dim), dtype=np.float32))
    return q, x


def _kernels(library: str, q: np.ndarray, x: np.ndarray) -> dict[str, Callable[[], Any]]:
    """name -> a call computing the (rows, cols) products in that format, operands prepared
    once (converted, transposed, quantised) outside the call, as a search would."""
    n = cpu_count()
    rows, cols = len(q), len(x)
    if library == "numpy":
        out = np.empty((rows, cols), dtype=np.float32)
        xt = x.T
        return {"float32 (OpenBLAS)": lambda: np.matmul(q, xt, out=out)}
    if library == "onnxruntime":
        try:
            import onnxruntime as ort
            from onnx import TensorProto, helper
        except ImportError as exc:
            raise Skip(f"onnxruntime/onnx not installed ({exc})") from None

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = n, 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")

        def session(op: str, a_type: int, b_type: int, y_type: int) -> Any:
            graph = helper.make_graph(
                [helper.make_node(op, ["a", "b"], ["y"])],
                "g",
                [
                    helper.make_tensor_value_info("a", a_type, ["m", "d"]),
                    helper.make_tensor_value_info("b", b_type, ["d", "n"]),
                ],
                [helper.make_tensor_value_info("y", y_type, ["m", "n"])],
            )
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
            model.ir_version = 8
            return ort.InferenceSession(
                model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
            )

        def bound(sess: Any, a: np.ndarray, b: np.ndarray, dtype: Any) -> Callable[[], Any]:
            y = np.empty((rows, cols), dtype=dtype)

            def call() -> None:
                io = sess.io_binding()
                io.bind_cpu_input("a", a)
                io.bind_cpu_input("b", b)
                io.bind_output("y", "cpu", 0, dtype, [rows, cols], y.ctypes.data)
                sess.run_with_iobinding(io)

            return call

        f16, f32 = TensorProto.FLOAT16, TensorProto.FLOAT
        a8 = np.minimum(np.rint(q * 30), 127).astype(np.uint8)  # 0..127: no AVX2 saturation
        b8 = np.ascontiguousarray(np.minimum(np.rint(x * 30), 127).astype(np.int8).T)
        xt32, xt16 = np.ascontiguousarray(x.T), np.ascontiguousarray(x.T.astype(np.float16))
        mm = "MatMulInteger"
        return {
            "int8 (MLAS MatMulInteger, uint8 x int8 -> int32)": bound(
                session(mm, TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32),
                a8,
                b8,
                np.int32,
            ),
            "float32 (MLAS MatMul)": bound(session("MatMul", f32, f32, f32), q, xt32, np.float32),
            "float16 (MatMul, float16 out)": bound(
                session("MatMul", f16, f16, f16), q.astype(np.float16), xt16, np.float16
            ),
        }
    if library == "tensorflow":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(n)
        a32, b32 = tf.constant(q), tf.constant(x)
        a16, b16 = tf.cast(a32, tf.bfloat16), tf.cast(b32, tf.bfloat16)
        h16, g16 = tf.cast(a32, tf.float16), tf.cast(b32, tf.float16)
        return {
            "float32 (tf.matmul)": lambda: tf.matmul(a32, b32, transpose_b=True).numpy(),
            "bfloat16 (tf.matmul, oneDNN, bfloat16 out)": lambda: tf.matmul(
                a16, b16, transpose_b=True
            ).numpy(),
            "float16 (tf.matmul, float16 out)": lambda: tf.matmul(
                h16, g16, transpose_b=True
            ).numpy(),
        }
    if library == "torch":
        try:
            import torch
        except ImportError as exc:
            raise Skip(f"PyTorch is not installed here (not a project dependency): {exc}") from None
        torch.set_num_threads(n)
        ta, tb = torch.from_numpy(q), torch.from_numpy(x).T.contiguous()
        ia = torch.from_numpy(np.minimum(np.rint(q * 30), 127).astype(np.int8))
        ib = torch.from_numpy(np.minimum(np.rint(x * 30), 127).astype(np.int8)).T.contiguous()
        return {
            "float32 (torch.mm)": lambda: torch.mm(ta, tb),
            "bfloat16 (torch.mm, bfloat16 out)": lambda: torch.mm(ta.bfloat16(), tb.bfloat16()),
            "float16 (torch.mm, float16 out)": lambda: torch.mm(ta.half(), tb.half()),
            "int8 (torch._int_mm -> int32)": lambda: torch._int_mm(ia, ib),
        }
    raise ValueError(f"unknown library {library!r}")


def library_child(library: str, rows: int, cols: int, dim: int, calls: int) -> dict[str, Any]:
    """Rates of one library's kernels in this (fresh) process: per kernel the median over
    ``calls`` timed calls after a warm-up, slow kernels on fewer index columns."""
    from threadpoolctl import threadpool_limits

    q, x = _operands(rows, cols, dim)
    out: dict[str, Any] = {}
    with threadpool_limits(limits=cpu_count()):
        small = _kernels(library, q, x[: max(64, cols // 20)])
        names = list(small)
        shrink = {}
        for name in names:  # a first, small call: warm-up, and how long a full one would take
            small[name]()
            t0 = time.perf_counter()
            small[name]()
            per_col = (time.perf_counter() - t0) / max(64, cols // 20)
            shrink[name] = max(64, min(cols, int(_CALL_SECONDS / max(per_col, 1e-12))))
        kernels = {c: _kernels(library, q, x[:c]) for c in set(shrink.values())}
        timings: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
        for name in names:
            kernels[shrink[name]][name]()  # warm-up at the measured size
        for _ in range(calls):
            for name in names:  # interleaved: load from elsewhere hits every kernel alike
                w0, c0 = time.perf_counter(), cpu_seconds()
                kernels[shrink[name]][name]()
                w1, c1 = time.perf_counter(), cpu_seconds()
                timings[name].append((w1 - w0, c1 - c0))
    for name in names:
        flop = 2.0 * rows * shrink[name] * dim
        wall = statistics.median(t[0] for t in timings[name])
        cpu = statistics.median(t[1] for t in timings[name])
        out[name] = {
            "cols": shrink[name],
            "gflop_per_cpu_s": flop / 1e9 / max(cpu, 1e-9),
            "gflop_per_s": flop / 1e9 / max(wall, 1e-9),
            "cores_busy": cpu / max(wall, 1e-9),
        }
    return {"kernels": out}


def hardware(quick: bool = False) -> dict[str, Any]:
    """GEMM rate per CPU-second of every format a well-kept library here offers."""
    size = QUICK if quick else FULL
    cpu = cpu_features()
    runs: dict[str, list[dict[str, Any]]] = {}
    skipped: dict[str, str] = {}
    for r in range(size["repeats"]):
        for library in LIBRARIES:
            if library in skipped:
                continue
            res = run_child(
                "benchmarks.hardware:library_child",
                {k: size[k] for k in ("rows", "cols", "dim", "calls")} | {"library": library},
            )
            if "skipped" in res:
                skipped[library] = res["skipped"]
                print(f"    {library}: skipped ({res['skipped']})", flush=True)
                continue
            for name, m in res["kernels"].items():
                runs.setdefault(f"{library}|{name}", []).append(m)
                print(
                    f"    repeat {r} {library} {name}: {m['gflop_per_cpu_s']:.1f} GFLOP/CPU-s",
                    flush=True,
                )
    med = {key: statistics.median(m["gflop_per_cpu_s"] for m in ms) for key, ms in runs.items()}
    base = med.get("numpy|float32 (OpenBLAS)", float("nan"))
    rows = []
    for key, ms in runs.items():
        library, name = key.split("|", 1)
        rows.append(
            {
                "library": library,
                "format (kernel)": name,
                "GFLOP per CPU-s (median)": round(med[key], 1),
                "runs": ", ".join(f"{m['gflop_per_cpu_s']:.1f}" for m in ms),
                "GFLOP/s wall": round(statistics.median(m["gflop_per_s"] for m in ms), 1),
                "vs NumPy float32 per CPU-s": round(med[key] / base, 2),
                "cores busy": round(statistics.median(m["cores_busy"] for m in ms), 2),
                "index rows per call": ms[0]["cols"],
            }
        )
    for library, reason in skipped.items():
        rows.append({"library": library, "format (kernel)": f"skipped: {reason}"})
    reduced = {k: v for k, v in med.items() if not k.split("|", 1)[1].startswith("float32")}
    best = max(reduced, key=lambda k: reduced[k]) if reduced else None
    ratio = reduced[best] / base if best else 0.0
    flags = [f for f, present in cpu.summary().items() if present]
    return {
        "size": size,
        "rows": rows,
        "targets": [
            {
                "target": f"a reduced format >= {TARGET} x NumPy float32 per CPU-s "
                f"(best: {best.replace('|', ' ') if best else 'none'})",
                "measured": round(ratio, 2),
                "met": ratio >= TARGET,
            }
        ],
        "notes": [
            f"CPU: {cpu.model or 'unknown'}; flags that matter: {', '.join(flags) or 'none'}",
            f"{size['rows']} queries x up to {size['cols']:,} index rows x d = {size['dim']} "
            f"per call (the exact search's block shape), {size['calls']} timed calls per "
            f"process, {size['repeats']} processes per library; medians",
            "GFLOP counts 2 x rows x cols x d for every format",
        ],
        "raw": {"runs": runs, "skipped": skipped, "cpu": cpu.summary(), "model": cpu.model},
    }
