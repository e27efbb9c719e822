"""``image-search serve``: bind the port, load the index and its model once, then run the app
under uvicorn until Ctrl-C or SIGTERM (requests in flight finish first)."""

from __future__ import annotations

import logging
import socket
import sys

from service.app import Limits, create_app
from service.engine import Engine
from service.security import Access
from tasks.errors import ImageSearchError, option_name, param, worded

log = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; a clear error when the address is taken.

    Made with its protocol named (``IPPROTO_TCP``, not 0): asyncio turns Nagle off only on
    connections whose socket says TCP, and without that every answer on a kept-alive connection
    waited ~40 ms for the client's delayed ACK."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ImageSearchError(
            f"Cannot listen on {host}:{port} ({exc.strerror or exc}); choose another "
            f"{param('port')}, "
            f"or {param('host')} 127.0.0.1."
        ) from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(
    index: str,
    *,
    host: str,
    port: int,
    weights: str | None,
    limits: Limits,
    access: Access,
    max_batch: int,
    reload_interval: float,
    notes: list[str] | None = None,
) -> None:
    """Serve the index in folder ``index`` on ``host:port`` until stopped; ``notes`` are said
    once it is ready (warnings about how it is exposed).

    Raises ImageSearchError (port taken, no index, model mismatch) before anything listens.
    """
    import uvicorn

    sock = bind(host, port)
    try:
        engine = Engine(
            index, weights=weights, reload_interval=reload_interval, max_batch=max_batch
        )
        app = create_app(engine, limits, access)
        loaded = engine.loaded
        shown = f"[{host}]" if ":" in host else host
        print(
            f"image-search: serving {len(loaded.index)} images of {engine.folder} "
            f"({loaded.spec.weights} weights, input {loaded.spec.input_size} px) on "
            f"http://{shown}:{sock.getsockname()[1]}"
            + (" (requests need the token)" if access.token else ""),
            file=sys.stderr,
            flush=True,
        )
        for line in notes or []:
            print(f"image-search: {worded(line, option_name)}", file=sys.stderr, flush=True)
        config = uvicorn.Config(
            app,
            log_level="warning",
            # No connection limit of uvicorn's: it would refuse /healthz too. The app admits
            # requests itself (Limits.request_limit) and always answers /healthz.
            timeout_graceful_shutdown=30,
        )
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
