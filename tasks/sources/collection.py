"""Image collections: a folder (local or an fsspec URL such as ``s3://bucket/photos``), a tar or
zip archive, a Parquet/CSV list of paths or URLs, or STL-10's binary files.

Every collection lists :class:`Item` s (a URI, a version that changes when the file changes, and
a label where the layout gives one) and streams their raw bytes in listing order. A per-image
problem (gone, unreadable, too large, HTTP 404) arrives as a :class:`BadImage` in the stream,
never as an exception that stops the run.

URIs: a local path or URL for files; ``ARCHIVE::MEMBER`` for archive members;
``FILE.bin::ROW`` for an image of an STL-10 binary file.
"""

from __future__ import annotations

import csv
import os
import tarfile
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from tasks.errors import ImageSearchError
from tasks.hardware import cpu_count
from tasks.layout import TEMP_PREFIX
from tasks.sources.images import BadImage, Decoded, decode_image, encode_png, fit, open_image
from tasks.sources.stl10 import IMAGE_BYTES, check_limit, read_all_images, release_pages

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")
LIST_SUFFIXES = (".parquet", ".csv")
URI_COLUMNS = ("uri", "path", "url", "file", "filename")
SEP = "::"
# Folders on these fsspec file systems are collections (s3fs, gcsfs, adlfs: install the extra).
OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory")
MAX_IMAGE_BYTES = 256 * 2**20  # one image file larger than this is refused, not read
HTTP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Item:
    """One image of a collection: where it is, a version string that changes when its bytes do
    (size and mtime, or an object store's ETag), and its label where the layout has one."""

    uri: str
    version: str
    label: str | None = None
    split: str | None = None  # 'index' or 'query' where the collection prescribes it


def is_image_name(name: str) -> bool:
    """Whether a file name has one of the image suffixes, and is not hidden or ours."""
    base = name.rsplit("/", 1)[-1]
    return base.lower().endswith(IMAGE_SUFFIXES) and not base.startswith((".", TEMP_PREFIX))


class Collection(ABC):
    """A set of images that can be listed and read."""

    kind: str = "collection"
    has_labels: bool = False
    limit: int | None = None

    def __init__(self, source: str) -> None:
        self.source = source
        self._items: list[Item] | None = None

    def items(self) -> list[Item]:
        """The images to index: the listing (taken once), cut to ``limit`` when one is set."""
        if self._items is None:
            found = self.listing()
            if self.limit is not None:
                found = found[: check_limit(self.limit, len(found), repr(self.source))]
            self._items = found
        return self._items

    @abstractmethod
    def listing(self) -> list[Item]:
        """Every image of the collection, sorted by URI."""

    @abstractmethod
    def read(self, uri: str) -> bytes:
        """The raw bytes of one image; :class:`BadImage` when they cannot be had."""

    def decode(self, data: bytes, size: int) -> Decoded:
        """Model input (size, size, 3) uint8 from the bytes :meth:`read` gave."""
        return decode_image(data, size)

    def measure(self, data: bytes) -> tuple[int, int]:
        """(width, height) of an image from its header, without decoding the pixels."""
        img = open_image(data)
        return img.width, img.height

    def picture(self, data: bytes) -> tuple[bytes, str]:
        """The image file to show a person: (bytes, media type)."""
        return data, _media_type(data)

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


def _media_type(data: bytes) -> str:
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


def _read_local(path: str) -> bytes:
    try:
        size = os.stat(path).st_size
        if size > MAX_IMAGE_BYTES:
            raise BadImage(f"file too large: {size:,} bytes (limit {MAX_IMAGE_BYTES:,})")
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as exc:
        raise BadImage("file vanished before it was read") from exc
    except OSError as exc:
        raise BadImage(f"unreadable file ({exc.strerror or exc})") from exc


def _read_url(url: str) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=HTTP_TIMEOUT_S, follow_redirects=True) as resp:
            if resp.status_code != 200:
                raise BadImage(f"HTTP {resp.status_code} from {url}")
            chunks, total = [], 0
            for chunk in resp.iter_bytes():
                total += len(chunk)
                if total > MAX_IMAGE_BYTES:
                    raise BadImage(f"response larger than {MAX_IMAGE_BYTES:,} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise BadImage(f"download failed ({type(exc).__name__}: {exc})") from exc


def read_uri(uri: str) -> bytes:
    """Bytes of a local path, an http(s) URL or an fsspec URL (s3://, gs://, memory://...)."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in ("http", "https"):
        return _read_url(uri)
    if scheme and scheme != "file":
        import fsspec

        try:
            with fsspec.open(uri, "rb") as f:
                data: bytes = f.read(MAX_IMAGE_BYTES + 1)
        except FileNotFoundError as exc:
            raise BadImage("object vanished before it was read") from exc
        except OSError as exc:
            raise BadImage(f"unreadable object ({exc})") from exc
        if len(data) > MAX_IMAGE_BYTES:
            raise BadImage(f"object larger than {MAX_IMAGE_BYTES:,} bytes")
        return data
    return _read_local(uri.removeprefix("file://"))


class FolderCollection(Collection):
    """Every image file under a folder, recursively; hidden files and other suffixes skipped.

    Labels follow torchvision's ``ImageFolder``: when every image lies exactly one folder deep
    (``root/CLASS/image.jpg``), the folder name is the label.
    """

    kind = "folder"

    def __init__(self, source: str, skip: Iterable[str] = ()) -> None:
        super().__init__(source)
        import fsspec.core

        try:
            self.fs, root = fsspec.core.url_to_fs(source)
        except ImportError as exc:
            extra = "gcs" if source.startswith(("gs:", "gcs:")) else "s3"
            raise ImageSearchError(
                f"Source {source!r} needs a file system package that is not installed ({exc}); "
                f"pip install 'image-search[{extra}]'."
            ) from exc
        self.root = root.rstrip("/")
        self.local = self.fs.protocol in ("file", "local") or "file" in self.fs.protocol
        self.skip = tuple(s.rstrip("/") + "/" for s in skip)

    def _uri(self, path: str) -> str:
        return path if self.local else self.fs.unstrip_protocol(path)

    def listing(self) -> list[Item]:
        found: list[tuple[str, str]] = []
        if self.local:
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames[:] = sorted(
                    d
                    for d in dirnames
                    if not d.startswith(".")
                    and not (os.path.join(dirpath, d) + "/").startswith(self.skip)
                )
                for name in filenames:
                    if is_image_name(name):
                        path = os.path.join(dirpath, name)
                        try:
                            st = os.stat(path)
                        except OSError:
                            continue  # vanished while listing
                        found.append((path, f"{st.st_size}:{st.st_mtime_ns}"))
        else:
            for path, info in self.fs.find(self.root, detail=True).items():
                parts = path[len(self.root) :].strip("/").split("/")
                if any(p.startswith(".") for p in parts[:-1]) or not is_image_name(path):
                    continue
                version = info.get("ETag") or info.get("mtime") or info.get("LastModified")
                found.append((path, f"{info.get('size')}:{version}"))
        found.sort()
        rels = [
            os.path.relpath(p, self.root) if self.local else p[len(self.root) :].strip("/")
            for p, _ in found
        ]
        depths = {len(PurePosixPath(r.replace(os.sep, "/")).parts) for r in rels}
        self.has_labels = depths == {2}
        return [
            Item(
                self._uri(path),
                version,
                PurePosixPath(rel.replace(os.sep, "/")).parts[0] if self.has_labels else None,
            )
            for (path, version), rel in zip(found, rels, strict=True)
        ]

    def read(self, uri: str) -> bytes:
        return read_uri(uri)


class ArchiveCollection(Collection):
    """The image members of a tar or zip archive; read in one pass, in archive order."""

    kind = "archive"

    def __init__(self, source: str) -> None:
        super().__init__(source)
        self.path = Path(source).expanduser().resolve()
        self.is_zip = self.path.name.lower().endswith(".zip")

    def _members(self) -> list[tuple[str, int, object]]:
        try:
            if self.is_zip:
                with zipfile.ZipFile(self.path) as zf:
                    return [
                        (i.filename, i.file_size, "-".join(map(str, i.date_time)))
                        for i in zf.infolist()
                        if not i.is_dir()
                    ]
            with tarfile.open(self.path) as tf:
                return [(m.name, m.size, m.mtime) for m in tf.getmembers() if m.isfile()]
        except (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
            raise ImageSearchError(
                f"Cannot read archive {self.path} ({exc}); it is damaged or not a tar/zip file."
            ) from exc

    def listing(self) -> list[Item]:
        members = [m for m in self._members() if is_image_name(m[0])]
        depths = {len(PurePosixPath(name).parts) for name, _, _ in members}
        self.has_labels = depths == {2}
        items = [
            Item(
                f"{self.path}{SEP}{name}",
                f"{size}:{mtime}",
                PurePosixPath(name).parts[0] if self.has_labels else None,
            )
            for name, size, mtime in members
        ]
        return sorted(items, key=lambda i: i.uri)

    def read(self, uri: str) -> bytes:
        name = uri.rsplit(SEP, 1)[-1]
        try:
            if self.is_zip:
                with zipfile.ZipFile(self.path) as zf:
                    info = zf.getinfo(name)
                    if info.file_size > MAX_IMAGE_BYTES:
                        raise BadImage(f"member too large: {info.file_size:,} bytes")
                    return zf.read(info)
            with tarfile.open(self.path) as tf:
                f = tf.extractfile(name)
                if f is None:
                    raise BadImage("not a regular file in the archive")
                return f.read(MAX_IMAGE_BYTES)
        except KeyError as exc:
            raise BadImage("member vanished from the archive") from exc
        except (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
            raise BadImage(f"unreadable member ({exc})") from exc

    def stream(self, items: list[Item], workers: int | None = None) -> Iterator[bytes | BadImage]:
        """One sequential pass over the archive (a compressed tar has no random access)."""
        if self.is_zip:  # random access: read in parallel like files
            yield from super().stream(items, workers)
            return
        wanted = {item.uri.rsplit(SEP, 1)[-1]: i for i, item in enumerate(items)}
        got: dict[int, bytes | BadImage] = {}
        try:
            with tarfile.open(self.path) as tf:
                for member in tf:
                    if member.name in wanted and member.isfile():
                        f = tf.extractfile(member)
                        got[wanted[member.name]] = f.read() if f else BadImage("not a file")
        except (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
            raise ImageSearchError(f"Cannot read archive {self.path} ({exc}).") from exc
        for i in range(len(items)):
            yield got.get(i, BadImage("member vanished from the archive"))


class ListCollection(Collection):
    """Images named in a Parquet or CSV file: one column of paths or URLs (``uri``, ``path``,
    ``url``, ``file`` or ``filename``), optionally a ``label`` column. Relative paths are taken
    from the list file's folder."""

    kind = "list"

    def __init__(self, source: str) -> None:
        super().__init__(source)
        self.path = Path(source).expanduser().resolve()

    def _rows(self) -> tuple[list[str], list[str | None] | None]:
        try:
            if self.path.suffix.lower() == ".parquet":
                import pyarrow.parquet as pq

                table = pq.read_table(self.path)
                names = table.column_names
                columns = {n: table.column(n).to_pylist() for n in names}
            else:
                with open(self.path, newline="", encoding="utf-8-sig") as f:
                    rows = list(csv.DictReader(f))
                names = list(rows[0].keys()) if rows else []
                columns = {n: [r.get(n) for r in rows] for n in names}
        except Exception as exc:
            raise ImageSearchError(f"Cannot read the image list {self.path} ({exc}).") from exc
        lower = {n.lower(): n for n in names}
        col = next((lower[c] for c in URI_COLUMNS if c in lower), None)
        if col is None:
            raise ImageSearchError(
                f"The image list {self.path} has no column named one of {', '.join(URI_COLUMNS)} "
                f"(it has: {', '.join(names) or 'none'}); name the column of paths or URLs 'uri'."
            )
        labels = columns[lower["label"]] if "label" in lower else None
        return [str(u) for u in columns[col] if u not in (None, "")], labels

    def _resolve(self, uri: str) -> str:
        if "://" in uri or os.path.isabs(uri):
            return uri
        return str(self.path.parent / uri)

    def listing(self) -> list[Item]:
        uris, labels = self._rows()
        self.has_labels = labels is not None
        items: dict[str, Item] = {}
        for i, raw in enumerate(uris):
            uri = self._resolve(raw)
            version = "remote"
            if "://" not in uri:
                try:
                    st = os.stat(uri)
                    version = f"{st.st_size}:{st.st_mtime_ns}"
                except OSError:
                    version = "missing"
            label = labels[i] if labels is not None else None
            items.setdefault(uri, Item(uri, version, None if label is None else str(label)))
        return sorted(items.values(), key=lambda i: i.uri)

    def read(self, uri: str) -> bytes:
        return read_uri(uri)


class Stl10Collection(Collection):
    """The images of an STL-10 binary file (optionally its first ``rows``), labels from the
    matching ``*_y.bin`` (1-based class numbers) and ``class_names.txt`` when given."""

    kind = "stl10"

    def __init__(
        self,
        path: str,
        rows: int | None = None,
        labels: str | None = None,
        split: str | None = None,
    ) -> None:
        super().__init__(path)
        self.split = split
        self.path = Path(path)
        self.images = read_all_images(self.path, rows)
        self.rows = len(self.images)
        self.labels_path = labels
        self.has_labels = labels is not None

    def _labels(self) -> list[str | None]:
        if self.labels_path is None:
            return [None] * self.rows
        raw = np.fromfile(self.labels_path, dtype=np.uint8)
        if len(raw) < self.rows:
            raise ImageSearchError(
                f"{self.labels_path} holds {len(raw)} labels for {self.rows} images."
            )
        names_file = Path(self.labels_path).parent / "class_names.txt"
        names = names_file.read_text().split() if names_file.is_file() else []
        return [names[v - 1] if 0 < v <= len(names) else str(int(v)) for v in raw[: self.rows]]

    def listing(self) -> list[Item]:
        labels = self._labels()
        width = len(str(self.rows))
        return [
            Item(f"{self.path}{SEP}{row:0{width}d}", "stl10", labels[row], self.split)
            for row in range(self.rows)
        ]

    def read(self, uri: str) -> bytes:
        row = int(uri.rsplit(SEP, 1)[-1])
        if not 0 <= row < self.rows:
            raise BadImage(f"row {row} is outside {self.path.name}")
        # The image's own bytes in the file's layout: their SHA-256 is the image's identity.
        return np.ascontiguousarray(self.images[row].transpose(2, 1, 0)).tobytes()

    def pixels(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, np.uint8).reshape(3, 96, 96).transpose(2, 1, 0)

    def decode(self, data: bytes, size: int) -> Decoded:
        if len(data) != IMAGE_BYTES:
            raise BadImage(f"{len(data)} bytes, not one STL-10 image")
        pixels = self.pixels(data)
        if size != 96:
            from PIL import Image

            pixels = fit(Image.fromarray(np.ascontiguousarray(pixels)), size)
        return Decoded(pixels=np.ascontiguousarray(pixels), width=96, height=96)

    def measure(self, data: bytes) -> tuple[int, int]:
        return 96, 96

    def picture(self, data: bytes) -> tuple[bytes, str]:
        return encode_png(self.pixels(data)), "image/png"

    def stream(self, items: list[Item], workers: int | None = None) -> Iterator[bytes | BadImage]:
        for n, item in enumerate(items, 1):
            yield self.read(item.uri)
            if n % 4096 == 0:  # mapped pages count as ours until released: keep memory flat
                release_pages(self.images)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "source": str(self.path),
            "rows": self.rows,
            "labels": self.labels_path,
            "split": self.split,
        }


class LabelledStl10(Collection):
    """STL-10's labelled sets as one collection: the 5,000 training images form the index and
    the 8,000 test images query it (``train_X.bin``/``train_y.bin``, ``test_X.bin``/``test_y.bin``
    and ``class_names.txt`` in one folder)."""

    kind = "stl10-labelled"
    has_labels = True

    def __init__(self, folder: str) -> None:
        super().__init__(folder)
        self.folder = Path(folder)
        self.parts = [
            Stl10Collection(
                str(self.folder / f"{name}_X.bin"),
                labels=str(self.folder / f"{name}_y.bin"),
                split=role,
            )
            for name, role in (("train", "index"), ("test", "query"))
        ]

    def _part(self, uri: str) -> Stl10Collection:
        return next(p for p in self.parts if uri.startswith(f"{p.path}{SEP}"))

    def listing(self) -> list[Item]:
        return [item for part in self.parts for item in part.listing()]

    def read(self, uri: str) -> bytes:
        return self._part(uri).read(uri)

    def decode(self, data: bytes, size: int) -> Decoded:
        return self.parts[0].decode(data, size)

    def measure(self, data: bytes) -> tuple[int, int]:
        return 96, 96

    def picture(self, data: bytes) -> tuple[bytes, str]:
        return self.parts[0].picture(data)

    def stream(self, items: list[Item], workers: int | None = None) -> Iterator[bytes | BadImage]:
        for item in items:
            yield self.read(item.uri)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": str(self.folder)}


def is_collection_source(source: str) -> bool:
    """Whether ``source`` names an image collection rather than an STL-10 source."""
    from tasks.sources.stl10 import EXTRACT_DIR, TARBALL_NAME, UNLABELED

    scheme = source.split("://", 1)[0].lower() if "://" in source else ""
    if scheme:
        return scheme in OBJECT_STORES  # http(s)/file: the STL-10 tarball; others: unsupported
    path = Path(source).expanduser()
    name = path.name.lower()
    if path.is_dir():
        stl10 = (path / UNLABELED, path / EXTRACT_DIR / UNLABELED, path / TARBALL_NAME)
        return not any(p.exists() for p in stl10)
    if path.is_file():
        if name.endswith(LIST_SUFFIXES):
            return True
        if name == TARBALL_NAME or name.endswith(".bin"):
            return False
        return name.endswith(ARCHIVE_SUFFIXES) and not _holds_stl10(path)
    return False


def _holds_stl10(archive: Path) -> bool:
    from tasks.sources.stl10 import UNLABELED

    if archive.name.lower().endswith(".zip"):
        return False
    try:
        with tarfile.open(archive) as tf:
            for member in tf:
                if member.name.endswith(UNLABELED):
                    return True
                if member.isfile() and is_image_name(member.name):
                    return False
    except (OSError, tarfile.TarError, EOFError):
        return False
    return False


def open_collection(source: str, skip: Iterable[str] = (), limit: int | None = None) -> Collection:
    """The collection ``source`` names (see :func:`is_collection_source`); ``limit`` keeps
    the first N images of its listing."""
    collection = _open(source, skip)
    collection.limit = limit
    return collection


def _open(source: str, skip: Iterable[str]) -> Collection:
    scheme = source.split("://", 1)[0].lower() if "://" in source else ""
    if scheme in OBJECT_STORES:
        return FolderCollection(source, skip)
    path = Path(source).expanduser()
    name = path.name.lower()
    if path.is_dir():
        return FolderCollection(str(path.resolve()), skip)
    if name.endswith(LIST_SUFFIXES):
        return ListCollection(str(path))
    if name.endswith(ARCHIVE_SUFFIXES):
        return ArchiveCollection(str(path))
    raise ImageSearchError(
        f"Source {source!r} is not an image collection: use a folder, a tar/zip archive, or a "
        f".parquet/.csv list of image paths or URLs."
    )


def reopen(described: dict[str, Any], skip: Iterable[str] = ()) -> Collection:
    """The collection a catalog's metadata describes (see :meth:`Collection.describe`); a
    folder's listing leaves out ``skip`` (the output folder, when it lies inside)."""
    if described.get("kind") == "stl10":
        return Stl10Collection(
            described["source"],
            described.get("rows"),
            described.get("labels"),
            described.get("split"),
        )
    if described.get("kind") == "stl10-labelled":
        return LabelledStl10(described["source"])
    return open_collection(described["source"], skip, limit=described.get("limit"))
