"""One download attempt of the STL-10 tarball: the missing bytes of a ``.part`` file through the
one HTTP client (:func:`tasks.sources.http.download_to_file`, Range resume), then the MD5 check
before the file is moved into place. Retrying is the download task's business (one retry layer),
not this module's."""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from tasks.errors import ImageSearchError, TransientNetworkError, param
from tasks.fingerprints import file_digest
from tasks.sources.http import READ_TIMEOUT_S, FetchError, ResponseTooLarge, download_to_file
from tasks.storage import is_out_of_space, out_of_space_error


def offline_hint(url: str, dest: Path) -> str:
    """What to do when ``url`` cannot be had: where to put the file by hand."""
    return (
        f"If this machine is offline, fetch {url} elsewhere and put it at {dest} "
        f"(or pass the tarball's path as {param('source')}); for offline development use "
        f"{param('source')} sample."
    )


def download_file(
    url: str,
    dest: Path,
    md5: str | None,
    *,
    max_bytes: int | None = None,
    timeout: float = READ_TIMEOUT_S,
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
    name = PurePosixPath(urllib.parse.urlparse(url).path).name or "download"
    bar = tqdm(unit="B", unit_scale=True, desc=name, disable=not progress)

    def advance(n: int, start: int, total: int | None) -> None:
        if bar.total is None and total is not None:
            bar.reset(total=total)
            bar.update(start)
        bar.update(n)

    try:
        with bar:
            download_to_file(url, part, max_bytes=max_bytes, timeout=timeout, on_bytes=advance)
    except TransientNetworkError as exc:
        hint = offline_hint(url, dest)
        raise TransientNetworkError(f"Could not download {url}: {exc.args[0]}. {hint}") from exc
    except ResponseTooLarge as exc:
        raise ImageSearchError(
            f"{exc.args[0]}. It is not the file it should be: check the URL or use another mirror."
        ) from exc
    except FetchError as exc:
        if exc.status is not None:
            raise ImageSearchError(f"{exc.args[0]}; check the URL or use another mirror.") from exc
        hint = offline_hint(url, dest)
        raise ImageSearchError(f"Cannot download: {exc.args[0]}. {hint}") from exc
    except OSError as exc:  # the network's errors are classified above: this is the file
        if is_out_of_space(exc):
            raise out_of_space_error(part, exc) from exc
        raise ImageSearchError(f"Cannot write {part}: {exc}") from exc
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
