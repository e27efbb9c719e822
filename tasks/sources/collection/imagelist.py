"""A list of images: a Parquet or CSV file with a column of paths or URLs."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, ClassVar

from tasks.errors import ImageSearchError
from tasks.sources.collection.base import (
    Collection,
    Fetch,
    Item,
    Listing,
    Request,
    local_version,
    read_uri,
)
from tasks.sources.located import LIST_SUFFIXES, Located

URI_COLUMNS = ("uri", "path", "url", "file", "filename")


class ListCollection(Collection):
    """Images named in a Parquet or CSV file: one column of paths or URLs (``uri``, ``path``,
    ``url``, ``file`` or ``filename``), optionally a ``label`` column. Relative paths are taken
    from the list file's folder."""

    kind: ClassVar[str] = "list"

    def __init__(self, source: str) -> None:
        super().__init__(source)
        self.path = Path(source).expanduser().resolve()

    @classmethod
    def reopen(cls, described: dict[str, Any], skip: tuple[str, ...] = ()) -> ListCollection:
        collection = cls(described["source"])
        collection.limit = described.get("limit")
        return collection

    def _rows(self) -> tuple[list[tuple[str, str | None]], bool]:
        """(path or URL, label) of every row that names one, and whether there is a label
        column."""
        try:
            if self.path.suffix.lower() == ".parquet":
                import pyarrow.parquet as pq

                table = pq.read_table(self.path)
                names = table.column_names
                columns = {n: table.column(n).to_pylist() for n in names}
            else:
                with open(self.path, newline="", encoding="utf-8-sig") as f:
                    reader = csv.DictReader(f)
                    records = list(reader)
                    names = list(reader.fieldnames or [])
                columns = {n: [r.get(n) for r in records] for n in names}
        except Exception as exc:  # pyarrow and csv raise many kinds: each is a bad list file
            raise ImageSearchError(f"Cannot read the image list {self.path} ({exc}).") from exc
        lower = {n.lower(): n for n in names}
        col = next((lower[c] for c in URI_COLUMNS if c in lower), None)
        if col is None:
            raise ImageSearchError(
                f"The image list {self.path} has no column named one of {', '.join(URI_COLUMNS)} "
                f"(it has: {', '.join(names) or 'none'}); name the column of paths or URLs 'uri'."
            )
        uris = columns[col]
        labels = columns[lower["label"]] if "label" in lower else [None] * len(uris)
        rows = [
            (str(u), None if label is None else str(label))
            for u, label in zip(uris, labels, strict=True)
            if u not in (None, "")
        ]
        return rows, "label" in lower

    def _resolve(self, uri: str) -> str:
        if "://" in uri or os.path.isabs(uri):
            return uri
        return str(self.path.parent / uri)

    def survey(self) -> Listing:
        rows, self.has_labels = self._rows()
        items: dict[str, Item] = {}
        for raw, label in rows:
            uri = self._resolve(raw)
            version = "remote"
            if "://" not in uri:
                try:
                    version = local_version(os.stat(uri))
                except OSError:
                    version = "missing"
            items.setdefault(uri, Item(uri, version, label))
        found = sorted(items.values(), key=lambda i: i.uri)
        skipped = {"listed twice": len(rows) - len(found)} if len(rows) > len(found) else {}
        summary = f"the list has {len(rows):,} rows with a path or URL"
        return Listing(found, skipped, 0, len(rows), summary=summary)

    def read(self, uri: str) -> bytes:
        return read_uri(uri)


class ListKind:
    """A local .parquet or .csv file naming images."""

    name = "list"

    def recognises(self, source: Located, request: Request) -> bool:
        return (
            source.path is not None
            and source.path.is_file()
            and source.name.endswith(LIST_SUFFIXES)
        )

    def open(self, source: Located, request: Request, fetch: Fetch) -> Collection:
        return ListCollection(str(source.path))


LIST = ListKind()
