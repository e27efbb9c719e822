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
import json
import os
import statistics
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
    of others. Deterministic for a seed.

    ``anchors`` (m, dim): the last m clusters are centred on these instead (the embeddings of
    the images a service benchmark sends), their spread scaled by the anchor's mean value, so
    that those queries have neighbours in the index as a photo has in a real library."""

    def __init__(
        self, clusters: int, dim: int = DIM, seed: int = 0, anchors: np.ndarray | None = None
    ) -> None:
        rng = np.random.default_rng(seed)
        self.dim = dim
        self.centres = rng.gamma(0.5, 1.0, (clusters, dim)).astype(np.float32)
        self.axes = (0.15 * rng.standard_normal((clusters, RANK, dim))).astype(np.float32)
        self.spread = np.ones(clusters, dtype=np.float32)
        if anchors is not None and len(anchors):
            m = len(anchors)
            self.centres[-m:] = anchors
            self.spread[-m:] = np.maximum(anchors.mean(axis=1), 1e-3) / 0.5
        weights = rng.lognormal(0.0, 0.7, clusters)
        self.weights = weights / weights.sum()
        self.seed = seed

    @classmethod
    def sized(
        cls, n: int, dim: int = DIM, seed: int = 0, anchors: np.ndarray | None = None
    ) -> ResnetLike:
        return cls(max(4, n // ROWS_PER_CLUSTER), dim, seed, anchors)

    def draw(self, cluster: int, m: int, rng: np.random.Generator) -> np.ndarray:
        """``m`` new rows (m, dim) float32 of ``cluster``."""
        x = rng.standard_normal((m, RANK), dtype=np.float32) @ self.axes[cluster]
        x += np.float32(0.05) * rng.standard_normal((m, self.dim), dtype=np.float32)
        x *= self.spread[cluster]
        x += self.centres[cluster]
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

    from benchmarks.startup import catalog_images
    from tasks.catalog import CATALOG_SCHEMA, write_catalog
    from tasks.features import store
    from tasks.features.model import ModelInfo
    from tasks.layout import CATALOG_FILE, EMBED, INDEX_FEATURES, QUERY_FEATURES
    from tasks.storage import RunFolder
    from tasks.types import ModelSpec

    images = folder / "images"
    files, digests = catalog_images(images, np.random.default_rng(0))
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


def _brute_force(rows: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest (float64 distances, positions), block by block of the float32 file."""
    from tasks.search.ann import exact_neighbours

    return exact_neighbours(rows, queries, k)


def _recall(truth_d: np.ndarray, dists: list[np.ndarray]) -> float:
    """Mean share of answered rows at most the exact k-th distance (ties are not misses)."""
    shares = [np.count_nonzero(d <= t[-1]) / len(t) for d, t in zip(dists, truth_d, strict=True)]
    return float(np.mean(shares))


def search(folder: str, n_queries: int, costly: int, k: int = 10) -> dict[str, Any]:
    """Open the index with the query core, then ask ``n_queries`` held-out queries one at a
    time, methods interleaved per query (the two float32 scans on the first ``costly`` only)."""
    import faiss

    from tasks.ask import open_index
    from tasks.ask import search as ask_search
    from tasks.ask.files import MatrixFile
    from tasks.layout import INDEX_MATRIX
    from tasks.search.ann import exact_neighbours, threads
    from tasks.search.core import measure
    from tasks.search.exact import search_prepared

    rss_before = rss_mib()
    t0 = time.perf_counter()
    index = open_index(folder)
    load_s = time.perf_counter() - t0
    rss_loaded = rss_mib()
    n = len(index)
    assert index.certified is not None and index.approximate is not None
    anchors = _anchors(Path(folder).parent / f"anchors-{n}.npy")
    queries = ResnetLike.sized(n, anchors=anchors).queries(n_queries)
    data = index.prepared.data
    flat = None
    if n * DIM * 4 <= 2 * 2**30:  # FAISS's own copy fits the budget: IndexFlatL2 itself
        flat = faiss.IndexFlatL2(DIM)
        for s in range(0, n, 65536):
            flat.add(np.ascontiguousarray(data[s : s + 65536]))
    ivf = faiss.extract_index_ivf(index.approximate.index)
    ivf.nprobe = index.approximate.probe.nprobe

    rows = MatrixFile(Path(folder) / INDEX_MATRIX)
    mapped = n * DIM * 4 <= 2 * 2**30  # else the float32 scans read the file a block at a time

    def faiss_flat(q: np.ndarray) -> np.ndarray:
        if flat is not None:
            return np.asarray(flat.search(q, k)[1])
        best_d, best_p = np.full((1, 0), np.inf, np.float32), np.zeros((1, 0), np.int64)
        for s, block in rows.blocks(65536):  # IndexFlatL2's kernel, shard by shard, merged
            d, p = faiss.knn(q, block, k)
            best_d = np.concatenate([best_d, d], axis=1)
            best_p = np.concatenate([best_p, p + s], axis=1)
            order = np.argsort(best_d, axis=1, kind="stable")[:, :k]
            best_d = np.take_along_axis(best_d, order, axis=1)
            best_p = np.take_along_axis(best_p, order, axis=1)
        return best_p

    def float32_scan(q: np.ndarray) -> np.ndarray:
        if mapped:
            return np.asarray(search_prepared(index.prepared, q, k)[1])
        return exact_neighbours(rows, q, k)[1]

    def faiss_ivfpq(q: np.ndarray) -> np.ndarray:
        with threads(1):
            return np.asarray(index.approximate.index.search(q, k)[1])  # type: ignore[union-attr]

    methods: dict[str, Any] = {
        "exact certified (int8 copy)": lambda q: ask_search(index, q, k, exact=True),
        "approximate (IVF-PQ + exact re-rank)": lambda q: ask_search(index, q, k),
        "FAISS IVF-PQ alone (same index, no re-rank)": faiss_ivfpq,
        "exact float32 scan": float32_scan,
        "FAISS IndexFlatL2 (exact, float32)": faiss_flat,
    }
    times: dict[str, list[float]] = {m: [] for m in methods}
    answers: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    names = list(methods)
    for m in names:  # warm-up: engines, thread pools, first pages
        methods[m](queries[:1])
    for i in range(n_queries):
        order = names[i % len(names) :] + names[: i % len(names)]
        for m in order:
            if i >= costly and m in ("exact float32 scan", "FAISS IndexFlatL2 (exact, float32)"):
                continue
            q = queries[i : i + 1]
            t = time.perf_counter()
            out = methods[m](q)
            times[m].append(time.perf_counter() - t)
            if isinstance(out, list):  # the query core's answers
                pos = np.array([[nb.image_id for nb in out[0][0]]])
            elif isinstance(out, tuple):
                pos = np.asarray(out[1])
            else:
                pos = out
            answers[m].append(pos[0])
    rss_after = rss_mib()
    checked = min(n_queries, 50)
    truth_d, truth_p = _brute_force(rows, queries[:checked], k)
    result: dict[str, Any] = {}
    for m in names:
        got = answers[m][:checked]
        dists = [measure(data, queries[i : i + 1], got[i][None])[0] for i in range(len(got))]
        exact_rows = sum(np.array_equal(got[i], truth_p[i]) for i in range(len(got)))
        result[m] = {
            "queries": len(times[m]),
            "p50_ms": round(1e3 * statistics.median(times[m]), 2),
            "p90_ms": round(1e3 * float(np.percentile(times[m], 90)), 2),
            "checked": len(got),
            "identical_to_float64": int(exact_rows),
            "recall_at_10": round(_recall(truth_d[: len(got)], dists), 4),
        }
    ann = index.approximate
    return {
        "n": n,
        "load_s": round(load_s, 2),
        "rss_before_mib": rss_before,
        "rss_loaded_mib": rss_loaded,
        "rss_after_mib": rss_after,
        "methods": result,
        "stored_recall_at_10": ann.recall.value if ann.recall else None,
        "probe": {"nprobe": ann.probe.nprobe, "rerank": ann.probe.rerank},
        "factory": ann.design.factory,
        "certified": index.stats.as_dict(),
        "faiss_flat": "IndexFlatL2" if flat is not None else "faiss.knn per 65,536-row block",
        "float32_scan": "search_prepared, mapped" if mapped else "per 16,384-row block, read",
        "load_average": os.getloadavg(),
    }


def serve(folder: Path, requests: int) -> dict[str, Any]:
    """``image-search serve`` on ``folder``: RSS once loaded, p50 of single 96-px requests in
    the default (approximate) tier and with exact=true, interleaved."""
    import httpx

    from benchmarks.service import Served, encode

    served = Served(folder)
    try:
        loaded = rss_mib(served.proc.pid)
        images = [encode(96, s) for s in range(SERVICE_IMAGES)]
        laps: dict[str, list[float]] = {"approximate": [], "exact": []}
        server: dict[str, list[dict[str, float]]] = {"approximate": [], "exact": []}
        floor: list[float] = []
        with httpx.Client(base_url=served.url, trust_env=False, timeout=300) as client:
            for i in range(requests + 5):
                t = time.perf_counter()
                client.get("/healthz").raise_for_status()  # the HTTP round trip alone
                if i >= 5:
                    floor.append((time.perf_counter() - t) * 1e3)
                for tier in ("approximate", "exact") if i % 2 else ("exact", "approximate"):
                    exact = "&exact=true" if tier == "exact" else ""
                    t = time.perf_counter()
                    files = {"image": ("q.png", images[i % SERVICE_IMAGES])}
                    resp = client.post(f"/search?k=10{exact}", files=files)
                    dt = time.perf_counter() - t
                    resp.raise_for_status()
                    assert resp.json()["tier"] == tier
                    if i >= 5:
                        laps[tier].append(dt * 1e3)
                        server[tier].append(resp.json()["timings_ms"])
        return {
            "ready_s": round(served.ready_s, 1),
            "rss_loaded_mib": loaded,
            "rss_after_mib": rss_mib(served.proc.pid),
            "peak_rss_mib": peak_rss_mib(served.proc.pid),
            **{f"{tier}_p50_ms": round(statistics.median(v), 1) for tier, v in laps.items()},
            **{
                f"{tier}_server_{part}_p50_ms": round(statistics.median(t[part] for t in v), 2)
                for tier, v in server.items()
                for part in ("embed", "search", "total")
            },
            "healthz_p50_ms": round(statistics.median(floor), 1),
            "requests": requests,
        }
    finally:
        served.stop()


SERVICE_IMAGES = 4  # generated 96-px PNGs the service benchmark sends (seeds 0..3)


def _anchors(path: Path) -> np.ndarray:
    """Embeddings (4, 2048) of the service benchmark's query images by the index's model
    (random weights, seed 0), stored at ``path`` once."""
    if path.exists():
        return np.load(path)
    from benchmarks.service import encode
    from tasks.features.model import build_model, make_forward
    from tasks.sources.images import decode_image

    forward = make_forward(build_model("none", seed=0)[0])
    pixels = np.stack([decode_image(encode(96, s), 96).pixels for s in range(SERVICE_IMAGES)])
    emb = np.asarray(forward(pixels), dtype=np.float32)
    np.save(path, emb)
    return emb


def _write(folder: str, n: int) -> dict[str, Any]:
    t = time.perf_counter()
    anchors = _anchors(Path(folder).parent / f"anchors-{n}.npy")
    write_index(Path(folder), n, ResnetLike.sized(n, anchors=anchors))
    return {"seconds": round(time.perf_counter() - t, 1)}


def one_size(
    n: int, scratch: Path, queries: int, costly: int, requests: int, progress: bool = True
) -> dict[str, Any]:
    """Write, build, search and serve one index of ``n`` images in ``scratch``; removed after."""
    from benchmarks.harness import run_child

    folder = scratch / f"index-{n}"
    try:
        print(f"  {n:,} images: writing the features of record", flush=True)
        written = run_child("benchmarks.million:_write", {"folder": str(folder), "n": n})
        print("  building the index stages", flush=True)
        built = run_child(
            "benchmarks.million:build",
            {"folder": str(folder), "ann": "on", "model": requests > 0, "progress": progress},
        )
        sizes = {
            str(p.relative_to(folder)): round(p.stat().st_size / 2**20, 1)
            for p in sorted((folder / "features").iterdir())
        }
        print("  searching", flush=True)
        searched = run_child(
            "benchmarks.million:search",
            {"folder": str(folder), "n_queries": queries, "costly": costly},
        )
        served = None
        if requests:
            print("  serving", flush=True)
            served = serve(folder, requests)
        return {
            "n": n,
            "write": written,
            "build": built,
            "files_mib": sizes,
            "search": searched,
            "serve": served,
        }
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def million(
    quick: bool = False,
    sizes: tuple[int, ...] | None = None,
    queries: int = 200,
    requests: int = 100,
    scratch: str | None = None,
) -> dict[str, Any]:
    """The harness's case: each size in turn (100,000 by default; 5,000 with ``quick``)."""
    from tasks.hardware import cpu_count, cpu_features

    sizes = sizes or ((5_000,) if quick else (100_000,))
    base = Path(scratch or tempfile.gettempdir())
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-million-", dir=base) as tmp:
        for n in sizes:
            costly = 5 if n > 200_000 else 20
            results.append(
                one_size(
                    n,
                    Path(tmp),
                    20 if quick else queries,
                    5 if quick else costly,
                    0 if quick else requests,
                )
            )
    cpu = cpu_features()
    return {
        "machine": {
            "cpu": cpu.model,
            "cores": cpu_count(),
            "flags": sorted(f for f, on in cpu.summary().items() if on),
        },
        "sizes": results,
        "table": summary_rows(results),
    }


def summary_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (size, method): the table of BENCHMARKS.md."""
    rows = []
    for r in results:
        for method, m in r["search"]["methods"].items():
            rows.append(
                {
                    "images": r["n"],
                    "method": method,
                    "p50 ms": m["p50_ms"],
                    "p90 ms": m["p90_ms"],
                    "queries": m["queries"],
                    "recall@10": m["recall_at_10"],
                    "identical to float64": f"{m['identical_to_float64']}/{m['checked']}",
                }
            )
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Machine: {result['machine']}", ""]
    rows = result["table"]
    if rows:
        head = list(rows[0])
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows]
    for r in result["sizes"]:
        lines += [
            "",
            f"{r['n']:,} images: build {r['build']['seconds']} s, index stages peak RSS "
            f"{r['build']['index_stages_peak_rss_mib']} MiB; files (MiB) {r['files_mib']}; "
            f"query core load {r['search']['load_s']} s, RSS loaded "
            f"{r['search']['rss_loaded_mib']} MiB; stored recall@10 "
            f"{r['search']['stored_recall_at_10']} ({r['search']['factory']}, "
            f"{r['search']['probe']}); service {r['serve']}",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.million", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="5,000 images, no service")
    parser.add_argument("--sizes", default=None, help="comma-separated index sizes")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--scratch", default=None, help="folder for the indexes (removed)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args(argv)
    sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else None
    result = million(args.quick, sizes, args.queries, args.requests, args.scratch)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "million.json").write_text(json.dumps(result, indent=2, default=str))
    report = markdown(result)
    (args.out / "million.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":  # pragma: no cover - run by hand
    sys.exit(main())
