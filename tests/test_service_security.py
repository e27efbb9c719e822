"""What the service may be made to do by whoever reaches it: fetch only public addresses (after
every redirect, refused before connecting), show only the bytes it indexed and only from
inside the source, drop work whose client left, parse ``k`` one way, answer only its own Host
names, ask for its token, and send the standard security headers. In-process (the ASGI app on
the session's index, with a stand-in forward pass) except where a real process is the point.

Every connection any test here makes goes to 127.0.0.1: the refused addresses are refused
before a connection, and a guard fails the test if one were ever attempted."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpcore
import httpx
import numpy as np
import pytest

from service.app import Limits, create_app
from service.engine import Engine
from service.security import (
    COOKIE,
    LOOPBACK_NAMES,
    Access,
    FetchPolicy,
    decide_access,
    inline_hashes,
    networks,
)
from tasks.errors import ImageSearchError
from tasks.sources.http import AddressRefused
from tests.http_server import MisbehavingServer
from tests.indexes import Built, build_index, describe, write_images
from tests.services import copy_index, png, start_service

TOKEN = secrets.token_urlsafe(24)  # random: no secret-looking literal in the repository
DIM = 2048


def zeros(pixels: np.ndarray) -> np.ndarray:
    """A stand-in forward pass: every query at the origin (the tests here need no real one)."""
    return np.zeros((len(pixels), DIM), dtype=np.float32)


@contextmanager
def app_on(
    folder: Path,
    limits: Limits | None = None,
    access: Access | None = None,
    forward: Callable[[np.ndarray], np.ndarray] = zeros,
) -> Iterator[Any]:
    engine = Engine(folder, build=lambda spec, exported: forward)
    engine.start()
    try:
        yield create_app(engine, limits, access)
    finally:
        engine.stop()


def run_client(app: Any, scenario: Callable[[httpx.AsyncClient], Awaitable[None]]) -> None:
    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            await scenario(client)

    asyncio.run(main())


@pytest.fixture
def served(index: Built, tmp_path: Path) -> Path:
    return copy_index(index.out, tmp_path / "index")


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every address the one HTTP client connects to; any but 127.0.0.1 fails the test before
    a packet leaves."""
    seen: list[str] = []
    original = httpcore.SyncBackend.connect_tcp

    def guarded(self: Any, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        seen.append(host)
        if host != "127.0.0.1":
            raise AssertionError(f"a connection to {host}:{port} was attempted")
        return original(self, host, port, *args, **kwargs)

    monkeypatch.setattr(httpcore.SyncBackend, "connect_tcp", guarded)
    return seen


# -- search by URL: public addresses only ------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),  # the cloud metadata endpoint
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("::ffff:10.0.0.1", "private"),  # IPv4 inside IPv6 is judged as the IPv4 address
        ("100.64.0.1", "not a public"),  # shared address space (carrier-grade NAT)
        ("240.0.0.1", "private|reserved"),
    ],
)
def test_the_fetch_policy_refuses_every_address_that_is_not_public(address: str, kind: str) -> None:
    with pytest.raises(AddressRefused, match=kind):
        FetchPolicy()(ipaddress.ip_address(address))
    FetchPolicy()(ipaddress.ip_address("93.184.216.34"))  # a public one passes


def test_the_operator_can_allow_networks_and_nothing_else() -> None:
    policy = FetchPolicy(networks(["127.0.0.1", "10.1.0.0/16"]))
    policy(ipaddress.ip_address("127.0.0.1"))
    policy(ipaddress.ip_address("10.1.2.3"))
    policy(ipaddress.ip_address("::ffff:10.1.2.3"))
    for refused in ("127.0.0.2", "10.2.0.1", "169.254.169.254", "::1"):
        with pytest.raises(AddressRefused):
            policy(ipaddress.ip_address(refused))
    with pytest.raises(ImageSearchError, match="host names are not accepted"):
        networks(["intranet.example"])


def fetch_detail(url: str) -> str:
    return (
        f"Could not fetch the URL {url}. This service fetches images from public http(s) "
        f"addresses, at most 20,971,520 bytes within 10 s."
    )


def test_a_url_on_loopback_is_refused_unless_allowed_and_never_connected_to(
    served: Path, index: Built, http_server: MisbehavingServer, loopback_only: list[str]
) -> None:
    _, path = index.some(1)[0]
    http_server.files["/photo.png"] = path.read_bytes()
    url = http_server.url("/photo.png")

    async def refused(client: httpx.AsyncClient) -> None:
        resp = await client.post("/search", json={"url": url})
        assert resp.status_code == 422, resp.text
        assert resp.json()["detail"] == fetch_detail(url)

    with app_on(served) as app:
        run_client(app, refused)
    assert http_server.requests == [] and loopback_only == []  # judged before connecting

    allowed = Access(fetch=FetchPolicy(networks(["127.0.0.1"])))

    async def fetched(client: httpx.AsyncClient) -> None:
        resp = await client.post("/search", json={"url": url, "k": 1})
        assert resp.status_code == 200, resp.text

    with app_on(served, access=allowed) as app:
        run_client(app, fetched)
    assert http_server.requests == [("/photo.png", None)]


def test_a_redirect_to_a_refused_address_is_never_followed_and_failures_read_alike(
    served: Path, http_server: MisbehavingServer, loopback_only: list[str]
) -> None:
    """An allowed server redirects to the metadata endpoint, a private and a multicast address:
    each is refused before a connection; a 404, a 500, a closed port and a refusal all get the
    same words."""
    targets = {
        "/metadata": "http://169.254.169.254/latest/meta-data/",
        "/private": "http://10.0.0.1/photo.png",
        "/multicast": "http://224.0.0.1/photo.png",
        "/v6-local": "http://[fe80::1]/photo.png",
    }
    http_server.redirects.update(targets)
    http_server.fail_status["/gone.png"] = [404]
    http_server.fail_status["/broken.png"] = [500]
    with socket_nobody_listens_on() as closed:
        urls = [http_server.url(p) for p in [*targets, "/gone.png", "/broken.png"]]
        urls.append(f"http://127.0.0.1:{closed}/photo.png")
        access = Access(fetch=FetchPolicy(networks(["127.0.0.1"])))

        async def scenario(client: httpx.AsyncClient) -> None:
            for url in urls:
                resp = await client.post("/search", json={"url": url})
                assert resp.status_code == 422, (url, resp.text)
                assert resp.json()["detail"] == fetch_detail(url)

        with app_on(served, access=access) as app:
            run_client(app, scenario)
    assert set(loopback_only) == {"127.0.0.1"}
    assert [p for p, _ in http_server.requests] == [*targets, "/gone.png", "/broken.png"]


@contextmanager
def socket_nobody_listens_on() -> Iterator[int]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        yield int(sock.getsockname()[1])


def test_search_by_url_is_off_beyond_loopback_unless_the_operator_allows_it(
    served: Path,
) -> None:
    beyond = "192.0.2.10"  # a documentation address: decided on, never bound
    assert decide_access(host="127.0.0.1", token=None, no_token=False)[0].url_search
    off, notes = decide_access(host=beyond, token=TOKEN, no_token=False)
    assert not off.url_search and any("search by URL is off" in n for n in notes)
    assert decide_access(host=beyond, token=TOKEN, no_token=False, allow_url_search=True)[
        0
    ].url_search

    async def scenario(client: httpx.AsyncClient) -> None:
        resp = await client.post("/search", json={"url": "https://example.com/a.jpg"})
        assert resp.status_code == 403 and "Search by URL is off" in resp.json()["detail"]

    with app_on(served, access=Access(url_search=False)) as app:
        run_client(app, scenario)


# -- the images it shows -----------------------------------------------------------------------


@pytest.fixture
def own_index(tmp_path: Path, random_resnet: Any) -> Built:
    """A small index of its own: these tests replace its photos."""

    write_images(tmp_path / "photos", 6)
    build_index(tmp_path / "photos", tmp_path / "out", random_resnet, serving=False)
    return Built(tmp_path / "photos", tmp_path / "out", describe(tmp_path / "out"))


def test_a_photo_replaced_by_a_link_or_a_fifo_is_never_served(
    own_index: Built, tmp_path: Path
) -> None:
    (first, first_path), (second, second_path), (third, third_path), (fourth, fourth_path) = (
        own_index.some(4)
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_text("TOP SECRET")
    same_bytes = outside / first_path.name  # the indexed bytes, but outside the source
    shutil.copy(first_path, same_bytes)
    original_second = second_path.read_bytes()
    first_path.unlink()
    first_path.symlink_to(same_bytes)
    second_path.unlink()
    second_path.symlink_to(secret)
    third_path.unlink()
    os.mkfifo(third_path)  # opening it for reading would wait for a writer forever
    fourth_path.write_bytes(original_second)  # changed content, a regular file inside

    async def scenario(client: httpx.AsyncClient) -> None:
        for image_id, status in ((first, 403), (second, 403), (third, 403), (fourth, 410)):
            for query in ["", "?size=64"]:
                resp = await client.get(f"/images/{image_id}{query}")
                assert resp.status_code == status, (image_id, query, resp.text)
                assert b"TOP SECRET" not in resp.content
        resp = await client.get(f"/images/{first}")
        assert "only files inside the source are" in resp.json()["detail"]
        resp = await client.get(f"/images/{fourth}")
        assert "changed since the index was built" in resp.json()["detail"]

    with app_on(own_index.out) as app:
        run_client(app, scenario)


def test_a_listed_photo_replaced_by_a_link_is_never_served(
    tmp_path: Path, random_resnet: Any
) -> None:
    """A list of paths: the file a row names must be that file, not a link to one elsewhere."""
    from tasks.ask import open_index

    photos = write_images(tmp_path / "photos", 6)
    listing = tmp_path / "list.csv"
    listing.write_text("uri\n" + "\n".join(str(p) for p in photos) + "\n")
    build_index(listing, tmp_path / "out", random_resnet, serving=False)
    opened = open_index(tmp_path / "out")
    ids = {opened.uri(pos): int(opened.ids[pos]) for pos in range(len(opened))}
    indexed = [p for p in photos if str(p) in ids]  # the split keeps some for queries
    kept, swapped = indexed[:2]
    copy = tmp_path / "copy" / swapped.name
    copy.parent.mkdir()
    shutil.copy(swapped, copy)
    swapped.unlink()
    swapped.symlink_to(copy)  # the same bytes, through a link

    async def scenario(client: httpx.AsyncClient) -> None:
        resp = await client.get(f"/images/{ids[str(kept)]}")
        assert resp.status_code == 200 and resp.content == kept.read_bytes()
        resp = await client.get(f"/images/{ids[str(swapped)]}")
        assert resp.status_code == 403 and "the listed file is now a link" in resp.text
        listed = await client.post("/search?k=6", files={"image": ("q.png", kept.read_bytes())})
        # Named relative to the list's folder.
        assert sorted(n["uri"] for n in listed.json()["neighbours"]) == sorted(
            f"photos/{p.name}" for p in indexed
        )

    with app_on(tmp_path / "out") as app:
        run_client(app, scenario)


def test_served_images_are_the_verified_bytes_with_their_own_type(
    served: Path, index: Built
) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        for image_id, path in index.some(3):
            resp = await client.get(f"/images/{image_id}")
            assert resp.status_code == 200
            assert (
                hashlib.sha256(resp.content).digest() == hashlib.sha256(path.read_bytes()).digest()
            )
            sniffed = "image/png" if resp.content.startswith(b"\x89PNG") else "image/jpeg"
            assert resp.headers["content-type"] == sniffed
            assert resp.headers["x-content-type-options"] == "nosniff"

    with app_on(served) as app:
        run_client(app, scenario)


# -- k: one parse, one message -----------------------------------------------------------------


@pytest.mark.parametrize("given", ["²", "-5", "abc", "0", "101", "1e1", "4.0", "0x10", "+3"])
def test_k_is_parsed_once_and_refused_with_one_message(served: Path, given: str) -> None:
    detail = f"k = {given}: ask for a whole number of neighbours from 1 to 100"
    image = png(32, 32)

    async def scenario(client: httpx.AsyncClient) -> None:
        answers = [
            await client.post("/search", params={"k": given}, files={"image": ("a.png", image)}),
            await client.post("/search", files={"image": ("a.png", image)}, data={"k": given}),
            await client.post("/search", json={"url": "https://example.com/a", "k": given}),
        ]
        if re.fullmatch(r"-?[0-9]+", given):  # the same number as a JSON number
            answers.append(
                await client.post("/search", json={"url": "https://a.example/", "k": int(given)})
            )
        for resp in answers:
            assert resp.status_code == 422, resp.text
            assert resp.json()["detail"] == detail
        good = await client.post("/search", data={"k": " 7 "}, files={"image": ("a.png", image)})
        assert good.status_code == 200 and len(good.json()["neighbours"]) == 7

    with app_on(served) as app:
        run_client(app, scenario)


# -- a client that leaves ----------------------------------------------------------------------


def test_a_search_whose_client_left_is_dropped_before_it_runs(served: Path, index: Built) -> None:
    """The first search holds the batcher; the second one's client disconnects while its query
    waits: it is never embedded, and its place is free again."""
    armed_t, entered_t, release_t = threading.Event(), threading.Event(), threading.Event()
    batches: list[int] = []

    def gated(pixels: np.ndarray) -> np.ndarray:
        if armed_t.is_set():
            batches.append(len(pixels))
            entered_t.set()
            assert release_t.wait(60)
        return zeros(pixels)

    image = png(32, 32)
    boundary = "x-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )

    async def scenario(app: Any) -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            first = asyncio.create_task(client.post("/search", files={"image": ("a.png", image)}))
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, entered_t.wait, 30)
            left = asyncio.Event()
            sent: list[dict[str, Any]] = []
            delivered = False

            async def receive() -> dict[str, Any]:
                nonlocal delivered
                if not delivered:
                    delivered = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await left.wait()
                return {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": "/search",
                "raw_path": b"/search",
                "query_string": b"k=3",
                "root_path": "",
                "headers": [
                    (b"host", b"127.0.0.1"),
                    (b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
                "client": ("127.0.0.1", 50000),
                "server": ("127.0.0.1", 80),
            }
            second = asyncio.create_task(app(scope, receive, send))
            while engine.health()["queued"] == 0:  # its query waits behind the first one
                await asyncio.sleep(0.01)
            left.set()  # the client goes away
            await asyncio.wait_for(second, 30)
            release_t.set()
            assert (await first).status_code == 200
            third = await client.post("/search", files={"image": ("c.png", image)})
            assert third.status_code == 200 and third.json()["batch"] == 1

    engine = Engine(served, build=lambda spec, exported: gated)
    app = create_app(engine, Limits(max_concurrency=2))
    armed_t.set()
    engine.start()
    try:
        asyncio.run(scenario(app))
    finally:
        release_t.set()
        engine.stop()
    # The first search, then the third: the abandoned one was never embedded.
    assert batches == [1, 1]


# -- who may ask: Host names, the token, the headers -------------------------------------------


def test_only_its_own_host_names_are_answered(served: Path) -> None:
    """A page of another site whose name was rebound to 127.0.0.1 sends its own name as the
    Host: refused, so it cannot read this service's answers."""
    access = decide_access(host="127.0.0.1", token=None, no_token=False)[0]
    assert access.allowed_hosts == LOOPBACK_NAMES
    added = decide_access(
        host="127.0.0.1", token=None, no_token=False, allowed_hosts=["Photos.example"]
    )[0]

    async def scenario(client: httpx.AsyncClient) -> None:
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
            for path in ("/", "/openapi.json", "/images/1"):
                resp = await client.get(path, headers={"host": host})
                assert resp.status_code == 400, (host, path)
                assert resp.headers["x-content-type-options"] == "nosniff"
            resp = await client.post("/search", json={"url": "x"}, headers={"host": host})
            assert resp.status_code == 400
            # The liveness probe answers whatever name it was sent to (a kubelet's pod address).
            assert (await client.get("/healthz", headers={"host": host})).status_code == 200
        for host in ("127.0.0.1:8000", "localhost", "[::1]:8000"):
            assert (await client.get("/", headers={"host": host})).status_code == 200

    with app_on(served, access=access) as app:
        run_client(app, scenario)

    async def with_name(client: httpx.AsyncClient) -> None:
        resp = await client.get("/", headers={"host": "photos.example:443"})
        assert resp.status_code == 200

    with app_on(served, access=added) as app:
        run_client(app, with_name)


def test_the_token_guards_everything_but_the_probe(served: Path, index: Built) -> None:
    image_id, path = index.some(1)[0]  # the stand-in forward pass finds any image

    async def scenario(client: httpx.AsyncClient) -> None:
        assert (await client.get("/healthz")).status_code == 200  # the liveness probe
        upload = {"image": ("q.png", path.read_bytes())}
        for method, url in (
            ("GET", "/"),
            ("GET", f"/images/{image_id}"),
            ("GET", "/docs"),
            ("GET", "/openapi.json"),
            ("POST", "/search"),
        ):
            resp = await client.request(method, url, files=upload if method == "POST" else None)
            assert resp.status_code == 401, url
            assert resp.headers["www-authenticate"].startswith("Bearer")
            assert "/?token=TOKEN" in resp.json()["detail"]
        wrong = {"authorization": "Bearer " + TOKEN[:-1] + ("y" if TOKEN[-1] == "x" else "x")}
        assert (await client.get(f"/images/{image_id}", headers=wrong)).status_code == 401
        bearer = {"authorization": f"Bearer {TOKEN}"}
        resp = await client.post("/search?k=1", files=upload, headers=bearer)
        assert resp.status_code == 200 and len(resp.json()["neighbours"]) == 1

        # A browser: /?token= once sets a cookie (a digest, not the token) and cleans the URL.
        assert (await client.get("/?token=wrong-token-of-some-length")).status_code == 401
        opened = await client.get(f"/?token={TOKEN}")
        assert opened.status_code == 303 and opened.headers["location"] == "/"
        cookie = opened.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=") and TOKEN not in cookie
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
        client.cookies.set(COOKIE, cookie.split(";")[0].split("=", 1)[1])
        assert (await client.get("/")).status_code == 200
        assert (await client.get(f"/images/{image_id}?size=32")).status_code == 200
        client.cookies.set(COOKIE, "0" * 64)
        assert (await client.get("/")).status_code == 401

    with app_on(served, access=Access(token=TOKEN)) as app:
        run_client(app, scenario)


def test_beyond_loopback_a_token_is_required_or_its_absence_said_loudly() -> None:
    beyond = "192.0.2.10"
    with pytest.raises(ImageSearchError, match="reachable from other machines") as caught:
        decide_access(host=beyond, token=None, no_token=False)
    assert "IMAGE_SEARCH_TOKEN" in caught.value.args[0]
    access, notes = decide_access(host=beyond, token=None, no_token=True)
    assert access.token is None and notes[0].startswith("WARNING: serving on 192.0.2.10 without")
    assert access.allowed_hosts == (*LOOPBACK_NAMES, beyond)
    with pytest.raises(ImageSearchError, match="use a secret of at least 16"):
        decide_access(host=beyond, token="short", no_token=False)
    with pytest.raises(ImageSearchError, match="unset one of them"):
        decide_access(host="127.0.0.1", token=TOKEN, no_token=True)
    access, notes = decide_access(host="127.0.0.1", token=None, no_token=False)
    assert access.token is None and notes == []


def test_serve_beyond_loopback_without_a_token_refuses_before_listening(
    index: Built, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.cli import main

    monkeypatch.delenv("IMAGE_SEARCH_TOKEN", raising=False)
    code = main(["serve", "--index", str(index.out), "--host", "192.0.2.10", "--port", "9"])
    err = capsys.readouterr().err
    assert code == 1 and "image-search: error: --host 192.0.2.10 makes the service" in err
    assert "or pass --no-token when a proxy" in err and "Traceback" not in err


def test_every_answer_carries_the_security_headers(served: Path, index: Built) -> None:
    image_id, _ = index.some(1)[0]

    async def scenario(client: httpx.AsyncClient) -> None:
        answers = {
            "/": await client.get("/"),
            "/healthz": await client.get("/healthz"),
            "image": await client.get(f"/images/{image_id}"),
            "404": await client.get("/images/987654"),
            "422": await client.post("/search", data={"k": "x"}),
            "/docs": await client.get("/docs"),
        }
        for name, resp in answers.items():
            assert resp.headers["x-content-type-options"] == "nosniff", name
            assert resp.headers["x-frame-options"] == "DENY", name
            assert resp.headers["referrer-policy"] == "no-referrer", name
            assert "frame-ancestors 'none'" in resp.headers["content-security-policy"], name
        for name in ("/healthz", "image", "404", "422"):
            assert answers[name].headers["content-security-policy"].startswith("default-src 'none'")
        page = answers["/"]
        policy = page.headers["content-security-policy"]
        assert "'unsafe-inline'" not in policy and "script-src 'sha256-" in policy
        for tag in ("script", "style"):
            hashes = inline_hashes(page.text, tag)
            assert hashes and all(h in policy for h in hashes)
        assert "https://cdn.jsdelivr.net" in answers["/docs"].headers["content-security-policy"]

    with app_on(served) as app:
        run_client(app, scenario)


def test_answers_and_health_name_no_server_path(served: Path, index: Built) -> None:
    _, path = index.some(1)[0]

    async def scenario(client: httpx.AsyncClient) -> None:
        health = await client.get("/healthz")
        assert health.json()["index"] == served.name
        resp = await client.post("/search?k=3", files={"image": ("q.png", path.read_bytes())})
        assert resp.status_code == 200
        assert resp.json()["neighbours"][0]["uri"] == path.name
        for text in (health.text, resp.text):
            assert str(served) not in text and str(index.images) not in text

    with app_on(served, forward=_self_finder(index)) as app:
        run_client(app, scenario)


def _self_finder(index: Built) -> Callable[[np.ndarray], np.ndarray]:
    """A forward pass that maps the query to the embedding of the index image it is, so the
    nearest neighbour is itself (the pixels decide which)."""
    from tasks.ask import open_index
    from tasks.sources.images import decode_image

    opened = open_index(index.out)
    table = {}
    for image_id, path in index.files.items():
        pos = opened.position(image_id)
        if pos is not None:
            pixels = decode_image(path.read_bytes(), opened.input_size).pixels
            table[pixels.tobytes()] = np.asarray(opened.prepared.data[pos], np.float32)

    def forward(pixels: np.ndarray) -> np.ndarray:
        return np.stack([table.get(p.tobytes(), np.zeros(DIM, np.float32)) for p in pixels])

    return forward


# -- a real service: abandoned slow fetches never take the probe down --------------------------


@pytest.mark.slow
def test_abandoned_slow_url_searches_leave_the_service_answering(
    index: Built, tmp_path: Path
) -> None:
    """Eight clients ask for a URL that trickles and give up after half a second: the two
    fetches that started end at their deadline, the other six were told 503 at once; /healthz
    answers all along, and uploads are answered again once the fetches have ended."""
    folder = copy_index(index.out, tmp_path / "index")
    image_id, path = index.some(1)[0]
    with MisbehavingServer() as trickle:
        trickle.rate = 20  # bytes per second: 200 kB would take hours
        trickle.files["/slow.png"] = os.urandom(200_000)
        url = trickle.url("/slow.png")
        running = start_service(
            folder,
            tmp_path / "serve.log",
            "--max-concurrency",
            "2",
            "--allow-url-network",
            "127.0.0.1",
            "--url-timeout",
            "3",
        )
        try:
            gave_up = 0
            for _ in range(8):
                with httpx.Client(base_url=running.url, trust_env=False, timeout=0.5) as c:
                    try:
                        c.post("/search", json={"url": url})
                    except httpx.TimeoutException:
                        gave_up += 1
            assert gave_up >= 2
            with running.client() as client:
                for _ in range(10):
                    assert client.get("/healthz").status_code == 200
                # The fetches end at their deadline (3 s); then uploads are answered again.
                for _ in range(100):
                    resp = client.post("/search?k=1", files={"image": ("q.png", path.read_bytes())})
                    if resp.status_code != 503:
                        break
                    assert client.get("/healthz").status_code == 200
                    time.sleep(0.2)
                assert resp.status_code == 200, resp.text
                assert resp.json()["neighbours"][0]["image_id"] == image_id
            assert len(trickle.ranges("/slow.png")) == 2  # never more fetches than searches
            time.sleep(1)  # the second fetch started half a second after the first
            sent = trickle.sent.get("/slow.png", 0)
            time.sleep(1)
            assert trickle.sent.get("/slow.png", 0) == sent  # both connections are closed
        finally:
            running.proc.terminate()
            running.proc.wait(timeout=60)
