"""One HTTP download attempt that resumes a ``.part`` file with a Range request and stops at the
expected size. Retrying is the download task's business (one retry layer), not this module's."""

from __future__ import annotations

import http.client
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from tasks.errors import ImageSearchError, TransientNetworkError, param
from tasks.fingerprints import file_digest
from tasks.storage import is_out_of_space, out_of_space_error

CHUNK = 1 << 20


def offline_hint(url: str, dest: Path) -> str:
    """What to do when ``url`` cannot be had: where to put the file by hand."""
    return (
        f"If this machine is offline, fetch {url} elsewhere and put it at {dest} "
        f"(or pass the tarball's path as {param('source')}); for offline development use "
        f"{param('source')} sample."
    )


def _open(url: str, start: int, timeout: float) -> http.client.HTTPResponse:
    headers = {"User-Agent": "image-search"}
    if start:
        headers["Range"] = f"bytes={start}-"
    req = urllib.request.Request(url, headers=headers)
    response: http.client.HTTPResponse = urllib.request.urlopen(req, timeout=timeout)
    return response


def download_file(
    url: str,
    dest: Path,
    md5: str | None,
    *,
    max_bytes: int | None = None,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` in one attempt, continuing a partial ``dest.part``.

    Raises :class:`TransientNetworkError` for trouble worth retrying (the ``.part`` file keeps
    what arrived, so the next attempt continues there) and :class:`ImageSearchError` for the
    rest. The MD5 is checked before the file is moved into place; a mismatch deletes the
    partial file, so a bad download never reaches the cache. The file never grows past the
    server's Content-Length or ``max_bytes``.
    """
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        _fetch_into(url, part, timeout=timeout, progress=progress, max_bytes=max_bytes)
    except TransientNetworkError as exc:
        hint = offline_hint(url, dest)
        raise TransientNetworkError(f"Could not download {url}: {exc}. {hint}") from exc
    if md5 is not None:
        got = file_digest(part, "md5")
        if got != md5:
            part.unlink(missing_ok=True)
            raise ImageSearchError(
                f"Downloaded {url} has MD5 {got}, expected {md5}: the file is corrupt, "
                f"truncated or not STL-10. It was deleted; run again to re-download, or use "
                f"another mirror."
            )
    os.replace(part, dest)
    return dest


def _fetch_into(
    url: str, part: Path, *, timeout: float, progress: bool, max_bytes: int | None
) -> None:
    """Append the missing bytes of ``url`` to ``part``."""
    start = part.stat().st_size if part.exists() else 0
    try:
        resp = _open(url, start, timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:
            return  # nothing left to fetch: the partial file is complete (MD5 decides)
        if exc.code >= 500 or exc.code in (408, 429):
            raise TransientNetworkError(f"HTTP {exc.code} {exc.reason}") from exc
        raise ImageSearchError(
            f"{url} answered HTTP {exc.code} {exc.reason}; check the URL or use another mirror."
        ) from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, (socket.timeout, TimeoutError, ConnectionError)):
            raise TransientNetworkError(str(exc.reason)) from exc
        raise ImageSearchError(
            f"Cannot reach {url}: {exc.reason}. " + offline_hint(url, part.with_suffix(""))
        ) from exc
    except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        raise TransientNetworkError(str(exc)) from exc
    with resp:
        status = getattr(resp, "status", 200)
        mode = "ab" if start and status == 206 else "wb"
        if mode == "wb":
            start = 0
        length = resp.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        limit = (
            min(x for x in (total, max_bytes) if x is not None) if (total or max_bytes) else None
        )
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
                    if limit is not None and start + received + len(block) > limit:
                        f.write(block[: limit - start - received])
                        received = limit - start
                        raise ImageSearchError(
                            f"{url} sent more than the expected {limit:,} bytes; stopped there. "
                            f"It is not the file it should be: check the URL or use another "
                            f"mirror."
                        )
                    f.write(block)
                    received += len(block)
                    bar.update(len(block))
        except ImageSearchError:
            part.unlink(missing_ok=True)
            raise
        except (TimeoutError, ConnectionError, http.client.HTTPException, OSError) as exc:
            if isinstance(exc, OSError) and not isinstance(exc, (TimeoutError, ConnectionError)):
                if is_out_of_space(exc):
                    raise out_of_space_error(part, exc) from exc
                raise ImageSearchError(f"Cannot write {part}: {exc}") from exc
            raise TransientNetworkError(f"connection lost after {start + received} bytes") from exc
        if length is not None and received < int(length):
            raise TransientNetworkError(
                f"connection closed after {start + received} of {total} bytes"
            )
