"""An index's files, read as one committed set, and the memory-mapped copy of its features.

A run commits an index as files renamed into place, each stage's record after its files
(:meth:`tasks.storage.RunFolder.commit`). A reader takes the folder's identity (inode, size and
mtime of every index file and record), checks that every file is the one its record describes,
reads, and takes the identity again: equal means one committed set was read whole.

Files of record (``tasks.layout.INDEX_FILES``) must be there. Derived files
(``tasks.layout.INDEX_DERIVED``: the memory-mapped copy, the exported model, and whatever a later
tier adds) are used only when their stage's record says they were made from the files of record
now in place; otherwise the reader falls back to the files of record and says why.

A file unlike its record while no run holds the folder's lock (:func:`being_written`) will
not settle by waiting: :func:`damage` says how it differs (missing, size, content).

The copy is two ``.npy`` files: the embeddings as one (n, 2048) float32 matrix, and per row the
image id (int64) and the half squared norm (float64) the exact search ranks with, so that
opening an index costs a memory map, not a read of every embedding.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from tasks.errors import ImageSearchError, param
from tasks.features.model import DIM
from tasks.fingerprints import file_digest
from tasks.layout import (
    EMBED,
    INDEX_DERIVED,
    INDEX_FEATURES,
    INDEX_FILES,
    INDEX_MATRIX,
    INDEX_ROWS,
    JOURNAL,
    LOCK_FILE,
    STAGING_DIR,
    record_of,
)
from tasks.search.exact import PreparedIndex
from tasks.storage import atomic_path, read_record, recorded_output

log = logging.getLogger(__name__)

ROWS_DTYPE = np.dtype([("image_id", "<i8"), ("half_sq_norm", "<f8")])
SOURCE_KEY = "source"  # in a derived stage's record info: what it was made from


def index_identity(folder: Path) -> str | None:
    """What changes whenever a run commits a new index into ``folder``: inode, size and mtime
    of every index file (of record and derived) and of the records that describe them. None
    when the folder holds no features file."""
    files = [*INDEX_FILES, *INDEX_DERIVED]
    records = sorted(
        {record_of(stage) for stage in (*INDEX_FILES.values(), *INDEX_DERIVED.values())}
    )
    parts = []
    for rel in [*files, *records]:
        try:
            st = os.stat(folder / rel)
        except OSError:
            if rel == INDEX_FEATURES:
                return None
            parts.append(f"{rel}:-")
            continue
        parts.append(f"{rel}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def features_digest(folder: Path) -> str | None:
    """The SHA-256 of the index features as their stage recorded it; None without a record."""
    record = read_record(folder, EMBED.name)
    try:
        return str(record["outputs"][INDEX_FEATURES]["sha256"]) if record else None
    except (KeyError, TypeError):
        return None


def derived_problem(folder: Path, stage: str, source: dict[str, Any]) -> str | None:
    """Why the derived files of ``stage`` in ``folder`` cannot stand in for the files of record
    (``source``: what their record must say they were made from), or None when they can."""
    record = read_record(folder, stage)
    if record is None:
        return f"no record of stage {stage} (an index written before it existed)"
    info = record.get("info") or {}
    if info.get(SOURCE_KEY) != source:
        return f"stage {stage} made them from other files (a run in between did not update them)"
    for rel in record.get("outputs") or {}:
        if not (folder / rel).is_file():
            return f"{rel} is missing"
    return None


def copy_source(folder: Path) -> dict[str, Any] | None:
    """What the memory-mapped copy must have been made from: the features of record now in
    place, by digest; None when no record describes them (a folder assembled by hand)."""
    digest = features_digest(folder)
    return None if digest is None else {INDEX_FEATURES: digest}


def _batches(features: Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids (m,) int64, embeddings (m, 2048) float32) of ``features``, row group by row group,
    every page's checksum verified."""
    source = pq.ParquetFile(features, page_checksum_verification=True)
    for group in range(source.num_row_groups):
        table = source.read_row_group(group, columns=["image_id", "embedding"])
        ids = table.column("image_id").to_numpy()
        values = table.column("embedding").combine_chunks().flatten().to_numpy()
        yield ids, values.reshape(-1, DIM)


def write_at(fd: int, data: memoryview | bytes, offset: int) -> None:
    """Write all of ``data`` at byte ``offset`` of the open file ``fd``."""
    view = memoryview(data).cast("B")
    while len(view):
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def write_copy(features: Path, matrix: Path, rows: Path) -> int:
    """Write the memory-mappable copy of the feature file ``features``: ``matrix`` (n, 2048)
    float32 and ``rows`` (n,) of (image_id, half squared norm), both atomically, row group by
    row group (memory stays flat: the matrix is written with plain writes, not through a map
    that would keep every page written resident). Returns n.

    Raises ImageSearchError for a feature file that is unsorted or holds NaN or infinity.
    """
    n = pq.ParquetFile(features).metadata.num_rows
    with atomic_path(matrix) as tmp_matrix, atomic_path(rows) as tmp_rows:
        sized = np.lib.format.open_memmap(tmp_matrix, mode="w+", dtype=np.float32, shape=(n, DIM))
        del sized  # the file exists with its header at full size; rows are written below
        offset = MatrixFile(tmp_matrix).offset
        per_row = np.lib.format.open_memmap(tmp_rows, mode="w+", dtype=ROWS_DTYPE, shape=(n,))
        start = 0
        fd = os.open(tmp_matrix, os.O_WRONLY)
        try:
            for ids, emb in _batches(features):
                end = start + len(ids)
                if end > n:
                    break
                if not np.isfinite(emb).all():
                    raise ImageSearchError(f"{features} holds NaN or infinite embeddings.")
                block = np.ascontiguousarray(emb, dtype=np.float32)
                write_at(fd, block.data, offset + start * DIM * 4)
                per_row["image_id"][start:end] = ids
                # As the exact search's prepare_index computes them: float64 sums, halved.
                per_row["half_sq_norm"][start:end] = (
                    np.einsum("ij,ij->i", emb, emb, dtype=np.float64) * 0.5
                )
                start = end
        finally:
            os.close(fd)
        if start != n:
            raise ImageSearchError(f"{features} says {n} rows but holds more or fewer.")
        if n > 1 and not (np.diff(per_row["image_id"]) > 0).all():
            raise ImageSearchError(f"{features} is not sorted by image_id.")
        per_row.flush()
        del per_row
    return n


def open_copy(matrix: Path, rows: Path, n: int) -> tuple[np.ndarray, PreparedIndex]:
    """The copy as (ids (n,) int64, a PreparedIndex over the memory-mapped (n, 2048) matrix),
    in milliseconds: nothing is read until searched, and processes share the pages.

    Raises ValueError when the files are not an (n, 2048) float32 copy with n rows.
    """
    data = np.load(matrix, mmap_mode="r")
    per_row = np.load(rows)
    if data.dtype != np.float32 or data.shape != (n, DIM) or not data.flags.c_contiguous:
        raise ValueError(f"{matrix} holds {data.dtype} {data.shape}, not float32 ({n}, {DIM})")
    if per_row.dtype != ROWS_DTYPE or per_row.shape != (n,):
        raise ValueError(f"{rows} holds {per_row.dtype} {per_row.shape}, not ({n},) rows")
    half = per_row["half_sq_norm"]
    prepared = PreparedIndex(
        data=data.view(np.ndarray),
        half_sq_norms=half.astype(np.float32),
        max_norm=float(np.sqrt(2.0 * half.max())) if n else 0.0,
    )
    return np.ascontiguousarray(per_row["image_id"]), prepared


class MatrixFile:
    """The rows of a 2-D ``.npy`` file read with plain reads, block by block or by position.

    A pass over an index of any size keeps memory at one block: a memory map would keep every
    page the pass touched resident in the process (8 GB for 10^6 x 2048 float32).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            self.offset = f.tell()
        if len(shape) != 2 or fortran or dtype.hasobject:
            raise ValueError(f"{path} holds {dtype} {shape}, not a C-ordered matrix")
        self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(dtype)
        self.row_bytes = self.shape[1] * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as a new (stop - start, d) array."""
        stop = min(stop, self.shape[0])
        out = np.empty((max(0, stop - start), self.shape[1]), dtype=self.dtype)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset + start * self.row_bytes)
            view = out.data.cast("B")
            done = 0
            while done < out.nbytes:
                got = f.readinto(view[done:])
                if not got:
                    raise ValueError(f"{self.path} ends before row {stop}")
                done += got
        return out

    def take(self, positions: np.ndarray) -> np.ndarray:
        """Rows at ``positions`` (m,) as a new (m, d) array, in the order given."""
        out = np.empty((len(positions), self.shape[1]), dtype=self.dtype)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i, p in enumerate(np.asarray(positions, dtype=np.int64)):
                data = os.pread(fd, self.row_bytes, self.offset + int(p) * self.row_bytes)
                if len(data) != self.row_bytes:
                    raise ValueError(f"{self.path} ends before row {int(p)}")
                out[i] = np.frombuffer(data, dtype=self.dtype)
        finally:
            os.close(fd)
        return out

    def blocks(self, rows: int, start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows (m <= ``rows``, d)) from row ``start`` to the end."""
        for s in range(start, self.shape[0], rows):
            yield s, self.rows(s, s + rows)


def copy_paths(folder: Path) -> tuple[Path, Path]:
    """Where the copy of ``folder``'s index features lives (matrix, rows)."""
    return folder / INDEX_MATRIX, folder / INDEX_ROWS


def being_written(folder: Path) -> bool:
    """Whether a run holds the folder's lock now (it is writing, or about to commit, there), or
    a commit's journal is in it. Asks the lock without taking it and without creating its file,
    so a read-only index is asked too."""
    if (folder / STAGING_DIR / JOURNAL).exists():
        return True
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False  # no lock file: no run has ever held this folder (or it is not ours)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def damaged(folder: Path, files: dict[str, str]) -> None:
    """Raise for the first of ``files`` (path relative to ``folder`` -> the stage that wrote it)
    that is not what its stage recorded (see :func:`damage`)."""
    for rel, stage in files.items():
        what = damage(folder, rel, stage)
        if what is not None:
            raise ImageSearchError(
                f"Index folder {folder} is damaged: {what}; it will not mend by itself: run "
                f"image-search again with {param('out')} {folder} to rebuild it."
            )


def damage(folder: Path, rel: str, stage: str) -> str | None:
    """How file ``rel`` of ``folder`` differs from what ``stage`` recorded: missing, another
    size, or other bytes (the SHA-256 is read only when the size matches and the time does
    not); None when it matches, or only lost its recorded time (a copied folder)."""
    seen = recorded_output(folder, rel, stage)
    if seen is None:
        return None
    try:
        st = os.stat(folder / rel)
    except OSError:
        return f"{rel} is missing although its record {record_of(stage)} lists it"
    if st.st_size != seen.get("size"):
        return (
            f"{rel} holds {st.st_size:,} bytes where its record {record_of(stage)} says "
            f"{seen.get('size'):,}"
        )
    if st.st_mtime_ns != seen.get("mtime_ns") and file_digest(folder / rel) != seen.get("sha256"):
        return f"{rel} no longer has the content its record {record_of(stage)} describes"
    return None
