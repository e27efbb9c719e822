"""Where outputs live and how they appear: atomic writes, folder locks, clean-up of what a killed
run left, and the one stage cache that makes reruns free and a run's outputs a consistent set.

Every stage of a run writes into ``<out>/.staging/`` and records there what it wrote (the key of
its inputs and code, and the SHA-256 of each output). Only when the whole run has finished does
:meth:`RunFolder.commit` move the new set into place, after writing a journal so that a run
killed halfway through the switch is completed by the next one. A reader of ``<out>`` therefore
never sees the split of one run beside the features of another. Everything inside ``<out>`` is
addressed relative to it, so a copied or re-mounted folder answers from its own files.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.errors import ImageSearchError
from tasks.fingerprints import code_version, file_digest, fingerprint
from tasks.layout import (
    EMBEDDINGS_DIR,
    JOURNAL,
    LOCK_FILE,
    OUTPUT_SUBDIRS,
    STAGING_DIR,
    STATE_DIR,
    TEMP_PREFIX,
    StageLayout,
    record_of,
)

log = logging.getLogger(__name__)

_SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def is_out_of_space(exc: BaseException) -> bool:
    """True for a full disk, an exceeded quota or a file-size limit (pyarrow sets errno too)."""
    return isinstance(exc, OSError) and exc.errno in _SPACE_ERRNOS


def out_of_space_error(path: Path, exc: OSError) -> ImageSearchError:
    """The user-facing form of a full disk while writing ``path``."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return ImageSearchError(
        f"Cannot write {path}: {reason}. The outputs already in place were not changed; free "
        f"space on that disk (or raise the quota or file-size limit) and run again: finished "
        f"work is kept."
    )


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success it is renamed onto ``dest``.

    The temporary file is created with mode 0666 less the process umask, like any file the
    user makes, and named ``.image-search-tmp.<name>.<random>`` so clean-up can tell it from
    anything else. A crash or an exception leaves ``dest`` untouched (old content or absent).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f"{TEMP_PREFIX}{dest.name}.{secrets.token_hex(4)}"
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        yield tmp
        os.replace(tmp, dest)
    except OSError as exc:
        if is_out_of_space(exc):
            raise out_of_space_error(dest, exc) from exc
        raise
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
        probe = path / f"{TEMP_PREFIX}write-test.{secrets.token_hex(4)}"
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        probe.unlink()
    except OSError as exc:
        raise ImageSearchError(
            f"{what} {str(path)!r} is not writable ({exc.strerror or exc}); "
            f"choose a folder you can write to."
        ) from exc
    return path


def is_writable_dir(path: Path) -> bool:
    """True when ``path`` is a folder this process can create files in."""
    try:
        ensure_writable_dir(path, "folder")
    except ImageSearchError:
        return False
    return True


def remove_orphan_temps(folders: Iterable[Path], *, recursive: bool = False) -> list[Path]:
    """Delete the temporary files (``.image-search-tmp.*``) a killed run left in ``folders``.

    Only names the product chose, only in the folders given (recursively only where the whole
    tree is the product's own, such as the staging folder). Safe only under
    :func:`folder_lock`, since a live run's temporary file looks the same as an orphan.
    """
    removed: list[Path] = []
    for folder in folders:
        if not folder.is_dir():
            continue
        found = folder.rglob(f"{TEMP_PREFIX}*") if recursive else folder.glob(f"{TEMP_PREFIX}*")
        for path in found:
            if path.is_file() and not path.is_symlink():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    return removed


@contextlib.contextmanager
def folder_lock(folder: Path, what: str, *, wait: float | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` across processes and hosts that share it; the
    kernel drops it when the holder dies, even by ``kill -9``.

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


def overlap(a: Path, b: Path) -> str | None:
    """How folder ``a`` overlaps folder ``b`` ("is the same folder as", "lies inside", "holds"),
    or None when they are apart; symlinks and ``..`` resolved first."""
    a, b = a.expanduser().resolve(), b.expanduser().resolve()
    if a == b:
        return "is the same folder as"
    if b in a.parents:
        return "lies inside"
    if a in b.parents:
        return "holds"
    return None


def read_record(folder: Path, stage: str) -> dict[str, Any] | None:
    """The record stage ``stage`` left in ``folder`` (key, outputs with size, mtime and SHA-256,
    info), or None when there is none or it cannot be read."""
    try:
        record = json.loads((folder / record_of(stage)).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def recorded_output(folder: Path, rel: str, stage: str) -> dict[str, Any] | None:
    """What stage ``stage``'s record in ``folder`` says of its output ``rel`` (size, mtime_ns,
    sha256), or None without such a record."""
    record = read_record(folder, stage)
    try:
        seen = record["outputs"][rel] if record else None
    except (KeyError, TypeError):
        return None
    return seen if isinstance(seen, dict) else None


def unsettled(folder: Path, files: Mapping[str, str]) -> str | None:
    """Why files ``files`` (path relative to ``folder`` -> the stage that wrote it) are not the
    ones their stage records describe (a commit under way), or None when they are, or when no
    record exists (a folder assembled by hand). Compares size and mtime only: cheap enough to
    ask before every read of an index."""
    for rel, stage in files.items():
        seen = recorded_output(folder, rel, stage)
        if seen is None:
            continue
        try:
            st = os.stat(folder / rel)
        except OSError:
            return f"{rel} is missing"
        if (st.st_size, st.st_mtime_ns) != (seen.get("size"), seen.get("mtime_ns")):
            return f"{rel} is not the file its record {record_of(stage)} describes"
    return None


class Stage:
    """One stage's view of the run folder: is it done for this key, where its outputs are, and
    the record that says so.

    ``outputs`` are paths relative to the output folder. A stage is done when a record with the
    same key lists files whose size and mtime still match, or whose SHA-256 still does: a
    deleted, truncated or altered output re-runs the stage, never is trusted.
    """

    def __init__(self, run: RunFolder, name: str, key: str, outputs: Sequence[str]) -> None:
        self.run = run
        self.name = name
        self.key = key
        self.outputs = list(outputs)
        self.info: dict[str, Any] | None = None
        self._base: Path | None = None

    def done(self) -> dict[str, Any] | None:
        """The recorded info when the outputs for this key exist intact (in place or staged).

        Found in place, any staged record of this stage is another run's leftover and is
        dropped, so that :meth:`RunFolder.commit` can never switch it in.
        """
        for base in (self.run.out, self.run.staging):
            info = self._check(base)
            if info is not None:
                self._base = base
                self.info = info
                if base == self.run.out:
                    (self.run.staging / record_of(self.name)).unlink(missing_ok=True)
                return info
        return None

    def path(self, rel: str) -> Path:
        """Where output ``rel`` is read from (when done) or written to (staging, when not)."""
        return (self._base or self.run.staging) / rel

    def finish(self, **info: Any) -> dict[str, Any]:
        """Record the outputs just written (their SHA-256) under this stage's key."""
        base = self.path("")
        files = {rel: self._describe(base / rel, None) for rel in self.outputs}
        record = {"key": self.key, "outputs": files, "info": info}
        write_json_atomic(base / record_of(self.name), record)
        self.info = info
        return info

    def digest(self) -> str:
        """One hash of this stage's recorded outputs, for the keys of the stages after it."""
        record = self._record(self.path(""))
        if record is None:
            raise RuntimeError(f"stage {self.name} has no record yet")
        return fingerprint(self.key, {rel: f["sha256"] for rel, f in record["outputs"].items()})

    def _record(self, base: Path) -> dict[str, Any] | None:
        return read_record(base, self.name)

    def _check(self, base: Path) -> dict[str, Any] | None:
        record = self._record(base)
        if record is None or record.get("key") != self.key:
            return None
        files = record.get("outputs") or {}
        if sorted(files) != sorted(self.outputs):
            return None
        for rel, seen in files.items():
            try:
                now = self._describe(base / rel, seen)
            except OSError:
                return None
            if now["sha256"] != seen.get("sha256"):
                log.warning("%s changed since it was written; stage %s runs again", rel, self.name)
                return None
        return dict(record.get("info") or {})

    @staticmethod
    def _describe(path: Path, seen: dict[str, Any] | None) -> dict[str, Any]:
        """Size, mtime and SHA-256 of ``path``; the hash is re-read only when size or mtime
        differ from ``seen``."""
        st = path.stat()
        if seen and seen.get("size") == st.st_size and seen.get("mtime_ns") == st.st_mtime_ns:
            return dict(seen)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_digest(path)}


class RunFolder:
    """The output folder of a run: its stages, its staging area and the switch between them."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.staging = out / STAGING_DIR

    def stage(self, layout: StageLayout, key_parts: Sequence[Any], code: Sequence[str]) -> Stage:
        """The stage ``layout`` names, keyed by ``key_parts`` and the source of the ``code``
        modules."""
        key = fingerprint(layout.name, code_version(*tuple(code)), *key_parts)
        return Stage(self, layout.name, key, layout.outputs)

    def clean_orphans(self) -> list[Path]:
        """Remove temporary files of killed runs from the folders this product writes."""
        ours = [self.out, self.out / STATE_DIR]
        ours += [p for p in self.out.iterdir() if p.is_dir() and p.name in OUTPUT_SUBDIRS]
        store = self.out / EMBEDDINGS_DIR
        ours += [p for p in store.iterdir() if p.is_dir()] if store.is_dir() else []
        return remove_orphan_temps(ours) + remove_orphan_temps([self.staging], recursive=True)

    def recover(self) -> list[str]:
        """Finish a switch that a killed run started; return the stages it moved."""
        try:
            names = json.loads((self.staging / JOURNAL).read_text())
        except (OSError, ValueError):
            return []
        self._switch([str(n) for n in names])
        return [str(n) for n in names]

    def commit(self, stages: Iterable[str]) -> list[str]:
        """Move the staged outputs of this run's ``stages`` into place, as one set.

        Stages whose outputs were already in place have no staged record and are skipped.
        Returns the stages moved.
        """
        names = sorted(n for n in stages if (self.staging / record_of(n)).exists())
        if not names:
            return []
        write_json_atomic(self.staging / JOURNAL, names)
        self._switch(names)
        return names

    def _switch(self, names: list[str]) -> None:
        for name in names:
            record_path = self.staging / record_of(name)
            try:
                record = json.loads(record_path.read_text())
            except (OSError, ValueError):
                continue  # already switched
            for rel in record.get("outputs", {}):
                src, dest = self.staging / rel, self.out / rel
                if src.exists():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, dest)
            (self.out / STATE_DIR).mkdir(parents=True, exist_ok=True)
            os.replace(record_path, self.out / record_of(name))
        (self.staging / JOURNAL).unlink(missing_ok=True)
