"""Asking a large index: ``python -m benchmarks.million [--quick] [--sizes N,...] [--out DIR]``
(also the ``million`` case of ``python -m benchmarks.run``, 100,000 images there).

Per size, in a scratch folder (``--scratch``, default the system's temporary folder; removed at
the end): synthetic ResNet-like features (:class:`ResnetLike`: clustered, non-negative, a
low-dimensional spread within each cluster, 1 % exact duplicates) written as an index folder
the way a run's embed stage leaves it (the Parquet file of record, its stage record, a catalog
of 16 generated images); then, each in a fresh process:

- **build**: the stages a run adds after embedding (the float32 copy, the int8 copy, the
  approximate index with its recall measured, the exported model), wall time per stage and
  peak RSS (VmHWM; the exported model is built by TensorFlow and timed apart);
- **search**: the index opened by the query core (RSS after loading), then held-out queries
  one at a time, methods interleaved per query: exact certified (int8 copy), approximate
  (IVF-PQ + exact re-rank), the float32 exact scan, FAISS ``IndexFlatL2`` (exact, float32;
  ``faiss.knn`` over the memory map where the matrix would not fit the memory budget) and the
  same IVF-PQ searched by FAISS alone; p50/p90 per method, identity of the exact answers with
  a float64 brute force, recall@10 of the approximate ones on the held-out queries;
- **service**: ``image-search serve`` on the folder, RSS after loading, p50 of single 96-px
  requests in the approximate tier and with ``exact=true``.

Writes ``million.json`` and ``million.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DIM = 2048
ROWS_PER_CLUSTER = 500
RANK = 8  # directions of spread within a cluster


class ResnetLike:
    """Synthetic features shaped like ResNet50's pooled activations: ``clusters`` gamma(0.5)
    centres (non-negative, sparse-ish, mean 0.5 per dimension), each with ``RANK`` random
    directions of spread (std 0.15 each) and a little isotropic noise (0.05), clipped at zero
    as a ReLU would; cluster sizes log-normal. Within each cluster's rows 1 % are exact copies
    of others. Deterministic for a seed."""

    def __init__(self, clusters: int, dim: int = DIM, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.dim = dim
        self.centres = rng.gamma(0.5, 1.0, (clusters, dim)).astype(np.float32)
        self.axes = (0.15 * rng.standard_normal((clusters, RANK, dim))).astype(np.float32)
        weights = rng.lognormal(0.0, 0.7, clusters)
        self.weights = weights / weights.sum()
        self.seed = seed

    @classmethod
    def sized(cls, n: int, dim: int = DIM, seed: int = 0) -> ResnetLike:
        return cls(max(4, n // ROWS_PER_CLUSTER), dim, seed)

    def draw(self, cluster: int, m: int, rng: np.random.Generator) -> np.ndarray:
        """``m`` new rows (m, dim) float32 of ``cluster``."""
        x = (
            self.centres[cluster]
            + rng.standard_normal((m, RANK), dtype=np.float32) @ (self.axes[cluster])
        )
        x += np.float32(0.05) * rng.standard_normal((m, self.dim), dtype=np.float32)
        return np.maximum(x, 0, out=x)

    def index(self, n: int) -> Iterator[np.ndarray]:
        """The ``n`` index rows, cluster by cluster, in blocks of at most 8,192 rows."""
        rng = np.random.default_rng(self.seed + 1)
        counts = rng.multinomial(n, self.weights)
        for c, count in enumerate(counts):
            for s in range(0, int(count), 8192):
                block = self.draw(c, min(8192, int(count) - s), rng)
                copies = len(block) // 100
                if copies:
                    pick = rng.choice(len(block), 2 * copies, replace=False)
                    block[pick[:copies]] = block[pick[copies:]]
                yield block

    def queries(self, m: int) -> np.ndarray:
        """``m`` held-out rows (m, dim): new draws from the same clusters, none in the index."""
        rng = np.random.default_rng(self.seed + 2)
        clusters = rng.choice(len(self.weights), m, p=self.weights)
        return np.concatenate([self.draw(int(c), 1, rng) for c in clusters])


def write_index(folder: Path, n: int, data: ResnetLike, input_size: int = 96) -> Path:
    """``folder`` as a run's embed stage leaves it: the Parquet file of record of ``n`` rows of
    ``data`` (model: random weights at ``input_size``) with its stage record, a catalog whose
    rows point at 16 generated images (written in place, as a folder assembled by hand), and
    nothing derived yet. Returns ``folder``."""
    import pyarrow as pa
    from PIL import Image

    from tasks.catalog import CATALOG_SCHEMA, write_catalog
    from tasks.features import store
    from tasks.features.model import ModelInfo
    from tasks.layout import CATALOG_FILE, EMBED, INDEX_FEATURES, QUERY_FEATURES
    from tasks.storage import RunFolder
    from tasks.types import ModelSpec

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    files, digests = [], []
    rng = np.random.default_rng(0)
    for i in range(16):
        path = images / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(path)
        files.append(str(path))
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    key = ModelSpec("none", 0, "float32", input_size).key()
    meta = {
        **ModelInfo("none", "random initialisation", 0).metadata(input_size),
        "model_key": key,
        "input_size": input_size,
    }

    def tables(blocks: Iterator[np.ndarray]) -> Iterator[Any]:
        start, pending = 0, np.empty((0, data.dim), np.float32)
        for block in blocks:
            pending = np.concatenate([pending, block])
            while len(pending) >= store.ROWS_PER_PART:
                part, pending = pending[: store.ROWS_PER_PART], pending[store.ROWS_PER_PART :]
                yield store.table(np.arange(start, start + len(part), dtype=np.int64), part)
                start += len(part)
        if len(pending):
            yield store.table(np.arange(start, start + len(pending), dtype=np.int64), pending)

    run = RunFolder(folder)
    embed = run.stage(EMBED, ["synthetic", n, data.seed, input_size, key], code=[])
    store.write_tables(
        tables(data.index(n)), embed.path(INDEX_FEATURES), {**meta, "split": "index", "rows": n}
    )
    store.write_tables(
        tables(iter([data.queries(1)])),
        embed.path(QUERY_FEATURES),
        {**meta, "split": "query", "rows": 1},
    )
    embed.finish(images=n)
    columns: dict[str, Any] = {
        "image_id": np.arange(n, dtype=np.int64),
        "uri": pa.array([files[i % 16] for i in range(n)]),
        "sha256": pa.array([digests[i % 16] for i in range(n)]),
        "width": np.full(n, 96, dtype=np.int32),
        "height": np.full(n, 96, dtype=np.int32),
        "version": pa.array(["synthetic"] * n),
    }
    for name in CATALOG_SCHEMA.names:
        columns.setdefault(name, pa.nulls(n, CATALOG_SCHEMA.field(name).type))
    write_catalog(
        folder / CATALOG_FILE,
        pa.Table.from_pydict(columns, schema=CATALOG_SCHEMA),
        {
            "collection": {"kind": "folder", "source": str(images), "limit": None},
            "next_id": n,
            "model_key": key,
            "input_size": input_size,
        },
    )
    run.commit([EMBED.name])
    return folder


def features_of(folder: Path) -> Any:
    """The :class:`tasks.types.Features` reference a run's embed stage hands on."""
    from tasks.features import store
    from tasks.layout import INDEX_FEATURES
    from tasks.types import DataRef, Features

    path = folder / INDEX_FEATURES
    meta = store.read_metadata(path)
    ref = DataRef(uri=str(path), rows=int(meta["rows"]), fingerprint="synthetic")
    return Features(index=ref, query=ref, model=meta, device="cpu")


def build(
    folder: str, ann: str = "on", model: bool = True, progress: bool = False
) -> dict[str, Any]:
    """The stages a run adds after embedding, each timed, then committed; peak RSS of the
    index stages before the model is exported (TensorFlow's own memory is not the index's)."""
    from tasks.features import serving
    from tasks.layout import run_stages
    from tasks.storage import RunFolder
    from tasks.types import ModelSpec

    out = Path(folder)
    run = RunFolder(out)
    features = features_of(out)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    serving.index_copy(features, run)
    seconds["index_copy"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    serving.index_compact(features, run, progress=progress)
    seconds["index_compact"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    info = serving.ann_index(features, run, ann, progress=progress)  # type: ignore[arg-type]
    seconds["ann"] = time.perf_counter() - t2
    seconds["index_stages"] = time.perf_counter() - t0
    peak = peak_rss_mib()
    if model:
        t3 = time.perf_counter()
        key = str(features.model["model_key"])
        serving.query_model(ModelSpec("none", 0, "float32", 96), run, key)
        seconds["query_model"] = time.perf_counter() - t3
    run.commit(run_stages([]))
    return {
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "index_stages_peak_rss_mib": peak,
        "ann": info,
    }


def peak_rss_mib(pid: int | str = "self") -> float:
    """VmHWM of a process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def rss_mib(pid: int | str = "self") -> float:
    """VmRSS of a process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


if __name__ == "__main__":  # pragma: no cover - run by hand
    parser = argparse.ArgumentParser(prog="python -m benchmarks.million", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    sys.exit(0 if parser.parse_args() else 1)
    _ = (json, os, statistics, subprocess, tempfile)
