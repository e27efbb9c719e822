"""``image-search serve`` as a real uvicorn process on 127.0.0.1, exercised over HTTP: an index
image uploaded finds itself with the batch run's neighbours; every kind of bad input is a clear
4xx and the service stays up; a newly committed index is picked up without a restart while
requests in flight finish on the old one; a busy service says so (503)."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from service.app import Limits, create_app
from service.engine import Engine
from tasks.layout import INDEX_FEATURES as FEATURES
from tests.indexes import SELF, Built, build_index, describe, stored_neighbours, write_images
from tests.services import Service, copy_index, free_port, png, serve_command, start_service

UPLOAD_LIMIT = 256 * 1024  # --max-upload-mb 0.25


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory, index: Built) -> Iterator[Service]:
    """One service process for the module, serving a copy of the shared index (tests update
    the copy); stopped with SIGTERM at the end, which it must survive cleanly."""
    base = tmp_path_factory.mktemp("served")
    folder = copy_index(index.out, base / "index")
    extra = ["--reload-interval", "0.2", "--max-upload-mb", "0.25", "--max-concurrency", "4"]
    extra += ["--allow-url-network", "127.0.0.1"]  # the test servers: loopback is refused else
    running = start_service(folder, base / "serve.log", *extra)
    yield running
    running.proc.send_signal(signal.SIGTERM)
    assert running.proc.wait(timeout=60) == 128 + signal.SIGTERM
    log = running.log.read_text()
    assert log.rstrip().endswith(
        "image-search: stopped (SIGTERM); requests in flight were answered."
    )
    assert "error" not in log and "Traceback" not in log


def upload(client: httpx.Client, data: bytes, name: str = "q.png", k: int = 5) -> httpx.Response:
    return client.post(f"/search?k={k}", files={"image": (name, data)})


def bomb_png(side: int = 30_000) -> bytes:
    """A few hundred bytes whose header claims ``side``×``side`` pixels (Pillow refuses it)."""
    data = bytearray(png(16, 16))
    ihdr = struct.pack(">II", side, side) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_uploaded_index_image_finds_itself_with_the_batch_runs_neighbours(
    service: Service, index: Built
) -> None:
    with service.client() as client:
        for image_id, path in index.some(3):
            resp = upload(client, path.read_bytes(), path.name, k=5)
            assert resp.status_code == 200, resp.text
            answer = resp.json()
            got = answer["neighbours"]
            want_d, want_ids = stored_neighbours(index.out, image_id, 5)
            assert [n["image_id"] for n in got] == want_ids.tolist()
            np.testing.assert_allclose([n["distance"] for n in got], want_d, atol=SELF)
            assert got[0]["distance"] < SELF
            assert got[0]["uri"] == path.relative_to(index.images).as_posix()
            assert str(index.images) not in resp.text  # paths relative to the source
            assert [n["rank"] for n in got] == [1, 2, 3, 4, 5]
            assert got[0]["url"] == f"/images/{image_id}"
            assert answer["query"] == path.name and answer["k"] == 5
            assert answer["index"]["images"] == len(index.files)
            assert answer["timings_ms"]["embed"] > 0 and answer["batch"] >= 1


def test_search_by_url(service: Service, index: Built, http_server: Any) -> None:
    image_id, path = index.some(1)[0]
    http_server.files["/photo.png"] = path.read_bytes()
    http_server.fail_status["/gone.png"] = [404]
    with service.client() as client:
        resp = client.post("/search", json={"url": http_server.url("/photo.png"), "k": 2})
        assert resp.status_code == 200, resp.text
        assert next(n["image_id"] for n in resp.json()["neighbours"]) == image_id
        resp = client.post("/search", json={"url": http_server.url("/gone.png")})
        assert resp.status_code == 422
        assert resp.json()["detail"].startswith(
            f"Could not fetch the URL {http_server.url('/gone.png')}. This service fetches"
        )
        resp = client.post("/search", json={"url": f"file://{path}"})
        assert resp.status_code == 422
        assert "only http:// and https:// URLs are fetched" in resp.json()["detail"]


def test_images_are_served_by_id_and_unknown_ids_are_404(service: Service, index: Built) -> None:
    with service.client() as client:
        for image_id, path in index.some(2):
            resp = client.get(f"/images/{image_id}")
            assert resp.status_code == 200
            assert resp.content == path.read_bytes()
            want = "image/png" if path.suffix == ".png" else "image/jpeg"
            assert resp.headers["content-type"] == want
        resp = client.get("/images/987654")
        assert resp.status_code == 404
        assert resp.json()["detail"].startswith("Image id 987654 is not in the index (")
        assert client.get("/images/not-a-number").status_code == 422


@pytest.mark.parametrize(
    ("send", "status", "message"),
    [
        (lambda c: upload(c, b"just some text, not pixels"), 415, "not an image Pillow"),
        (lambda c: upload(c, b""), 415, "empty file (0 bytes)"),
        (lambda c: upload(c, png(4, 4)), 415, "too small: 4×4 pixels"),
        (lambda c: upload(c, bomb_png()), 413, "decompression bomb refused"),
        (lambda c: upload(c, os.urandom(UPLOAD_LIMIT + 1)), 413, "larger than this service"),
        (lambda c: c.post("/search", files={"k": (None, "3")}), 422, "form field 'image'"),
        (
            lambda c: c.post("/search", content=b"x", headers={"content-type": "text/plain"}),
            415,
            "Content-Type text/plain",
        ),
        (lambda c: c.post("/search", json={"link": "x"}), 422, 'Send JSON like {"url"'),
        (lambda c: upload(c, png(32, 32), k=0), 422, "k = 0: ask for a whole number of neig"),
        (lambda c: upload(c, png(32, 32), k=101), 422, "k = 101: ask for a whole number of n"),
        (
            lambda c: c.post("/search", json={"url": "http://127.0.0.1:9/x.png", "k": 101}),
            422,
            "k = 101: ask for a whole number of neighbours from 1 to 100",
        ),
        (
            lambda c: c.post("/search", files={"image": ("a.png", png(32, 32))}, data={"k": "x"}),
            422,
            "k = x: ask for a whole number of neighbours from 1 to 100",
        ),
    ],
    ids=[
        "text",
        "empty",
        "tiny",
        "bomb",
        "oversized",
        "no-file",
        "content-type",
        "json",
        "k",
        "k-above-cap",
        "json-k-above-cap",
        "form-k",
    ],
)
def test_bad_input_is_a_clear_4xx_and_the_service_stays_up(
    service: Service, index: Built, send: Any, status: int, message: str
) -> None:
    with service.client() as client:
        resp = send(client)
        assert resp.status_code == status, resp.text
        assert message in resp.json()["detail"]
        assert client.get("/healthz").json()["status"] == "ok"
        image_id, path = index.some(1)[0]
        good = upload(client, path.read_bytes(), k=1)
        assert good.status_code == 200 and good.json()["neighbours"][0]["image_id"] == image_id


def test_healthz_page_and_api_description(service: Service, index: Built) -> None:
    with service.client() as client:
        health = client.get("/healthz").json()
        page = client.get("/")
        docs = client.get("/docs")
        api = client.get("/openapi.json").json()
    assert health["images"] == len(index.files) and health["input_size"] == 96
    assert health["weights"] == "none" and health["problem"] is None
    assert health["index"] == service.folder.name  # its name: no server path
    assert health["features_from"] == "features/index.npy"  # memory-mapped, not read
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'type="file"' in page.text and "/search" in page.text
    assert 'max="100"' in page.text and "?size=" in page.text
    assert docs.status_code == 200 and "/openapi.json" in docs.text
    search = api["paths"]["/search"]["post"]
    assert set(search["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    answer = search["responses"]["200"]["content"]["application/json"]["schema"]
    assert answer == {"$ref": "#/components/schemas/SearchOut"}
    assert {"SearchOut", "NeighbourOut", "HealthOut"} <= set(api["components"]["schemas"])
    by_url = search["requestBody"]["content"]["application/json"]["schema"]
    assert by_url["required"] == ["url"] and set(by_url["properties"]) == {"url", "k"}
    k = next(p for p in search["parameters"] if p["name"] == "k")
    assert (k["in"], k["schema"]["anyOf"][0]["maximum"]) == ("query", 100)


def test_tiles_are_thumbnails_of_the_indexed_image(service: Service, index: Built) -> None:
    image_id, path = index.some(1)[0]
    with service.client() as client:
        tile = client.get(f"/images/{image_id}?size=144")
        assert tile.status_code == 200 and tile.headers["content-type"] == "image/jpeg"
        with Image.open(io.BytesIO(tile.content)) as img:
            assert img.size == (144, 144)
        assert len(tile.content) < path.stat().st_size * 4  # a tile, whatever the original
        too_small = client.get(f"/images/{image_id}?size=4")
        assert too_small.status_code == 422
        assert too_small.json()["detail"] == "size = 4: Input should be greater than or equal to 16"


def commit_into(src: Path, dest: Path) -> None:
    """Move a finished index into ``dest`` the way a run commits: each file by rename, stage
    by stage in the order of their names, each stage's outputs before its record."""
    incoming = dest / ".incoming"
    shutil.copytree(src, incoming, ignore=shutil.ignore_patterns(".embeddings", ".staging"))
    for rel in (
        "catalog.parquet",
        "errors.parquet",
        ".state/catalog.json",
        FEATURES,
        "features/query.parquet",
        ".state/embed.json",
        "features/index.npy",
        "features/index-rows.npy",
        ".state/index-copy.json",
        "features/model.onnx",
        ".state/query-model.json",
    ):
        os.replace(incoming / rel, dest / rel)
    shutil.rmtree(incoming)


def wait_for(client: httpx.Client, check: Any, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        health: dict[str, Any] = client.get("/healthz").json()
        if check(health) or time.monotonic() > deadline:
            return health
        time.sleep(0.1)


@pytest.fixture(scope="session")
def grown(tmp_path_factory: pytest.TempPathFactory, index: Built, random_resnet: Any) -> Built:
    """The shared index's images plus six new ones, indexed by a later run into a copy of the
    shared index's folder (its embedding store spares the old images a second embedding)."""
    base = tmp_path_factory.mktemp("grown")
    shutil.copytree(index.images, base / "images")
    write_images(base / "images", 6, start=24)
    shutil.copytree(index.out, base / "out")
    build_index(base / "images", base / "out", random_resnet)
    return Built(base / "images", base / "out", describe(base / "out"))


def test_a_committed_index_is_picked_up_and_a_vanished_one_keeps_answering(
    service: Service, grown: Built, index: Built
) -> None:
    new = [(i, p) for i, p in sorted(grown.files.items()) if int(p.stem[3:]) >= 24]
    assert new, "some of the new images are on the index side of the split"
    new_id, new_path = new[0]
    with service.client() as client:
        before = client.get("/healthz").json()
        commit_into(grown.out, service.folder)
        health = wait_for(client, lambda h: h["images"] == len(grown.files))
        assert health["images"] == len(grown.files) and health["reloads"] == before["reloads"] + 1
        assert health["status"] == "ok"
        resp = upload(client, new_path.read_bytes(), k=1)
        assert resp.json()["neighbours"][0]["image_id"] == new_id
        assert resp.json()["neighbours"][0]["distance"] < SELF
        assert client.get(f"/images/{new_id}").content == new_path.read_bytes()

        moved = service.folder.with_name("moved-away")
        service.folder.rename(moved)
        try:
            health = wait_for(client, lambda h: h["status"] != "ok")
            assert health["status"] == "degraded" and "holds no index now" in health["problem"]
            assert health["images"] == len(grown.files)
            resp = upload(client, new_path.read_bytes(), k=1)  # still answering from memory
            assert resp.status_code == 200 and resp.json()["neighbours"][0]["image_id"] == new_id
        finally:
            moved.rename(service.folder)
        health = wait_for(client, lambda h: h["status"] == "ok")
        assert health["status"] == "ok" and health["reloads"] == before["reloads"] + 1


def test_refuses_to_start_without_an_index_on_a_taken_port_or_with_another_model(
    service: Service, index: Built, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same command in this process: each refusal comes before anything listens."""
    from flows.cli import main

    def serve(folder: Path, port: int, *extra: str) -> tuple[int, str]:
        code = main(serve_command(folder, port, *extra)[3:])
        return code, capsys.readouterr().err

    code, err = serve(tmp_path / "nowhere", free_port())
    assert code == 1 and f"Index folder {tmp_path / 'nowhere'} does not exist" in err
    port = int(service.url.rsplit(":", 1)[1])
    code, err = serve(index.out, port)
    assert code == 1 and f"Cannot listen on 127.0.0.1:{port}" in err
    code, err = serve(index.out, free_port(), "--weights", "imagenet")
    assert code == 1 and "--weights imagenet differs" in err
    code, err = serve(index.out, free_port(), "--max-upload-mb", "0")
    assert code == 2 and "--max-upload-mb = 0: Input should be greater than 0" in err
    assert "Traceback" not in err


# In-process: the engine's swap and the app's limits, with the session's model.


@pytest.fixture
def engine(index: Built, tmp_path: Path, random_forward: Any) -> Iterator[Engine]:
    # Swapped by the tests' own refresh() alone: the watcher could take a new index first.
    running = Engine(
        copy_index(index.out, tmp_path / "index"),
        build=lambda spec, exported: random_forward,
        reload_interval=3600,
    )
    running.start()
    yield running
    running.stop()


def pixels_of(path: Path) -> np.ndarray:
    from tasks.sources.images import decode_image

    return decode_image(path.read_bytes(), 96).pixels


def test_requests_in_flight_finish_on_the_index_they_started_with(
    engine: Engine, index: Built, grown: Built
) -> None:
    old = engine.loaded
    new_id, new_path = next((i, p) for i, p in sorted(grown.files.items()) if int(p.stem[3:]) >= 24)
    commit_into(grown.out, engine.folder)
    assert engine.refresh() is True and engine.loaded is not old
    assert engine.loaded.forward is old.forward  # same model key: the model is kept
    on_old = engine.submit(old, pixels_of(new_path), 1).result(timeout=60)
    on_new = engine.submit(engine.loaded, pixels_of(new_path), 1).result(timeout=60)
    assert on_old.neighbours[0].image_id in index.files
    assert on_old.neighbours[0].distance > 100 * SELF
    assert (on_new.neighbours[0].image_id, on_new.neighbours[0].distance < SELF) == (new_id, True)
    assert engine.refresh() is False  # nothing new committed since


def test_an_index_that_does_not_load_leaves_the_old_one_answering(
    engine: Engine, index: Built
) -> None:
    old = engine.loaded
    features = engine.folder / FEATURES
    features.write_bytes(b"PAR1 damaged")
    (engine.folder / ".state" / "embed.json").unlink()
    assert engine.refresh() is False
    assert engine.loaded is old and "was not loaded" in (engine.last_error or "")
    health = engine.health()
    assert health["status"] == "degraded" and health["images"] == len(index.files)
    assert engine.refresh() is False  # the same broken files are not read again
    shutil.copy(index.out / FEATURES, features)
    assert engine.refresh() is True and engine.last_error is None


def test_saturated_service_answers_503_and_chunked_bodies_are_limited(
    index: Built, tmp_path: Path, random_forward: Any
) -> None:
    armed, entered, release = threading.Event(), threading.Event(), threading.Event()

    def gated(pixels: np.ndarray) -> np.ndarray:
        if armed.is_set():  # the warm-up pass at load goes through
            entered.set()
            assert release.wait(60)
        return np.asarray(random_forward(pixels))

    engine = Engine(copy_index(index.out, tmp_path / "index"), build=lambda spec, exported: gated)
    armed.set()
    app = create_app(engine, Limits(max_upload_bytes=10_000, max_concurrency=1))
    image = png(32, 32)

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            first = asyncio.create_task(client.post("/search", files={"image": ("a.png", image)}))
            assert await asyncio.get_running_loop().run_in_executor(None, entered.wait, 30)
            second = await client.post("/search", files={"image": ("b.png", image)})
            assert second.status_code == 503 and second.headers["retry-after"] == "1"
            assert "busy (1 searches running)" in second.json()["detail"]
            release.set()
            assert (await first).status_code == 200

            async def chunks() -> Any:
                for _ in range(3):
                    yield b"x" * 6_000

            resp = await client.post(
                "/search", content=chunks(), headers={"content-type": "application/json"}
            )
            assert resp.status_code == 413 and "10,000 bytes" in resp.json()["detail"]

    engine.start()
    try:
        asyncio.run(scenario())
    finally:
        release.set()
        engine.stop()


def test_a_damaged_index_is_named_damaged_with_the_file_and_the_fix(
    index: Built, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file that differs from its record while no run writes the folder never settles: the
    query and the service say which file and how to rebuild it (it used to be "is being
    updated, try again", forever)."""
    from flows.cli import main
    from tasks.ask import open_index
    from tasks.errors import ImageSearchError, option_name

    folder = copy_index(index.out, tmp_path / "damaged")
    features = folder / FEATURES
    data = features.read_bytes()
    features.write_bytes(data[: len(data) // 2])
    fix = f"it will not mend by itself: run image-search again with --out {folder} to rebuild it."
    with pytest.raises(ImageSearchError) as caught:
        open_index(folder, attempts=2, wait_s=0.01)
    assert caught.value.worded(option_name) == (
        f"Index folder {folder} is damaged: {FEATURES} holds {len(data) // 2:,} bytes where "
        f"its record .state/embed.json says {len(data):,}; {fix}"
    )
    _, path = index.some(1)[0]
    assert main(["query", str(path), "--index", str(folder)]) == 1
    assert f"image-search: error: Index folder {folder} is damaged: " in capsys.readouterr().err

    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # same size, other bytes
    features.write_bytes(bytes(flipped))
    with pytest.raises(ImageSearchError, match="no longer has the content its record"):
        open_index(folder, attempts=2, wait_s=0.01)


def test_the_service_says_damaged_or_being_written_without_server_paths(
    engine: Engine, index: Built
) -> None:
    from tasks.storage import folder_lock

    features = engine.folder / FEATURES
    good = features.read_bytes()
    with folder_lock(engine.folder, "Output folder"):  # a run is committing
        features.write_bytes(good)  # the same bytes: only its time differs from the record
        assert engine.refresh() is False
        assert "being written by a run right now" in (engine.last_error or "")
    features.write_bytes(good[:-100])  # the run is gone and left it cut short
    os.utime(engine.folder / ".state" / "embed.json")  # a new identity: read it again
    assert engine.refresh() is False
    health = engine.health()
    assert health["status"] == "degraded" and health["images"] == len(index.files)
    assert f"is damaged: {FEATURES} holds" in health["problem"]
    assert f"--out {engine.folder.name} to rebuild it" in health["problem"].replace(
        "out ", "--out "
    )
    assert str(engine.folder) not in str(health)


def test_the_served_socket_turns_nagle_off_on_every_connection() -> None:
    """The socket ``serve`` listens on names TCP as its protocol, so asyncio (uvicorn's loop)
    sets TCP_NODELAY on each connection it accepts: an answer written in two parts does not
    wait for the client's delayed ACK on a kept-alive connection."""
    import socket

    from service.server import bind

    listener = bind("127.0.0.1", 0)
    seen: list[int] = []

    async def scenario() -> None:
        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=listener)
        async with server:
            _, writer = await asyncio.open_connection(*listener.getsockname()[:2])
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.01)
            writer.close()

    asyncio.run(scenario())
    assert seen == [1]
