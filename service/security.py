"""Who may use the service and what it may reach: the token, the Host names it answers to, the
addresses a search by URL may fetch from, and the headers every answer carries.

- **Token.** With one set, every request but ``GET /healthz`` (the probe) needs it: the header
  ``Authorization: Bearer TOKEN``, or the cookie a browser gets by opening ``/?token=TOKEN``
  once (HttpOnly, SameSite=Lax, holding a digest of the token, not the token).
- **Host names.** Starlette's ``TrustedHostMiddleware``: loopback names, the address the service
  is bound to, and what the operator adds; anything else is 400 (``/healthz`` aside), so a
  DNS-rebinding page cannot talk to a service on this machine.
- **URL search.** A URL's every address, after every redirect, is judged before a connection is
  made (:class:`FetchPolicy`, the one HTTP client's address policy): public addresses only,
  plus the networks the operator allows.
- **Headers.** ``nosniff``, no framing, no referrer, and a Content-Security-Policy; the page's
  own inline script and style are allowed by their SHA-256 alone.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qs

from starlette.middleware.trustedhost import TrustedHostMiddleware

from tasks.errors import ImageSearchError, param
from tasks.sources.http import IPAddress, public_addresses_only

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TOKEN_ENV = "IMAGE_SEARCH_TOKEN"
COOKIE = "image_search_session"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
OPEN_PATHS = frozenset({"/healthz"})  # answered without the token: the liveness probe

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def is_loopback_host(host: str) -> bool:
    """Whether listening on ``host`` keeps the service on this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def host_names(host: str, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The Host header names to answer: loopback names, ``host`` itself when it is one address
    (not every interface), and ``extra`` (``*`` for any)."""
    names = list(LOOPBACK_NAMES)
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        names.append(host.lower())
    else:
        if not address.is_unspecified:
            names.append(f"[{address}]" if address.version == 6 else str(address))
    for name in extra:
        name = name.strip().lower()
        if ":" in name and not name.startswith("["):
            try:
                name = f"[{ipaddress.IPv6Address(name)}]"
            except ValueError as exc:
                raise ImageSearchError(
                    f"{param('allowed_host')} {name!r} is not a host name (give it without a port)"
                ) from exc
        if name.startswith("*") and name != "*" and not name.startswith("*."):
            raise ImageSearchError(
                f"{param('allowed_host')} {name!r}: a wildcard must look like '*.example.com'"
            )
        if name:
            names.append(name)
    return tuple(dict.fromkeys(names))


def networks(given: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Addresses and networks (``10.1.2.3``, ``10.0.0.0/8``, ``::1``) that URL search may
    reach although they are not public. Host names are refused: a name can resolve to any
    address, and the policy judges addresses."""
    found = []
    for text in given:
        try:
            found.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError as exc:
            raise ImageSearchError(
                f"{param('allow_url_network')} {text!r} is not an IP address or network such as "
                f"10.0.0.0/8 (host names are not accepted: they can resolve to any address)"
            ) from exc
    return tuple(found)


@dataclass(frozen=True)
class FetchPolicy:
    """The address policy of URL searches: public addresses, and ``allowed`` networks besides;
    loopback, private, link-local (cloud metadata), multicast and reserved ones are refused
    before any connection. Hashable: the HTTP client keeps one connection pool per policy."""

    allowed: tuple[IPNetwork, ...] = ()

    def __call__(self, address: IPAddress) -> None:
        plain = address
        if isinstance(plain, ipaddress.IPv6Address) and plain.ipv4_mapped is not None:
            plain = plain.ipv4_mapped
        if any(plain.version == net.version and plain in net for net in self.allowed):
            return
        public_addresses_only(plain)


@dataclass(frozen=True)
class Access:
    """Who may use the service and what a search by URL may reach.

    ``token``: required on every request but ``/healthz`` when set. ``allowed_hosts``: the Host
    header names answered (``*``: any). ``url_search``: whether ``{"url": ...}`` is accepted.
    ``fetch``: the address policy of those fetches.
    """

    token: str | None = None
    allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES
    url_search: bool = True
    fetch: FetchPolicy = field(default_factory=FetchPolicy)


def session_value(token: str) -> str:
    """What the browser's cookie holds: a digest of the token, never the token itself."""
    return hmac.new(token.encode(), b"image-search session", hashlib.sha256).hexdigest()


def _json(status: int, detail: str, headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class TokenGate:
    """ASGI middleware: 401 for a request without the token (``/healthz`` excepted); ``GET
    /?token=TOKEN`` sets the browser's cookie and redirects to ``/``."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token
        self.session = session_value(token)

    def _authorised(self, scope: Scope) -> bool:
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), self.token.encode()
        ):
            return True
        cookies = SimpleCookie()
        try:
            cookies.load(headers.get(b"cookie", b"").decode("latin-1"))
        except CookieError:  # a malformed Cookie header is no credential
            return False
        morsel = cookies.get(COOKIE)
        return morsel is not None and hmac.compare_digest(
            morsel.value.encode(), self.session.encode()
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if scope["path"] == "/" and "token" in query:
            if hmac.compare_digest(query["token"][-1].encode(), self.token.encode()):
                from starlette.responses import RedirectResponse

                secure = "; Secure" if scope.get("scheme") == "https" else ""
                response = RedirectResponse("/", status_code=303)
                response.headers["Set-Cookie"] = (
                    f"{COOKIE}={self.session}; Path=/; HttpOnly; SameSite=Lax{secure}"
                )
                await response(scope, receive, send)
                return
        elif self._authorised(scope):
            await self.app(scope, receive, send)
            return
        response = _json(
            401,
            "This service needs its token: send the header 'Authorization: Bearer TOKEN', or "
            "open /?token=TOKEN once in the browser.",
            {"WWW-Authenticate": 'Bearer realm="image-search"'},
        )
        await response(scope, receive, send)


class HostCheck(TrustedHostMiddleware):
    """Starlette's check of the Host header (400 for a name the service does not answer to),
    except for the liveness probe: a kubelet's probe names the pod's address, and /healthz
    answers anyone anyway."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def csp_hash(text: str) -> str:
    """A CSP source that allows exactly the inline ``<script>``/``<style>`` whose text is this."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def inline_hashes(html: str, tag: str) -> list[str]:
    """The CSP hash of every inline ``<tag>`` element of ``html`` (those without ``src``)."""
    pattern = re.compile(rf"<{tag}(?![^>]*\bsrc=)[^>]*>(.*?)</{tag}>", re.DOTALL | re.IGNORECASE)
    return [csp_hash(m.group(1)) for m in pattern.finditer(html)]


# Every answer that is not a page: nothing in it may run, load or be framed.
DEFAULT_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"


def page_csp(html: str) -> str:
    """The policy of the page at ``/``: its own inline script and style by hash, images from
    this service (and the preview of a picked file), requests to this service only."""
    scripts = " ".join(inline_hashes(html, "script"))
    styles = " ".join(inline_hashes(html, "style"))
    return (
        f"default-src 'none'; script-src {scripts}; style-src {styles}; "
        f"img-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        f"frame-ancestors 'none'"
    )


def docs_csp(html: str) -> str:
    """The policy of ``/docs``: Swagger UI from its CDN, its inline start-up script by hash."""
    scripts = " ".join(["https://cdn.jsdelivr.net", *inline_hashes(html, "script")])
    return (
        f"default-src 'none'; script-src {scripts}; style-src https://cdn.jsdelivr.net "
        f"'unsafe-inline'; img-src 'self' data: https://fastapi.tiangolo.com; connect-src 'self'; "
        f"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-resource-policy": "same-origin",
}


class SecurityHeaders:
    """ASGI middleware: the standard security headers on every answer, and
    :data:`DEFAULT_CSP` where a route set no policy of its own."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                present = {name.lower() for name, _ in headers}
                for name, value in SECURITY_HEADERS.items():
                    if name.encode() not in present:
                        headers.append((name.encode(), value.encode()))
                if b"content-security-policy" not in present:
                    headers.append((b"content-security-policy", DEFAULT_CSP.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


MIN_TOKEN_CHARS = 16
MAKE_TOKEN = "python3 -c 'import secrets; print(secrets.token_urlsafe())'"


def decide_access(
    *,
    host: str,
    token: str | None,
    no_token: bool,
    allowed_hosts: Iterable[str] = (),
    allow_url_search: bool = False,
    url_networks: Iterable[str] = (),
) -> tuple[Access, list[str]]:
    """The :class:`Access` of a service listening on ``host`` with these settings, and the
    lines to print when it starts.

    A service reachable from other machines shows every indexed image to whoever reaches its
    port, so beyond loopback it needs a token, or ``no_token`` (a proxy in front checks who
    comes in), said loudly. Search by URL makes the service fetch for its clients: on by
    default on loopback only.

    Raises ImageSearchError for a token that is empty or short, or missing beyond loopback.
    """
    local = is_loopback_host(host)
    lines: list[str] = []
    if token is not None:
        if no_token:
            raise ImageSearchError(
                f"{TOKEN_ENV} is set and {param('no_token')} is given; unset one of them."
            )
        if len(token.strip()) < MIN_TOKEN_CHARS:
            raise ImageSearchError(
                f"{TOKEN_ENV} holds {len(token.strip())} characters; use a secret of at least "
                f"{MIN_TOKEN_CHARS}, such as the output of {MAKE_TOKEN}."
            )
        token = token.strip()
    elif not local and not no_token:
        raise ImageSearchError(
            f"{param('host')} {host} makes the service reachable from other machines, and it "
            f"has no token: anyone who reaches its port could search the index and see every "
            f"image in it. Set {TOKEN_ENV} to a secret (for example from {MAKE_TOKEN}; clients "
            f"send 'Authorization: Bearer TOKEN', a browser opens /?token=TOKEN once), or pass "
            f"{param('no_token')} when a proxy in front of the service checks who comes in."
        )
    elif not local:
        lines.append(
            f"WARNING: serving on {host} without a token ({param('no_token')}): anyone who "
            f"reaches the port can search the index and see every image in it."
        )
    names = host_names(host, allowed_hosts)
    if not local and "*" not in names:
        lines.append(
            f"answering requests addressed to {', '.join(names)} only; add the names clients "
            f"use with {param('allowed_host')}."
        )
    url_search = local or allow_url_search
    if not url_search:
        lines.append(f"search by URL is off; {param('allow_url_search')} turns it on.")
    access = Access(
        token=token,
        allowed_hosts=names,
        url_search=url_search,
        fetch=FetchPolicy(networks(url_networks)),
    )
    return access, lines
