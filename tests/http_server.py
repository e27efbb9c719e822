"""A local HTTP server for tests: serves files on 127.0.0.1 with Range support and misbehaves
on command (slow, cut, failing)."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNK = 64 * 1024


class MisbehavingServer:
    """Serves ``files`` on 127.0.0.1 with HTTP Range support, and misbehaves on command.

    - ``rate``: bytes per second per response (0: as fast as possible), a slow network;
    - ``cut_at[path] = n``: every response stops at absolute offset n and drops the
      connection, a server that never delivers the whole file;
    - ``cut_once[path] = [n, ...]``: the next responses send n bytes each, then drop;
    - ``fail_status[path] = [code, ...]``: the next requests are answered with these errors;
    - ``hide_length``: paths answered without Content-Length (the body ends when the
      connection closes), as a stream of unknown size;
    - ``redirects[path] = url``: answered with a 302 to ``url``.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.rate = 0
        self.cut_at: dict[str, int] = {}
        self.cut_once: dict[str, list[int]] = {}
        self.fail_status: dict[str, list[int]] = {}
        self.hide_length: set[str] = set()
        self.redirects: dict[str, str] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.sent: dict[str, int] = {}  # body bytes written per path, all responses together
        self.stopping = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                if self.path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                statuses = server.fail_status.get(self.path)
                if statuses:
                    self.send_error(statuses.pop(0))
                    return
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = int(rng[6:].split("-")[0]) if rng and rng.startswith("bytes=") else 0
                if start >= len(data) and rng:
                    self.send_error(416)
                    return
                if rng:
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                if self.path not in server.hide_length:
                    self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                limit = len(body)
                if self.path in server.cut_at:
                    limit = max(server.cut_at[self.path] - start, 0)
                once = server.cut_once.get(self.path)
                if once:
                    limit = min(limit, once.pop(0))
                try:
                    self._send(body[:limit])
                except (BrokenPipeError, ConnectionResetError):
                    return  # the client went away (killed, or gave up)
                if limit < len(body) or self.path in server.hide_length:
                    self.close_connection = True

            def _send(self, body: bytes) -> None:
                step = CHUNK if not server.rate else max(server.rate // 20, 1)
                for i in range(0, len(body), step):
                    if server.stopping.is_set():
                        return
                    self.wfile.write(body[i : i + step])
                    self.wfile.flush()
                    server.sent[self.path] = server.sent.get(self.path, 0) + len(body[i : i + step])
                    if server.rate:
                        time.sleep(step / server.rate)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    def url(self, path: str) -> str:
        host, port = self.address
        return f"http://{host}:{port}{path}"

    def ranges(self, path: str) -> list[str | None]:
        """The Range header of every request for ``path``, in order (None: no Range)."""
        return [r for p, r in self.requests if p == path]

    def __enter__(self) -> MisbehavingServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)
