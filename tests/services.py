"""``image-search serve`` as a process for tests: a free port, the command, start and wait for
/healthz, a copy of an index to serve, a generated PNG to upload."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_command(folder: Path, port: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "flows.cli",
        "serve",
        "--index",
        str(folder),
        "--port",
        str(port),
        *extra,
    ]


@dataclass
class Service:
    """A running ``image-search serve`` and the folder it serves."""

    url: str
    proc: subprocess.Popen[bytes]
    folder: Path
    log: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, trust_env=False, timeout=60)


def start_service(
    folder: Path,
    log: Path,
    *extra: str,
    timeout: float = 240,
    env: dict[str, str] | None = None,
) -> Service:
    """Start the service on a free port and wait until /healthz answers."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            serve_command(folder, port, *extra),
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    service = Service(f"http://127.0.0.1:{port}", proc, folder, log)
    deadline = time.monotonic() + timeout
    with service.client() as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited {proc.returncode}:\n{log.read_text()}")
            try:
                if client.get("/healthz").status_code == 200:
                    return service
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"serve did not answer within {timeout} s:\n{log.read_text()}")


def copy_index(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".embeddings", ".staging"))
    return dest


def png(width: int, height: int, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()
