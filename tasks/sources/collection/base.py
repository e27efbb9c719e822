"""What every kind of collection shares: :class:`Item`, :class:`Listing`, the :class:`Collection`
interface, and reading one image's bytes from a path or a URL (with a size cap, and for URLs a
per-read timeout and an overall deadline).

URIs: a local path or URL for files; ``ARCHIVE::MEMBER`` for archive members;
``FILE.bin::ROW`` for an image of an STL-10 binary file.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Protocol

from tasks.errors import ImageSearchError, TransientNetworkError, param
from tasks.hardware import cpu_count
from tasks.layout import TEMP_PREFIX
from tasks.sources.images import BadImage, Decoded, decode_image, open_image
from tasks.sources.located import IMAGE_SUFFIXES, Located
from tasks.sources.stl10 import check_limit
from tasks.types import DataRef

log = logging.getLogger("tasks.sources.collection")

SEP = "::"
MAX_IMAGE_BYTES = 256 * 2**20  # one image file larger than this is refused, not read
URL_READ_TIMEOUT_S = 30.0  # the longest wait for the next bytes of one image from a URL
URL_DEADLINE_S = 60.0  # the longest one image from a URL may take, redirects included

_SAID: ContextVar[bool] = ContextVar("listing_said", default=False)


def say(message: str, *args: object) -> None:
    """Log what a listing saw, unless it was said already (:func:`said_already`)."""
    if not _SAID.get():
        log.info(message, *args)


@contextmanager
def said_already() -> Iterator[None]:
    """Within, listings log nothing: the run listed this source moments before and said what
    it saw; its catalog task lists it again from the description it was handed."""
    token = _SAID.set(True)
    try:
        yield
    finally:
        _SAID.reset(token)


@dataclass(frozen=True)
class Request:
    """What a run asks the registry for: a source, which STL-10 set where it is STL-10, the
    first ``limit`` images, the data cache, and folders to leave out (the output folder)."""

    source: str
    stl10_set: str = "unlabeled"
    limit: int | None = None
    data_dir: Path | None = None
    skip: tuple[str, ...] = ()


# The STL-10 download: (source, data cache or None) -> the verified unlabeled_X.bin. The flow
# passes its download task here (the one retry layer); a plain call makes one attempt.
Fetch = Callable[[str, str | None], DataRef]


class Kind(Protocol):
    """One kind of source: how the registry recognises it, and how it opens it."""

    name: str

    def recognises(self, source: Located, request: Request) -> bool: ...

    def open(self, source: Located, request: Request, fetch: Fetch) -> Collection: ...


@dataclass(frozen=True)
class Item:
    """One image of a collection: where it is, a version string that changes when its bytes do
    (for a local file: size, mtime, inode and ctime; an object store's ETag), and its label
    where the layout has one."""

    uri: str
    version: str
    label: str | None = None
    split: str | None = None  # 'index' or 'query' where the collection prescribes it


@dataclass
class Listing:
    """What a listing saw: the images, and how many entries it passed over, by kind
    (``{".svg": 648, "hidden": 3}``); ``folders`` and ``files`` count everything looked at."""

    items: list[Item]
    skipped: dict[str, int] = field(default_factory=dict)
    folders: int = 0
    files: int = 0
    summary: str | None = None  # what was there, where folders and files do not say it

    def seen(self) -> str:
        """'17 folders, 312 files (298 .svg, 14 .xml)': what was there, for a message."""
        text = self.summary or f"{self.folders:,} folders, {self.files:,} files"
        return f"{text} ({describe_counts(self.skipped)})" if self.skipped else text


def describe_counts(counts: dict[str, int]) -> str:
    """'298 .svg, 14 .xml, 3 hidden': the largest counts first."""
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{n:,} {kind}" for kind, n in ordered)


def skip_kind(name: str) -> str | None:
    """Why a file called ``name`` is passed over (its suffix, 'hidden', 'no suffix'), or None
    when it is an image file to read."""
    base = name.rsplit("/", 1)[-1]
    if base.startswith((".", TEMP_PREFIX)):
        return "hidden"
    lower = base.lower()
    if lower.endswith(IMAGE_SUFFIXES):
        return None
    suffix = os.path.splitext(lower)[1]
    return suffix if suffix else "no suffix"


def is_image_name(name: str) -> bool:
    """Whether a file name has one of the image suffixes, and is not hidden or ours."""
    return skip_kind(name) is None


def local_version(st: os.stat_result) -> str:
    """A local file's version: size and mtime, and what a real change cannot keep (inode, ctime),
    so a copy that keeps size and mtime (``cp -p``, ``rsync -a``, ``touch -r``) still counts."""
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns}"


def say_versions_extended(n: int) -> None:
    """One line for ``n`` images an earlier version catalogued by size and mtime alone (a prefix
    of :func:`local_version`): they are read once more, and nothing is embedded again."""
    log.info(
        "%s images were catalogued by an earlier version of image-search, by size and mtime "
        "only: reading them once more to record their inode and ctime too (what the store "
        "holds is not embedded again)",
        f"{n:,}",
    )


def folder_labels(rels: list[str], source: str) -> list[str | None]:
    """Labels from class folders (``root/CLASS/image``, as torchvision's ``ImageFolder``) when
    the layout is one: every image one folder deep, at least two classes, each with at least
    two images. Otherwise no labels at all, and a log line says why."""
    parts = [PurePosixPath(r.replace(os.sep, "/")).parts for r in rels]
    if not parts:
        return []
    why = None
    classes = Counter(p[0] for p in parts)
    if any(len(p) != 2 for p in parts):
        loose = sum(1 for p in parts if len(p) != 2)
        why = f"{loose:,} of {len(parts):,} images are not one folder deep (ROOT/CLASS/IMAGE)"
    elif len(classes) < 2:
        why = f"there is one class folder ({next(iter(classes))!r}); labels need two or more"
    elif single := sorted(c for c, n in classes.items() if n < 2):
        shown = ", ".join(repr(c) for c in single[:5]) + (" ..." if len(single) > 5 else "")
        why = f"{len(single)} class folder(s) hold a single image ({shown}); each needs two"
    if why is not None:
        say("%s: folder names are not used as labels: %s", source, why)
        return [None] * len(parts)
    return [p[0] for p in parts]


class Collection(ABC):
    """A set of images that can be listed and read."""

    kind: ClassVar[str] = "collection"
    has_labels: bool = False
    limit: int | None = None

    def __init__(self, source: str) -> None:
        self.source = source
        self._listing: Listing | None = None
        self._items: list[Item] | None = None

    @abstractmethod
    def survey(self) -> Listing:
        """Every image of the collection in reading order (sorted by URI unless the kind says
        otherwise), and what was passed over."""

    @classmethod
    @abstractmethod
    def reopen(cls, described: dict[str, Any], skip: tuple[str, ...] = ()) -> Collection:
        """The collection :meth:`describe` described (a worker, a query, a later run)."""

    @abstractmethod
    def read(self, uri: str) -> bytes:
        """The raw bytes of one image; :class:`BadImage` when they cannot be had."""

    def listed(self) -> Listing:
        """The listing, taken once; names what was skipped in a log line."""
        if self._listing is None:
            self._listing = self.survey()
            if self._listing.skipped:
                say(
                    "%s: %s images; passed over %s",
                    self.source,
                    f"{len(self._listing.items):,}",
                    describe_counts(self._listing.skipped),
                )
        return self._listing

    def listing(self) -> list[Item]:
        """Every image of the collection."""
        return self.listed().items

    @property
    def skipped(self) -> dict[str, int]:
        """What the listing passed over, by kind (the catalog records it)."""
        return dict(self.listed().skipped)

    def items(self) -> list[Item]:
        """The images to index: the listing cut to ``limit`` when one is set. A collection
        without a single image is an error that says what was there instead."""
        if self._items is None:
            listing = self.listed()
            found = listing.items
            if not found:
                raise ImageSearchError(
                    f"No images found in {self.source}: {listing.seen()}; supported: "
                    f"{' '.join(IMAGE_SUFFIXES)}. Point {param('source')} at your images."
                )
            if self.limit is not None:
                found = found[: check_limit(self.limit, len(found), repr(self.source))]
            self._items = found
        return self._items

    def decode(self, data: bytes, size: int) -> Decoded:
        """Model input (size, size, 3) uint8 from the bytes :meth:`read` gave."""
        return decode_image(data, size)

    def measure(self, data: bytes) -> tuple[int, int]:
        """(width, height) of an image from its header, without decoding the pixels."""
        img = open_image(data)
        return img.width, img.height

    def picture(self, data: bytes) -> tuple[bytes, str]:
        """The image file to show a person: (bytes, media type)."""
        return data, media_type(data)

    def stream(self, items: list[Item], workers: int | None = None) -> Iterator[bytes | BadImage]:
        """Raw bytes (or why not) of ``items``, in order, read by a few threads at a time."""
        workers = workers or max(2, cpu_count())

        def one(item: Item) -> bytes | BadImage:
            try:
                return self.read(item.uri)
            except BadImage as exc:
                return exc

        with ThreadPoolExecutor(max_workers=workers) as pool:
            window = workers * 4  # bounded read-ahead: memory stays flat
            pending = [pool.submit(one, item) for item in items[:window]]
            for i in range(len(items)):
                result = pending[i].result()
                pending[i] = None  # type: ignore[call-overload]
                if i + window < len(items):
                    pending.append(pool.submit(one, items[i + window]))
                yield result

    def describe(self) -> dict[str, Any]:
        """What to store in the catalog so that a reader can open this collection again."""
        return {"kind": self.kind, "source": self.source, "limit": self.limit}


def media_type(data: bytes) -> str:
    """The media type of an image file from its first bytes."""
    signatures = {
        b"\xff\xd8\xff": "image/jpeg",
        b"\x89PNG": "image/png",
        b"GIF8": "image/gif",
        b"BM": "image/bmp",
        b"II*\x00": "image/tiff",
        b"MM\x00*": "image/tiff",
    }
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for magic, media in signatures.items():
        if data.startswith(magic):
            return media
    return "application/octet-stream"


def read_local(path: str) -> bytes:
    """The bytes of a local file, at most :data:`MAX_IMAGE_BYTES`."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_IMAGE_BYTES:
                raise BadImage(f"file too large: {size:,} bytes (limit {MAX_IMAGE_BYTES:,})")
            return f.read()  # not read(MAX + 1): that allocates the whole cap first
    except FileNotFoundError as exc:
        raise BadImage("no such file") from exc
    except IsADirectoryError as exc:
        raise BadImage("a folder, not an image file") from exc
    except OSError as exc:
        raise BadImage(f"unreadable file ({exc.strerror or exc})") from exc


def read_url(url: str) -> bytes:
    """The bytes of an http(s) URL through the one HTTP client, with the image cap, a per-read
    timeout and an overall deadline: a slow or silent server is this image's problem alone."""
    from tasks.sources.http import FetchError, fetch_bytes

    try:
        return fetch_bytes(
            url, max_bytes=MAX_IMAGE_BYTES, timeout=URL_READ_TIMEOUT_S, deadline=URL_DEADLINE_S
        )
    except (FetchError, TransientNetworkError) as exc:
        raise BadImage(f"download failed: {exc.args[0]}") from exc


def read_object(uri: str) -> bytes:
    """The bytes of an fsspec URL (``s3://``, ``gs://``, ``memory://``...). The key is taken
    literally: a ``::`` in it is part of the name, never fsspec's URL chaining."""
    import fsspec

    protocol = uri.split("://", 1)[0]
    try:
        fs = fsspec.filesystem(protocol)
    except (ImportError, ValueError) as exc:
        raise BadImage(f"no file system for {protocol}:// ({exc})") from exc
    return read_from(fs, fs._strip_protocol(uri))


def read_from(fs: Any, path: str) -> bytes:
    """The bytes of ``path`` on fsspec file system ``fs``, at most :data:`MAX_IMAGE_BYTES`."""
    try:
        with fs.open(path, "rb") as f:
            data: bytes = f.read(MAX_IMAGE_BYTES + 1)
    except FileNotFoundError as exc:
        raise BadImage("no such object") from exc
    except (OSError, ValueError) as exc:
        raise BadImage(f"unreadable object ({exc})") from exc
    if len(data) > MAX_IMAGE_BYTES:
        raise BadImage(f"object larger than {MAX_IMAGE_BYTES:,} bytes")
    return data


def read_uri(uri: str) -> bytes:
    """Bytes of a local path, an http(s) URL or an fsspec URL (s3://, gs://, memory://...)."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in ("http", "https"):
        return read_url(uri)
    if scheme and scheme != "file":
        return read_object(uri)
    return read_local(uri.removeprefix("file://"))
