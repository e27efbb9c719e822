"""Decode case: open a 100,000-image file in the STL-10 binary layout with the product's reader
(``tasks.sources.stl10.read_all_images``: size checks, then a memory map)."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import rss_mib
from tasks.sources.stl10 import IMAGE_BYTES, read_all_images


def decode(quick: bool = False) -> dict[str, Any]:
    """Open a 100,000-image STL-10 file as an (N, 96, 96, 3) uint8 view: time and RSS growth.

    The file is sparse (made by truncate), so it costs no disk and no time; quick and full are
    the same size because opening must not depend on it."""
    n = 100_000
    repeats = 5
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        path = Path(tmp) / "unlabeled_X.bin"
        with open(path, "wb") as f:
            f.truncate(n * IMAGE_BYTES)
        times, rss_growth = [], []
        for _ in range(repeats):
            before = rss_mib()
            t0 = time.perf_counter()
            images = read_all_images(path)
            times.append(time.perf_counter() - t0)
            rss_growth.append(rss_mib() - before)
            assert images.shape == (n, 96, 96, 3)
            first = np.ascontiguousarray(images[0])  # reading one image touches one image
            assert first.shape == (96, 96, 3)
            del images
        t, g = statistics.median(times), max(rss_growth)
        size_gb = path.stat().st_size / 1e9
    return {
        "rows": [
            {
                "images": n,
                "file GB": round(size_gb, 2),
                "open ms (median)": round(t * 1e3, 3),
                "runs ms": ", ".join(f"{x * 1e3:.3f}" for x in times),
                "RSS growth MiB (max)": round(g, 2),
            }
        ],
        "targets": [
            {
                "target": "open in milliseconds (< 10 ms)",
                "measured": round(t * 1e3, 3),
                "met": t < 0.01,
            },
            {"target": "RSS growth ~0 (< 5 MiB)", "measured": round(g, 2), "met": g < 5},
        ],
        "notes": [
            f"{repeats} opens of a sparse file with read_all_images; RSS read from /proc before "
            "and after"
        ],
        "raw": {"open_s": times, "rss_growth_mib": rss_growth},
    }
