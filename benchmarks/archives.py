"""Archive benchmark: a tar archive of images streamed whole (peak memory, against the same
images as a folder) and one of its members read alone (a picture, a query's neighbour).

``archives``: PNG files of random pixels (incompressible, about 320 KiB each; 1,000 of them,
320 MiB) as a folder, a ``.tar`` and a ``.tar.gz``. For each, a fresh process lists the
collection and streams every image through it as the catalog pass does (peak RSS above the
process after its imports), then reads the last member alone: the first read of a freshly
opened collection (what a service's first ``/images`` tile costs) and three more reads of the
same one. Each measurement runs ``repeats`` times, interleaved; medians.

``python benchmarks/archives.py SOURCE`` measures one source in this process and prints JSON:
with ``PYTHONPATH`` set to another checkout, it measures that checkout's code.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def measure(source: str) -> dict[str, float]:
    """Stream every image of ``source``, then read its last one alone; seconds and MiB."""
    from tasks.sources.collection import open_collection

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    collection = open_collection(source)
    items = collection.items()
    t0 = time.perf_counter()
    total = sum(len(data) for data in collection.stream(items) if isinstance(data, bytes))
    stream_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    last = items[-1].uri
    fresh = open_collection(source)
    t0 = time.perf_counter()
    fresh.read(last)
    first_read = time.perf_counter() - t0
    again = []
    for _ in range(3):
        t0 = time.perf_counter()
        fresh.read(last)
        again.append(time.perf_counter() - t0)
    return {
        "images": len(items),
        "MiB read": total / 2**20,
        "stream s": stream_s,
        "peak RSS MiB": peak / 1024,
        "peak above imports MiB": (peak - base) / 1024,
        "first single read s": first_read,
        "next single read s": statistics.median(again),
    }


def _make(root: Path, n: int, side: int) -> dict[str, str]:
    folder = root / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    from PIL import Image

    for i in range(n):
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.png", compress_level=1)
    sources = {"folder": str(folder)}
    for name, mode in (("tar", "w"), ("tar.gz", "w:gz")):
        path = root / f"photos.{name}"
        with (
            tarfile.open(path, mode, compresslevel=1)
            if mode == "w:gz"
            else tarfile.open(path, mode) as tf
        ):
            tf.add(folder, arcname="photos")
        sources[name] = str(path)
    return sources


def _child(source: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, __file__, source], capture_output=True, text=True, check=True
    )
    return dict(json.loads(done.stdout))


def archives(quick: bool = False, repeats: int = 3) -> dict[str, Any]:
    """Peak memory of streaming a tar archive vs a folder, and the cost of a single read."""
    n, side = (20, 64) if quick else (1000, 330)
    repeats = 1 if quick else repeats
    with tempfile.TemporaryDirectory(prefix="bench-archives-") as tmp:
        sources = _make(Path(tmp), n, side)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in sources}
        for _ in range(repeats):
            for name, source in sources.items():
                runs[name].append(_child(source))
        sizes = {name: Path(s).stat().st_size for name, s in sources.items() if name != "folder"}
    rows = []
    for name, results in runs.items():
        row: dict[str, Any] = {"source": name}
        if name in sizes:
            row["archive MiB"] = round(sizes[name] / 2**20)
        for key in results[0]:
            row[key] = round(statistics.median(r[key] for r in results), 4)
        rows.append(row)
    return {"name": "archives", "images": n, "rows": rows, "targets": [], "raw": runs}


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1])))
