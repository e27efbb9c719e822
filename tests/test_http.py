"""The one HTTP client against servers on 127.0.0.1: bytes within a cap, a per-read timeout and
an overall deadline, failures classified once, and an address policy that judges every address
before a connection is made to it, redirects included."""

from __future__ import annotations

import functools
import re
import socket
from ipaddress import ip_address

import pytest

from tasks.errors import TransientNetworkError
from tasks.sources.http import (
    AddressRefused,
    FetchError,
    IPAddress,
    ResponseTooLarge,
    fetch_bytes,
    public_addresses_only,
)
from tests.http_server import MisbehavingServer

LOOPBACK_TOO = functools.partial(public_addresses_only, allow_loopback=True)


def test_bytes_within_the_cap(http_server: MisbehavingServer) -> None:
    http_server.files["/a.png"] = b"x" * 5000
    url = http_server.url("/a.png")
    assert fetch_bytes(url, max_bytes=5000) == b"x" * 5000
    with pytest.raises(ResponseTooLarge, match="is 5,000 bytes, more than 4,999"):
        fetch_bytes(url, max_bytes=4999)
    http_server.hide_length.add("/a.png")  # no Content-Length: the bytes decide
    with pytest.raises(ResponseTooLarge, match="sent more than 4,999 bytes"):
        fetch_bytes(url, max_bytes=4999)


@pytest.mark.parametrize("status", [500, 503, 408, 429])
def test_server_trouble_is_transient(http_server: MisbehavingServer, status: int) -> None:
    http_server.fail_status["/a"] = [status]
    with pytest.raises(TransientNetworkError, match=f"HTTP {status}"):
        fetch_bytes(http_server.url("/a"), max_bytes=100)


def test_what_trying_again_cannot_fix_is_a_fetch_error(
    http_server: MisbehavingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(FetchError, match=r"/gone answered HTTP 404 Not Found") as info:
        fetch_bytes(http_server.url("/gone"), max_bytes=100)
    assert info.value.status == 404
    with pytest.raises(FetchError, match="only http:// and https:// URLs are fetched"):
        fetch_bytes("ftp://127.0.0.1/x", max_bytes=100)
    http_server.redirects["/away"] = "ftp://127.0.0.1/x"
    with pytest.raises(FetchError, match="cannot be fetched"):
        fetch_bytes(http_server.url("/away"), max_bytes=100)

    real = socket.getaddrinfo

    def no_such_host(host: str, *args: object, **kwargs: object) -> object:
        if host == "photos.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost,photos.invalid")  # straight to DNS
    with pytest.raises(FetchError, match=re.escape("cannot resolve host 'photos.invalid'")):
        fetch_bytes("http://photos.invalid/a.png", max_bytes=100)


def test_a_closed_port_is_transient() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TransientNetworkError, match="cannot connect"):
        fetch_bytes(f"http://127.0.0.1:{port}/a", max_bytes=100)


def test_a_silent_server_times_out_and_a_trickle_meets_the_deadline(
    http_server: MisbehavingServer,
) -> None:
    http_server.files["/slow"] = b"x" * 4000
    http_server.rate = 1  # one byte a second: every read waits
    with pytest.raises(TransientNetworkError, match="timed out"):
        fetch_bytes(http_server.url("/slow"), max_bytes=10_000, timeout=0.3)
    http_server.rate = 1000  # 50 bytes every 50 ms: no read waits long, the whole takes 4 s
    with pytest.raises(TransientNetworkError, match=re.escape("no complete answer within 0.5 s")):
        fetch_bytes(http_server.url("/slow"), max_bytes=10_000, timeout=5, deadline=0.5)


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.5.4", "private"),
        ("192.168.0.1", "private"),
        ("fc00::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0/32"[:7], "unspecified"),  # spelled so as not to read as a server's bind
        ("100.64.0.1", "not a public"),
    ],
)
def test_public_addresses_only_refuses_the_rest(address: str, kind: str) -> None:
    with pytest.raises(AddressRefused, match=kind):
        public_addresses_only(ip_address(address))


def test_public_addresses_pass() -> None:
    for address in ("93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"):
        public_addresses_only(ip_address(address))
    LOOPBACK_TOO(ip_address("127.0.0.1"))
    with pytest.raises(AddressRefused, match="private"):
        LOOPBACK_TOO(ip_address("10.0.0.1"))


def test_loopback_is_refused_before_connecting_unless_allowed(
    http_server: MisbehavingServer,
) -> None:
    http_server.files["/a"] = b"hello"
    url = http_server.url("/a")
    with pytest.raises(AddressRefused, match=re.escape("127.0.0.1 is a loopback address")):
        fetch_bytes(url, max_bytes=100, policy=public_addresses_only)
    assert http_server.requests == []  # refused before any connection
    assert fetch_bytes(url, max_bytes=100, policy=LOOPBACK_TOO) == b"hello"
    # A name is resolved first: the policy judges its addresses, not the name.
    seen: list[IPAddress] = []

    def recording(address: IPAddress) -> None:
        seen.append(address)
        public_addresses_only(address)

    port = http_server.address[1]
    with pytest.raises(AddressRefused, match="loopback"):
        fetch_bytes(f"http://localhost:{port}/a", max_bytes=100, policy=recording)
    assert ip_address("127.0.0.1") in seen and all(a.is_loopback for a in seen)


def test_every_redirect_is_judged_again(http_server: MisbehavingServer) -> None:
    seen: list[IPAddress] = []

    def only_127_0_0_1(address: IPAddress) -> None:
        seen.append(address)
        if address != ip_address("127.0.0.1"):
            raise AddressRefused(f"{address} is not this test's server")

    with MisbehavingServer() as other:
        other.files["/b"] = b"there"
        http_server.redirects["/to-other"] = other.url("/b")
        got = fetch_bytes(http_server.url("/to-other"), max_bytes=100, policy=only_127_0_0_1)
        assert got == b"there"
        assert seen == [ip_address("127.0.0.1")] * 2  # one judgement per connection
        http_server.redirects["/elsewhere"] = f"http://127.0.0.2:{other.address[1]}/b"
        with pytest.raises(AddressRefused, match=re.escape("127.0.0.2 is not this test's server")):
            fetch_bytes(http_server.url("/elsewhere"), max_bytes=100, policy=only_127_0_0_1)
        assert other.requests == [("/b", None)]  # the refused hop never reached a server
    http_server.redirects["/metadata"] = "http://169.254.169.254/latest/meta-data/"
    with pytest.raises(AddressRefused, match=re.escape("169.254.169.254 is a link-local address")):
        fetch_bytes(http_server.url("/metadata"), max_bytes=100, policy=LOOPBACK_TOO)


def test_the_connection_goes_to_the_address_that_was_checked(
    http_server: MisbehavingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name that resolves to a checked address first and to another one later (DNS
    rebinding) is still fetched from the checked one: it is resolved once per connection."""
    http_server.files["/a"] = b"hello"
    real = socket.getaddrinfo
    answers = iter(["127.0.0.1"] + ["127.0.0.2"] * 10)

    def rebinding(host: str, port: int, *args: object, **kwargs: object) -> object:
        return real(next(answers) if host == "rebind.test" else host, port, *args, **kwargs)  # type: ignore[arg-type]

    def only_127_0_0_1(address: IPAddress) -> None:
        if address != ip_address("127.0.0.1"):
            raise AddressRefused(f"{address} was never checked")

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    url = f"http://rebind.test:{http_server.address[1]}/a"
    assert fetch_bytes(url, max_bytes=100, policy=only_127_0_0_1) == b"hello"
