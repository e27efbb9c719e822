"""The local Prefect API that command-line runs share when ``PREFECT_API_URL`` is unset: started
in the background by the first command that needs one, used by every later one, stopped by
itself once no command has used it for a while (or by ``prefect server stop``).

Starting a Prefect server costs seconds (a first one on a fresh ``PREFECT_HOME`` creates its
database: 20 s on an idle 2-core machine), more than the rest of a rerun with nothing to do; a
server that outlives the command also keeps the run's page in the UI reachable. It is Prefect's
own server app (API and UI) on 127.0.0.1, in a session of its own (Ctrl-C in the terminal does
not reach it), with these files in ``PREFECT_HOME``, all named by this module:

- ``image-search-api.json``: its process id and URL, written by the server once it listens;
- ``image-search-api.users``: every command that uses it holds a shared lock on this file for
  its life; the kernel drops the lock when the command ends, even by ``kill -9``;
- ``image-search-api.lock``: held by the one command that looks for a server or starts one;
- ``image-search-api.log``: the server's own errors;
- ``server.pid``: Prefect's record of a background server, written when no other server owns
  it, so that ``prefect server stop`` stops this one as it stops its own.

The server stops itself when nobody has held a lease or sent a request for
``IMAGE_SEARCH_API_IDLE_MINUTES`` (30 by default): a UI page left open keeps it alive.

``python -m flows.local_api --port N`` is the server process itself.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tasks.errors import ImageSearchError

API_URL_SETTING = "PREFECT_API_URL"
STARTUP_TIMEOUT_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
IDLE_SETTING = "IMAGE_SEARCH_API_IDLE_MINUTES"
DEFAULT_IDLE_MINUTES = 30.0
# A first start creates the database (about 20 s on an idle 2-core machine); a busy one needs
# several times that. Used unless the user set the setting.
DEFAULT_STARTUP_TIMEOUT = 180
# The longest a configured API may take to answer its health check before the run is refused.
ANSWER_TIMEOUT = 15.0
STATE_FILE = "image-search-api.json"
USERS_FILE = "image-search-api.users"
START_LOCK = "image-search-api.lock"
LOG_FILE = "image-search-api.log"
PREFECT_PID_FILE = "server.pid"  # prefect.cli._server_utils.SERVER_PID_FILE_NAME
# The exit status of the server process when its port was taken meanwhile.
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
        f"(`prefect config unset {API_URL_SETTING}`) to run on a local API this command starts."
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


def idle_minutes() -> float:
    """How long the server waits unused before it stops (``IMAGE_SEARCH_API_IDLE_MINUTES``)."""
    raw = os.environ.get(IDLE_SETTING, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_IDLE_MINUTES
    except ValueError:
        raise ImageSearchError(
            f"{IDLE_SETTING} = {raw!r}: give the minutes the local Prefect API waits unused "
            f"before it stops (default {DEFAULT_IDLE_MINUTES:g})."
        ) from None
    if value <= 0:
        raise ImageSearchError(f"{IDLE_SETTING} = {raw!r}: give a number of minutes above 0.")
    return value


def prefect_home() -> Path:
    """``PREFECT_HOME``, created if needed."""
    from prefect.settings import PREFECT_HOME

    home = Path(PREFECT_HOME.value()).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def _alive(pid: int) -> bool:
    if pid <= 0:  # 0 and -1 would name process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with httpx.Client(timeout=timeout, trust_env=False) as client:
            return client.get(f"{url}/health").status_code == 200
    except httpx.HTTPError:
        return False


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop_hint(state: dict[str, Any]) -> str:
    """How the user stops the server that ``state`` describes."""
    if state.get("prefect_pid_file"):
        return "`prefect server stop` stops it now"
    return f"`kill {state.get('pid')}` stops it now"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Server:
    """A running local API: its process, URL, and how the user stops it."""

    pid: int
    url: str  # ends in /api
    started_here: bool
    stop_hint: str
    idle_minutes: float | None  # None: a server that does not stop by itself

    @property
    def ui(self) -> str:
        return self.url.removesuffix("/api")


class LocalApi:
    """A command's use of the shared local API: :meth:`lease` (taken first, held to the end),
    then :meth:`find_or_start` and, for a server this command started, :meth:`wait_ready`."""

    def __init__(self, home: Path, timeout: float, idle: float) -> None:
        self.home = home
        self.timeout = timeout
        self.idle = idle
        self.process: subprocess.Popen[bytes] | None = None
        self._started = 0.0
        self._port = 0
        self._adopted = 0  # a server another command started and did not see ready

    @contextlib.contextmanager
    def lease(self) -> Iterator[None]:
        """Hold a shared lock on the users file: the server does not stop while it is held."""
        fd = os.open(self.home / USERS_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    @contextlib.contextmanager
    def _start_lock(self) -> Iterator[None]:
        fd = os.open(self.home / START_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def running(self) -> Server | None:
        """The local API that answers now, if any: ours (its state file) or a server that
        ``prefect server start --background`` left on ``PREFECT_SERVER_API_PORT``."""
        state = _read_json(self.home / STATE_FILE)
        if state and _alive(int(state.get("pid", 0))) and _healthy(str(state.get("url"))):
            idle = float(state.get("idle_minutes", self.idle))
            return Server(int(state["pid"]), str(state["url"]), False, _stop_hint(state), idle)
        pid_file = self.home / PREFECT_PID_FILE
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if state and int(state.get("pid", 0)) == pid:
            return None  # ours, and gone or silent: not Prefect's own
        from prefect.settings import PREFECT_SERVER_API_PORT

        url = f"http://127.0.0.1:{PREFECT_SERVER_API_PORT.value()}/api"
        if _alive(pid) and _healthy(url):
            return Server(pid, url, False, "`prefect server stop` stops it", None)
        return None

    def find_or_start(self) -> Server | None:
        """The running local API, or None after starting one (call :meth:`wait_ready`).

        Under the start lock: two commands at once start one server, not two.
        """
        with self._start_lock():
            found = self.running()
            if found is not None:
                return found
            state = _read_json(self.home / STATE_FILE)
            if state and _alive(int(state.get("pid", 0))):
                # Still starting (its starter was interrupted): wait for it, do not start a second.
                self._adopt(int(state["pid"]), str(state["url"]))
                return None
            self._forget(state)
            self._started = time.monotonic()
            self._launch()
            self._await_registration()
            return None

    def _await_registration(self, timeout: float = 60.0) -> None:
        """Wait until the server just launched has written its state file (it does so before
        it imports Prefect), so that a command after this one sees it starting."""
        deadline = time.monotonic() + timeout
        while self.process is not None and self.process.poll() is None:
            if (_read_json(self.home / STATE_FILE) or {}).get("pid") == self.process.pid:
                return
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)

    def _adopt(self, pid: int, url: str) -> None:
        self._started = time.monotonic()
        self._port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
        self._adopted = pid

    def _forget(self, state: dict[str, Any] | None) -> None:
        """Remove the files of a server that is gone (killed): ours only."""
        if not state:
            return
        if (_read_json(self.home / STATE_FILE) or {}).get("pid") == state.get("pid"):
            (self.home / STATE_FILE).unlink(missing_ok=True)
        pid_file = self.home / PREFECT_PID_FILE
        with contextlib.suppress(OSError, ValueError):
            if int(pid_file.read_text().strip()) == int(state.get("pid", -1)):
                pid_file.unlink()

    def _launch(self, port: int | None = None) -> None:
        from prefect.settings import PREFECT_SERVER_API_PORT

        preferred = int(PREFECT_SERVER_API_PORT.value())
        self._port = port or (preferred if _port_free(preferred) else _free_port())
        log = open(self.home / LOG_FILE, "wb")  # noqa: SIM115 - handed to the child
        env = {k: v for k, v in os.environ.items() if k != API_URL_SETTING}
        env["PREFECT_HOME"] = str(self.home)
        env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        command = [sys.executable, "-m", "flows.local_api", "--port", str(self._port)]
        command += ["--home", str(self.home), "--idle-minutes", str(self.idle)]
        try:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
                # Ctrl-C in a terminal signals the whole foreground process group: not the server.
                start_new_session=True,
            )
        finally:
            log.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}/api"

    def wait_ready(self) -> Server:
        """Block until the server started or adopted here answers; a clear error (and the
        server stopped) if it exits or takes longer than the start-up budget."""
        deadline = self._started + self.timeout
        retries = 3
        adoptions = 3
        while True:  # look at least once, however long the caller took to get here
            if self.process is None and not _alive(self._adopted) and adoptions > 0:
                # The server adopted here is gone before it answered (one that stopped itself,
                # idle, just as this command found it): find or start one as at first.
                adoptions -= 1
                self._adopted = 0
                found = self.find_or_start()
                if found is not None:
                    return found
                deadline = self._started + self.timeout
                continue
            code = self.process.poll() if self.process is not None else None
            if code == _PORT_TAKEN and retries > 0:
                retries -= 1
                self._launch(_free_port())
                continue
            if code is not None:
                raise PrefectApiError(
                    f"The local Prefect API exited with status {code} while starting:\n"
                    f"{self._log_tail()}\nSet {API_URL_SETTING} to a running Prefect server "
                    f"to run without it."
                )
            if self.process is None and not _alive(self._adopted):
                raise PrefectApiError(
                    f"The local Prefect API stopped while starting:\n{self._log_tail()}"
                )
            if _healthy(self.url):
                state = _read_json(self.home / STATE_FILE) or {}
                pid = self.process.pid if self.process is not None else self._adopted
                idle = float(state.get("idle_minutes", self.idle))
                started = self.process is not None
                return Server(pid, self.url, started, _stop_hint(state), idle)
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.stop_started()
        raise PrefectApiError(
            f"The local Prefect API did not start within {self.timeout:.0f} s "
            f"({STARTUP_TIMEOUT_SETTING}). On a busy machine raise that setting, or start a "
            f"server once (`prefect server start`) and set {API_URL_SETTING} to its URL."
        )

    def stop_started(self, grace: float = 10.0) -> None:
        """Stop the server this command started (one that never became ready)."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            except ProcessLookupError:
                process.wait()
        self._forget({"pid": process.pid})

    def _log_tail(self, chars: int = 2000) -> str:
        try:
            return (self.home / LOG_FILE).read_text(errors="replace")[-chars:].strip()
        except OSError:
            return ""


# -- the server process ---------------------------------------------------------------------


class _Activity:
    """ASGI middleware: remembers when the last request arrived (the UI counts as use)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.last = time.monotonic()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            self.last = time.monotonic()
        await self.app(scope, receive, send)


def _unused(users: Path) -> int | None:
    """An open descriptor holding the exclusive lock on ``users`` when no command holds a lease
    (no command can take one while it is held), else None."""
    fd = os.open(users, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _watch_idle(server: Any, activity: _Activity, users: Path, idle_s: float) -> None:
    """Ask uvicorn to stop once no lease is held and no request came for ``idle_s``. The
    decision holds the users file's lock until this process exits, so a command that arrives
    meanwhile waits and then starts a new server rather than use one that is stopping."""
    used_at = time.monotonic()
    step = max(0.2, min(5.0, idle_s / 10))
    while not server.should_exit:
        time.sleep(step)
        fd = _unused(users)
        if fd is None:
            used_at = time.monotonic()
            continue
        if time.monotonic() - max(used_at, activity.last) >= idle_s:
            server.should_exit = True  # fd stays open: the lock goes with the process
            return
        os.close(fd)


def serve(home: Path, port: int, idle_minutes: float) -> int:
    """Run Prefect's server app (API and UI) on 127.0.0.1:``port`` until it has been unused
    for ``idle_minutes`` or receives SIGTERM; the exit status. ``home``: ``PREFECT_HOME``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        return _PORT_TAKEN
    sock.listen(128)
    url = f"http://127.0.0.1:{port}"
    # The UI asks this URL for the API; settings are read when Prefect is imported below.
    os.environ["PREFECT_SERVER_API_HOST"] = "127.0.0.1"
    os.environ["PREFECT_SERVER_API_PORT"] = str(port)
    os.environ["PREFECT_UI_API_URL"] = f"{url}/api"
    pid_file = home / PREFECT_PID_FILE
    try:
        fd = os.open(pid_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        owns_pid_file = False
    else:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        owns_pid_file = True
    state = {
        "pid": os.getpid(),
        "url": f"{url}/api",
        "prefect_pid_file": owns_pid_file,
        "idle_minutes": idle_minutes,
    }
    _write_atomic(home / STATE_FILE, json.dumps(state))
    try:
        import uvicorn
        from prefect.server.api.server import create_app

        activity = _Activity(create_app(final=True))
        config = uvicorn.Config(
            activity, log_level="error", lifespan="on", timeout_graceful_shutdown=5
        )
        server = uvicorn.Server(config)
        threading.Thread(
            target=_watch_idle,
            args=(server, activity, home / USERS_FILE, idle_minutes * 60),
            daemon=True,
        ).start()
        # uvicorn shuts down gracefully on SIGTERM, then delivers it again to the handler it
        # found: this one, so that the files below are removed before the process ends.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
        server.run(sockets=[sock])
    finally:
        if (_read_json(home / STATE_FILE) or {}).get("pid") == os.getpid():
            (home / STATE_FILE).unlink(missing_ok=True)
        if owns_pid_file:
            with contextlib.suppress(OSError, ValueError):
                if int(pid_file.read_text().strip()) == os.getpid():
                    pid_file.unlink()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--idle-minutes", type=float, default=DEFAULT_IDLE_MINUTES)
    args = parser.parse_args()
    sys.exit(serve(args.home, args.port, args.idle_minutes))
