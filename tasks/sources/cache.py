"""The data cache: where downloads and extracted files live, the record of files already
MD5-checked, and the lock that serialises writers. A complete cache may be read-only."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from tasks.errors import ImageSearchError, param
from tasks.fingerprints import file_digest
from tasks.storage import folder_lock, is_writable_dir, remove_orphan_temps, write_json_atomic

log = logging.getLogger(__name__)

DATA_ENV = "IMAGE_SEARCH_DATA"
VERIFIED = ".verified.json"


def default_data_dir() -> Path:
    """The data cache: ``$IMAGE_SEARCH_DATA``, else the per-user cache folder."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("image-search")) / "data"


def verify_file(path: Path, md5: str | None, data_dir: Path) -> str:
    """MD5 of ``path``, checked against ``md5`` when given; a clear error when it differs.

    The digest is remembered in the cache's record under the file's resolved path, size,
    mtime and inode, so later runs skip re-reading 2.7 GB; a read-only cache re-hashes.
    """
    record = data_dir / VERIFIED
    st = path.stat()
    key = str(path.resolve())
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    try:
        seen = json.loads(record.read_text())
    except (OSError, ValueError):
        seen = {}
    entry = seen.get(key) if isinstance(seen, dict) else None
    if entry and all(entry.get(k) == v for k, v in stamp.items()):
        digest = str(entry["md5"])
    else:
        digest = file_digest(path, "md5")
        if not isinstance(seen, dict):
            seen = {}
        seen[key] = {**stamp, "md5": digest}
        with contextlib.suppress(OSError, ImageSearchError):
            write_json_atomic(record, seen)
    if md5 is not None and digest != md5:
        hint = (
            "If it is your own file in the STL-10 binary format, pass the .bin file itself as "
            f"{param('source')}."
            if path.suffix == ".bin"
            else "It is corrupt, truncated or not STL-10: fetch it again, or extract your own "
            f"archive and pass its unlabeled_X.bin as {param('source')}."
        )
        raise ImageSearchError(
            f"{path} has MD5 {digest}, expected {md5} (the official STL-10 {path.name}). {hint}"
        )
    return digest


@contextlib.contextmanager
def data_lock(data_dir: Path, subfolders: tuple[str, ...] = ()) -> Iterator[bool]:
    """Serialise writers of one data cache across processes and pods; yield whether the cache
    is writable.

    Whoever holds the lock first removes the temporary files a killed run left in the cache
    (and in its ``subfolders``). A cache that exists but is read-only (a shared ReadOnlyMany
    volume) is used without a lock: nobody can write it, so there is nothing to serialise.
    """
    if data_dir.is_dir() and not is_writable_dir(data_dir):
        yield False
        return
    with folder_lock(data_dir, "Data cache"):
        folders = [data_dir, *(data_dir / s for s in subfolders)]
        for orphan in remove_orphan_temps(folders):
            log.warning("removed %s, left behind by an interrupted run", orphan)
        yield True
