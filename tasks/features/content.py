"""The content-addressed embedding store: one embedding per distinct image content (SHA-256 of
the image's bytes) for one model identity, kept in ``<out>/.embeddings/<model key>/``.

It is what makes indexing incremental: a run embeds only contents the store lacks, so adding
1,000 photos to 100,000 embeds 1,000, two copies of one photo are embedded once, and a killed run
resumes without embedding a finished part again. Parts are Arrow IPC files
(``sha256`` fixed_size_binary[32], ``embedding`` fixed_size_list<float32>[2048]) that appear
atomically and are read through memory maps, so gathering rows costs no more memory than the
rows gathered. Parts from concurrent writers (Dask workers) get unique names and never collide.

Every part carries the SHA-256 of its rows in its schema metadata, checked whenever the store
is loaded: a part whose bytes changed on disk (even floats that still parse) is dropped and
its images are embedded again, never published.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from tasks.columns import numbers
from tasks.features.model import DIM
from tasks.fingerprints import code_version, fingerprint
from tasks.layout import EMBEDDINGS_DIR
from tasks.storage import atomic_path, write_json_atomic

log = logging.getLogger(__name__)

MODEL_FILE = "model.json"
SCHEMA = pa.schema(
    [
        pa.field("sha256", pa.binary(32), nullable=False),
        pa.field("embedding", pa.list_(pa.float32(), DIM), nullable=False),
    ]
)
CHECKSUM_KEY = b"image_search.rows_sha256"  # schema metadata: SHA-256 of a part's rows
# Compact when dead rows (contents no longer in any catalog) outnumber live ones.
COMPACT_DEAD_RATIO = 1.0


def model_key(weights_identity: str, seed: int, precision: str, input_size: int) -> str:
    """Everything that decides an image's embedding, as a short key: weights by content, seed
    (random weights), arithmetic, input size, and the code of the model and the resize rule."""
    code = code_version("tasks.features.model", "tasks.sources.images")
    return fingerprint(weights_identity, seed, precision, input_size, code)[:16]


class _Unchecked(Exception):
    """A part written before parts carried a checksum."""


class EmbeddingStore:
    """The embeddings of one model identity, keyed by content hash (32-byte SHA-256 digests)."""

    def __init__(self, out: Path, key: str) -> None:
        self.out = out
        self.folder = out / EMBEDDINGS_DIR / key
        self.key = key
        self._index: dict[bytes, tuple[int, int]] | None = None
        self._unchecked = 0  # parts of an earlier version, without a checksum, dropped
        self._views: list[np.ndarray] = []  # (rows, 2048) float32 views of memory-mapped parts

    def parts(self) -> list[Path]:
        """The finished part files, oldest first."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.glob("part-*.arrow"))

    def describe(self, metadata: dict[str, Any]) -> None:
        """Record the model metadata once, for a person looking at the folder."""
        path = self.folder / MODEL_FILE
        if not path.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, metadata)

    def model(self) -> dict[str, Any]:
        path = self.folder / MODEL_FILE
        return dict(json.loads(path.read_text())) if path.exists() else {}

    def _open(self, path: Path) -> tuple[pa.Table, np.ndarray] | None:
        """A part's table and its (rows, 2048) float32 view, checked against its checksum; None
        (and the part deleted) when it is damaged."""
        try:
            table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
            if not table.schema.equals(SCHEMA, check_metadata=False):
                raise pa.ArrowInvalid(f"unexpected schema {table.schema}")
            digests, values = _arrays(table)
            recorded = (table.schema.metadata or {}).get(CHECKSUM_KEY, b"").decode()
            if not recorded:
                raise _Unchecked
            if _rows_checksum(digests, values) != recorded:
                raise pa.ArrowInvalid("its rows do not match their checksum")
            return table, values
        except _Unchecked:
            # Written by an earlier version, before parts carried a checksum: its rows cannot
            # be trusted either; :meth:`load` says so once for all of them.
            path.unlink(missing_ok=True)
            self._unchecked += 1
            return None
        except (OSError, pa.ArrowInvalid, UnicodeDecodeError) as exc:
            # Parts appear atomically, so this is outside damage to our own cache file: drop
            # it and let the run embed those images again.
            log.warning("embedding part %s is damaged (%s); recomputing its images", path, exc)
            path.unlink(missing_ok=True)
            return None

    def load(self) -> dict[bytes, tuple[int, int]]:
        """Map every stored digest to (table number, row); the first copy wins."""
        if self._index is None:
            self._views, self._index = [], {}
            self._unchecked = 0
            for path in self.parts():
                opened = self._open(path)
                if opened is not None:
                    self._add(*opened)
            if self._unchecked:
                log.warning(
                    "%d embedding part(s) in %s were written by an earlier version of "
                    "image-search, without a checksum; their images are embedded again, once",
                    self._unchecked,
                    self.folder,
                )
        return self._index

    def _add(self, table: pa.Table, values: np.ndarray) -> None:
        assert self._index is not None
        t = len(self._views)
        self._views.append(values)
        for row, digest in enumerate(table.column("sha256").to_pylist()):
            self._index.setdefault(digest, (t, row))

    def __contains__(self, digest: bytes) -> bool:
        return digest in self.load()

    def __len__(self) -> int:
        return len(self.load())

    def append(self, digests: list[bytes], embeddings: np.ndarray) -> Path:
        """Store (n,) digests with their (n, 2048) float32 embeddings as one new part."""
        flat = np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1)
        table = pa.Table.from_arrays(
            [
                pa.array(digests, type=pa.binary(32)),
                pa.FixedSizeListArray.from_arrays(pa.array(flat), DIM),
            ],
            schema=SCHEMA,
        )
        checksum = _rows_checksum(*_arrays(table))
        table = table.replace_schema_metadata({CHECKSUM_KEY: checksum.encode()})
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"part-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.arrow"
        dest = self.folder / name
        with (
            atomic_path(dest) as tmp,
            pa.OSFile(str(tmp), "wb") as sink,
            pa.ipc.new_file(sink, table.schema) as writer,
        ):
            writer.write_table(table)
        if self._index is not None:
            written = pa.ipc.open_file(pa.memory_map(str(dest))).read_all()
            self._add(written, _arrays(written)[1])
        return dest

    def gather(self, digests: list[bytes]) -> np.ndarray:
        """Embeddings of ``digests`` in order: (n, 2048) float32; KeyError for a missing one."""
        index = self.load()
        out = np.empty((len(digests), DIM), dtype=np.float32)
        for i, digest in enumerate(digests):
            t, row = index[digest]
            out[i] = self._views[t][row]
        return out

    def compact(self, live: set[bytes]) -> int:
        """Rewrite the store without contents no catalog uses any more, when those outnumber
        the live ones (by :data:`COMPACT_DEAD_RATIO`); returns the rows dropped."""
        index = self.load()
        dead = len(index) - len(live & index.keys())
        if dead == 0 or dead < COMPACT_DEAD_RATIO * max(len(live), 1):
            return 0
        keep = sorted(live & index.keys())
        old = self.parts()
        for start in range(0, len(keep), 4096):
            chunk = keep[start : start + 4096]
            self.append(chunk, self.gather(chunk))
        for path in old:
            path.unlink(missing_ok=True)
        self._index, self._views = None, []
        return dead


def _arrays(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """A part's digests as (rows, 32) uint8 and embeddings as (rows, 2048) float32, both views
    of the (memory-mapped) buffers, not copies."""
    digests = table.column("sha256").combine_chunks()
    raw = np.frombuffer(digests.buffers()[1], dtype=np.uint8)
    start = digests.offset * 32
    values = table.column("embedding").combine_chunks().values
    floats = numbers(values).reshape(-1, DIM)
    return raw[start : start + 32 * len(digests)].reshape(-1, 32), floats


def _rows_checksum(digests: np.ndarray, values: np.ndarray) -> str:
    """SHA-256 of a part's rows: its digests, then its embeddings' bytes."""
    h = hashlib.sha256(np.ascontiguousarray(digests).data)
    h.update(np.ascontiguousarray(values).data)
    return h.hexdigest()
