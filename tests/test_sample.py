"""The built-in sample: deterministic STL-10-format crops of real photographs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.sources.sample import SAMPLE_IMAGES, ensure_sample, make_sample_images
from tasks.sources.stl10 import read_all_images


def test_sample_is_deterministic_and_decodes(tmp_path: Path) -> None:
    assert SAMPLE_IMAGES >= 2000
    first = make_sample_images(50)
    np.testing.assert_array_equal(first, make_sample_images(50))
    ref = ensure_sample(tmp_path, n=50)
    np.testing.assert_array_equal(read_all_images(ref.uri), first)
    mtime = Path(ref.uri).stat().st_mtime_ns
    assert ensure_sample(tmp_path, n=50) == ref
    assert Path(ref.uri).stat().st_mtime_ns == mtime  # written once


def test_crops_are_real_varied_photographs() -> None:
    images = make_sample_images(200).astype(np.float32)
    # Not noise: neighbouring pixels of a photograph are strongly correlated.
    dx = np.abs(np.diff(images, axis=2)).mean()
    assert dx < 0.25 * images.std()
    # Varied: no two crops are identical, and both photographs are used.
    flat = images.reshape(len(images), -1)
    assert len(np.unique(flat, axis=0)) == len(images)
    # Near neighbours are genuinely similar: the nearest crop is much closer than a random one.
    sq = (flat.astype(np.float64) ** 2).sum(1)
    d = np.maximum(sq[:, None] + sq[None, :] - 2.0 * flat.astype(np.float64) @ flat.T, 0)
    np.fill_diagonal(d, np.inf)
    nearest = np.sqrt(d.min(axis=1))
    random_pairs = np.sqrt(d[np.arange(len(d)), (np.arange(len(d)) + 7) % len(d)])
    assert np.median(nearest) < 0.6 * np.median(random_pairs)
