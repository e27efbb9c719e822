"""The Prefect API of a command-line run: the configured one, checked before the run, or a
temporary local server for this run alone.

Prefect starts a temporary server by itself when ``PREFECT_API_URL`` is unset, but inside the
terminal's process group (Ctrl-C kills it under the run, which then retries the dead API for
minutes), with a 20 s start-up budget that a fresh ``PREFECT_HOME`` nearly uses up, and it is
left running when the command is terminated. This one runs Prefect's own server app in a
session of its own, gets a start-up budget that fits a first start, is stopped by the command
line when the run ends, and stops itself if the command line dies.

``python -m flows.local_api --port N --parent PID`` is the server process itself.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO

import httpx

from tasks.errors import ImageSearchError

API_URL_SETTING = "PREFECT_API_URL"
STARTUP_TIMEOUT_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
# A first start creates the database (about 20 s on an idle 2-core machine); a busy one needs
# several times that. Used unless the user set the setting.
DEFAULT_STARTUP_TIMEOUT = 180
# The longest a configured API may take to answer its health check before the run is refused.
ANSWER_TIMEOUT = 15.0
# uvicorn's exit status when it cannot bind its port (someone took it since we looked).
_PORT_TAKEN = 3


class PrefectApiError(ImageSearchError):
    """The Prefect API is unreachable, silent or would not start; the message names the fix."""


def check_api(url: str) -> None:
    """Refuse, naming the setting, an API that does not answer within one request's time
    (``PREFECT_API_REQUEST_TIMEOUT``, at most 15 s).

    Any HTTP answer counts (a server behind authentication may refuse ``/health``): only a
    connection that fails or stays silent stops the run, before it would retry for minutes.
    """
    from prefect.settings import PREFECT_API_REQUEST_TIMEOUT

    timeout = min(ANSWER_TIMEOUT, PREFECT_API_REQUEST_TIMEOUT.value())
    fix = (
        f"Start that server, point {API_URL_SETTING} at a running one, or unset it "
        f"(`prefect config unset {API_URL_SETTING}`) to run on a temporary local API."
    )
    try:
        with httpx.Client(timeout=timeout) as client:
            client.get(url.rstrip("/") + "/health")
    except httpx.TimeoutException:
        raise PrefectApiError(
            f"The Prefect API at {url} ({API_URL_SETTING}) did not answer within "
            f"{timeout:.0f} s. {fix}"
        ) from None
    except (httpx.HTTPError, OSError) as exc:
        raise PrefectApiError(
            f"Cannot reach the Prefect API at {url} ({API_URL_SETTING}): {exc or type(exc)}. {fix}"
        ) from None


def startup_timeout() -> int:
    """The user's ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` if set, else ours."""
    from prefect.settings import get_current_settings

    ephemeral = get_current_settings().server.ephemeral
    if "startup_timeout_seconds" in ephemeral.model_fields_set:
        return int(ephemeral.startup_timeout_seconds)
    return DEFAULT_STARTUP_TIMEOUT


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TemporaryApi:
    """A Prefect server on 127.0.0.1 for one run: :meth:`start`, :meth:`wait_ready`, :meth:`stop`.

    Start-up runs in the background, so the caller can import the flow meanwhile.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._started = 0.0
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> None:
        """Launch the server in its own session; it logs errors to a temporary file."""
        if not self._started:
            self._started = time.monotonic()
        self.port = _free_port()
        if self._log is None:
            # Kept open for the server's life (its stderr); stop() closes it.
            self._log = tempfile.TemporaryFile(prefix="image-search-api-")  # noqa: SIM115
        command = [sys.executable, "-m", "flows.local_api", "--port", str(self.port)]
        self.process = subprocess.Popen(
            [*command, "--parent", str(os.getpid())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            # Ctrl-C in a terminal signals the whole foreground process group: not the server.
            start_new_session=True,
        )

    def wait_ready(self) -> None:
        """Block until ``/api/health`` answers; a clear error if it exits or takes too long."""
        assert self.process is not None, "start() first"
        deadline = self._started + self.timeout
        retries = 3
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while True:  # look at least once, however long the caller took to get here
                code = self.process.poll()
                if code == _PORT_TAKEN and retries > 0:
                    retries -= 1
                    self.start()
                    continue
                if code is not None:
                    raise PrefectApiError(
                        f"The temporary Prefect API exited with status {code} while starting:\n"
                        f"{self._log_tail()}\nSet {API_URL_SETTING} to a running Prefect server "
                        f"to run without it."
                    )
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        self.stop()
        raise PrefectApiError(
            f"The temporary Prefect API did not start within {self.timeout:.0f} s "
            f"({STARTUP_TIMEOUT_SETTING}). On a busy machine raise that setting, or start a "
            f"server once (`prefect server start`) and set {API_URL_SETTING} to its URL."
        )

    def _log_tail(self, chars: int = 2000) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-chars:].strip()

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``grace`` seconds; wait for it."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            except ProcessLookupError:
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def _stop_with_parent(parent: int) -> None:
    """Watch the command line that started this server; shut down once it is gone (kill -9,
    an OOM kill), so no server outlives its run."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)


def serve(port: int, parent: int) -> None:
    """Run Prefect's server app (no UI, no background services) until SIGTERM."""
    threading.Thread(target=_stop_with_parent, args=(parent,), daemon=True).start()
    import uvicorn
    from prefect.server.api.server import create_app

    uvicorn.run(
        create_app(ephemeral=True, final=True),
        host="127.0.0.1",
        port=port,
        log_level="error",
        lifespan="on",
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args()
    serve(args.port, args.parent)
