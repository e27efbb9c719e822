"""Sharded exact search on Dask against the in-process search, on the same feature files.

``python -m benchmarks.shards [--quick]`` (or ``python -m benchmarks.run shards``). Synthetic
2048-d features (``benchmarks.search.make_features``) are written once with the feature store in
row groups of ``ROWS_PER_PART``; then, per repeat and interleaved, each configuration runs in its
own child: the ``numpy`` backend in-process (``run_backend``, the flow's clock), and the
``sharded`` backend (``flows.sharded.run_sharded``: Prefect's DaskTaskRunner attached to a
``distributed.LocalCluster`` started beforehand and warmed by one search of tiny files, both
reported apart) on 1 worker × 2 threads and on 2 workers × 1 thread. Ratios are between
medians of the same run.

``--embed`` (or ``python -m benchmarks.run embed-shards``): the catalog pass's embedding of
10,000 distinct sample crops the same three ways, each into an empty store, each on a fresh
cluster (``flows.sharded.run_embed_sharded``, per-shard rates reported for the scale model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import run_child
from benchmarks.search import make_features

FULL = {"n_index": 90_000, "n_queries": 10_000, "dim": 2048, "k": 3, "repeats": 3}
QUICK = {"n_index": 3_000, "n_queries": 300, "dim": 2048, "k": 3, "repeats": 1}
CONFIGS = {"in-process": None, "1 worker × 2 threads": (1, 2), "2 workers × 1 thread": (2, 1)}
TARGET_OVERHEAD = 0.10  # the Dask path's extra wall time over the in-process search
TARGET_MERGE = 0.02  # the merge's share of the sharded search's wall time


def write_features(folder: Path, index: np.ndarray, queries: np.ndarray) -> None:
    """``index.parquet`` and ``query.parquet`` as the store writes them: row groups of
    ROWS_PER_PART rows (the shards' unit), ids = row positions."""
    from tasks.features import store

    step = store.ROWS_PER_PART
    for name, emb in (("index", index), ("query", queries)):
        ids = np.arange(len(emb), dtype=np.int64)
        tables = (
            store.table(ids[i : i + step], emb[i : i + step]) for i in range(0, len(emb), step)
        )
        store.write_tables(tables, folder / f"{name}.parquet", {"synthetic": True})


def config_child(config: str, folder: str, k: int, tag: str) -> dict[str, Any]:
    """One configuration's search over the files in ``folder``; neighbours saved to compare."""
    from tasks.search.backends import make_backend, run_backend

    data = Path(folder)
    dest = data / f"{config.split()[0]}-{tag}.npz"
    workers = CONFIGS[config]
    if workers is None:
        run = run_backend(
            make_backend("numpy"), data / "index.parquet", data / "query.parquet", k, dest
        )
        return {"search_s": run.search_seconds, "load_s": run.load_seconds, "path": str(dest)}

    from distributed import LocalCluster
    from prefect.testing.utilities import prefect_test_harness

    from flows.sharded import run_sharded

    n_workers, threads = workers
    with prefect_test_harness(server_startup_timeout=180):
        t0 = time.perf_counter()
        with LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads,
            processes=True,
            dashboard_address=None,
        ) as cluster:
            start_s = time.perf_counter() - t0
            # A first search on tiny files: workers import the task engine and the kernel once
            # per cluster; reported apart, like the start-up.
            warm = data / "warm"
            t0 = time.perf_counter()
            run_sharded(
                warm / "index.parquet",
                warm / "query.parquet",
                k,
                warm / f"{tag}-{n_workers}.npz",
                cluster.scheduler_address,
                n_shards=n_workers * threads,
            )
            first_s = time.perf_counter() - t0
            run = run_sharded(
                data / "index.parquet",
                data / "query.parquet",
                k,
                dest,
                cluster.scheduler_address,
                n_shards=n_workers * threads,
            )
    shard_s = [s["seconds"] for s in run.details["shards"]]
    return {
        "search_s": run.search_seconds,
        "merge_s": run.details["merge_seconds"],
        "cluster_start_s": start_s,
        "first_tiny_run_s": first_s,
        "slowest_shard_s": max(shard_s),
        "path": str(dest),
    }


def shards(quick: bool = False) -> dict[str, Any]:
    """In-process vs 1 worker × 2 threads vs 2 workers × 1 thread: wall time, overhead ratio,
    merge share, and the answers compared bit for bit."""
    size = QUICK if quick else FULL
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        index, queries = make_features(size["n_index"], size["n_queries"], size["dim"])
        write_features(Path(tmp), index, queries)
        del index, queries
        (Path(tmp) / "warm").mkdir()
        write_features(Path(tmp) / "warm", *make_features(300, 30, size["dim"], seed=1))
        for r in range(size["repeats"]):
            for config in CONFIGS:
                res = run_child(
                    "benchmarks.shards:config_child",
                    {"config": config, "folder": tmp, "k": size["k"], "tag": str(r)},
                    grace_s=0,
                )
                runs[config].append(res)
                print(f"    repeat {r} {config}: search {res['search_s']:.2f} s", flush=True)
        identical = {}
        with np.load(runs["in-process"][0]["path"]) as ref:
            for config in list(CONFIGS)[1:]:
                with np.load(runs[config][0]["path"]) as got:
                    identical[config] = bool(
                        np.array_equal(ref["neighbor_ids"], got["neighbor_ids"])
                        and ref["distances"].tobytes() == got["distances"].tobytes()
                    )
    base = statistics.median(r["search_s"] for r in runs["in-process"])
    rows, targets = [], []
    for config, rs in runs.items():
        search_s = statistics.median(r["search_s"] for r in rs)
        row: dict[str, Any] = {"configuration": config, "search s (median)": search_s}
        if config != "in-process":
            merge_s = statistics.median(r["merge_s"] for r in rs)
            row.update(
                {
                    "overhead vs in-process": search_s / base - 1,
                    "merge s": merge_s,
                    "merge share": merge_s / search_s,
                    "slowest shard s": statistics.median(r["slowest_shard_s"] for r in rs),
                    "cluster start s": statistics.median(r["cluster_start_s"] for r in rs),
                    "first (tiny) run s": statistics.median(r["first_tiny_run_s"] for r in rs),
                    "identical answer": identical[config],
                }
            )
            targets.append(
                {
                    "target": f"{config}: overhead <= {TARGET_OVERHEAD:.0%}",
                    "met": search_s / base - 1 <= TARGET_OVERHEAD,
                    "measured": search_s / base - 1,
                }
            )
            targets.append(
                {
                    "target": f"{config}: merge <= {TARGET_MERGE:.0%} of search",
                    "met": merge_s / search_s <= TARGET_MERGE,
                    "measured": merge_s / search_s,
                }
            )
        rows.append(row)
    return {
        "size": size,
        "rows": rows,
        "targets": targets,
        "runs": runs,
        "notes": [
            f"{size['n_queries']:,} queries × {size['n_index']:,} index rows, d = {size['dim']}, "
            f"k = {size['k']}, medians of {size['repeats']}; one shard per worker thread",
        ],
    }


# --- Sharded embedding ------------------------------------------------------------------------

EMBED_FULL = {"n_images": 10_000, "batch_size": 64, "repeats": 1}
EMBED_QUICK = {"n_images": 96, "batch_size": 16, "repeats": 1}


def embed_config_child(config: str, source: str, out: str, batch_size: int) -> dict[str, Any]:
    """One configuration's catalog embedding of the STL-10-format file ``source`` into an empty
    store under ``out``; the wall time includes TensorFlow's import and the model build (once
    in-process, once per worker process on a fresh cluster: an honest cost of the Dask path)."""
    from tasks.sources.collection import Stl10Collection
    from tasks.types import ModelSpec

    spec = ModelSpec(weights="none")
    collection = Stl10Collection(source)
    items = collection.items()
    workers = CONFIGS[config]
    if workers is None:
        from tasks.catalog import embed_items
        from tasks.features.content import EmbeddingStore
        from tasks.features.embed import forward_factory

        t0 = time.perf_counter()
        _, embedded = embed_items(
            collection,
            items,
            EmbeddingStore(Path(out), spec.key()),
            forward_factory(spec, {}),
            input_size=spec.input_size,
            batch_size=batch_size,
            progress=False,
        )
        return {"embed_s": time.perf_counter() - t0, "embedded": embedded}

    from distributed import LocalCluster
    from prefect.testing.utilities import prefect_test_harness

    from flows.sharded import run_embed_sharded

    n_workers, threads = workers
    with prefect_test_harness(server_startup_timeout=180):
        t0 = time.perf_counter()
        with LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads,
            processes=True,
            dashboard_address=None,
        ) as cluster:
            start_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            done = run_embed_sharded(
                collection, items, Path(out), spec, batch_size, cluster.scheduler_address
            )
            embed_s = time.perf_counter() - t0
    shards = done["shards"]
    return {
        "embed_s": embed_s,
        "embedded": done["embedded"],
        "cluster_start_s": start_s,
        "shards": len(shards),
        "shard_img_per_s": [s["items"] / s["seconds"] for s in shards],
        "slowest_shard_s": max(s["seconds"] for s in shards),
    }


def embed_shards(quick: bool = False) -> dict[str, Any]:
    """Catalog embedding of distinct sample crops: in-process vs 1 worker × 2 threads vs
    2 workers × 1 thread, wall time and overhead ratio (random ResNet50, 96 px)."""
    from tasks.sources.sample import make_sample_images, to_stl10_bytes

    size = EMBED_QUICK if quick else EMBED_FULL
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="bench-embed-shards-") as tmp:
        # Distinct crops: a file of repeats would have the store embed each content once.
        source = Path(tmp) / "crops_X.bin"
        source.write_bytes(to_stl10_bytes(make_sample_images(size["n_images"], seed=11)))
        for r in range(size["repeats"]):
            for config in CONFIGS:
                out = Path(tmp) / f"out-{r}-{config.split()[0]}"
                res = run_child(
                    "benchmarks.shards:embed_config_child",
                    {
                        "config": config,
                        "source": str(source),
                        "out": str(out),
                        "batch_size": size["batch_size"],
                    },
                    grace_s=0,
                )
                runs[config].append(res)
                print(f"    repeat {r} {config}: embed {res['embed_s']:.1f} s", flush=True)
    base = statistics.median(r["embed_s"] for r in runs["in-process"])
    rows, targets = [], []
    for config, rs in runs.items():
        embed_s = statistics.median(r["embed_s"] for r in rs)
        row: dict[str, Any] = {
            "configuration": config,
            "embed s (median)": embed_s,
            "img/s": size["n_images"] / embed_s,
            "embedded": rs[0]["embedded"],
        }
        if config != "in-process":
            rates = [x for r in rs for x in r["shard_img_per_s"]]
            row.update(
                {
                    "overhead vs in-process": embed_s / base - 1,
                    "shards": rs[0]["shards"],
                    "median shard img/s": statistics.median(rates),
                    "slowest shard s": statistics.median(r["slowest_shard_s"] for r in rs),
                    "cluster start s": statistics.median(r["cluster_start_s"] for r in rs),
                }
            )
            targets.append(
                {
                    "target": f"{config}: overhead <= {TARGET_OVERHEAD:.0%}",
                    "met": embed_s / base - 1 <= TARGET_OVERHEAD,
                    "measured": embed_s / base - 1,
                }
            )
        rows.append(row)
    return {
        "size": size,
        "rows": rows,
        "targets": targets,
        "runs": runs,
        "notes": [
            f"{size['n_images']:,} distinct 96 px crops, random ResNet50, batch "
            f"{size['batch_size']}, {size['repeats']} run(s) each; TensorFlow import and model "
            f"build included (per worker process on the cluster)",
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shards", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness")
    parser.add_argument("--embed", action="store_true", help="the sharded embedding instead")
    args = parser.parse_args(argv)
    result = embed_shards(args.quick) if args.embed else shards(args.quick)
    json.dump({k: v for k, v in result.items() if k != "runs"}, sys.stdout, indent=2, default=str)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
