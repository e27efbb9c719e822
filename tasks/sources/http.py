"""The one HTTP client: a size-capped fetch of a URL's bytes (an image of a list, a query, an
upload by URL) and a Range-resuming download to a file (the STL-10 tarball), on one set of client
settings (httpx; connect and per-read timeouts; redirects followed; the environment's proxies).

Every failure is classified here, once: connect errors, timeouts, a dropped connection and HTTP
5xx/408/429 are :class:`TransientNetworkError` (worth another try later); HTTP 4xx, a refused
address, a bad URL or redirect are :class:`FetchError`, an ``ImageSearchError``. Nothing here
retries: the download task is the one retry layer.

An optional address policy sees every address before a connection is made to it, after the host
name is resolved and again for every redirect that needs a new connection; the connection then
goes to the address that was checked, so a name cannot resolve to another one in between.
:func:`public_addresses_only` is the policy a public service wants.
"""

from __future__ import annotations

import ipaddress
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import httpcore
import httpx

from tasks.errors import ImageSearchError, TransientNetworkError
from tasks.sources.transport import AddressPolicy as AddressPolicy  # for whoever writes one
from tasks.sources.transport import IPAddress as IPAddress
from tasks.sources.transport import Transport, Unresolvable, deadline_passed, until

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0  # the longest wait for the next bytes of an answer
MAX_REDIRECTS = 10
USER_AGENT = "image-search"


class FetchError(ImageSearchError):
    """A URL that cannot be had and will not be by trying again (HTTP 4xx, a bad URL or
    redirect, a refused address); ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ResponseTooLarge(FetchError):
    """An answer larger than the caller's cap: refused once it is known to be (header or bytes)."""


class AddressRefused(FetchError):
    """An address the fetch's policy does not allow to connect to."""


def public_addresses_only(address: IPAddress, *, allow_loopback: bool = False) -> None:
    """Refuse every address that is not a public one: loopback (unless ``allow_loopback``),
    private, link-local (cloud metadata endpoints live there), multicast, unspecified and
    reserved ranges; an IPv4 address inside IPv6 is judged as the IPv4 address it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    kinds = (
        ("loopback", address.is_loopback and not allow_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("unspecified", address.is_unspecified),
        ("private", address.is_private and not address.is_loopback),
        ("reserved", address.is_reserved),
    )
    for kind, refused in kinds:
        if refused:
            raise AddressRefused(f"{address} is a {kind} address; only public ones are fetched")
    if not address.is_global and not address.is_loopback:
        raise AddressRefused(f"{address} is not a public address; only public ones are fetched")


_clients: dict[AddressPolicy | None, httpx.Client] = {}
_clients_lock = threading.Lock()


def _client(policy: AddressPolicy | None) -> httpx.Client:
    """One client per address policy, shared by every thread (its pools keep connections)."""
    with _clients_lock:
        client = _clients.get(policy)
        if client is None:
            client = httpx.Client(
                transport=Transport(policy),
                follow_redirects=True,
                max_redirects=MAX_REDIRECTS,
                headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
            )
            _clients[policy] = client
        return client


os.register_at_fork(after_in_child=_clients.clear)  # a child process opens its own connections


def _timeouts(read_timeout: float) -> httpx.Timeout:
    return httpx.Timeout(read_timeout, connect=CONNECT_TIMEOUT_S, pool=read_timeout)


_TIMEOUTS = (httpx.TimeoutException, httpcore.TimeoutException)
_CONNECT = (httpx.ConnectError, httpcore.ConnectError)
_LOST = (
    httpx.NetworkError,
    httpcore.NetworkError,
    httpx.RemoteProtocolError,
    httpcore.RemoteProtocolError,
    httpx.ProxyError,
    httpcore.ProxyError,
)
_REFUSED = (
    httpx.HTTPError,
    httpx.InvalidURL,
    httpcore.UnsupportedProtocol,
    httpcore.LocalProtocolError,
)
NETWORK_ERRORS = (*_TIMEOUTS, *_CONNECT, *_LOST, *_REFUSED, Unresolvable)


def _failure(url: str, exc: Exception, deadline_s: float | None) -> Exception:
    """What ``exc`` (raised while fetching ``url``) means: transient, or the user's to fix."""
    if isinstance(exc, _TIMEOUTS):
        if deadline_s is not None and deadline_passed():
            return TransientNetworkError(f"no complete answer within {deadline_s:g} s")
        return TransientNetworkError(f"timed out ({type(exc).__name__})")
    if isinstance(exc, _CONNECT):
        return TransientNetworkError(f"cannot connect ({exc or type(exc).__name__})")
    if isinstance(exc, _LOST):
        return TransientNetworkError(f"connection lost ({exc or type(exc).__name__})")
    if isinstance(exc, Unresolvable):
        return FetchError(f"{url}: {exc}")
    return FetchError(f"{url} cannot be fetched ({type(exc).__name__}: {exc})")


def check_status(url: str, response: httpx.Response, ok: Iterable[int] = (200,)) -> None:
    """Raise for an answer that is not one of ``ok``: transient for 5xx/408/429, else a
    :class:`FetchError` naming the status."""
    status = response.status_code
    if status in ok:
        return
    what = f"HTTP {status} {response.reason_phrase}".rstrip()
    if status >= 500 or status in (408, 429):
        raise TransientNetworkError(what)
    raise FetchError(f"{url} answered {what}", status=status)


def _check_url(url: str) -> None:
    if not url.lower().startswith(("http://", "https://")):
        raise FetchError(f"{url!r}: only http:// and https:// URLs are fetched")


def fetch_bytes(
    url: str,
    *,
    max_bytes: int,
    timeout: float = READ_TIMEOUT_S,
    deadline: float | None = None,
    policy: AddressPolicy | None = None,
) -> bytes:
    """The body of ``url`` (HTTP 200), at most ``max_bytes`` of it; each read waits at most
    ``timeout`` seconds and the whole fetch, redirects included, ends within ``deadline``.

    Raises :class:`ResponseTooLarge` beyond the cap, :class:`FetchError` for what trying again
    will not fix, :class:`TransientNetworkError` for what it may.
    """
    _check_url(url)
    with until(deadline):
        try:
            with _client(policy).stream("GET", url, timeout=_timeouts(timeout)) as response:
                check_status(url, response)
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise ResponseTooLarge(
                        f"{url} is {int(declared):,} bytes, more than {max_bytes:,}"
                    )
                chunks, total = [], 0
                for chunk in response.iter_bytes():
                    total += len(chunk)
                    if total > max_bytes:
                        raise ResponseTooLarge(f"{url} sent more than {max_bytes:,} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)
        except NETWORK_ERRORS as exc:
            raise _failure(url, exc, deadline) from exc


def download_to_file(
    url: str,
    part: Path,
    *,
    max_bytes: int | None = None,
    timeout: float = READ_TIMEOUT_S,
    on_bytes: Callable[[int, int, int | None], None] | None = None,
    policy: AddressPolicy | None = None,
) -> None:
    """Append the bytes of ``url`` that ``part`` lacks (a Range request continues a partial
    file; a server that ignores it sends everything and ``part`` starts over). The file never
    grows past the server's Content-Length or ``max_bytes``; what arrived stays for the next
    attempt when the connection fails. ``on_bytes(n, start, total)`` follows the progress.

    Raises :class:`TransientNetworkError` for trouble worth retrying, :class:`FetchError` when
    the answer is refused or more than expected (the partial file is then deleted), and the
    ``OSError`` of a file that cannot be written.
    """
    _check_url(url)
    start = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={start}-"} if start else {}
    received = 0
    total: int | None = None
    body_started = False
    try:
        with _client(policy).stream(
            "GET", url, headers=headers, timeout=_timeouts(timeout)
        ) as response:
            if response.status_code == 416 and start:
                return  # nothing left to fetch: the partial file is complete (the MD5 decides)
            check_status(url, response, ok=(200, 206))
            if response.status_code != 206:
                start = 0
            length = response.headers.get("Content-Length", "")
            total = start + int(length) if length.isdigit() else None
            limits = [x for x in (total, max_bytes) if x is not None]
            limit = min(limits) if limits else None
            with open(part, "ab" if start else "wb") as f:
                body_started = True
                for block in response.iter_raw():
                    if limit is not None and start + received + len(block) > limit:
                        f.write(block[: limit - start - received])
                        f.close()
                        part.unlink(missing_ok=True)
                        raise ResponseTooLarge(
                            f"{url} sent more than the expected {limit:,} bytes; stopped there"
                        )
                    f.write(block)
                    received += len(block)
                    if on_bytes is not None:
                        on_bytes(len(block), start, total)
    except NETWORK_ERRORS as exc:
        if not body_started:
            raise _failure(url, exc, None) from exc
        if total is not None:  # h11's word for a body cut short: say how far it got
            raise TransientNetworkError(
                f"connection closed after {start + received} of {total} bytes"
            ) from exc
        raise TransientNetworkError(f"connection lost after {start + received} bytes") from exc
    if total is not None and start + received < total:
        raise TransientNetworkError(f"connection closed after {start + received} of {total} bytes")
