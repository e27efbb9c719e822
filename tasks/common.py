"""Shared pieces of every stage: the user-facing error type, data references, atomic writes,
fingerprints and the per-stage "already done" markers that make reruns free."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

IMAGE_SHAPE = (96, 96, 3)
IMAGE_BYTES = 96 * 96 * 3  # 27,648 bytes per STL-10 image
_UMASK = os.umask(0)
os.umask(_UMASK)


class ImageSearchError(Exception):
    """A problem the user can fix: bad input, missing file, unreachable URL.

    The message names the offending value and the fix; the CLI prints it without a traceback.
    """


class DataRef(BaseModel):
    """A small, serialisable reference to data on disk, passed between tasks instead of arrays."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str
    rows: int
    fingerprint: str

    @property
    def path(self) -> Path:
        return Path(self.uri)


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (parameters, upstream fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_digest(path: Path, algorithm: str = "md5", chunk: int = 1 << 22) -> str:
    """Hex digest of a file, read in 4 MiB chunks so memory stays flat."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def quick_file_fingerprint(path: Path) -> str:
    """Cheap identity of a large file: size, mtime and its first and last MiB.

    Used to key derived outputs; correctness of downloads is checked with full MD5 instead.
    """
    st = path.stat()
    h = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > 1 << 20:
            f.seek(max(st.st_size - (1 << 20), 0))
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success it is renamed onto ``dest``.

    A crash or an exception leaves ``dest`` untouched (old content or absent) and removes the
    temporary file, so readers never see a torn file.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are shared like any file
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(dest: Path, payload: Any) -> None:
    """Write ``payload`` as pretty JSON, atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def ensure_writable_dir(path: Path, what: str) -> Path:
    """Create ``path`` if needed and prove it is writable, else raise a clear error."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ImageSearchError(
            f"{what} {str(path)!r} is not writable ({exc.strerror or exc}); "
            f"choose a folder you can write to."
        ) from exc
    return path


STATE_DIR = ".state"


def stage_marker(out: Path, stage: str) -> Path:
    """Where a stage records the key of the inputs its finished outputs were made from."""
    return out / STATE_DIR / f"{stage}.json"


def stage_is_done(out: Path, stage: str, key: str, outputs: list[Path]) -> dict[str, Any] | None:
    """Return the stage's recorded info when it already ran with ``key`` and its outputs exist."""
    marker = stage_marker(out, stage)
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if info.get("key") != key or not all(p.exists() for p in outputs):
        return None
    return dict(info)


def mark_stage_done(out: Path, stage: str, key: str, **info: Any) -> None:
    """Record that ``stage`` finished with ``key`` (written after its outputs are in place)."""
    write_json_atomic(stage_marker(out, stage), {"key": key, **info})
