"""Shared pieces of every stage: the user-facing error type, data references, atomic writes,
fingerprints and the per-stage "already done" markers that make reruns free."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

log = logging.getLogger(__name__)

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
    except OSError as exc:
        if is_out_of_space(exc):
            raise out_of_space_error(dest, exc) from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)


_SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def is_out_of_space(exc: BaseException) -> bool:
    """True for a full disk, an exceeded quota or a file-size limit (pyarrow sets errno too)."""
    return isinstance(exc, OSError) and exc.errno in _SPACE_ERRNOS


def out_of_space_error(path: Path, exc: OSError) -> ImageSearchError:
    """The user-facing form of a full disk while writing ``path``."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return ImageSearchError(
        f"Cannot write {path}: {reason}. Nothing already there was changed; free space on that "
        f"disk (or raise the quota or file-size limit) and run again: finished stages are kept."
    )


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


def is_orphan_temp(path: Path) -> bool:
    """True for a temporary file of :func:`atomic_path` (``.<name>.<random>.tmp``)."""
    return path.name.startswith(".") and path.name.endswith(".tmp") and path.is_file()


def remove_orphan_temps(folder: Path) -> list[Path]:
    """Delete the temporary files a killed run left under ``folder``; return what was removed.

    Only safe while holding :func:`folder_lock` on ``folder``: a live run's temporary file looks
    the same as an orphan.
    """
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in folder.rglob(".*.tmp"):
        if is_orphan_temp(path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


LOCK_FILE = ".lock"


@contextlib.contextmanager
def folder_lock(folder: Path, what: str, *, wait: float | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (a ``.lock`` file in it) across processes and hosts
    that share the folder; the kernel drops it when the holder dies, even by ``kill -9``.

    When another run holds it, log that this one waits, naming the folder; ``wait`` seconds
    (None: no limit) later, give up with an :class:`ImageSearchError` that says what to do.
    """
    from filelock import FileLock, Timeout

    ensure_writable_dir(folder, what)
    lock = FileLock(str(folder / LOCK_FILE))
    try:
        lock.acquire(timeout=0.5)
    except Timeout:
        log.warning(
            "another run is using the %s %s; waiting for it to finish", what.lower(), folder
        )
        start = time.monotonic()
        try:
            lock.acquire(timeout=-1 if wait is None else wait)
        except Timeout:
            raise ImageSearchError(
                f"{what} {str(folder)!r} is still in use by another run after "
                f"{time.monotonic() - start:.0f} s; wait for that run to finish, or choose "
                f"another folder."
            ) from None
    try:
        yield
    finally:
        lock.release()
