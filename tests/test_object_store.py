"""A folder on an object store (``s3://``), through fsspec/s3fs against a real local
S3-compatible server process (moto's server on 127.0.0.1): listed, catalogued, embedded, and
re-indexed incrementally as objects arrive."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tasks.catalog import read_catalog
from tasks.features.embed import catalog_collection
from tasks.sources.collection import FolderCollection, is_collection_source, open_collection
from tasks.storage import RunFolder
from tasks.types import ModelSpec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    """A local S3-compatible server process, and the endpoint URL users would configure."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("the local S3 server did not start")
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """An empty bucket ``photos`` reached through the standard AWS settings."""
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    if fs.exists("photos"):
        fs.rm("photos", recursive=True)
    fs.mkdir("photos")
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()


def png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_an_s3_folder_is_indexed_and_grows_incrementally(
    bucket: object, tmp_path: Path, reuse_random_resnet: None
) -> None:
    fs = bucket
    for i in range(6):
        fs.pipe(f"photos/shared/{'red' if i < 3 else 'blue'}/{i}.png", png((40 * i, 0, 0)))  # type: ignore[attr-defined]
    fs.pipe("photos/shared/blue/broken.png", b"not a png")  # type: ignore[attr-defined]
    fs.pipe("photos/shared/notes.txt", b"what these are")  # type: ignore[attr-defined]
    source = "s3://photos/shared"
    assert is_collection_source(source)
    collection = open_collection(source)
    assert isinstance(collection, FolderCollection)
    items = collection.items()
    assert [i.uri for i in items][:2] == [
        "s3://photos/shared/blue/3.png",
        "s3://photos/shared/blue/4.png",
    ]
    assert {i.label for i in items} == {"red", "blue"}

    run = RunFolder(tmp_path / "out")
    spec = ModelSpec("none")
    cat = catalog_collection(collection, run, spec, batch_size=8, progress=False)
    assert (cat.stats["listed"], cat.stats["embedded"], cat.n_errors) == (7, 6, 1)
    run.commit(["catalog"])
    # What the listing passed over is recorded with the catalog, by kind.
    assert read_catalog(tmp_path / "out" / "catalog.parquet").meta["skipped"] == {".txt": 1}

    fs.pipe("photos/shared/red/new.png", png((1, 2, 3)))  # type: ignore[attr-defined]
    again = catalog_collection(open_collection(source), run, spec, batch_size=8, progress=False)
    assert again.stats["embedded"] == 1 and again.stats["unchanged"] == 6
    assert again.stats["read"] == 2  # the new object and the broken one, tried again


def test_a_key_with_double_colons_is_an_image_like_any_other(bucket: object) -> None:
    """fsspec would read ``a::b.png`` as a chain of two URLs (and stop the run with a
    TypeError); the key is read as the name it is."""
    fs = bucket
    fs.pipe("photos/odd/a::b.png", png((1, 2, 3)))  # type: ignore[attr-defined]
    fs.pipe("photos/odd/c.png", png((4, 5, 6)))  # type: ignore[attr-defined]
    collection = open_collection("s3://photos/odd")
    items = collection.items()
    assert [i.uri for i in items] == ["s3://photos/odd/a::b.png", "s3://photos/odd/c.png"]
    assert list(collection.stream(items)) == [png((1, 2, 3)), png((4, 5, 6))]
