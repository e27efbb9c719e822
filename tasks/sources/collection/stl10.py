"""STL-10 as a kind of source: the official URL or a mirror, a tarball, a folder holding the
extracted files, an STL-10-format ``.bin`` file, or the built-in ``sample``; its unlabeled set,
or its labelled sets (training images indexed, test images querying them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tasks.errors import ImageSearchError, param
from tasks.sources.cache import default_data_dir
from tasks.sources.collection.base import (
    SEP,
    Collection,
    Fetch,
    Item,
    Listing,
    Request,
)
from tasks.sources.images import BadImage, Decoded, encode_png, fit
from tasks.sources.located import Located
from tasks.sources.resolve import labelled_folder
from tasks.sources.sample import ensure_labelled_sample
from tasks.sources.stl10 import (
    EXTRACT_DIR,
    IMAGE_BYTES,
    read_all_images,
    release_pages,
    stl10_form,
    with_limit,
)


class Stl10Collection(Collection):
    """The images of an STL-10 binary file (optionally its first ``rows``), labels from the
    matching ``*_y.bin`` (1-based class numbers) and ``class_names.txt`` when given."""

    kind: ClassVar[str] = "stl10"

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

    @classmethod
    def reopen(cls, described: dict[str, Any], skip: tuple[str, ...] = ()) -> Stl10Collection:
        return cls(
            described["source"],
            described.get("rows"),
            described.get("labels"),
            described.get("split"),
        )

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

    def survey(self) -> Listing:
        labels = self._labels()
        width = len(str(self.rows))
        items = [
            Item(f"{self.path}{SEP}{row:0{width}d}", "stl10", labels[row], self.split)
            for row in range(self.rows)
        ]
        return Listing(items, files=1)

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

    kind: ClassVar[str] = "stl10-labelled"
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

    @classmethod
    def reopen(cls, described: dict[str, Any], skip: tuple[str, ...] = ()) -> LabelledStl10:
        return cls(described["source"])

    def _part(self, uri: str) -> Stl10Collection:
        return next(p for p in self.parts if uri.startswith(f"{p.path}{SEP}"))

    def survey(self) -> Listing:
        return Listing([item for part in self.parts for item in part.listing()], files=2)

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


class Stl10Kind:
    """STL-10 in any of its forms (see :func:`stl10_form`), and every source when its labelled
    sets are asked for."""

    name = "stl10"

    def recognises(self, source: Located, request: Request) -> bool:
        if request.stl10_set == "labelled":
            return (
                bool(source.scheme)
                or source.text == "sample"
                or bool(source.path and source.path.exists())
            )
        return stl10_form(source) is not None

    def open(self, source: Located, request: Request, fetch: Fetch) -> Collection:
        data_dir = str(request.data_dir) if request.data_dir is not None else None
        if request.stl10_set != "labelled":
            dataset = with_limit(fetch(source.text, data_dir), request.limit)
            return Stl10Collection(dataset.uri, dataset.rows)
        if request.limit is not None:
            raise ImageSearchError(
                f"{param('limit')} applies to the unlabeled set; leave it empty with "
                f"{param('stl10_set')} labelled."
            )
        form = stl10_form(source)
        if form == "sample":
            sample = ensure_labelled_sample(request.data_dir or default_data_dir())
            return LabelledStl10(str(sample))
        if source.path is not None:
            for folder in (source.path, source.path / EXTRACT_DIR):
                if (folder / "train_X.bin").is_file():
                    return LabelledStl10(str(labelled_folder(folder.resolve(), request.data_dir)))
        if form is None:
            raise ImageSearchError(
                f"{param('stl10_set')} labelled needs STL-10's labelled sets, and "
                f"{source.text!r} is not STL-10: point {param('source')} at the STL-10 tarball, "
                f"its URL, or the folder holding train_X.bin, train_y.bin, test_X.bin and "
                f"test_y.bin; for your own images leave {param('stl10_set')} at unlabeled."
            )
        fetched = fetch(source.text, data_dir)
        return LabelledStl10(str(labelled_folder(Path(fetched.uri).parent, request.data_dir)))


STL10 = Stl10Kind()
