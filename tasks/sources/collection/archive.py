"""The image members of a tar or zip archive.

A tar archive is read as a stream, member after member, in archive order (its listing's order:
the one order a compressed tar can be read in without holding members in memory). Reading one
member alone (a picture, a query's neighbour) seeks straight to it in an uncompressed tar, from
the offsets its one scan remembered; a compressed tar has no index, so one member costs
decompressing the archive up to it. A zip archive has its own index and is read like files.

Two members with the same name: the last one counts, as when the archive is extracted (tar and
unzip both leave the later file in place); the earlier ones are counted as skipped.
"""

from __future__ import annotations

import tarfile
import threading
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from tasks.errors import ImageSearchError
from tasks.sources.collection.base import (
    MAX_IMAGE_BYTES,
    SEP,
    Collection,
    Fetch,
    Item,
    Listing,
    Request,
    folder_labels,
    skip_kind,
)
from tasks.sources.images import BadImage
from tasks.sources.located import ARCHIVE_SUFFIXES, Located

ARCHIVE_ERRORS = (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError, ValueError)
COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz


@dataclass(frozen=True)
class Member:
    """One regular file of an archive, where its bytes start (tar) and what makes its version."""

    name: str
    size: int
    stamp: str  # mtime as the archive records it
    offset: int  # tar: offset of the data in the (uncompressed) archive; zip: -1


class ArchiveCollection(Collection):
    """The image members of a tar (optionally gzip/bz2/xz-compressed) or zip archive."""

    kind: ClassVar[str] = "archive"

    def __init__(self, source: str) -> None:
        super().__init__(source)
        self.path = Path(source).expanduser().resolve()
        self.is_zip = self.path.name.lower().endswith(".zip")
        self._members: dict[str, Member] | None = None  # name -> its last occurrence
        self._lock = threading.RLock()
        self._plain: bool | None = None

    @classmethod
    def reopen(cls, described: dict[str, Any], skip: tuple[str, ...] = ()) -> ArchiveCollection:
        collection = cls(described["source"])
        collection.limit = described.get("limit")
        return collection

    def _error(self, exc: BaseException) -> ImageSearchError:
        return ImageSearchError(
            f"Cannot read archive {self.path} ({exc}); it is damaged or not a tar/zip file."
        )

    def _scan(self) -> list[Member]:
        """Every regular file of the archive, in archive order."""
        try:
            if self.is_zip:
                with zipfile.ZipFile(self.path) as zf:
                    infos = zf.infolist()
                    return [
                        Member(i.filename, i.file_size, "-".join(map(str, i.date_time)), -1)
                        for i in infos
                        if not i.is_dir()
                    ]
            with tarfile.open(self.path) as tf:
                return [
                    Member(m.name, m.size, str(m.mtime), m.offset_data) for m in tf if m.isfile()
                ]
        except ARCHIVE_ERRORS as exc:
            raise self._error(exc) from exc

    def survey(self) -> Listing:
        members = self._scan()
        last = {m.name: m for m in members}
        skipped: Counter[str] = Counter()
        kept: list[Member] = []
        for m in members:
            if last[m.name] is not m:
                skipped["duplicate name"] += 1
            elif (kind := skip_kind(m.name)) is not None:
                skipped[kind] += 1
            else:
                kept.append(m)
        with self._lock:
            self._members = last
        if self.is_zip:
            kept.sort(key=lambda m: m.name)
        labels = folder_labels([m.name for m in kept], self.source)
        self.has_labels = any(label is not None for label in labels)
        items = [
            Item(f"{self.path}{SEP}{m.name}", f"{m.size}:{m.stamp}", label)
            for m, label in zip(kept, labels, strict=True)
        ]
        folders = len({m.name.rsplit("/", 1)[0] for m in members if "/" in m.name})
        return Listing(items, dict(skipped), folders, len(members))

    def _member(self, name: str) -> Member:
        with self._lock:
            if self._members is None:
                self.listed()
            known = self._members or {}
        try:
            return known[name]
        except KeyError:
            raise BadImage("no such member in the archive") from None

    def _is_plain_tar(self) -> bool:
        """Whether the archive is an uncompressed tar (its members can be read by offset)."""
        if self._plain is None:
            try:
                with open(self.path, "rb") as f:
                    head = f.read(6)
            except OSError as exc:
                raise self._error(exc) from exc
            self._plain = not self.is_zip and not head.startswith(COMPRESSED)
        return self._plain

    def read(self, uri: str) -> bytes:
        name = uri.rsplit(SEP, 1)[-1]
        member = self._member(name)
        if member.size > MAX_IMAGE_BYTES:
            raise BadImage(f"member too large: {member.size:,} bytes (limit {MAX_IMAGE_BYTES:,})")
        try:
            if self.is_zip:
                with zipfile.ZipFile(self.path) as zf:
                    return zf.read(zf.getinfo(name))
            if self._is_plain_tar():
                with open(self.path, "rb") as plain:
                    plain.seek(member.offset)
                    data = plain.read(member.size)
            else:  # no index in a compressed stream: decompress up to the member
                with tarfile.open(self.path) as tf:
                    info = tarfile.TarInfo(name)
                    info.size, info.offset_data = member.size, member.offset
                    f = tf.extractfile(info)
                    data = f.read() if f is not None else b""
        except KeyError as exc:
            raise BadImage("no such member in the archive") from exc
        except ARCHIVE_ERRORS as exc:
            raise BadImage(f"unreadable member ({exc})") from exc
        if len(data) != member.size:
            raise BadImage(f"member cut short: {len(data):,} of {member.size:,} bytes")
        return data

    def stream(self, items: list[Item], workers: int | None = None) -> Iterator[bytes | BadImage]:
        """Zip and uncompressed tar: random access, read in parallel like files. A compressed
        tar: one sequential pass that yields each member as it passes, never holding more than
        the one at hand (``items`` in listing order; any other order reads member by member)."""
        if self.is_zip or self._is_plain_tar():
            yield from super().stream(items, workers)
            return
        wanted = [self._member_or_none(item.uri) for item in items]
        offsets = [m.offset for m in wanted if m is not None]
        if offsets != sorted(offsets):  # not in archive order: one member at a time
            yield from super().stream(items, workers)
            return
        done = 0

        def missing() -> list[BadImage]:
            nonlocal done
            found = []
            while done < len(items) and wanted[done] is None:
                found.append(BadImage("no such member in the archive"))
                done += 1
            return found

        yield from missing()
        try:
            with tarfile.open(self.path, mode="r|*") as tf:
                for member in tf:
                    if done == len(items):
                        break
                    want = wanted[done]
                    if want is None or member.offset_data != want.offset or not member.isfile():
                        continue
                    yield self._take(tf, member)
                    done += 1
                    yield from missing()
        except ARCHIVE_ERRORS as exc:
            raise self._error(exc) from exc
        for _ in range(done, len(items)):
            yield BadImage("member vanished from the archive")

    def _member_or_none(self, uri: str) -> Member | None:
        try:
            return self._member(uri.rsplit(SEP, 1)[-1])
        except BadImage:
            return None

    @staticmethod
    def _take(tf: tarfile.TarFile, member: tarfile.TarInfo) -> bytes | BadImage:
        if member.size > MAX_IMAGE_BYTES:
            return BadImage(f"member too large: {member.size:,} bytes (limit {MAX_IMAGE_BYTES:,})")
        f = tf.extractfile(member)
        if f is None:
            return BadImage("not a regular file in the archive")
        data = f.read()
        if len(data) != member.size:
            return BadImage(f"member cut short: {len(data):,} of {member.size:,} bytes")
        return data


class ArchiveKind:
    """A local tar or zip archive (one that is not STL-10's tarball)."""

    name = "archive"

    def recognises(self, source: Located, request: Request) -> bool:
        return (
            source.path is not None
            and source.path.is_file()
            and source.name.endswith(ARCHIVE_SUFFIXES)
        )

    def open(self, source: Located, request: Request, fetch: Fetch) -> Collection:
        return ArchiveCollection(str(source.path))


ARCHIVE = ArchiveKind()
