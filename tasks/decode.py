"""Decode STL-10's binary format as a memory map: (N, 96, 96, 3) uint8 without reading it."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from tasks.common import IMAGE_BYTES, DataRef, ImageSearchError, fingerprint


def read_all_images(path: Path | str, limit: int | None = None) -> np.ndarray:
    """Return the images of an STL-10 binary file as a read-only NHWC view of shape (N, 96, 96, 3).

    The file is memory-mapped, so opening even the 2.76 GB unlabeled file costs milliseconds and
    no memory; pages are read only when a batch touches them. ``limit`` keeps the first N images.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageSearchError(f"Cannot open image file {path}: {exc.strerror or exc}.") from exc
    if size == 0:
        raise ImageSearchError(f"Image file {path} is empty; it holds no STL-10 images.")
    if size % IMAGE_BYTES:
        raise ImageSearchError(
            f"Image file {path} has {size:,} bytes, not a multiple of {IMAGE_BYTES:,} "
            f"(one 96×96×3 STL-10 image): it is truncated or not in the STL-10 binary format."
        )
    n = size // IMAGE_BYTES
    if limit is not None:
        if limit < 1:
            raise ImageSearchError(f"limit = {limit}; it must be at least 1 (or empty for all).")
        if limit > n:
            raise ImageSearchError(
                f"limit = {limit:,} but {path.name} holds only {n:,} images; "
                f"use --limit {n} or less."
            )
        n = limit
    raw = np.memmap(path, dtype=np.uint8, mode="r", shape=(n * IMAGE_BYTES,))
    return raw.reshape(n, 3, 96, 96).transpose(0, 3, 2, 1)


def with_limit(dataset: DataRef, limit: int | None) -> DataRef:
    """The first ``limit`` images of ``dataset`` (all when None), checked against its size."""
    if limit is None or limit == dataset.rows:
        return dataset
    if limit < 1:
        raise ImageSearchError(f"limit = {limit}; it must be at least 1 (or empty for all).")
    if limit > dataset.rows:
        raise ImageSearchError(
            f"limit = {limit:,} but the dataset holds only {dataset.rows:,} images; use "
            f"--limit {dataset.rows} or less."
        )
    return DataRef(
        uri=dataset.uri, rows=limit, fingerprint=fingerprint(dataset.fingerprint, "limit", limit)
    )


def release_pages(images: np.ndarray) -> None:
    """Let the kernel drop the pages of ``images``' memory map from this process.

    Read pages of a file mapping stay resident (and count as the process's memory) until
    unmapped; ``MADV_DONTNEED`` releases them, and a later read simply faults them in again
    from the page cache. A no-op for arrays that are not memory maps.
    """
    base: object = images
    while base is not None and not isinstance(getattr(base, "_mmap", None), mmap.mmap):
        base = getattr(base, "base", None)
    if base is not None and hasattr(mmap, "MADV_DONTNEED"):
        base._mmap.madvise(mmap.MADV_DONTNEED)  # type: ignore[attr-defined]
