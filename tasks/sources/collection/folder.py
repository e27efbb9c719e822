"""A folder of images, local or on an object store (any fsspec URL: ``s3://``, ``gs://``...),
searched recursively; linked folders are followed."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from typing import Any, ClassVar

from tasks.errors import ImageSearchError
from tasks.sources.collection.base import (
    Collection,
    Fetch,
    Item,
    Listing,
    Request,
    folder_labels,
    local_version,
    read_from,
    read_local,
    say,
    skip_kind,
)
from tasks.sources.located import OBJECT_STORES, Located


class FolderCollection(Collection):
    """Every image file under a folder, recursively; hidden files and other suffixes are passed
    over and counted. Links to folders are followed (also out of the folder: that is what a
    user's link means), each real folder once, so a link loop ends.

    Labels follow torchvision's ``ImageFolder`` (``root/CLASS/image.jpg``) when the layout is
    one (see :func:`folder_labels`).
    """

    kind: ClassVar[str] = "folder"

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
        self.root = root.rstrip("/") or "/"
        self.local = self.fs.protocol in ("file", "local") or "file" in self.fs.protocol
        self.skip = tuple(s.rstrip("/") + "/" for s in skip)

    @classmethod
    def reopen(cls, described: dict[str, Any], skip: tuple[str, ...] = ()) -> FolderCollection:
        collection = cls(described["source"], skip)
        collection.limit = described.get("limit")
        return collection

    def survey(self) -> Listing:
        listing = self._walk_local() if self.local else self._walk_store()
        rels = [
            os.path.relpath(i.uri, self.root) if self.local else self._rel(self._path(i.uri))
            for i in listing.items
        ]
        labels = folder_labels(rels, self.source)
        self.has_labels = any(label is not None for label in labels)
        listing.items = [
            Item(item.uri, item.version, label)
            for item, label in zip(listing.items, labels, strict=True)
        ]
        return listing

    def _skipped(self, path: str) -> bool:
        """Whether ``path`` (a folder) is one the listing leaves out (the output folder)."""
        if not self.skip:
            return False
        return (path + "/").startswith(self.skip) or (os.path.realpath(path) + "/").startswith(
            self.skip
        )

    def _walk_local(self) -> Listing:
        """The folder's own sub-folders first, then the linked ones (so a folder reached both
        ways is listed under its own path); each real folder once."""
        found: list[Item] = []
        skipped: Counter[str] = Counter()
        folders = files = links_out = 0
        real_root = os.path.realpath(self.root)
        root_st = os.stat(self.root)
        visited = {(root_st.st_dev, root_st.st_ino)}
        Entry = tuple[str, frozenset[tuple[int, int]]]  # a folder and the real folders above it
        own: list[Entry] = [(self.root, frozenset(visited))]
        linked: list[Entry] = []
        while own or linked:
            folder, above = own.pop() if own else linked.pop(0)
            if folder != self.root:
                try:
                    st = os.stat(folder)
                except OSError:
                    skipped["unreadable folder"] += 1
                    continue
                key = (st.st_dev, st.st_ino)
                if key in visited:
                    skipped["link loop" if key in above else "folder linked twice"] += 1
                    continue
                visited.add(key)
                above = above | {key}
                folders += 1
                if os.path.islink(folder):
                    real = os.path.realpath(folder)
                    links_out += os.path.commonpath([real, real_root]) != real_root
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError:
                skipped["unreadable folder"] += 1
                continue
            for entry in entries:
                try:
                    is_dir = entry.is_dir()
                    is_file = not is_dir and entry.is_file()
                except OSError:
                    is_dir = is_file = False
                if entry.name.startswith("."):
                    skipped["hidden"] += 1
                    files += is_file
                elif is_dir:
                    if not self._skipped(entry.path):
                        (linked if entry.is_symlink() else own).append((entry.path, above))
                elif is_file:
                    files += 1
                    kind = skip_kind(entry.name)
                    if kind is not None:
                        skipped[kind] += 1
                        continue
                    try:
                        found.append(Item(entry.path, local_version(os.stat(entry.path))))
                    except OSError:
                        skipped["vanished while listed"] += 1
                else:
                    skipped["broken link" if entry.is_symlink() else "not a file"] += 1
        if links_out:
            say("%s: followed %d links to folders outside it", self.source, links_out)
        found.sort(key=lambda i: i.uri)
        return Listing(found, dict(skipped), folders, files)

    def _rel(self, path: str) -> str:
        return path[len(self.root) :].strip("/")

    def _path(self, uri: str) -> str:
        return str(self.fs._strip_protocol(uri))

    def _walk_store(self) -> Listing:
        found: list[Item] = []
        skipped: Counter[str] = Counter()
        folders: set[str] = set()
        files = 0
        for path, info in self.fs.find(self.root, detail=True).items():
            parts = self._rel(path).split("/")
            folders.update("/".join(parts[:n]) for n in range(1, len(parts)))
            files += 1
            if any(p.startswith(".") for p in parts[:-1]):
                skipped["hidden"] += 1
                continue
            kind = skip_kind(parts[-1])
            if kind is not None:
                skipped[kind] += 1
                continue
            version = info.get("ETag") or info.get("mtime") or info.get("LastModified")
            found.append(Item(self.fs.unstrip_protocol(path), f"{info.get('size')}:{version}"))
        found.sort(key=lambda i: i.uri)
        return Listing(found, dict(skipped), len(folders), files)

    def read(self, uri: str) -> bytes:
        if self.local:
            return read_local(uri)
        return read_from(self.fs, self._path(uri))


class FolderKind:
    """A local folder (one that holds no STL-10 files), or a folder URL on an object store."""

    name = "folder"

    def recognises(self, source: Located, request: Request) -> bool:
        if source.scheme:
            return source.scheme in OBJECT_STORES
        return source.path is not None and source.path.is_dir()

    def open(self, source: Located, request: Request, fetch: Fetch) -> Collection:
        where = source.text if source.scheme else str(source.path.resolve())  # type: ignore[union-attr]
        return FolderCollection(where, request.skip)


FOLDER = FolderKind()
