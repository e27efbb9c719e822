"""Pipeline benchmark cases: embedding overhead, the whole flow at full scale, rerun cost.

Each case returns a JSON-ready dict: ``rows`` for the table, ``targets`` (each with the
measured ratio and whether it is met) and ``raw`` numbers. Ratios are measured within one run.
Every case works in a temporary folder that it removes however it ends (100,000 images and
their features are gigabytes).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import GRACE_S, wait_or_stop
from tasks.layout import STATE_DIR

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _median_of(runs: int, fn: Callable[[], float]) -> tuple[float, list[float]]:
    values = [fn() for _ in range(runs)]
    return statistics.median(values), values


def _stl10_file(path: Path, n: int) -> Path:
    """``n`` images in the STL-10 layout: the sample crops, repeated (real photo statistics)."""
    from tasks.sources.sample import make_sample_images, to_stl10_bytes

    base = to_stl10_bytes(make_sample_images(min(n, 2000)))
    per = len(base) // min(n, 2000)
    with open(path, "wb") as f:
        left = n
        while left:
            take = min(left, len(base) // per)
            f.write(base[: take * per])
            left -= take
    return path


def embed_overhead(quick: bool = False) -> dict[str, Any]:
    """Images/s of the catalog pass (memory map -> SHA-256 -> forward -> embedding store) over
    a bare compiled forward pass on preallocated input, per batch size; plus bfloat16."""
    n = 128 if quick else 1024
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        return _embed_overhead(Path(tmp), n, quick)


def _embed_overhead(tmp: Path, n: int, quick: bool) -> dict[str, Any]:
    from tasks.catalog import embed_items
    from tasks.features.content import EmbeddingStore
    from tasks.features.model import build_model, make_forward
    from tasks.sources.collection import Stl10Collection

    repeats = 3
    batch_sizes = [32] if quick else [16, 32, 64, 128]
    collection = Stl10Collection(str(_stl10_file(tmp / "x.bin", n)))
    items = collection.items()
    images = collection.images
    model, _ = build_model("none", seed=0)
    forward = make_forward(model)
    pre = np.ascontiguousarray(images[: max(batch_sizes)])
    rows, raw = [], {}
    fresh = iter(range(10**6))
    for bs in batch_sizes:
        forward(pre[:bs])  # trace and warm up

        def bare(bs: int = bs) -> float:
            t0 = time.perf_counter()
            for start in range(0, n, bs):
                forward(pre[: min(bs, n - start)])
            return n / (time.perf_counter() - t0)

        def stage(bs: int = bs) -> float:
            """The catalog pass: read, hash, embed into an empty store."""
            store = EmbeddingStore(tmp / f"out{next(fresh)}", "k")
            t0 = time.perf_counter()
            embed_items(
                collection,
                items,
                store,
                lambda: forward,
                input_size=96,
                batch_size=bs,
                progress=False,
            )
            return n / (time.perf_counter() - t0)

        bare_runs, stage_runs = [], []
        for _ in range(repeats):  # interleaved, so drift hits both alike
            bare_runs.append(bare())
            stage_runs.append(stage())
        b, s = statistics.median(bare_runs), statistics.median(stage_runs)
        raw[f"batch_{bs}"] = {"bare": bare_runs, "stage": stage_runs}
        rows.append(
            {
                "batch": bs,
                "bare img/s": round(b, 1),
                "stage img/s": round(s, 1),
                "stage / bare": round(s / b, 3),
            }
        )
    best = max(rows, key=lambda r: r["stage img/s"])
    result: dict[str, Any] = {
        "name": "embed",
        "images": n,
        "repeats": repeats,
        "rows": rows,
        "best_batch": best["batch"],
        "targets": [
            {
                "target": "embed stage >= 0.95 x bare forward (best batch)",
                "measured": best["stage / bare"],
                "met": best["stage / bare"] >= 0.95,
            }
        ],
        "raw": raw,
    }
    if not quick:
        result.update(_bfloat16(images, forward, int(best["batch"]), repeats))
    return result


def _bfloat16(
    images: np.ndarray, forward32: Callable[[np.ndarray], np.ndarray], bs: int, repeats: int
) -> dict[str, Any]:
    """bfloat16 vs float32 speed on the same batches, and neighbour agreement of the features."""
    from sklearn.neighbors import NearestNeighbors

    from tasks.features.model import build_model, make_forward

    model16, _ = build_model("none", seed=0, precision="bfloat16")
    forward16 = make_forward(model16)
    pre = np.ascontiguousarray(images[:bs])
    n = len(images)
    forward16(pre)

    def speed(fwd: Callable[[np.ndarray], np.ndarray]) -> float:
        t0 = time.perf_counter()
        for _ in range(0, n, bs):
            fwd(pre)
        return n / (time.perf_counter() - t0)

    s32, s16 = [], []
    for _ in range(repeats):
        s32.append(speed(forward32))
        s16.append(speed(forward16))
    f32 = np.concatenate(
        [forward32(np.ascontiguousarray(images[i : i + bs])) for i in range(0, n, bs)]
    )
    f16 = np.concatenate(
        [forward16(np.ascontiguousarray(images[i : i + bs])) for i in range(0, n, bs)]
    )
    split = int(n * 0.9)
    nn32 = NearestNeighbors(n_neighbors=3, algorithm="brute").fit(f32[:split])
    nn16 = NearestNeighbors(n_neighbors=3, algorithm="brute").fit(f16[:split])
    i32 = nn32.kneighbors(f32[split:], return_distance=False)
    i16 = nn16.kneighbors(f16[split:], return_distance=False)
    agreement = float(np.mean(i32 == i16))
    ratio = statistics.median(s16) / statistics.median(s32)
    return {
        "bfloat16": {
            "float32 img/s": round(statistics.median(s32), 1),
            "bfloat16 img/s": round(statistics.median(s16), 1),
            "speedup": round(ratio, 3),
            "neighbour agreement": round(agreement, 4),
            "raw": {"float32": s32, "bfloat16": s16},
        },
        "bfloat16_targets": [
            {
                "target": "bfloat16 >= 1.5 x float32",
                "measured": round(ratio, 3),
                "met": ratio >= 1.5,
            },
            {
                "target": "bfloat16 neighbour agreement >= 0.99",
                "measured": round(agreement, 4),
                "met": agreement >= 0.99,
            },
        ],
    }


def _cli(args: list[str], env: dict[str, str], log: Path) -> tuple[float, int, str]:
    """Run ``image-search`` in a child, its output into ``log``; (wall seconds, exit code, log
    tail). Interrupted, the child gets SIGINT and time to stop its Prefect API and clean up."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
        code = wait_or_stop(proc, GRACE_S / 2)  # inside this case's own grace period
    return time.perf_counter() - t0, code, log.read_text(errors="replace")[-2000:]


def full_flow(quick: bool = False) -> dict[str, Any]:
    """The whole flow on an STL-10-format file of 100,000 images (2,000 in --quick): peak RSS of
    the flow process and its wall time over the embed + search time it reports itself."""
    n = 2000 if quick else 100_000
    with tempfile.TemporaryDirectory(prefix="bench-flow-") as tmp_name:
        tmp = Path(tmp_name)
        data = _stl10_file(tmp / "unlabeled_X.bin", n)
        out = tmp / "out"
        env = {"IMAGE_SEARCH_DATA": str(tmp / "cache")}
        args = ["--source", str(data), "--weights", "none", "--backends", "numpy", "--out"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        wall, code, err = _cli([*args, str(out)], env, tmp / "flow.log")
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if code != 0:
            raise RuntimeError(f"flow failed ({code}): {err}")
        # The stage record of the embed stage: {"key", "outputs", "info": {"seconds", ...}}.
        embed = json.loads((out / STATE_DIR / "embed.json").read_text())["info"]
        compare = json.loads((out / "compare.json").read_text())
    search = sum(
        b["load_seconds"] + b["fit_seconds"] + b["search_seconds"]
        for b in compare["backends"].values()
        if b["available"]
    )
    work = embed["seconds"] + search
    peak_gib = max(peak_kib, before) / 2**20
    return {
        "name": "flow",
        "images": n,
        "rows": [
            {
                "images": n,
                "wall s": round(wall, 1),
                "embed s": round(embed["seconds"], 1),
                "search s (load+fit+search, all backends)": round(search, 1),
                "wall / (embed + search)": round(wall / work, 3),
                "peak RSS GiB": round(peak_gib, 2),
            }
        ],
        "targets": [
            {"target": "peak RSS < 3 GiB", "measured": round(peak_gib, 2), "met": peak_gib < 3},
            {
                "target": "wall <= 1.15 x (embed + search)",
                "measured": round(wall / work, 3),
                "met": wall / work <= 1.15,
            },
        ],
        "raw": {"wall": wall, "embed": embed, "compare_backends": compare["backends"]},
    }


def rerun_cost(quick: bool = False) -> dict[str, Any]:
    """A second identical run (every stage skipped) against an empty flow run, both in one
    process on one temporary Prefect API."""
    with tempfile.TemporaryDirectory(prefix="bench-rerun-") as tmp:
        return _rerun_cost(Path(tmp), quick)


def _rerun_cost(tmp: Path, quick: bool) -> dict[str, Any]:
    from prefect import flow

    from flows.image_search import image_search

    os.environ["IMAGE_SEARCH_DATA"] = str(tmp / "cache")  # this case runs in its own process
    limit, out = 300 if quick else 2000, str(tmp / "out")

    def run() -> None:
        image_search(source="sample", weights="none", limit=limit, out=out)

    @flow(name="empty")
    def empty() -> None:
        return None

    run()  # the first, real run
    empty()  # warm the API path for the baseline too
    repeats = 3 if quick else 5
    reruns, empties = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        reruns.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        empty()
        empties.append(time.perf_counter() - t0)
    r, e = statistics.median(reruns), statistics.median(empties)
    return {
        "name": "rerun",
        "rows": [
            {"rerun s": round(r, 3), "empty flow s": round(e, 3), "rerun / empty": round(r / e, 2)}
        ],
        "targets": [
            {
                "target": "rerun <= 1.5 x empty flow run",
                "measured": round(r / e, 2),
                "met": r / e <= 1.5,
            }
        ],
        "raw": {"reruns": reruns, "empties": empties},
    }


if __name__ == "__main__":
    cases = {"embed": embed_overhead, "flow": full_flow, "rerun": rerun_cost}
    quick = "--quick" in sys.argv
    for name in [a for a in sys.argv[1:] if not a.startswith("--")] or list(cases):
        print(json.dumps(cases[name](quick), indent=2, default=str), flush=True)
