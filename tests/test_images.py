"""Decoding real image formats by the documented rule, and listing collections: folders,
archives, Parquet/CSV lists of paths and URLs."""

from __future__ import annotations

import io
import os
import struct
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.errors import ImageSearchError
from tasks.sources.collection import (
    SEP,
    ArchiveCollection,
    FolderCollection,
    ListCollection,
    is_collection_source,
    open_collection,
)
from tasks.sources.images import BadImage, decode_image, fit
from tests.http_server import MisbehavingServer


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def gradient(w: int, h: int) -> Image.Image:
    """An RGB image whose pixels say where they are: red grows to the right, green downward."""
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 60)], -1).astype(np.uint8))


def test_resize_keeps_aspect_and_centre_crops() -> None:
    out = decode_image(encode(gradient(300, 100), "PNG"), 50)
    assert out.pixels.shape == (50, 50, 3) and (out.width, out.height) == (300, 100)
    # Short side 100 -> 50, long side 300 -> 150, centre 50 columns: red spans the middle third.
    red = out.pixels[25, :, 0].astype(int)
    assert 75 < red[0] < 95 and 160 < red[-1] < 180
    assert np.all(np.diff(red) >= 0)
    green = out.pixels[:, 25, 1].astype(int)
    assert green[0] < 10 and green[-1] > 245  # the whole height is kept


def test_exif_orientation_is_applied() -> None:
    img = gradient(120, 80)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: a viewer turns it 90° clockwise
    data = encode(img, "JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(data, 64)
    assert (out.width, out.height) == (80, 120)  # as shown, portrait
    plain = fit(img.transpose(Image.Transpose.ROTATE_270), 64)
    assert np.abs(out.pixels.astype(int) - plain.astype(int)).mean() < 6


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("L", "PNG"),
        ("P", "GIF"),
        ("CMYK", "JPEG"),
        ("I;16", "PNG"),
        ("RGB", "WEBP"),
        ("RGB", "BMP"),
    ],
)
def test_every_mode_becomes_rgb(mode: str, fmt: str) -> None:
    base = gradient(64, 48)
    img = base.convert("CMYK") if mode == "CMYK" else base.convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img, dtype=np.uint16) * 257)
    out = decode_image(encode(img, fmt), 32)
    assert out.pixels.shape == (32, 32, 3) and out.pixels.dtype == np.uint8
    if mode in ("L", "I;16"):  # grey stays grey, scaled to 8 bits
        assert np.array_equal(out.pixels[..., 0], out.pixels[..., 1])
        assert out.pixels.max() > 200


def test_alpha_is_composited_over_white() -> None:
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent on the left half
    rgba[:, 20:, 3] = 255
    out = decode_image(encode(Image.fromarray(rgba), "PNG"), 40).pixels
    assert tuple(out[20, 5]) == (255, 255, 255) and tuple(out[20, 35]) == (255, 0, 0)


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (32, 32), c) for c in ((0, 0, 255), (255, 0, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    out = decode_image(buf.getvalue(), 32).pixels
    assert out[..., 2].mean() > 200 and out[..., 0].mean() < 50


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"this is text, not a PNG\n" * 10, "not an image"),
        (encode(gradient(1, 1), "PNG"), "too small: 1×1"),
        (encode(gradient(200, 200), "JPEG")[:400], "unreadable image header"),
        (encode(gradient(200, 200), "JPEG")[:1000], "damaged image data"),
    ],
)
def test_bad_images_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(BadImage, match=reason):
        decode_image(data, 32)


def test_a_decompression_bomb_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(Image.new("L", (300, 300)), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(BadImage, match="decompression bomb"):
        decode_image(data, 32)


def write_tree(root: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(Image.new("RGB", (20, 20), (i * 20, 0, 0)), "PNG"))


def test_folder_listing_labels_and_skips(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    names = ["cat/a.png", "cat/b.PNG", "dog/c.png", "dog/d.jpg", "dog/.hidden.png", ".trash/x.png"]
    write_tree(root, names)
    (root / "dog" / "notes.txt").write_text("not an image")
    folder = FolderCollection(str(root))
    listing = folder.listed()
    items = listing.items
    assert [Path(i.uri).relative_to(root).as_posix() for i in items] == [
        "cat/a.png",
        "cat/b.PNG",
        "dog/c.png",
        "dog/d.jpg",
    ]
    assert [i.label for i in items] == ["cat", "cat", "dog", "dog"] and folder.has_labels
    # What was passed over, by kind: the hidden file and the hidden folder, the text file.
    assert listing.skipped == {"hidden": 2, ".txt": 1}
    assert (listing.folders, listing.files) == (2, 6)
    write_tree(root, ["loose.png"])  # not every image one folder deep: no labels
    assert {i.label for i in FolderCollection(str(root)).listing()} == {None}
    # The output folder inside the source is never indexed.
    write_tree(root, ["out/samples.png"])
    skipped = FolderCollection(str(root), skip=[str(root / "out")]).listing()
    assert not any("/out/" in i.uri for i in skipped)


@pytest.mark.parametrize(
    ("names", "why"),
    [
        (["cat/a.png", "cat/b.png", "cat/c.png"], "there is one class folder ('cat')"),
        (["cat/a.png", "cat/b.png", "dog/c.png"], "1 class folder(s) hold a single image ('dog')"),
        (["cat/a.png", "cat/b.png", "dog/c.png", "d.png"], "1 of 4 images are not one folder"),
    ],
)
def test_folder_names_are_labels_only_when_they_are_classes(
    tmp_path: Path, names: list[str], why: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One class, or a class of one image, makes no labels (so no quality measures later); the
    log says why."""
    write_tree(tmp_path, names)
    with caplog.at_level("INFO", logger="tasks.sources.collection"):
        folder = FolderCollection(str(tmp_path))
        assert [i.label for i in folder.listing()] == [None] * len(names)
    assert not folder.has_labels
    assert f"folder names are not used as labels: {why}" in caplog.text


def test_linked_folders_are_followed_once_and_what_is_passed_over_is_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A folder made of links to folders elsewhere (as /usr/share/wallpapers is) is listed
    through them; a loop ends, a folder reached twice is listed once under its own path, and
    every entry passed over is counted by kind."""
    root = tmp_path / "wallpapers"
    elsewhere = tmp_path / "themes" / "joy" / "wallpaper"
    write_tree(elsewhere, ["a.png", "b.png"])
    (elsewhere / "1920x1080.svg").write_text("<svg/>")
    write_tree(root / "own", ["c.png", "d.png"])
    (root / "Joy").symlink_to(elsewhere)  # out of the source: followed, counted
    (root / "own" / "up").symlink_to(root)  # a loop
    (root / "again").symlink_to(root / "own")  # the same folder a second time
    (root / "broken").symlink_to(tmp_path / "nowhere")
    (root / "left_ptr").write_bytes(b"Xcur")  # a cursor file: no suffix
    (root / ".directory").write_text("[Desktop Entry]")
    with caplog.at_level("INFO", logger="tasks.sources.collection"):
        folder = FolderCollection(str(root))
        listing = folder.listed()
    assert [Path(i.uri).relative_to(root).as_posix() for i in listing.items] == [
        "Joy/a.png",
        "Joy/b.png",
        "own/c.png",
        "own/d.png",
    ]
    assert [i.label for i in listing.items] == ["Joy", "Joy", "own", "own"]
    assert listing.skipped == {
        ".svg": 1,
        "no suffix": 1,
        "hidden": 1,
        "broken link": 1,
        "link loop": 1,
        "folder linked twice": 1,
    }
    assert (listing.folders, listing.files) == (2, 7)
    assert "followed 1 links to folders outside it" in caplog.text
    assert "passed over 1 .svg, 1 broken link" in caplog.text
    # Nothing usable: the message says what was there instead.
    empty = tmp_path / "icons"
    (empty / "scalable").mkdir(parents=True)
    for i in range(3):
        (empty / "scalable" / f"{i}.svg").write_text("<svg/>")
    (empty / "index.theme").write_text("[Icon Theme]")
    with pytest.raises(ImageSearchError) as info:
        FolderCollection(str(empty)).items()
    assert str(info.value) == (
        f"No images found in {empty}: 1 folders, 4 files (3 .svg, 1 .theme); supported: .jpg "
        f".jpeg .png .webp .gif .bmp .tif .tiff. Point source at your images."
    )


def test_a_changed_file_gets_a_new_version(tmp_path: Path) -> None:
    write_tree(tmp_path, ["a.png"])
    before = FolderCollection(str(tmp_path)).listing()[0].version
    (tmp_path / "a.png").write_bytes(encode(Image.new("RGB", (30, 20)), "PNG"))
    assert FolderCollection(str(tmp_path)).listing()[0].version != before


@pytest.mark.parametrize("how", ["in place", "renamed over"])
def test_a_change_that_keeps_size_and_mtime_is_still_seen(tmp_path: Path, how: str) -> None:
    """``cp -p``, ``rsync -a`` or ``touch -r`` can give new bytes the old size and mtime: the
    version also holds what they cannot keep (the inode, the ctime), as a list's entries do."""
    write_tree(tmp_path, ["a.png"])
    path = tmp_path / "a.png"
    old = path.read_bytes()
    new = old[:-16] + bytes(16)  # other bytes, the same size
    (tmp_path / "list.csv").write_text("uri\na.png\n")
    before = [open_collection(str(tmp_path / s)).listing()[0].version for s in ["", "list.csv"]]
    st = path.stat()
    if how == "in place":  # cp -p onto the file: same inode, new ctime
        path.write_bytes(new)
    else:  # rsync -a: a new file renamed over the old one
        (tmp_path / ".a.png.tmp").write_bytes(new)
        os.replace(tmp_path / ".a.png.tmp", path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # touch -r: the old mtime back
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    after = [open_collection(str(tmp_path / s)).listing()[0].version for s in ["", "list.csv"]]
    assert after[0] != before[0] and after[1] != before[1]


@pytest.mark.slow
def test_new_version_strings_reread_once_and_embed_nothing(
    tmp_path: Path,
    reuse_random_resnet: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A catalog whose versions were size:mtime (before inode and ctime were part of them) is
    read again once, and not one image is embedded again: the store is keyed by content."""
    from tasks.features.embed import catalog_collection
    from tasks.storage import RunFolder
    from tasks.types import ModelSpec

    write_tree(tmp_path / "photos", [f"{c}/{i}.png" for c in ("a", "b") for i in range(3)])
    run, spec = RunFolder(tmp_path / "out"), ModelSpec("none")
    with monkeypatch.context() as old_versions:
        old_versions.setattr(
            "tasks.sources.collection.folder.local_version",
            lambda st: f"{st.st_size}:{st.st_mtime_ns}",
        )
        first = catalog_collection(
            open_collection(str(tmp_path / "photos")), run, spec, batch_size=8, progress=False
        )
    assert first.stats["embedded"] == 6
    run.commit(["catalog"])
    with caplog.at_level("INFO", logger="tasks.sources.collection"):
        again = catalog_collection(
            open_collection(str(tmp_path / "photos")), run, spec, batch_size=8, progress=False
        )
    assert (again.stats["read"], again.stats["embedded"], again.stats["unchanged"]) == (6, 0, 0)
    said = [r.getMessage() for r in caplog.records if "earlier version" in r.getMessage()]
    assert said == [
        "6 images were catalogued by an earlier version of image-search, by size and mtime "
        "only: reading them once more to record their inode and ctime too (what the store "
        "holds is not embedded again)"
    ]
    run.commit(["catalog"])
    caplog.clear()
    with caplog.at_level("INFO", logger="tasks.sources.collection"):
        catalog_collection(
            open_collection(str(tmp_path / "photos")), run, spec, batch_size=8, progress=False
        )
    assert not [r for r in caplog.records if "earlier version" in r.getMessage()]  # said once


def test_tar_and_zip_archives(tmp_path: Path) -> None:
    files = {"set/x/1.png": encode(gradient(20, 20), "PNG"), "set/x/2.jpg": b"broken"}
    tar_path, zip_path = tmp_path / "photos.tar.gz", tmp_path / "photos.zip"
    with tarfile.open(tar_path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with zipfile.ZipFile(zip_path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    for path in (tar_path, zip_path):
        assert is_collection_source(str(path))
        archive = open_collection(str(path))
        assert isinstance(archive, ArchiveCollection)
        items = archive.items()
        assert [i.uri.rsplit(SEP, 1)[1] for i in items] == ["set/x/1.png", "set/x/2.jpg"]
        got = list(archive.stream(items))
        assert got[0] == files["set/x/1.png"] and got[1] == b"broken"
        assert archive.read(items[0].uri) == files["set/x/1.png"]


def test_lists_of_paths_and_urls(tmp_path: Path) -> None:
    write_tree(tmp_path / "imgs", ["a.png", "b.png"])
    png = (tmp_path / "imgs" / "a.png").read_bytes()
    with MisbehavingServer() as server:
        server.files["/c.png"] = png
        rows = {
            "uri": ["imgs/a.png", str(tmp_path / "imgs" / "b.png"), server.url("/c.png")],
            "label": ["x", "y", "x"],
        }
        rows["uri"].append(server.url("/gone.png"))
        rows["label"].append("y")
        pq.write_table(pa.table(rows), tmp_path / "list.parquet")
        (tmp_path / "list.csv").write_text(
            "path,label\n" + "\n".join(f"{u},{lab}" for u, lab in zip(*rows.values(), strict=True))
        )
        for name in ("list.parquet", "list.csv"):
            listed = open_collection(str(tmp_path / name))
            assert isinstance(listed, ListCollection)
            items = listed.items()
            assert len(items) == 4 and listed.has_labels
            by_uri = {i.uri: i for i in items}
            assert by_uri[str(tmp_path / "imgs" / "a.png")].label == "x"
            got = dict(zip([i.uri for i in items], listed.stream(items), strict=True))
            assert got[server.url("/c.png")] == png
            missing = got[server.url("/gone.png")]
            assert isinstance(missing, BadImage) and "HTTP 404" in missing.reason
    (tmp_path / "bad.csv").write_text("name,label\na.png,x\n")
    with pytest.raises(ImageSearchError, match="no column named one of uri, path, url"):
        open_collection(str(tmp_path / "bad.csv")).items()


def test_stl10_sources_are_not_collections(tmp_path: Path) -> None:
    (tmp_path / "unlabeled_X.bin").write_bytes(b"")
    assert not is_collection_source(str(tmp_path))
    assert not is_collection_source("sample")
    assert not is_collection_source("https://example.org/stl10_binary.tar.gz")
    assert is_collection_source("s3://bucket/photos")
    write_tree(tmp_path / "p", ["a.png"])
    assert is_collection_source(str(tmp_path / "p"))


def test_a_folder_without_images_is_a_clear_error(tmp_path: Path) -> None:
    from tasks.features.embed import catalog_collection
    from tasks.storage import RunFolder
    from tasks.types import ModelSpec

    (tmp_path / "notes.txt").write_text("no photos here")
    with pytest.raises(
        ImageSearchError, match=r"No images found in .*: 0 folders, 1 files \(1 .txt\)"
    ):
        catalog_collection(
            open_collection(str(tmp_path)), RunFolder(tmp_path / "out"), ModelSpec("none"),
            batch_size=8, progress=False,
        )  # fmt: skip
    assert not (tmp_path / "out").exists()


def _dds_of_an_unknown_pixel_format() -> bytes:
    """A DDS header naming a pixel format no decoder has (Pillow raises NotImplementedError)."""
    header = struct.pack("<7I", 124, 0x1007, 64, 64, 0, 0, 0) + bytes(44)
    pixel_format = struct.pack("<2I", 32, 0x4) + b"ABCD" + bytes(20)
    return b"DDS " + header + pixel_format + struct.pack("<4I", 0x1000, 0, 0, 0) + bytes(4100)


def _blp_of_an_unknown_encoding() -> bytes:
    """A BLP2 header with an encoding Pillow does not know (it raises BLPFormatError)."""
    header = struct.pack("<I", 1) + bytes([9, 8, 0, 0]) + struct.pack("<2I", 64, 64)
    return b"BLP2" + header + bytes(5128)


def _bigtiff_with_a_strip_beyond_any_file() -> bytes:
    """A BigTIFF whose strip starts past 2**63 (seeking there raises OverflowError)."""
    entries = [(256, 16, 16), (257, 16, 16), (258, 3, 8), (259, 3, 1), (262, 3, 1),
               (273, 16, 2**63 + 5), (277, 3, 1), (278, 16, 16), (279, 16, 256)]  # fmt: skip
    ifd = struct.pack("<Q", len(entries))
    for tag, kind, value in entries:
        packed = struct.pack("<Q", value) if kind == 16 else struct.pack("<H", value) + bytes(6)
        ifd += struct.pack("<HHQ", tag, kind, 1) + packed
    return b"II" + struct.pack("<HHHQ", 43, 8, 0, 16) + ifd + bytes(8) + b"\x80" * 256


HOSTILE = {
    "dds-named.png": (_dds_of_an_unknown_pixel_format(), "NotImplementedError"),
    "blp-named.png": (_blp_of_an_unknown_encoding(), "BLPFormatError"),
    "bigtiff.tif": (_bigtiff_with_a_strip_beyond_any_file(), "OverflowError"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_whatever_a_decoder_raises_is_that_images_problem(name: str, tmp_path: Path) -> None:
    """Errors Pillow's plugins raise on hostile bytes are a BadImage naming the error: an error
    row in a batch (the file is its uri), a query's error, a 415 from the service (was: the run
    stopped, the service answered 500)."""
    from fastapi import HTTPException

    from service.app import _decode
    from tasks.catalog import embed_items
    from tasks.features.content import EmbeddingStore

    data, error = HOSTILE[name]
    with pytest.raises(BadImage, match=error):
        decode_image(data, 32)
    write_tree(tmp_path / "photos", ["good.png"])
    (tmp_path / "photos" / name).write_bytes(data)
    folder = FolderCollection(str(tmp_path / "photos"))
    items = folder.items()
    outcomes, embedded = embed_items(
        folder,
        items,
        EmbeddingStore(tmp_path / "out", "test"),
        lambda: lambda batch: np.zeros((len(batch), 2048), np.float32),
        input_size=32,
        batch_size=4,
        progress=False,
    )
    by_name = {Path(i.uri).name: o for i, o in zip(items, outcomes, strict=True)}
    assert isinstance(by_name["good.png"], tuple) and embedded == 1
    assert isinstance(by_name[name], str) and error in by_name[name]
    with pytest.raises(HTTPException) as info:
        _decode(data, 32, 50_000_000)
    assert info.value.status_code == 415 and error in str(info.value.detail)


def _writable_formats() -> dict[str, bytes]:
    """A small real image in every format this Pillow writes (and so can read back)."""
    base = gradient(24, 32)
    modes = {"MSP": "1", "XBM": "1", "SPIDER": "L", "BLP": "P"}
    found = {}
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "DDS", "ICO", "PCX", "TGA", "PPM",
                "SGI", "QOI", "JPEG2000", "MSP", "XBM", "SPIDER", "DIB", "BLP", "ICNS",
                "AVIF"):  # fmt: skip
        try:
            found[fmt] = encode(base.convert(modes.get(fmt, "RGB")), fmt)
        except (KeyError, OSError, ValueError):
            continue  # a codec this build of Pillow lacks
    return found


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on the damage it meets
def test_fuzzed_images_of_every_format_decode_or_are_refused() -> None:
    """Seeded mutations of real small images of every format (a bounded number each): each one
    decodes to (32, 32, 3) or is a BadImage; nothing else escapes the decode rule."""
    formats = _writable_formats()
    assert {"PNG", "JPEG", "GIF", "TIFF", "WEBP", "DDS"} <= formats.keys()
    rng = np.random.default_rng(0)
    outcomes: dict[str, int] = {"decoded": 0, "refused": 0}
    for data in formats.values():
        for _ in range(40):
            mutated = bytearray(data)
            for _ in range(int(rng.integers(1, 9))):
                header = rng.random() < 0.7
                at = int(rng.integers(0, min(len(mutated), 64) if header else len(mutated)))
                mutated[at] = int(rng.integers(0, 256))
            if rng.random() < 0.2:
                mutated = mutated[: int(rng.integers(1, len(mutated)))]
            try:
                assert decode_image(bytes(mutated), 32).pixels.shape == (32, 32, 3)
                outcomes["decoded"] += 1
            except BadImage:
                outcomes["refused"] += 1
    assert outcomes["decoded"] > 0 and outcomes["refused"] > 0, outcomes


def test_a_thin_image_is_never_enlarged_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """An 8×200,000 PNG (a few KB) would be enlarged to 96×2,400,000 (690 MB) before the crop:
    only the part the crop keeps is computed, and it matches the whole resize within ±2."""
    thin = encode(gradient(8, 200_000).convert("L"), "PNG", optimize=True)
    assert len(thin) < 500_000
    sizes: list[tuple[int, int]] = []
    resize = Image.Image.resize

    def spy(self: Image.Image, size: tuple[int, int], *args: Any, **kwargs: Any) -> Image.Image:
        sizes.append(size)
        if size[0] * size[1] > 96 * 200_000:  # the whole enlargement: not worth allocating here
            return Image.new(self.mode, (96, 96))
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    out = decode_image(thin, 96)
    assert out.pixels.shape == (96, 96, 3) and (out.width, out.height) == (8, 200_000)
    assert max(w * h for w, h in sizes) <= 96 * 200_000  # never the 2.4 M-row enlargement
    # Where the whole resize is affordable, both ways agree to rounding.
    monkeypatch.setattr(Image.Image, "resize", resize)
    small = gradient(9, 700)
    whole = fit(small, 96)
    monkeypatch.setattr("tasks.sources.images.MAX_ENLARGED_PIXELS", 1000)
    part = fit(small, 96)
    assert np.abs(whole.astype(int) - part.astype(int)).max() <= 2
    # Ordinary images, shrunk or enlarged, take the whole resize exactly as before.
    for w, h in ((300, 200), (60, 40)):
        whole_resize = gradient(w, h).resize((144, 96), Image.Resampling.BICUBIC, reducing_gap=3.0)
        expected = np.asarray(whole_resize.crop((24, 0, 120, 96)))
        assert np.array_equal(fit(gradient(w, h), 96), expected)
