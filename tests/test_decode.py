"""Decoding STL-10's binary layout as a memory map."""

from __future__ import annotations

import re
import resource
import time
from pathlib import Path

import numpy as np
import pytest

from tasks.errors import ImageSearchError
from tasks.sources.sample import to_stl10_bytes
from tasks.sources.stl10 import IMAGE_BYTES, read_all_images, release_pages, with_limit
from tasks.types import DataRef


def test_nhwc_orientation_from_an_asymmetric_pattern(tmp_path: Path) -> None:
    # STL-10 stores each channel column-major: byte (c, x, y) at c*9216 + x*96 + y.
    raw = np.zeros((2, 3, 96, 96), dtype=np.uint8)
    raw[0, 0, 5, 0] = 200  # red, column x=5, row y=0
    raw[0, 2, 0, 7] = 100  # blue, column x=0, row y=7
    raw[1, 1, 95, 94] = 50  # green, column 95, row 94
    path = tmp_path / "p.bin"
    path.write_bytes(raw.tobytes())
    images = read_all_images(path)
    assert images.shape == (2, 96, 96, 3)
    assert images.dtype == np.uint8
    # NHWC: images[n, row, column, channel]
    assert images[0, 0, 5, 0] == 200
    assert images[0, 7, 0, 2] == 100
    assert images[1, 94, 95, 1] == 50
    assert int(images.sum()) == 350


def test_encoder_round_trips(tmp_path: Path) -> None:
    images = np.random.default_rng(1).integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)
    path = tmp_path / "r.bin"
    path.write_bytes(to_stl10_bytes(images))
    np.testing.assert_array_equal(read_all_images(path), images)


def test_memory_map_of_100k_images_costs_almost_nothing(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:  # sparse: 2.76 GB on paper, nothing on disk
        f.truncate(100_000 * IMAGE_BYTES)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    images = read_all_images(path)
    elapsed = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert images.shape == (100_000, 96, 96, 3)
    assert isinstance(images.base, np.ndarray)  # a view, not a copy
    assert elapsed < 0.5, elapsed  # generous: it is a handful of syscalls
    assert (rss1 - rss0) < 20 * 1024, rss1 - rss0  # KiB: the 2.76 GB were never read
    assert int(images[99_999].sum()) == 0


@pytest.mark.parametrize(
    ("size", "message"), [(0, "is empty"), (IMAGE_BYTES + 1, "not a multiple of 27,648")]
)
def test_bad_sizes_are_rejected(tmp_path: Path, size: int, message: str) -> None:
    path = tmp_path / "bad.bin"
    path.write_bytes(bytes(size))
    with pytest.raises(ImageSearchError, match=re.escape(message)):
        read_all_images(path)


def test_limit(tmp_path: Path) -> None:
    path = tmp_path / "five.bin"
    path.write_bytes(bytes(5 * IMAGE_BYTES))
    assert read_all_images(path, limit=2).shape[0] == 2
    with pytest.raises(ImageSearchError, match=r"limit = 6 but five\.bin holds only 5 images"):
        read_all_images(path, limit=6)
    ref = DataRef(uri=str(path), rows=5, fingerprint="f")
    assert with_limit(ref, None) is ref
    assert with_limit(ref, 3).rows == 3
    assert with_limit(ref, 3).fingerprint != ref.fingerprint
    for bad in (0, -1):
        with pytest.raises(ImageSearchError, match=f"limit = {bad}; it must be at least 1"):
            with_limit(ref, bad)
    with pytest.raises(ImageSearchError, match="use a limit of 5 or less"):
        with_limit(ref, 9)


def _rss_mib() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS"))
    return int(line.split()[1]) // 1024


def test_release_pages_drops_resident_memory_and_keeps_data(tmp_path: Path) -> None:
    path = tmp_path / "r.bin"
    path.write_bytes(
        np.random.default_rng(0).integers(0, 256, 4000 * IMAGE_BYTES, np.uint8).tobytes()
    )
    images = read_all_images(path)
    before = _rss_mib()
    total = int(images.sum(dtype=np.int64))  # touches all 110 MB of the map
    touched = _rss_mib()
    release_pages(images)
    released = _rss_mib()
    assert touched - before > 80
    assert released - before < 20
    assert int(images.sum(dtype=np.int64)) == total
    release_pages(np.zeros(3))  # not a map: nothing to do
