"""The connection layer under the one HTTP client (:mod:`tasks.sources.http`): httpcore pools
whose network backend resolves a host itself, lets the address policy judge each address, connects
to one that passed (never to the name again), and keeps the current fetch's overall deadline on
every connect, read and write."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpcore
import httpx

from tasks.errors import ImageSearchError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressPolicy = Callable[[IPAddress], None]  # raises an ImageSearchError to refuse an address

_deadline = threading.local()  # .at: time.monotonic() by which the current fetch must end


def _budget(timeout: float | None) -> float | None:
    """``timeout`` shortened to what is left of the current fetch's deadline."""
    at = getattr(_deadline, "at", None)
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise httpcore.ReadTimeout("the fetch's deadline passed")
    return left if timeout is None else min(timeout, left)


class Unresolvable(Exception):
    """A host name that does not resolve (a typo, or no network at all)."""


class _Stream(httpcore.NetworkStream):
    """A connection whose every read and write also keeps the fetch's deadline."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self.inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.inner.read(max_bytes, _budget(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.inner.write(buffer, _budget(timeout))

    def close(self) -> None:
        self.inner.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        return _Stream(self.inner.start_tls(ssl_context, server_hostname, _budget(timeout)))

    def get_extra_info(self, info: str) -> Any:
        return self.inner.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    """Resolves the host itself, lets ``policy`` judge each address, and connects to one that
    passed (never to the name, which could resolve differently the second time)."""

    def __init__(self, policy: AddressPolicy | None) -> None:
        self.policy = policy
        self.inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise Unresolvable(f"cannot resolve host {host!r} ({exc})") from exc
        addresses = list(dict.fromkeys(ipaddress.ip_address(a[4][0]) for a in found))
        if self.policy is not None:
            refused: list[ImageSearchError] = []
            allowed = []
            for address in addresses:
                try:
                    self.policy(address)
                    allowed.append(address)
                except ImageSearchError as exc:
                    refused.append(exc)
            if not allowed:
                raise refused[0]
            addresses = allowed
        failure: Exception | None = None
        for address in addresses:
            try:
                stream = self.inner.connect_tcp(
                    str(address), port, _budget(timeout), local_address, socket_options
                )
                return _Stream(stream)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None  # getaddrinfo never answers with no address
        raise failure

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise httpcore.UnsupportedProtocol("unix sockets are not fetched")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class _Body(httpx.SyncByteStream):
    def __init__(self, response: httpcore.Response) -> None:
        self.response = response

    def __iter__(self) -> Iterator[bytes]:
        yield from self.response.iter_stream()

    def close(self) -> None:
        self.response.close()


class Transport(httpx.BaseTransport):
    """httpcore pools on :class:`_Backend`: direct, or through the environment's proxy for the
    URL's scheme (``HTTPS_PROXY``, ``NO_PROXY``...) when no address policy is set. With a policy
    every connection is direct, since a proxy would connect to addresses nobody checked."""

    def __init__(self, policy: AddressPolicy | None) -> None:
        ssl_context = httpx.create_ssl_context()
        backend = _Backend(policy)
        pools = {"max_connections": 64, "keepalive_expiry": 10.0, "network_backend": backend}
        self.direct = httpcore.ConnectionPool(ssl_context=ssl_context, **pools)  # type: ignore[arg-type]
        self.proxies: dict[str, httpcore.HTTPProxy] = {}
        if policy is None:
            for scheme, url in urllib.request.getproxies().items():
                if scheme in ("http", "https") and "://" in url:
                    self.proxies[scheme] = httpcore.HTTPProxy(
                        proxy_url=url,
                        ssl_context=ssl_context,
                        **pools,  # type: ignore[arg-type]
                    )

    def _pool(self, url: httpx.URL) -> httpcore.ConnectionPool | httpcore.HTTPProxy:
        proxy = self.proxies.get(url.scheme)
        if proxy is None or urllib.request.proxy_bypass(url.host):
            return self.direct
        return proxy

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        response = self._pool(request.url).handle_request(core)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_Body(response),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self.direct.close()
        for proxy in self.proxies.values():
            proxy.close()


@contextlib.contextmanager
def until(deadline_s: float | None) -> Iterator[None]:
    """Every connect, read and write of this thread ends within ``deadline_s`` from now."""
    before = getattr(_deadline, "at", None)
    _deadline.at = None if deadline_s is None else time.monotonic() + deadline_s
    try:
        yield
    finally:
        _deadline.at = before


def deadline_passed() -> bool:
    """Whether the current fetch's deadline has (about) passed."""
    at = getattr(_deadline, "at", None)
    return at is not None and time.monotonic() >= at - 0.05
