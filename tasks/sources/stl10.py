"""STL-10's binary format and its official files: decode as a memory map of (N, 96, 96, 3)
uint8 without reading it, the checks that say whether a file can be one, and which form of
STL-10 a source is."""

from __future__ import annotations

import mmap
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from tasks.errors import ImageSearchError, param
from tasks.fingerprints import fingerprint
from tasks.sources.located import ARCHIVE_SUFFIXES, IMAGE_SUFFIXES, LIST_SUFFIXES, Located
from tasks.types import DataRef

OFFICIAL_URL = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"
TARBALL_NAME = "stl10_binary.tar.gz"
EXTRACT_DIR = "stl10_binary"
UNLABELED = "unlabeled_X.bin"
IMAGE_BYTES = 96 * 96 * 3  # 27,648 bytes per STL-10 image


@dataclass(frozen=True)
class Checksums:
    """What the official files must be: MD5 sums of the tarball and of the members we extract,
    and the largest size a download of the tarball may reach (None: no known bound)."""

    tarball: str | None
    members: dict[str, str]
    max_tarball_bytes: int | None = None


# The labelled sets: 5,000 training and 8,000 test images, labels 1..10 (one byte each).
LABELLED = {
    "train_X.bin": "918c2871b30a85fa023e0c44e0bee87f",
    "train_y.bin": "5a34089d4802c674881badbb80307741",
    "test_X.bin": "7f263ba9f9e0b06b93213547f721ac82",
    "test_y.bin": "36f9794fa4beb8a2c72628de14fa638e",
}
LABELLED_SIZES = {
    "train_X.bin": 5000 * IMAGE_BYTES,
    "train_y.bin": 5000,
    "test_X.bin": 8000 * IMAGE_BYTES,
    "test_y.bin": 8000,
}
CLASS_NAMES = "class_names.txt"

OFFICIAL = Checksums(
    tarball="91f7769df0f17e558f3565bffb0c7dfb",
    members={UNLABELED: "5242ba1fed5e4be9e1e742405eb56ca4", **LABELLED},
    # The official tarball is 2.64 GB; a response that grows past this is not it.
    max_tarball_bytes=2_700_000_000,
)
# The search uses the 100,000 unlabeled images; the labelled sets come along when present.
WANTED = (UNLABELED, *LABELLED, CLASS_NAMES)
OPTIONAL = frozenset({*LABELLED, CLASS_NAMES})


def count_images(path: Path) -> int:
    """The number of images in an STL-10 binary file; a clear error when it cannot be one."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageSearchError(f"Cannot open image file {path}: {exc.strerror or exc}.") from exc
    if size == 0:
        raise ImageSearchError(
            f"Image file {path} is empty; it holds no STL-10 images. Point {param('source')} at "
            f"the "
            f"real unlabeled_X.bin (or its tarball), or use {param('source')} sample."
        )
    if size % IMAGE_BYTES:
        raise ImageSearchError(
            f"Image file {path} has {size:,} bytes, not a multiple of {IMAGE_BYTES:,} (one "
            f"96×96×3 STL-10 image): it is truncated or not in the STL-10 binary format."
        )
    return size // IMAGE_BYTES


def check_limit(limit: int | None, available: int, what: str) -> int:
    """How many images a run uses: ``limit`` (checked against ``available``), or all."""
    if limit is None:
        return available
    if limit < 1:
        raise ImageSearchError(
            f"{param('limit')} = {limit}; it must be at least 1 (or empty for all)."
        )
    if limit > available:
        raise ImageSearchError(
            f"{param('limit')} = {limit:,} but {what} holds only {available:,} images; use a "
            f"limit of "
            f"{available} or less."
        )
    return limit


def read_all_images(path: Path | str, limit: int | None = None) -> np.ndarray:
    """Return the images of an STL-10 binary file as a read-only NHWC view of shape (N, 96, 96, 3).

    The file is memory-mapped, so opening even the 2.76 GB unlabeled file costs milliseconds and
    no memory; pages are read only when a batch touches them. ``limit`` keeps the first N images.
    """
    path = Path(path)
    n = check_limit(limit, count_images(path), path.name)
    raw = np.memmap(path, dtype=np.uint8, mode="r", shape=(n * IMAGE_BYTES,))
    return raw.reshape(n, 3, 96, 96).transpose(0, 3, 2, 1)


def dataset_ref(path: Path, fp: str) -> DataRef:
    """A reference to an STL-10 binary file, checked to be one."""
    return DataRef(uri=str(path), rows=count_images(path), fingerprint=fp)


def with_limit(dataset: DataRef, limit: int | None) -> DataRef:
    """The first ``limit`` images of ``dataset`` (all when None), checked against its size."""
    n = check_limit(limit, dataset.rows, "the dataset")
    if n == dataset.rows:
        return dataset
    return DataRef(
        uri=dataset.uri, rows=n, fingerprint=fingerprint(dataset.fingerprint, "limit", n)
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


def stl10_form(source: Located) -> str | None:
    """Which form of STL-10 ``source`` is: 'sample', 'url', 'folder' (holding the extracted
    files or the tarball), 'bin', 'tarball' (any file that is not an image, a list or an archive
    of images: its MD5 says whether it is the tarball), or None when it is not STL-10."""
    if source.text == "sample":
        return "sample"
    if source.scheme in ("http", "https"):
        return "url"
    if source.path is None:
        return None
    path, name = source.path, source.name
    if path.is_dir():
        stl10 = (path / UNLABELED, path / EXTRACT_DIR / UNLABELED, path / TARBALL_NAME)
        return "folder" if any(p.exists() for p in stl10) else None
    if not path.is_file():
        return None
    if name.endswith(".bin"):
        return "bin"
    if name == TARBALL_NAME:
        return "tarball"
    if name.endswith((*LIST_SUFFIXES, *IMAGE_SUFFIXES)):
        return None
    if name.endswith(ARCHIVE_SUFFIXES):
        return "tarball" if _holds_stl10(path) else None
    return "tarball"


def _holds_stl10(archive: Path) -> bool:
    """Whether a tar archive is laid out like STL-10's (its first members say so)."""
    if archive.name.lower().endswith(".zip"):
        return False
    wanted = {UNLABELED, *LABELLED}
    try:
        with tarfile.open(archive) as tf:
            for member in tf:
                if PurePosixPath(member.name).name in wanted:
                    return True
                if member.name.startswith(f"{EXTRACT_DIR}/"):
                    return True
                if member.isfile() and member.name.lower().endswith(IMAGE_SUFFIXES):
                    return False
    except (OSError, tarfile.TarError, EOFError):
        return False
    return False
