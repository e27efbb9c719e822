"""The registry of source kinds: what ``--source`` names, decided in one place.

Each kind (:data:`KINDS`, asked in order) says whether it recognises a source and opens it as a
:class:`Collection`: STL-10 in its forms (URL, tarball, folder of its files, ``.bin``,
``sample``; every source when the labelled sets are asked for), a folder (local, linked folders
followed, or on an object store), a ``.parquet``/``.csv`` list, a tar or zip archive. A flow asks
once, with :func:`open_source`; the STL-10 download is handed in as ``fetch`` (the flow's
download task, its one retry layer), so the registry itself never imports Prefect. A
collection's :meth:`Collection.describe` reopens it anywhere (:func:`reopen`).

Every collection lists :class:`Item` s (a URI, a version that changes when the file changes, a
label where the layout gives one) with counts of what it passed over, and streams their raw
bytes in listing order; a per-image problem arrives as a :class:`BadImage` in the stream.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tasks.errors import ImageSearchError
from tasks.sources.collection.archive import ARCHIVE, ArchiveCollection
from tasks.sources.collection.base import (
    MAX_IMAGE_BYTES,
    SEP,
    Collection,
    Fetch,
    Item,
    Kind,
    Listing,
    Request,
    is_image_name,
    read_uri,
    said_already,
    say_versions_extended,
)
from tasks.sources.collection.folder import FOLDER, FolderCollection
from tasks.sources.collection.imagelist import LIST, ListCollection
from tasks.sources.collection.stl10 import STL10, LabelledStl10, Stl10Collection
from tasks.sources.images import BadImage
from tasks.sources.located import IMAGE_SUFFIXES, Located, locate, not_a_source
from tasks.sources.resolve import download_and_extract
from tasks.types import DataRef

__all__ = [
    "IMAGE_SUFFIXES",
    "KINDS",
    "MAX_IMAGE_BYTES",
    "SEP",
    "ArchiveCollection",
    "BadImage",
    "Collection",
    "FolderCollection",
    "Item",
    "LabelledStl10",
    "ListCollection",
    "Listing",
    "Request",
    "Stl10Collection",
    "is_collection_source",
    "is_image_name",
    "open_collection",
    "open_source",
    "read_uri",
    "reopen",
    "said_already",
    "say_versions_extended",
]

KINDS: tuple[Kind, ...] = (STL10, FOLDER, LIST, ARCHIVE)
COLLECTIONS: dict[str, type[Collection]] = {
    cls.kind: cls
    for cls in (Stl10Collection, LabelledStl10, FolderCollection, ArchiveCollection, ListCollection)
}


def kind_of(source: Located, request: Request, kinds: Iterable[Kind] = KINDS) -> Kind:
    """The first of ``kinds`` that recognises ``source``."""
    for kind in kinds:
        if kind.recognises(source, request):
            return kind
    raise not_a_source(source)


def _one_attempt(source: str, data_dir: str | None) -> DataRef:
    return download_and_extract(source, Path(data_dir) if data_dir else None)


def open_source(request: Request, fetch: Fetch | None = None) -> Collection:
    """The collection ``request.source`` names, whichever kind it is; ``fetch`` gets STL-10
    (default: one download attempt, no retries)."""
    source = locate(request.source)
    collection = kind_of(source, request).open(source, request, fetch or _one_attempt)
    if not isinstance(collection, (Stl10Collection, LabelledStl10)):
        collection.limit = request.limit  # STL-10 applies its limit when it opens its file
    return collection


def open_collection(source: str, skip: Iterable[str] = (), limit: int | None = None) -> Collection:
    """The user's images at ``source`` (a folder, archive or list; never STL-10's download);
    ``limit`` keeps the first N images of its listing."""
    located = locate(source)
    request = Request(source, limit=limit, skip=tuple(skip))
    collection = kind_of(located, request, (FOLDER, LIST, ARCHIVE)).open(
        located, request, _one_attempt
    )
    collection.limit = limit
    return collection


def is_collection_source(source: str) -> bool:
    """Whether ``source`` names the user's images rather than STL-10."""
    located = locate(source)
    try:
        return kind_of(located, Request(source)) is not STL10
    except ImageSearchError:
        return False


def reopen(described: dict[str, Any], skip: Iterable[str] = ()) -> Collection:
    """The collection a catalog's metadata describes (see :meth:`Collection.describe`); a
    folder's listing leaves out ``skip`` (the output folder, when it lies inside)."""
    kind = described.get("kind")
    if kind not in COLLECTIONS:
        raise ImageSearchError(f"Unknown kind of collection {kind!r} in a catalog's metadata.")
    return COLLECTIONS[kind].reopen(described, tuple(skip))
