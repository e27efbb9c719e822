"""The index's model exported once as ONNX, so that a query embeds with onnxruntime (a model that
loads in a fraction of a second) instead of building ResNet50 in TensorFlow (seconds, and
TensorFlow's import). The graph is the Keras model's own, layer by layer: the preprocessing
(RGB->BGR, ImageNet mean) inside, batch normalisation folded into the convolutions, global max
pooling; uint8 (B, S, S, 3) in, float32 (B, 2048) out, for any input size S.

Exporting needs the Keras model (TensorFlow) and ``onnx``; running needs only onnxruntime.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tasks.features.model import DIM
from tasks.hardware import cpu_count

log = logging.getLogger(__name__)

OPSET = 17
INPUT = "pixels"
OUTPUT = "embedding"
# keras.applications.resnet50.preprocess_input ("caffe"): BGR order, minus the ImageNet mean
# of each channel (B, G, R). The graph takes RGB: the mean in RGB order, and the first
# convolution reads its input channels reversed.
_MEAN_BGR = (103.939, 116.779, 123.68)


class ExportError(ValueError):
    """The model holds a layer this exporter does not translate."""


def _padding(config: dict[str, Any], kernel: tuple[int, ...]) -> dict[str, Any]:
    """ONNX padding attributes of a Keras ``padding`` setting (TensorFlow's 'same' puts the odd
    pixel at the end, as SAME_UPPER does)."""
    if config["padding"] == "valid":
        return {"pads": [0, 0, 0, 0]}
    if config["padding"] == "same":
        return {"auto_pad": "SAME_UPPER"}
    raise ExportError(f"padding {config['padding']!r} of layer {config['name']}")


def to_onnx(model: Any) -> Any:
    """The ONNX model (an ``onnx.ModelProto``) of Keras ResNet50 ``model`` (no top, max pooling).

    Raises ExportError for a layer or setting without a translation here, so that a model this
    code does not know is never exported half right.
    """
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[Any] = []
    inits: list[Any] = []
    names: dict[int, str] = {}  # id(KerasTensor) -> ONNX value name
    produced_by: dict[str, Any] = {}  # ONNX value name -> its node
    consumers: dict[int, int] = {}
    for layer in model.layers:
        for tensor in layer._inbound_nodes[0].input_tensors:
            consumers[id(tensor)] = consumers.get(id(tensor), 0) + 1
    reversed_channels: set[str] = set()  # values still in RGB where Keras has BGR

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(array, name))
        return name

    def emit(op: str, inputs: list[str], output: str, **attrs: Any) -> Any:
        node = helper.make_node(op, inputs, [output], name=output, **attrs)
        nodes.append(node)
        produced_by[output] = node
        return node

    mean_rgb = np.array(_MEAN_BGR[::-1], dtype=np.float32)
    emit("Cast", [INPUT], "input_float", to=TensorProto.FLOAT)
    emit("Sub", ["input_float", const("imagenet_mean_rgb", mean_rgb)], "input_centred")
    emit("Transpose", ["input_centred"], "input_nchw", perm=[0, 3, 1, 2])
    weights: dict[str, dict[str, np.ndarray]] = {}
    for layer in model.layers:
        node = layer._inbound_nodes[0]
        inputs = [names[id(t)] for t in node.input_tensors]
        out = node.output_tensors[0]
        kind = type(layer).__name__
        config = layer.get_config()
        name = layer.name
        if kind == "InputLayer":
            names[id(out)] = "input_nchw"
            reversed_channels.add("input_nchw")
            continue
        if kind == "ZeroPadding2D":
            (top, bottom), (left, right) = config["padding"]
            pads = const(f"{name}_pads", np.array([0, 0, top, left, 0, 0, bottom, right], np.int64))
            emit("Pad", [inputs[0], pads], name, mode="constant")
            if inputs[0] in reversed_channels:
                reversed_channels.add(name)
        elif kind == "Conv2D":
            if config["activation"] != "linear" or config["groups"] != 1:
                raise ExportError(f"convolution {name}: {config['activation']}, groups")
            if tuple(config["dilation_rate"]) != (1, 1) or not layer.use_bias:
                raise ExportError(f"convolution {name}: dilation or no bias")
            kernel = np.asarray(layer.kernel.numpy(), dtype=np.float64)  # (kh, kw, in, out)
            bias = np.asarray(layer.bias.numpy(), dtype=np.float64)
            w = kernel.transpose(3, 2, 0, 1)  # (out, in, kh, kw)
            if inputs[0] in reversed_channels:
                w = w[:, ::-1]  # reads RGB where the Keras model reads BGR
            weights[name] = {"w": w, "b": bias}
            emit(
                "Conv",
                [inputs[0], f"{name}_w", f"{name}_b"],
                name,
                kernel_shape=list(config["kernel_size"]),
                strides=list(config["strides"]),
                **_padding(config, tuple(config["kernel_size"])),
            )
        elif kind == "BatchNormalization":
            conv = produced_by.get(inputs[0])
            source = node.input_tensors[0]
            if conv is None or conv.op_type != "Conv" or consumers.get(id(source)) != 1:
                raise ExportError(f"batch normalisation {name} not right after a convolution")
            if config["axis"] not in (3, -1) or not (config["center"] and config["scale"]):
                raise ExportError(f"batch normalisation {name}: axis or missing scale/centre")
            gamma, beta, mean, var = (
                np.asarray(v.numpy(), dtype=np.float64)
                for v in (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance)
            )
            scale = gamma / np.sqrt(var + config["epsilon"])
            folded = weights[conv.name]
            folded["w"] = folded["w"] * scale[:, None, None, None]
            folded["b"] = (folded["b"] - mean) * scale + beta
            names[id(out)] = conv.output[0]
            continue
        elif kind == "Activation":
            if config["activation"] != "relu":
                raise ExportError(f"activation {config['activation']!r} of layer {name}")
            emit("Relu", inputs, name)
        elif kind == "Add":
            emit("Add", inputs, name)
        elif kind == "MaxPooling2D":
            if config["padding"] != "valid":
                raise ExportError(f"max pooling {name}: padding {config['padding']!r}")
            emit(
                "MaxPool",
                inputs,
                name,
                kernel_shape=list(config["pool_size"]),
                strides=list(config["strides"]),
            )
        elif kind == "GlobalMaxPooling2D":
            emit("GlobalMaxPool", inputs, f"{name}_4d")
            emit("Flatten", [f"{name}_4d"], name, axis=1)
        else:
            raise ExportError(f"layer {name} of kind {kind}")
        names[id(out)] = name
    final = names[id(model.outputs[0])]
    emit("Identity", [final], OUTPUT)
    for conv, folded in weights.items():
        const(f"{conv}_w", folded["w"].astype(np.float32))
        const(f"{conv}_b", folded["b"].astype(np.float32))
    graph = helper.make_graph(
        nodes,
        "resnet50",
        [helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["batch", "height", "width", 3])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", DIM])],
        initializer=inits,
    )
    onnx_model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="image-search",
    )
    onnx_model.ir_version = 8  # readable by every onnxruntime that supports opset 17
    return onnx_model


def export(model: Any, dest: Path) -> None:
    """Write ``model``'s ONNX graph to ``dest`` (the caller makes it appear atomically)."""
    import onnx

    onnx.save_model(to_onnx(model), str(dest))


def _return_freed_heap() -> None:
    """Give the heap memory freed meanwhile back to the system (glibc's ``malloc_trim``): after a
    session is made from the 94 MB model, about 130 MiB of freed parse buffers would otherwise
    stay resident for the life of the process. Elsewhere, nothing to do."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def load(path: Path, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """The forward pass of the exported model at ``path``: uint8 (B, S, S, 3) -> float32
    (B, 2048), on this process's cores (onnxruntime on the CPU)."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # errors only: no device-discovery notices
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or cpu_count()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    _return_freed_heap()  # the parsed model's buffers: freed, but kept by the allocator

    def call(batch: np.ndarray) -> np.ndarray:
        pixels = np.ascontiguousarray(batch, dtype=np.uint8)
        return np.asarray(session.run([OUTPUT], {INPUT: pixels})[0], dtype=np.float32)

    return call
