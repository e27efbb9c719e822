"""Sources that do not break a run: the registry's answers for what is not a collection, lists
with slow or missing entries, archives with duplicate names or large members, object-store keys
with ``::`` in them."""

from __future__ import annotations

import io
import tarfile
import warnings
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from tasks.errors import ImageSearchError
from tasks.sources.collection import (
    SEP,
    ArchiveCollection,
    FolderCollection,
    Request,
    open_collection,
    open_source,
    read_uri,
)
from tasks.sources.images import BadImage
from tests.http_server import MisbehavingServer


def png(colour: tuple[int, int, int], size: tuple[int, int] = (20, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


# -- what the registry says about what is not a collection ----------------------------------


def test_a_single_photo_is_not_a_source(tmp_path: Path) -> None:
    photo = tmp_path / "holiday.jpg"
    photo.write_bytes(png((1, 2, 3)))
    with pytest.raises(ImageSearchError, match="is a single image; point source at the folder"):
        open_source(Request(str(photo)))


def test_a_file_url_of_a_folder_is_the_folder(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png((1, 2, 3)))
    collection = open_source(Request(tmp_path.as_uri()))
    assert isinstance(collection, FolderCollection)
    assert [Path(i.uri).name for i in collection.items()] == ["a.png"]


def test_a_list_with_a_header_and_no_rows(tmp_path: Path) -> None:
    (tmp_path / "list.csv").write_text("uri,label\n")
    with pytest.raises(ImageSearchError, match="the list has 0 rows with a path or URL"):
        open_collection(str(tmp_path / "list.csv")).items()


def test_a_missing_path_in_a_list_is_no_such_file(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png((1, 2, 3)))
    (tmp_path / "list.csv").write_text("uri\na.png\ngone.png\n")
    listed = open_collection(str(tmp_path / "list.csv"))
    got = list(listed.stream(listed.items()))
    assert got[0] == png((1, 2, 3))
    assert isinstance(got[1], BadImage) and got[1].reason == "no such file"


# -- a slow URL is one image's problem --------------------------------------------------------


def test_a_slow_url_in_a_list_is_an_error_row_within_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that trickles its bytes would hold the catalog (and a query) for as long as it
    likes: each image has an overall deadline, and is then an error like any other."""
    monkeypatch.setattr("tasks.sources.collection.base.URL_DEADLINE_S", 0.5)
    with MisbehavingServer() as server:
        server.files["/slow.png"] = png((9, 9, 9), (200, 200))
        server.files["/fast.png"] = png((1, 1, 1))
        server.rate = 200  # 10 bytes every 50 ms: never silent, never done
        (tmp_path / "list.csv").write_text(f"uri\n{server.url('/slow.png')}\n")
        listed = open_collection(str(tmp_path / "list.csv"))
        [slow] = list(listed.stream(listed.items()))
        assert isinstance(slow, BadImage)
        assert slow.reason == "download failed: no complete answer within 0.5 s"
        with pytest.raises(BadImage, match=r"no complete answer within 0\.5 s"):
            read_uri(server.url("/slow.png"))  # what a query reads its URLs with
        server.rate = 0
        assert read_uri(server.url("/fast.png")) == png((1, 1, 1))


# -- archives ---------------------------------------------------------------------------------


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    mode = "w:gz" if path.name.endswith(".gz") else "w"
    with tarfile.open(path, mode) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _zip(path: Path, members: list[tuple[str, bytes]]) -> None:
    with zipfile.ZipFile(path, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile's word on a duplicate name
        for name, data in members:
            zf.writestr(name, data)


@pytest.mark.parametrize("name", ["photos.zip", "photos.tar", "photos.tar.gz"])
def test_two_members_with_one_name_keep_the_last(tmp_path: Path, name: str) -> None:
    """As extracting the archive would: the later member is the file, the earlier one is
    counted as skipped; the URI stays the name, stable as the archive grows."""
    first, second, other = png((200, 0, 0)), png((0, 200, 0)), png((0, 0, 200))
    path = tmp_path / name
    members = [("set/a.png", first), ("set/b.png", other), ("set/a.png", second)]
    (_zip if name.endswith(".zip") else _tar)(path, members)
    archive = ArchiveCollection(str(path))
    listing = archive.listed()
    assert sorted(i.uri.rsplit(SEP, 1)[1] for i in listing.items) == ["set/a.png", "set/b.png"]
    assert listing.skipped == {"duplicate name": 1}
    by_name = dict(zip([i.uri.rsplit(SEP, 1)[1] for i in listing.items],
                       archive.stream(listing.items), strict=True))  # fmt: skip
    assert by_name == {"set/a.png": second, "set/b.png": other}
    assert archive.read(f"{path}{SEP}set/a.png") == second


def test_a_tar_member_over_the_cap_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tasks.sources.collection.archive.MAX_IMAGE_BYTES", 1000)
    small, large = png((1, 2, 3)), png((4, 5, 6), (400, 400)) + bytes(2000)
    for name in ("big.tar", "big.tar.gz"):
        path = tmp_path / name
        _tar(path, [("a.png", small), ("b.png", large)])
        archive = ArchiveCollection(str(path))
        got = list(archive.stream(archive.items()))
        assert got[0] == small
        assert isinstance(got[1], BadImage) and got[1].reason.startswith("member too large")
        with pytest.raises(BadImage, match="member too large"):
            archive.read(f"{path}{SEP}b.png")


def test_a_compressed_tar_streams_in_archive_order_and_a_plain_one_reads_by_offset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A .tar.gz lists (and streams) its members in archive order, the one order it can be
    read in without holding members back; one member of a plain .tar is read by its offset,
    without opening the archive as a tar again."""
    members = [(f"p/{n}.png", png((i, 0, 0))) for i, n in enumerate(["z", "m", "a"])]
    _tar(tmp_path / "p.tar.gz", members)
    compressed = ArchiveCollection(str(tmp_path / "p.tar.gz"))
    items = compressed.items()
    assert [i.uri.rsplit(SEP, 1)[1] for i in items] == ["p/z.png", "p/m.png", "p/a.png"]
    assert list(compressed.stream(items)) == [data for _, data in members]
    assert list(compressed.stream(items[1:])) == [data for _, data in members[1:]]

    _tar(tmp_path / "p.tar", members)
    plain = ArchiveCollection(str(tmp_path / "p.tar"))
    uris = [i.uri for i in plain.items()]  # one scan of the headers
    opened: list[object] = []
    real_open = tarfile.open

    def counting(*args: object, **kwargs: object) -> tarfile.TarFile:
        opened.append(args)
        return real_open(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tarfile, "open", counting)
    assert [plain.read(u) for u in reversed(uris)] == [data for _, data in reversed(members)]
    assert list(plain.stream(plain.items())) == [data for _, data in members]
    assert opened == []


# -- object stores ----------------------------------------------------------------------------


def test_an_object_key_with_double_colons_is_read_literally() -> None:
    """fsspec reads ``a::b`` as a chain of URLs; a key holding ``::`` is just a name."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/odd/a::b.png", png((1, 2, 3)))
    fs.pipe("/bucket/odd/c.png", png((4, 5, 6)))
    collection = open_collection("memory://bucket/odd")
    items = collection.items()
    assert [i.uri for i in items] == ["memory:///bucket/odd/a::b.png", "memory:///bucket/odd/c.png"]
    assert list(collection.stream(items)) == [png((1, 2, 3)), png((4, 5, 6))]
    assert read_uri(items[0].uri) == png((1, 2, 3))
    fs.rm("/bucket/odd", recursive=True)
