"""A source as text, parsed once for every kind of source to look at (:func:`locate`), the
suffixes that name kinds of files, and the message for a source no kind recognises."""

from __future__ import annotations

import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import ImageSearchError, param

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")
LIST_SUFFIXES = (".parquet", ".csv")
# Folders on these fsspec file systems are collections (s3fs, gcsfs, adlfs: install the extra).
OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory")


@dataclass(frozen=True)
class Located:
    """A source as the kinds see it: the text as given (trimmed), its URL scheme ('' for a
    local path), and the local path (a ``file://`` URL is its path)."""

    text: str
    scheme: str
    path: Path | None

    @property
    def name(self) -> str:
        return self.path.name.lower() if self.path is not None else ""


def locate(source: str) -> Located:
    """``source`` parsed once, for every kind to look at."""
    text = source.strip()
    if "://" not in text:
        return Located(text, "", Path(text).expanduser())
    scheme = text.split("://", 1)[0].lower()
    if scheme == "file":
        path = urllib.request.url2pathname(urllib.parse.urlparse(text).path)
        return Located(text, "", Path(path))
    return Located(text, scheme, None)


def not_a_source(source: Located) -> ImageSearchError:
    """Why no kind recognises ``source``, and what would be."""
    if source.scheme:
        return ImageSearchError(
            f"Unsupported source {source.text!r}: scheme {source.scheme!r} is not one of http, "
            f"https, file (STL-10) or {', '.join(OBJECT_STORES[:-1])} (a folder of images). Use "
            f"a URL, a tarball path, a folder, an archive or list of images, a .bin file or "
            f"'sample'."
        )
    path = source.path
    if path is not None and path.is_file() and source.name.endswith(IMAGE_SUFFIXES):
        return ImageSearchError(
            f"Source {source.text!r} is a single image; point {param('source')} at the folder "
            f"that holds your images, a tar/zip archive of them, or a .parquet/.csv list of "
            f"their paths or URLs."
        )
    if path is not None and path.exists():
        return ImageSearchError(
            f"Source {source.text!r} is neither a folder, a file nor a URL image-search can "
            f"read; use a folder, archive or .parquet/.csv list of your images, or STL-10."
        )
    return ImageSearchError(
        f"Source {source.text!r} is neither a URL, an existing file or folder, nor 'sample'. "
        f"Use a folder, archive or .parquet/.csv list of your images, the STL-10 URL, a path to "
        f"its tarball, a folder with its unlabeled_X.bin, or {param('source')} sample."
    )
