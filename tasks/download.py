"""Download, verify and extract STL-10: checked, cached, resumable, atomic.

``download_and_extract(source, data_dir)`` turns any supported source into a verified
``unlabeled_X.bin`` in the data cache and returns a reference to it.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import socket
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import State
from tqdm import tqdm

from tasks.common import (
    IMAGE_BYTES,
    DataRef,
    ImageSearchError,
    file_digest,
    folder_lock,
    is_out_of_space,
    out_of_space_error,
    quick_file_fingerprint,
    remove_orphan_temps,
    write_json_atomic,
)

log = logging.getLogger(__name__)

OFFICIAL_URL = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"
TARBALL_NAME = "stl10_binary.tar.gz"
EXTRACT_DIR = "stl10_binary"
UNLABELED = "unlabeled_X.bin"
DATA_ENV = "IMAGE_SEARCH_DATA"
BACKOFF_ENV = "IMAGE_SEARCH_RETRY_BACKOFF"
CHUNK = 1 << 20


def retry_backoff() -> float:
    """Base delay in seconds between download retries: ``$IMAGE_SEARCH_RETRY_BACKOFF``, else 1.

    Attempts within one try wait 1×, 2×, 4× this; the task's own retries wait 5× and 30×.
    """
    try:
        return max(float(os.environ.get(BACKOFF_ENV, "1")), 0.0)
    except ValueError:
        return 1.0


@dataclass(frozen=True)
class Checksums:
    """Expected MD5 sums: the tarball and the members we extract from it."""

    tarball: str | None
    members: dict[str, str]


OFFICIAL = Checksums(
    tarball="91f7769df0f17e558f3565bffb0c7dfb",
    members={UNLABELED: "5242ba1fed5e4be9e1e742405eb56ca4"},
)
# The search uses the 100,000 unlabeled images; the labelled files are not extracted.
WANTED = (UNLABELED,)


def default_data_dir() -> Path:
    """The data cache: ``$IMAGE_SEARCH_DATA``, else the per-user cache folder."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("image-search")) / "data"


class TransientDownloadError(ImageSearchError):
    """A network failure worth retrying (connection reset, timeout, 5xx)."""


def _open(url: str, start: int, timeout: float) -> http.client.HTTPResponse:
    headers = {"User-Agent": "image-search"}
    if start:
        headers["Range"] = f"bytes={start}-"
    req = urllib.request.Request(url, headers=headers)
    response: http.client.HTTPResponse = urllib.request.urlopen(req, timeout=timeout)
    return response


def _offline_hint(url: str, dest: Path) -> str:
    return (
        f"If this machine is offline, fetch {url} elsewhere and put it at {dest} "
        f"(or pass the tarball's path as --source); for offline development use --source sample."
    )


def download_file(
    url: str,
    dest: Path,
    md5: str | None,
    *,
    attempts: int = 4,
    backoff: float | None = None,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest``, resuming a partial ``dest.part`` with HTTP Range requests.

    Transient failures are retried ``attempts`` times with exponential backoff, each attempt
    continuing where the last stopped. The MD5 is checked before the file is moved into place;
    a mismatch deletes the partial file, so a bad download never reaches the cache.
    """
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    backoff = retry_backoff() if backoff is None else backoff
    last: Exception | None = None
    for attempt in range(attempts):
        if attempt:
            delay = backoff * 2 ** (attempt - 1)
            log.warning("download of %s failed (%s); retrying in %.1f s", url, last, delay)
            time.sleep(delay)
        try:
            _fetch_into(url, part, timeout=timeout, progress=progress)
            break
        except TransientDownloadError as exc:
            last = exc
    else:
        raise TransientDownloadError(
            f"Could not download {url} after {attempts} attempts: {last}. "
            + _offline_hint(url, dest)
        )
    if md5 is not None:
        got = file_digest(part)
        if got != md5:
            part.unlink(missing_ok=True)
            raise ImageSearchError(
                f"Downloaded {url} has MD5 {got}, expected {md5}: the file is corrupt, "
                f"truncated or not STL-10. It was deleted; run again to re-download, or use "
                f"another mirror."
            )
    os.replace(part, dest)
    return dest


def _fetch_into(url: str, part: Path, *, timeout: float, progress: bool) -> None:
    """One attempt: append the missing bytes of ``url`` to ``part``."""
    start = part.stat().st_size if part.exists() else 0
    try:
        resp = _open(url, start, timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:
            return  # nothing left to fetch: the partial file is complete (MD5 decides)
        if exc.code >= 500 or exc.code in (408, 429):
            raise TransientDownloadError(f"HTTP {exc.code} {exc.reason}") from exc
        raise ImageSearchError(
            f"{url} answered HTTP {exc.code} {exc.reason}; check the URL or use another mirror."
        ) from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, (socket.timeout, TimeoutError, ConnectionError)):
            raise TransientDownloadError(str(exc.reason)) from exc
        raise ImageSearchError(
            f"Cannot reach {url}: {exc.reason}. " + _offline_hint(url, part.with_suffix(""))
        ) from exc
    except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        raise TransientDownloadError(str(exc)) from exc
    with resp:
        status = getattr(resp, "status", 200)
        mode = "ab" if start and status == 206 else "wb"
        if mode == "wb":
            start = 0
        length = resp.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        received = 0
        try:
            with (
                open(part, mode) as f,
                tqdm(
                    total=total,
                    initial=start,
                    unit="B",
                    unit_scale=True,
                    desc=PurePosixPath(urllib.parse.urlparse(url).path).name or "download",
                    disable=not progress,
                ) as bar,
            ):
                while block := resp.read(CHUNK):
                    f.write(block)
                    received += len(block)
                    bar.update(len(block))
        except (TimeoutError, ConnectionError, http.client.HTTPException, OSError) as exc:
            if isinstance(exc, OSError) and not isinstance(exc, (TimeoutError, ConnectionError)):
                if is_out_of_space(exc):
                    raise out_of_space_error(part, exc) from exc
                raise ImageSearchError(f"Cannot write {part}: {exc}") from exc
            raise TransientDownloadError(f"connection lost after {start + received} bytes") from exc
        if length is not None and received < int(length):
            raise TransientDownloadError(
                f"connection closed after {start + received} of {total} bytes"
            )


def _member_problem(member: tarfile.TarInfo) -> str | None:
    """Why extracting ``member`` would be unsafe, or None."""
    name = member.name
    if (
        name.startswith("/")
        or PurePosixPath(name).is_absolute()
        or (len(name) > 1 and name[1] == ":")
    ):
        return "has an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "contains '..'"
    if member.issym() or member.islnk():
        return f"is a link to {member.linkname!r}"
    if member.isdev() or member.isfifo():
        return "is a device or FIFO"
    return None


def extract_members(
    tarball: Path, dest_dir: Path, members: dict[str, str | None]
) -> dict[str, Path]:
    """Stream ``tarball`` once and extract just the named members (by base name) into ``dest_dir``.

    Every member is checked; the whole tarball is refused if any would land outside
    ``dest_dir`` (absolute path, ``..``, links). Each file is MD5-checked while it is written to
    a temporary name; all are renamed into place only after the whole archive passed.
    """
    found: dict[str, Path] = {}
    staged: list[tuple[Path, Path]] = []
    try:
        _extract_pass(tarball, dest_dir, members, found, staged)
        for tmp, target in staged:
            os.replace(tmp, target)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    missing = sorted(set(members) - set(found))
    if missing:
        raise ImageSearchError(f"{tarball} holds no {', '.join(missing)}; it is not STL-10.")
    return found


def _extract_pass(
    tarball: Path,
    dest_dir: Path,
    members: dict[str, str | None],
    found: dict[str, Path],
    staged: list[tuple[Path, Path]],
) -> None:
    """One streaming pass over ``tarball``: check every member, stage the wanted ones."""
    try:
        with tarfile.open(tarball, mode="r|gz") as tar:
            for member in tar:
                problem = _member_problem(member)
                if problem:
                    raise ImageSearchError(
                        f"Refusing {tarball}: member {member.name!r} {problem} and would land "
                        f"outside {dest_dir}. The tarball is not a genuine STL-10 archive."
                    )
                base = PurePosixPath(member.name).name
                if base not in members or not member.isfile() or base in found:
                    continue
                src = tar.extractfile(member)
                if src is None:  # pragma: no cover - isfile() guarantees a stream
                    continue
                target = dest_dir / base
                dest_dir.mkdir(parents=True, exist_ok=True)
                fd, name = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=dest_dir)
                tmp = Path(name)
                staged.append((tmp, target))
                digest = hashlib.md5()
                with src, os.fdopen(fd, "wb") as out:
                    while block := src.read(CHUNK):
                        digest.update(block)
                        out.write(block)
                os.chmod(tmp, 0o644)
                want = members[base]
                if want is not None and digest.hexdigest() != want:
                    raise ImageSearchError(
                        f"{base} in {tarball} has MD5 {digest.hexdigest()}, expected {want}."
                    )
                found[base] = target
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, ImageSearchError):
            raise
        raise ImageSearchError(
            f"Cannot read {tarball}: {exc}. The tarball is truncated or corrupt; delete it and "
            f"download again."
        ) from exc


def _verified_record(data_dir: Path) -> Path:
    return data_dir / ".verified.json"


def verify_file(path: Path, md5: str | None, data_dir: Path) -> str:
    """MD5-check ``path`` once; remember (size, mtime) so later runs skip the 2.7 GB read."""
    record = _verified_record(data_dir)
    st = path.stat()
    key = str(path.resolve())
    try:
        seen = json.loads(record.read_text())
    except (OSError, ValueError):
        seen = {}
    entry = seen.get(key)
    if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        digest = str(entry["md5"])
    else:
        digest = file_digest(path)
        seen[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "md5": digest}
        # A read-only cache still works; it just re-hashes next time.
        with contextlib.suppress(OSError):
            write_json_atomic(record, seen)
    if md5 is not None and digest != md5:
        hint = (
            "If it is your own file in the STL-10 binary format, pass the .bin file itself as "
            "--source."
            if path.suffix == ".bin"
            else "It is corrupt, truncated or not STL-10: fetch it again, or extract your own "
            "archive and pass its unlabeled_X.bin as --source."
        )
        raise ImageSearchError(
            f"{path} has MD5 {digest}, expected {md5} (the official STL-10 {path.name}). {hint}"
        )
    return digest


def check_image_file(path: Path) -> int:
    """The number of images in an STL-10 binary file; a clear error when it cannot be one."""
    size = path.stat().st_size
    if size == 0:
        raise ImageSearchError(
            f"Image file {path} is empty; it holds no STL-10 images. Point --source at the real "
            f"unlabeled_X.bin (or its tarball), or use --source sample."
        )
    if size % IMAGE_BYTES:
        raise ImageSearchError(
            f"Image file {path} has {size:,} bytes, not a multiple of {IMAGE_BYTES:,} (one "
            f"96×96×3 STL-10 image): it is truncated or not in the STL-10 binary format."
        )
    return size // IMAGE_BYTES


def _ref(path: Path, fp: str) -> DataRef:
    size = check_image_file(path) * IMAGE_BYTES
    return DataRef(uri=str(path), rows=size // IMAGE_BYTES, fingerprint=fp)


@contextlib.contextmanager
def data_lock(data_dir: Path) -> Iterator[None]:
    """Serialise downloads and extraction into one data cache across processes and pods.

    Whoever holds it first removes the temporary files of a run that was killed mid-write.
    """
    with folder_lock(data_dir, "Data cache"):
        for orphan in remove_orphan_temps(data_dir):
            log.warning("removed %s, left behind by an interrupted run", orphan)
        yield


def download_and_extract(
    source: str, data_dir: Path | None = None, *, checksums: Checksums | None = None
) -> DataRef:
    """Make ``unlabeled_X.bin`` available from ``source`` and return a reference to it.

    ``source``: an http(s)/file URL of the tarball, a local tarball, a folder with the extracted
    files, a ``.bin`` file in the STL-10 binary format (used as is, not checksummed), or
    ``sample``. A verified copy in the cache means no network access at all.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    checksums = OFFICIAL if checksums is None else checksums
    source = source.strip()
    if source == "sample":
        from tasks.sample import ensure_sample

        return ensure_sample(data_dir)
    parsed = urllib.parse.urlparse(source)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https", "file"):
        return _from_url(source, data_dir, checksums)
    if scheme and len(scheme) > 1:  # a one-letter scheme is a Windows drive
        raise ImageSearchError(
            f"Unsupported source {source!r}: scheme {scheme!r} is not one of http, https, file. "
            f"Use a URL, a tarball path, a folder, a .bin file or 'sample'."
        )
    path = Path(source).expanduser()
    if path.is_dir():
        return _from_folder(path, data_dir, checksums)
    if path.is_file():
        if path.suffix == ".bin":
            return _ref(path, quick_file_fingerprint(path))
        return _from_tarball(path, data_dir, checksums)
    raise ImageSearchError(
        f"Source {source!r} is neither a URL, an existing file or folder, nor 'sample'. "
        f"Use {OFFICIAL_URL}, a path to stl10_binary.tar.gz, a folder with unlabeled_X.bin, "
        f"or --source sample."
    )


def _cached(data_dir: Path, checksums: Checksums) -> DataRef | None:
    target = data_dir / EXTRACT_DIR / UNLABELED
    if not target.exists():
        return None
    try:
        digest = verify_file(target, checksums.members.get(UNLABELED), data_dir)
    except ImageSearchError:
        log.warning("cached %s failed verification; it will be replaced", target)
        return None
    return _ref(target, digest)


def _extract_into_cache(tarball: Path, data_dir: Path, checksums: Checksums) -> DataRef:
    wanted = {name: checksums.members.get(name) for name in WANTED}
    found = extract_members(tarball, data_dir / EXTRACT_DIR, wanted)
    target = found[UNLABELED]
    digest = verify_file(target, checksums.members.get(UNLABELED), data_dir)
    return _ref(target, digest)


def _from_url(url: str, data_dir: Path, checksums: Checksums) -> DataRef:
    with data_lock(data_dir):
        if (ref := _cached(data_dir, checksums)) is not None:
            return ref
        tarball = data_dir / TARBALL_NAME
        if tarball.exists():
            try:
                verify_file(tarball, checksums.tarball, data_dir)
            except ImageSearchError:
                log.warning("cached %s failed verification; downloading it again", tarball)
                tarball.unlink()
        if not tarball.exists():
            if url.lower().startswith("file:"):
                local = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
                if not local.is_file():
                    raise ImageSearchError(f"Source {url!r}: no such file {local}.")
            download_file(url, tarball, checksums.tarball)
        try:
            return _extract_into_cache(tarball, data_dir, checksums)
        except ImageSearchError as exc:
            # The cache's own copy is useless; keeping it would fail every later run the same way.
            tarball.unlink(missing_ok=True)
            raise ImageSearchError(
                f"{exc} The downloaded {tarball} was deleted; the next run downloads it again."
            ) from exc


def _from_tarball(tarball: Path, data_dir: Path, checksums: Checksums) -> DataRef:
    with data_lock(data_dir):
        if (ref := _cached(data_dir, checksums)) is not None:
            return ref
        verify_file(tarball, checksums.tarball, data_dir)
        return _extract_into_cache(tarball, data_dir, checksums)


def _from_folder(folder: Path, data_dir: Path, checksums: Checksums) -> DataRef:
    for candidate in (folder / UNLABELED, folder / EXTRACT_DIR / UNLABELED):
        if candidate.is_file():
            with data_lock(data_dir):
                digest = verify_file(candidate, checksums.members.get(UNLABELED), data_dir)
            return _ref(candidate, digest)
    tarball = folder / TARBALL_NAME
    if tarball.is_file():
        return _from_tarball(tarball, data_dir, checksums)
    raise ImageSearchError(
        f"Folder {folder} holds neither {UNLABELED} nor {TARBALL_NAME}; point --source at the "
        f"folder that does."
    )


def _retry_transient(task: Any, task_run: Any, state: State) -> bool:
    """Retry only network trouble; a bad URL, checksum or tarball fails at once."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, TransientDownloadError) or not isinstance(exc, ImageSearchError)


@task(
    retries=2,
    retry_delay_seconds=[5 * retry_backoff(), 30 * retry_backoff()],
    retry_condition_fn=_retry_transient,
    cache_policy=NO_CACHE,
)
def download(source: str, data_dir: str | None) -> DataRef:
    """Prefect task: fetch and verify the dataset (network I/O, so it alone retries)."""
    ref = download_and_extract(source, Path(data_dir) if data_dir else None)
    get_run_logger().info("dataset %s: %d images (%s)", ref.uri, ref.rows, ref.fingerprint)
    return ref
