"""ResNet50 features: stream batches from the memory map through a compiled forward pass and
write them to Parquet in row groups (``image_id`` int64, ``embedding`` fixed_size_list<float32>).

Each split is written as numbered part files that appear atomically as batches complete, so an
interrupted run resumes at the first missing part; the parts are then merged row group by row
group into ``features/<split>.parquet``. Memory stays flat however many images there are.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

from tasks.common import (
    DataRef,
    ImageSearchError,
    atomic_path,
    fingerprint,
    mark_stage_done,
    quick_file_fingerprint,
)
from tasks.decode import read_all_images, release_pages
from tasks.split import read_split

log = logging.getLogger(__name__)

FEATURES_DIR = "features"
DIM = 2048
INPUT_SHAPE = (96, 96, 3)
META_KEY = b"image_search"
PREPROCESSING = "keras.applications.resnet50.preprocess_input (caffe: RGB->BGR, ImageNet mean)"
WEIGHTS_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/" + WEIGHTS_FILE
ROWS_PER_PART = 4096  # one row group: 4096 × 2048 × 4 B = 32 MiB

SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("embedding", pa.list_(pa.float32(), DIM), nullable=False),
    ]
)


def keras_weights_path() -> Path:
    """Where Keras looks for the ResNet50 notop ImageNet weights ($KERAS_HOME or ~/.keras)."""
    home = os.environ.get("KERAS_HOME") or str(Path("~/.keras").expanduser())
    return Path(home) / "models" / WEIGHTS_FILE


def _quiet_tensorflow() -> None:
    """Keep TensorFlow's C++ start-up chatter out of the run log unless the user asked for it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def configure_gpu_memory(fraction: float | None) -> str:
    """Apply the GPU memory policy before TensorFlow allocates anything; describe what was done.

    ``None``: memory growth, so TensorFlow takes only what it uses. A fraction caps TensorFlow at
    that share of each GPU, leaving the rest to cuML on the same device.
    """
    _quiet_tensorflow()
    import tensorflow as tf

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

    def metadata(self) -> dict[str, Any]:
        import keras
        import tensorflow as tf

        return {
            "model": "keras.applications.ResNet50",
            "include_top": False,
            "pooling": "max",
            "input_shape": list(INPUT_SHAPE),
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


def weights_identity(weights: str) -> str:
    """A short identity of the weights for cache keys: the name, or a file fingerprint."""
    if weights in ("imagenet", "none"):
        return weights
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ImageSearchError(
            f"weights = {weights!r}: no such file. Use 'imagenet', 'none', or the path of a "
            f"ResNet50 notop weights file ({WEIGHTS_FILE})."
        )
    return f"file:{path.name}:{quick_file_fingerprint(path)}"


PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16"}


def build_model(weights: str, seed: int = 0, precision: str = "float32") -> tuple[Any, ModelInfo]:
    """Keras ResNet50 without its classifier, global max pooling: (N, 96, 96, 3) -> (N, 2048).

    ``precision="bfloat16"`` computes in bfloat16 with float32 weights (Keras' mixed policy):
    faster on CPUs with AVX-512 BF16 and on recent GPUs, slightly different features.
    """
    import keras

    if precision not in PRECISIONS:
        raise ImageSearchError(f"precision = {precision!r}; choose from {', '.join(PRECISIONS)}.")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(PRECISIONS[precision])
    try:
        model, info = _build(weights, seed)
    finally:
        keras.config.set_dtype_policy(previous)
    return model, ModelInfo(info.weights, info.weights_detail, seed, precision)


def _build(weights: str, seed: int) -> tuple[Any, ModelInfo]:
    import keras

    kwargs: dict[str, Any] = {"include_top": False, "pooling": "max", "input_shape": INPUT_SHAPE}
    if weights == "none":
        model = keras.applications.ResNet50(weights=None, **kwargs)
        _seeded_kernels(model, seed)
        detail = "random initialisation (seeded Glorot-uniform): features are NOT meaningful"
        return model, ModelInfo("none", detail, seed)
    if weights == "imagenet":
        cached = keras_weights_path()
        if not cached.is_file():
            raise ImageSearchError(
                f"ImageNet weights for ResNet50 are not in the Keras cache and cannot be "
                f"downloaded here. Fetch {WEIGHTS_URL} and put it at {cached} (or pass its path "
                f"as --weights); use --weights none for random weights."
            )
        path = cached
    else:
        path = Path(weights).expanduser()
        weights_identity(weights)  # clear error for a missing file
    model = keras.applications.ResNet50(weights=None, **kwargs)
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
    """A compiled forward pass: uint8 (B, 96, 96, 3) -> float32 (B, 2048), preprocessing inside.

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


def _parts_dir(out_dir: Path, split: str, key: str) -> Path:
    return out_dir / f".{split}.parts-{key}"


def features_key(
    dataset: DataRef, split: DataRef, weights: str, seed: int, precision: str = "float32"
) -> str:
    """Cache key of the feature files: data, split and model identity."""
    return fingerprint(
        "embed-v1",
        dataset.fingerprint,
        split.fingerprint,
        weights_identity(weights),
        seed,
        precision,
    )


def read_metadata(path: Path) -> dict[str, Any]:
    """The image-search metadata stored in a feature file's schema."""
    meta = pq.read_schema(path).metadata or {}
    try:
        return dict(json.loads(meta[META_KEY]))
    except (KeyError, ValueError) as exc:
        raise ImageSearchError(
            f"{path} carries no image-search metadata; it was not written by this pipeline."
        ) from exc


def _refuse_foreign(path: Path) -> None:
    """Refuse to replace a file at ``path`` that this pipeline did not write.

    Our own features from other inputs are a stale cache entry and get replaced; anything
    else (another model's or tool's Parquet) is the user's data.
    """
    if not path.exists():
        return
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        meta = {}
    if META_KEY not in meta:
        raise ImageSearchError(
            f"{path} exists but was not written by image-search (no image_search metadata); "
            f"move it away or choose another --out."
        )


def feature_file_matches(path: Path, key: str, rows: int) -> bool:
    """True when ``path`` holds our features for ``key`` with the expected shape and rows."""
    try:
        schema = pq.read_schema(path)
        meta = read_metadata(path)
        n = pq.ParquetFile(path).metadata.num_rows
    except (OSError, ImageSearchError, pa.ArrowInvalid):
        return False
    return schema.equals(SCHEMA, check_metadata=False) and meta.get("key") == key and n == rows


def read_batch(images: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Gather ``images[ids]`` from the memory map as one contiguous (B, 96, 96, 3) uint8 batch.

    Fancy indexing touches only the requested images; ``np.take`` on the transposed map would
    first copy the whole file into memory.
    """
    return np.ascontiguousarray(images[ids])


def _batches(ids: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def _table(ids: np.ndarray, emb: np.ndarray) -> pa.Table:
    values = pa.array(np.ascontiguousarray(emb, dtype=np.float32).reshape(-1))
    return pa.Table.from_arrays(
        [pa.array(ids, type=pa.int64()), pa.FixedSizeListArray.from_arrays(values, DIM)],
        schema=SCHEMA,
    )


def _write_parquet(table: pa.Table, path: Path, metadata: dict[str, Any] | None = None) -> None:
    if metadata is not None:
        table = table.replace_schema_metadata({META_KEY: json.dumps(metadata).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(
            table,
            tmp,
            compression={"image_id": "zstd", "embedding": "none"},
            use_dictionary=False,
            write_statistics=["image_id"],
            row_group_size=ROWS_PER_PART,
        )


def embed_split(
    images: np.ndarray,
    ids: np.ndarray,
    forward: Callable[[np.ndarray], np.ndarray],
    dest: Path,
    key: str,
    metadata: dict[str, Any],
    batch_size: int,
    progress: bool = True,
) -> Path:
    """Embed ``images[ids]`` into ``dest`` (resuming from finished parts), then merge the parts.

    images: (N, 96, 96, 3) uint8 memory map; ids: (n,) int64 sorted image ids.
    """
    parts = _parts_dir(dest.parent, dest.stem, key)
    for stale in dest.parent.glob(f".{dest.stem}.parts-*"):
        if stale != parts:  # parts of another model or split are never resumed
            shutil.rmtree(stale, ignore_errors=True)
    parts.mkdir(parents=True, exist_ok=True)
    n_parts = -(-len(ids) // ROWS_PER_PART)
    todo = [p for p in range(n_parts) if not (parts / f"part-{p:05d}.parquet").exists()]
    done_rows = sum(
        min(ROWS_PER_PART, len(ids) - p * ROWS_PER_PART) for p in range(n_parts) if p not in todo
    )
    bar = tqdm(
        total=len(ids),
        initial=done_rows,
        unit="img",
        desc=f"embed {dest.stem}",
        disable=not progress,
    )
    with bar, ThreadPoolExecutor(max_workers=1) as reader:
        for p in todo:
            part_ids = ids[p * ROWS_PER_PART : (p + 1) * ROWS_PER_PART]
            chunks = list(_batches(part_ids, batch_size))
            out = np.empty((len(part_ids), DIM), dtype=np.float32)
            # Read the next batch from the memory map while the current one runs forward.
            pending = reader.submit(read_batch, images, chunks[0])
            row = 0
            for i, chunk in enumerate(chunks):
                batch = pending.result()
                if i + 1 < len(chunks):
                    pending = reader.submit(read_batch, images, chunks[i + 1])
                out[row : row + len(chunk)] = forward(batch)
                row += len(chunk)
                bar.update(len(chunk))
            _write_parquet(_table(part_ids, out), parts / f"part-{p:05d}.parquet")
            # Pages read from the map count as this process's memory until released; drop
            # them per part so resident memory stays flat however large the file is.
            release_pages(images)
    merged = {**metadata, "key": key, "rows": len(ids)}
    _merge_parts(parts, n_parts, dest, merged)
    shutil.rmtree(parts, ignore_errors=True)
    return dest


def _merge_parts(parts: Path, n_parts: int, dest: Path, metadata: dict[str, Any]) -> None:
    """Concatenate the part files into ``dest`` row group by row group, atomically."""
    schema = SCHEMA.with_metadata({META_KEY: json.dumps(metadata).encode()})
    with (
        atomic_path(dest) as tmp,
        pq.ParquetWriter(
            tmp,
            schema,
            compression={"image_id": "zstd", "embedding": "none"},
            use_dictionary=False,
            write_statistics=["image_id"],
        ) as writer,
    ):
        for p in range(n_parts):
            table = pq.read_table(parts / f"part-{p:05d}.parquet")
            writer.write_table(table.replace_schema_metadata(schema.metadata))


def load_features(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """Read a feature file: (ids (n,) int64, embeddings (n, d) float32).

    Row group by row group into one preallocated array, so the peak is the array plus one row
    group; reading the whole table first and then concatenating it held the data twice.
    """
    source = pq.ParquetFile(path)
    n = source.metadata.num_rows
    field = source.schema_arrow.field("embedding")
    dim = field.type.list_size
    ids = np.empty(n, dtype=np.int64)
    emb = np.empty((n, dim), dtype=np.float32)
    row = 0
    for group in range(source.num_row_groups):
        table = source.read_row_group(group, columns=["image_id", "embedding"])
        m = table.num_rows
        ids[row : row + m] = table.column("image_id").to_numpy()
        for chunk in table.column("embedding").chunks:
            values = chunk.flatten().to_numpy(zero_copy_only=False)
            emb[row : row + len(chunk)] = values.reshape(-1, dim)
            row += len(chunk)
    return ids, emb


@dataclass(frozen=True)
class Features:
    """References to both feature files and what produced them."""

    index: DataRef
    query: DataRef
    model: dict[str, Any]
    device: str


def extract_features(
    dataset: DataRef,
    split: DataRef,
    out: Path,
    *,
    weights: str,
    batch_size: int,
    seed: int = 0,
    precision: str = "float32",
    gpu_memory_fraction: float | None = None,
    progress: bool = True,
) -> Features:
    """Write ``features/index.parquet`` and ``features/query.parquet`` unless already there."""
    key = features_key(dataset, split, weights, seed, precision)
    index_ids, query_ids = read_split(split.path)
    folder = out / FEATURES_DIR
    paths = {"index": folder / "index.parquet", "query": folder / "query.parquet"}
    ids = {"index": index_ids, "query": query_ids}
    todo = [s for s in paths if not feature_file_matches(paths[s], key, len(ids[s]))]
    for s in todo:
        _refuse_foreign(paths[s])
    device = "cached"
    if todo:
        started = time.perf_counter()
        device = configure_gpu_memory(gpu_memory_fraction)
        model, info = build_model(weights, seed, precision)
        forward = make_forward(model)
        images = read_all_images(dataset.uri, dataset.rows)
        metadata = {**info.metadata(), "source_fingerprint": dataset.fingerprint}
        for s in todo:
            embed_split(
                images,
                ids[s],
                forward,
                paths[s],
                key,
                {**metadata, "split": s},
                batch_size,
                progress,
            )
        seconds = time.perf_counter() - started
        n = sum(len(ids[s]) for s in todo)
        log.info("embedded %d images in %.1f s (%.1f images/s)", n, seconds, n / seconds)
        mark_stage_done(out, "embed", key, seconds=seconds, images=n, batch_size=batch_size)
    model_meta = read_metadata(paths["index"])
    refs = {
        s: DataRef(uri=str(paths[s]), rows=len(ids[s]), fingerprint=f"{key}-{s}") for s in paths
    }
    return Features(index=refs["index"], query=refs["query"], model=model_meta, device=device)


@task(cache_policy=NO_CACHE)
def embed(
    dataset: DataRef,
    split: DataRef,
    out: str,
    weights: str,
    batch_size: int,
    seed: int,
    precision: str,
    gpu_memory_fraction: float | None,
) -> Features:
    """Prefect task: ResNet50 features of both splits, listed as an artifact."""
    features = extract_features(
        dataset,
        split,
        Path(out),
        weights=weights,
        batch_size=batch_size,
        seed=seed,
        precision=precision,
        gpu_memory_fraction=gpu_memory_fraction,
    )
    rows = [
        {"file": ref.uri, "rows": ref.rows, "bytes": Path(ref.uri).stat().st_size}
        for ref in (features.index, features.query)
    ]
    create_table_artifact(
        key="features",
        table=rows,
        description=f"ResNet50 features ({features.model['weights']} weights), {DIM}-d",
    )
    return features
