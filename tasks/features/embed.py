"""The embed stage: stream batches of images from the memory map through the compiled forward
pass into part files, merge them into ``features/index.parquet`` and ``features/query.parquet``.
Memory stays flat however many images there are."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

from tasks.features import store
from tasks.features.model import (
    DIM,
    build_model,
    configure_gpu_memory,
    make_forward,
    weights_identity,
)
from tasks.report import artifact_key
from tasks.sources.stl10 import read_all_images, release_pages
from tasks.split import SplitRef, read_split
from tasks.storage import DataRef, RunFolder

log = logging.getLogger(__name__)

FEATURES_DIR = "features"
OUTPUTS = {"index": f"{FEATURES_DIR}/index.parquet", "query": f"{FEATURES_DIR}/query.parquet"}


@dataclass(frozen=True)
class Features:
    """References to both feature files and what produced them."""

    index: DataRef
    query: DataRef
    model: dict[str, Any]
    device: str


def read_batch(images: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Gather ``images[ids]`` from the memory map as one contiguous (B, 96, 96, 3) uint8 batch.

    Fancy indexing touches only the requested images; ``np.take`` on the transposed map would
    first copy the whole file into memory.
    """
    return np.ascontiguousarray(images[ids])


def _batches(ids: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


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
    rows_per_part = store.ROWS_PER_PART
    parts = store.parts_dir(dest, key)
    store.drop_stale_parts(dest, parts)
    parts.mkdir(parents=True, exist_ok=True)
    n_parts = -(-len(ids) // rows_per_part)
    todo = [p for p in range(n_parts) if not store.part_path(parts, p).exists()]
    done_rows = sum(
        min(rows_per_part, len(ids) - p * rows_per_part) for p in range(n_parts) if p not in todo
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
            part_ids = ids[p * rows_per_part : (p + 1) * rows_per_part]
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
            store.write_part(store.table(part_ids, out), store.part_path(parts, p))
            # Pages read from the map count as this process's memory until released; drop
            # them per part so resident memory stays flat however large the file is.
            release_pages(images)
    store.merge_parts(parts, n_parts, dest, {**metadata, "key": key, "rows": len(ids)})
    shutil.rmtree(parts, ignore_errors=True)
    return dest


def extract_features(
    dataset: DataRef,
    split: SplitRef,
    run: RunFolder,
    *,
    weights: str,
    batch_size: int,
    seed: int = 0,
    precision: str = "float32",
    gpu_memory_fraction: float | None = None,
    progress: bool = True,
) -> Features:
    """``features/index.parquet`` and ``features/query.parquet`` of ``split``, unless a run
    already made them from the same images, split, weights (by content), seed and precision."""
    stage = run.stage(
        "embed",
        [dataset.fingerprint, split.fingerprint, weights_identity(weights), seed, precision],
        list(OUTPUTS.values()),
        code=["tasks.features"],
    )
    device = "cached"
    if stage.done() is None:
        for rel in OUTPUTS.values():
            store.refuse_foreign(run.out / rel)
        index_ids, query_ids = read_split(split.path)
        ids = {"index": index_ids, "query": query_ids}
        started = time.perf_counter()
        device = configure_gpu_memory(gpu_memory_fraction)
        model, info = build_model(weights, seed, precision)
        forward = make_forward(model)
        images = read_all_images(dataset.uri, dataset.rows)
        metadata = {**info.metadata(), "source_fingerprint": dataset.fingerprint}
        for name, rel in OUTPUTS.items():
            embed_split(
                images,
                ids[name],
                forward,
                stage.path(rel),
                stage.key,
                {**metadata, "split": name},
                batch_size,
                progress,
            )
        seconds = time.perf_counter() - started
        n = len(index_ids) + len(query_ids)
        log.info("embedded %d images in %.1f s (%.1f images/s)", n, seconds, n / seconds)
        stage.finish(seconds=seconds, images=n, batch_size=batch_size)
    digest = stage.digest()
    paths = {name: stage.path(rel) for name, rel in OUTPUTS.items()}
    rows = {"index": split.n_index, "query": split.n_query}
    refs = {
        name: DataRef(uri=str(paths[name]), rows=rows[name], fingerprint=f"{digest}-{name}")
        for name in OUTPUTS
    }
    return Features(
        index=refs["index"],
        query=refs["query"],
        model=store.read_metadata(paths["index"]),
        device=device,
    )


@task(cache_policy=NO_CACHE)
def embed(
    dataset: DataRef,
    split: SplitRef,
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
        RunFolder(Path(out)),
        weights=weights,
        batch_size=batch_size,
        seed=seed,
        precision=precision,
        gpu_memory_fraction=gpu_memory_fraction,
    )
    rows = [
        {"file": Path(ref.uri).name, "rows": ref.rows, "bytes": Path(ref.uri).stat().st_size}
        for ref in (features.index, features.query)
    ]
    create_table_artifact(
        key=artifact_key("features"),
        table=rows,
        description=f"ResNet50 features ({features.model['weights']} weights), {DIM}-d",
    )
    return features
