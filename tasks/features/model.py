"""Keras ResNet50 without its classifier, global max pooling: (N, S, S, 3) uint8 -> (N, 2048)
float32 for any input size S (96 for STL-10, 224 for photos). Weights (ImageNet from the Keras
cache, a file, or seeded random), the GPU memory policy, and the compiled forward pass that
embedding and queries share."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.errors import ImageSearchError, param
from tasks.fingerprints import file_digest

DIM = 2048
# The network is built for any square input size; the size is a property of the features.
INPUT_SHAPE = (None, None, 3)
PREPROCESSING = "keras.applications.resnet50.preprocess_input (caffe: RGB->BGR, ImageNet mean)"
MIN_INPUT_SIZE = 32  # ResNet50 halves the image five times
WEIGHTS_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/" + WEIGHTS_FILE


def keras_weights_path() -> Path:
    """Where Keras looks for the ResNet50 notop ImageNet weights ($KERAS_HOME or ~/.keras)."""
    home = os.environ.get("KERAS_HOME") or str(Path("~/.keras").expanduser())
    return Path(home) / "models" / WEIGHTS_FILE


VERBOSE_SETTING = "IMAGE_SEARCH_VERBOSE"
# What TensorFlow, absl and CUDA print from C++ while TensorFlow loads on a machine without a
# GPU: glog-style lines ("I0000 00:00:... cudart_stub.cc ...", "E0000 ... cuInit"), absl's
# notice about its log, and the CPU-instructions advice that follows one of them.
_CHATTER = re.compile(
    rb"^(?:[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ |WARNING: All log messages before absl"
    rb"|To enable the following instructions:|.*(?:cuda|cuInit|oneDNN|TensorRT))",
    re.IGNORECASE,
)


def verbose() -> bool:
    """Whether the user asked to see TensorFlow's own start-up lines (``--verbose``)."""
    return os.environ.get(VERBOSE_SETTING, "").strip().lower() in ("1", "true", "yes")


@contextlib.contextmanager
def _without_native_chatter() -> Iterator[None]:
    """Catch what native code writes to file descriptor 2 meanwhile and pass on every line that
    is not TensorFlow's start-up chatter (Python's own writes included, in their order)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().splitlines(True) if not _CHATTER.match(line)]
            if kept:
                os.write(2, b"".join(kept))


def import_tensorflow() -> Any:
    """TensorFlow and Keras, imported once; without their C++ start-up lines (CUDA stubs,
    cuInit, oneDNN, absl) unless :func:`verbose`, since they begin before Python logging."""
    if "tensorflow" in sys.modules and "keras" in sys.modules:
        return sys.modules["tensorflow"]
    if verbose():
        import keras
        import tensorflow as tf

        return tf
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _without_native_chatter():
        import keras  # noqa: F401
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")  # CUDA's probe (cuInit) prints here, once
    return tf


def configure_gpu_memory(fraction: float | None) -> str:
    """Apply the GPU memory policy before TensorFlow allocates anything; describe what was done.

    ``None``: memory growth, so TensorFlow takes only what it uses. A fraction caps TensorFlow at
    that share of each GPU, leaving the rest to cuML on the same device.
    """
    tf = import_tensorflow()
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "no GPU visible to TensorFlow: running on the CPU"
    try:
        for gpu in gpus:
            if fraction is None:
                tf.config.experimental.set_memory_growth(gpu, True)
            else:
                limit_mb = int(_gpu_total_mb() * fraction)
                tf.config.set_logical_device_configuration(
                    gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=limit_mb)]
                )
    except RuntimeError as exc:  # TensorFlow already initialised the devices in this process
        return f"GPU memory policy not applied ({exc}); TensorFlow was already initialised"
    if fraction is None:
        return f"{len(gpus)} GPU(s), memory growth on"
    return f"{len(gpus)} GPU(s), TensorFlow capped at {fraction:.0%} of GPU memory"


def _gpu_total_mb() -> int:
    """Total memory of GPU 0 in MiB, from nvidia-smi."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        return int(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        raise ImageSearchError(
            f"gpu_memory_fraction needs the GPU's total memory, but nvidia-smi failed ({exc}); "
            f"leave gpu_memory_fraction empty to use memory growth instead."
        ) from exc


@dataclass(frozen=True)
class ModelInfo:
    """What produced the features; stored in every feature file's metadata."""

    weights: str
    weights_detail: str
    seed: int
    precision: str = "float32"

    def metadata(self, input_size: int) -> dict[str, Any]:
        tf = import_tensorflow()
        import keras

        from tasks.sources.images import RESIZE_RULE

        return {
            "model": "keras.applications.ResNet50",
            "include_top": False,
            "pooling": "max",
            "input_size": input_size,
            "input_shape": [input_size, input_size, 3],
            "resize": RESIZE_RULE,
            "preprocessing": PREPROCESSING,
            "weights": self.weights,
            "weights_detail": self.weights_detail,
            "random_init": self.weights == "none",
            "seed": self.seed,
            "precision": self.precision,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "dim": DIM,
        }


def weights_path(weights: str) -> Path | None:
    """The file that ``weights`` names (None for random weights); a clear error when missing."""
    if weights == "none":
        return None
    if weights == "imagenet":
        cached = keras_weights_path()
        if not cached.is_file():
            raise ImageSearchError(
                f"ImageNet weights for ResNet50 are not in the Keras cache and cannot be "
                f"downloaded here. Fetch {WEIGHTS_URL} and put it at {cached} (or pass its path "
                f"as {param('weights')}); use {param('weights')} none for random weights."
            )
        return cached
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ImageSearchError(
            f"{param('weights')} = {weights!r}: no such file. Use 'imagenet', 'none', or the path "
            f"of a ResNet50 notop weights file ({WEIGHTS_FILE})."
        )
    return path


def weights_identity(weights: str) -> str:
    """What determines the features of ``weights``, for cache keys: 'none', or the SHA-256 of
    the weights file's content (replacing the file in the Keras cache changes the key)."""
    path = weights_path(weights)
    return "none" if path is None else f"sha256:{file_digest(path)}"


PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16"}


# Within :func:`reuse_models`, the models built so far, by what decides them: a run that
# embeds and then exports its model builds it once.
_BUILT: dict[tuple[str, str, int, str], tuple[Any, ModelInfo]] = {}
_REUSING = [0]


@contextlib.contextmanager
def reuse_models() -> Iterator[None]:
    """Within this block (one run), :func:`build_model` gives the same model object for the same
    weights (by content), seed and precision; after it, the models are let go."""
    _REUSING[0] += 1
    try:
        yield
    finally:
        _REUSING[0] -= 1
        if not _REUSING[0]:
            _BUILT.clear()


def build_model(weights: str, seed: int = 0, precision: str = "float32") -> tuple[Any, ModelInfo]:
    """Keras ResNet50 without its classifier, global max pooling: (N, S, S, 3) -> (N, 2048).

    ``precision="bfloat16"`` computes in bfloat16 with float32 weights (Keras' mixed policy):
    faster on CPUs with AVX-512 BF16 and on recent GPUs, slightly different features. The same
    weights (by content), seed and precision give the same model object within
    :func:`reuse_models`.
    """
    if precision not in PRECISIONS:
        raise ImageSearchError(f"precision = {precision!r}; choose from {', '.join(PRECISIONS)}.")
    key = (weights, weights_identity(weights), seed, precision) if _REUSING[0] else None
    if key is not None and key in _BUILT:
        return _BUILT[key]
    import_tensorflow()
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(PRECISIONS[precision])
    try:
        model, info = _build(weights, seed)
    finally:
        keras.config.set_dtype_policy(previous)
    built = model, ModelInfo(info.weights, info.weights_detail, seed, precision)
    if key is not None:
        _BUILT[key] = built
    return built


def _build(weights: str, seed: int) -> tuple[Any, ModelInfo]:
    import keras

    kwargs: dict[str, Any] = {"include_top": False, "pooling": "max", "input_shape": INPUT_SHAPE}
    path = weights_path(weights)
    model = keras.applications.ResNet50(weights=None, **kwargs)
    if path is None:
        _seeded_kernels(model, seed)
        detail = "random initialisation (seeded Glorot-uniform): features are NOT meaningful"
        return model, ModelInfo("none", detail, seed)
    try:
        # Keras only *warns* when parts of a file match no layer and keeps random weights
        # there; a partial load would silently give meaningless features, so it is an error.
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            model.load_weights(str(path))
    except (ValueError, OSError, KeyError, UserWarning) as exc:
        raise ImageSearchError(
            f"weights file {path} does not fit ResNet50 without its top ({exc}); it must be "
            f"{WEIGHTS_FILE} or weights saved from the same architecture."
        ) from exc
    label = "imagenet" if weights == "imagenet" else str(path)
    return model, ModelInfo(label, f"loaded from {path}", seed)


def _seeded_kernels(model: Any, seed: int) -> None:
    """Give every kernel Glorot-uniform values (Keras' default) from NumPy seeded with ``seed``.

    Keras' own initialisers draw from process-global state, so two models built in one
    process differed; this makes random weights a pure function of the seed. Biases and batch
    normalisation keep their constant initial values. (He-normal kernels, without trained
    batch statistics, grew the features to distances of 10^4, where float32 search libraries
    drift by whole units.)
    """
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        if variable.path.endswith("kernel"):
            shape = tuple(variable.shape)
            receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
            fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            variable.assign(rng.uniform(-limit, limit, shape).astype(np.float32))


def make_forward(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A compiled forward pass: uint8 (B, S, S, 3) -> float32 (B, 2048), preprocessing inside.

    A ``tf.function`` call is markedly faster than ``model.predict`` for streamed batches.
    """
    import keras
    import tensorflow as tf

    @tf.function(
        input_signature=[tf.TensorSpec(shape=(None, *INPUT_SHAPE), dtype=tf.uint8)],
        reduce_retracing=True,
    )
    def forward(batch: tf.Tensor) -> tf.Tensor:
        x = keras.applications.resnet50.preprocess_input(tf.cast(batch, tf.float32))
        return tf.cast(model(x, training=False), tf.float32)

    def call(batch: np.ndarray) -> np.ndarray:
        return np.asarray(forward(tf.constant(batch)), dtype=np.float32)

    return call
