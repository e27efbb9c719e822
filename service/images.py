"""What the service shows of an index's images: their bytes, only when they are still the
content that was indexed, and where they are, said relative to the source.

An image is served only when its bytes still have the SHA-256 the catalog recorded, with the
media type sniffed from those bytes (or as a thumbnail decoded from them). A file of a local
folder must be a regular file whose real path lies inside the source folder: an indexed photo
replaced by a link to a file elsewhere (or by a FIFO or a device) is never opened for reading
into an answer. A listed file (``.csv``/``.parquet`` source) must be the file itself, not a link.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from pathlib import Path

import numpy as np

from tasks.ask import Index
from tasks.sources.collection import SEP
from tasks.sources.collection.base import MAX_IMAGE_BYTES
from tasks.sources.images import BadImage

# Kinds whose source is the folder their images' paths are relative to; the others' source is a
# file (a list, an archive, an STL-10 .bin) and its folder is the base.
_FOLDER_KINDS = ("folder", "stl10-labelled")


class OutsideSource(Exception):
    """A catalogued file that now leads out of the source: never read into an answer."""


def source_base(index: Index) -> Path | None:
    """The local folder the index's image paths are shown relative to; None for a source that
    is not local (an object store, a URL)."""
    source = str(index.collection_meta.get("source") or "")
    if not source or "://" in source:
        return None
    path = Path(source)
    return path if index.collection_meta.get("kind") in _FOLDER_KINDS else path.parent


def shown_uri(uri: str, base: Path | None) -> str:
    """``uri`` as an answer shows it: a local path relative to the source's folder (POSIX
    separators; an archive member or STL-10 row keeps its ``::`` suffix), a path outside that
    folder by its file name alone, a URL as it is. Never an absolute path of this machine."""
    if "://" in uri:
        return uri
    path, sep, rest = uri.partition(SEP)
    if base is not None:
        try:
            rel = Path(path).relative_to(base).as_posix()
        except ValueError:
            rel = Path(path).name
    else:
        rel = Path(path).name
    return f"{rel}{sep}{rest}"


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _read_regular(path: str, *, root: str | None, follow: bool) -> bytes:
    """The bytes of the regular file at ``path``, refused when it is anything else, larger than
    the image cap, (``root``) not really inside folder ``root``, or (not ``follow``) a link.
    Checks the file that was opened, not the name, so a swap in between changes nothing."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as exc:
        raise BadImage("no such file") from exc
    except OSError as exc:
        if not follow and os.path.islink(path):
            raise OutsideSource("the listed file is now a link") from exc
        raise BadImage(f"unreadable file ({exc.strerror or exc})") from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OutsideSource("it is no longer a regular file")
        if root is not None:
            try:
                real = os.readlink(f"/proc/self/fd/{f.fileno()}")
            except OSError:  # no /proc: the name's real path, checked just after the open
                real = os.path.realpath(path)
            if not _inside(real, os.path.realpath(root)):
                raise OutsideSource("its file now leads out of the source folder")
        if st.st_size > MAX_IMAGE_BYTES:
            raise BadImage(f"file too large: {st.st_size:,} bytes")
        data = f.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise BadImage(f"file larger than {MAX_IMAGE_BYTES:,} bytes")
    return data


def verified_bytes(index: Index, image_id: int) -> bytes:
    """The bytes of image ``image_id`` as indexed: read under the rules above and checked
    against the catalogued SHA-256.

    Raises KeyError for an id the index does not hold, :class:`OutsideSource` for a file that
    leads out of the source, BadImage for one that cannot be read or whose content changed.
    """
    pos = index.position(image_id)
    if pos is None:
        raise KeyError(image_id)
    uri = index.uri(pos)
    kind = index.collection_meta.get("kind")
    source = str(index.collection_meta.get("source") or "")
    if kind == "folder" and "://" not in source:
        data = _read_regular(uri, root=source, follow=True)
    elif kind == "list" and ("://" not in uri or uri.startswith("file://")):
        data = _read_regular(uri.removeprefix("file://"), root=None, follow=False)
    else:  # inside an archive or an STL-10 file, or on an object store: the bytes decide
        data = index.collection.read(uri)
    if hashlib.sha256(data).hexdigest() != index.digests[pos].as_py():
        raise BadImage("its file changed since the index was built")
    return data


def picture(index: Index, image_id: int) -> tuple[bytes, str]:
    """Image ``image_id`` to show: (verified bytes, media type sniffed from them)."""
    return index.collection.picture(verified_bytes(index, image_id))


def thumbnail(index: Index, image_id: int, size: int) -> bytes:
    """Image ``image_id`` as a ``size``-pixel square JPEG decoded from its verified bytes (short
    side resized, centre crop, by the one decode rule)."""
    from PIL import Image

    pixels = index.collection.decode(verified_bytes(index, image_id), size).pixels
    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()
