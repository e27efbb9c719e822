"""``image-search serve``: bind the port, load the index and its model once, then run the app
under uvicorn until Ctrl-C or SIGTERM (requests in flight finish first)."""

from __future__ import annotations

import logging
import socket
import sys

from service.app import Limits, create_app
from service.engine import Engine
from tasks.errors import ImageSearchError, param

log = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; a clear error when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
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
    max_batch: int,
    reload_interval: float,
) -> None:
    """Serve the index in folder ``index`` on ``host:port`` until stopped.

    Raises ImageSearchError (port taken, no index, model mismatch) before anything listens.
    """
    import uvicorn

    sock = bind(host, port)
    try:
        engine = Engine(
            index, weights=weights, reload_interval=reload_interval, max_batch=max_batch
        )
        app = create_app(engine, limits)
        loaded = engine.loaded
        print(
            f"image-search: serving {len(loaded.index)} images of {engine.folder} "
            f"({loaded.spec.weights} weights, input {loaded.spec.input_size} px) on "
            f"http://{host}:{sock.getsockname()[1]}",
            file=sys.stderr,
            flush=True,
        )
        config = uvicorn.Config(
            app,
            log_level="warning",
            # Connections beyond the searches' own limit get uvicorn's 503 before any work.
            limit_concurrency=limits.max_concurrency * 4,
            timeout_graceful_shutdown=30,
        )
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
