"""Stopping a run, and the local Prefect API that runs share, with real ``image-search run``
processes started as a user starts them: without ``PREFECT_API_URL``.

Ctrl-C in a terminal signals the whole process group, SIGTERM is what Kubernetes and systemd
send, ``kill -9`` is an OOM kill: each ends the run within seconds with its exit status and the
resume hint, never a traceback. The local API the first command started outlives it, as that
command announced, and stops by itself once no command has used it for its idle time (here a
few seconds); nothing else is left behind. A rerun finds the API running and starts none; two
commands at once start one; a user's own start-up budget is honoured.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.http_server import MisbehavingServer
from tests.indexes import Built, write_images
from tests.reliability.conftest import Proc, Runner, wait_until

pytestmark = pytest.mark.slow

RESUME = "run the same command again to resume where it stopped."
# Long enough that a signal lands mid-run: 2,000 images take minutes to embed on a CPU.
LONG_RUN = ["--source", "sample", "--weights", "none", "--limit", "2000", "--batch-size", "16"]
IDLE_MINUTES = 0.1  # the local API stops 6 s after its last use
STARTED = (
    "image-search: started a local Prefect API for this and later commands at http://127.0.0.1:"
)
LASTS = "it stops after 0.1 minutes unused, and `prefect server stop` stops it now."


def api_servers(home: Path) -> list[int]:
    """PIDs of the local API servers that run for PREFECT_HOME ``home``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"flows.local_api" not in argv or b"--home" not in argv[:-1]:
            continue  # not a local API server (or one of another layout)
        if argv[argv.index(b"--home") + 1] == str(home).encode():
            found.append(int(entry.name))
    return found


def session_members(sid: int) -> list[int]:
    """PIDs of the processes still in session ``sid`` (a command and anything it left)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def state(home: Path) -> dict[str, object] | None:
    try:
        return dict(json.loads((home / "image-search-api.json").read_text()))
    except (OSError, ValueError):
        return None


def _runner(tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Runner]:
    """A Runner whose processes find no PREFECT_API_URL (empty means unset) and share a local
    API in ``home``; every process and server is gone afterwards."""
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "INFO")  # to see the flow run begin
    monkeypatch.setenv("IMAGE_SEARCH_API_IDLE_MINUTES", str(IDLE_MINUTES))
    monkeypatch.delenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", raising=False)
    runner = Runner(api_url="", tmp=tmp_path / "logs")
    runner.tmp.mkdir()
    yield runner
    for proc in runner.procs:
        proc.kill()
    for server in api_servers(home):  # only if a test failed before its server stopped
        os.killpg(server, signal.SIGKILL)


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One PREFECT_HOME for the signal tests: its database is created once."""
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture
def own_api(tmp_path: Path, shared_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Runner]:
    yield from _runner(tmp_path, shared_home, monkeypatch)


@pytest.fixture
def fresh_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Runner]:
    yield from _runner(tmp_path, tmp_path / "fresh-prefect-home", monkeypatch)


def start_mid_run(runner: Runner, home: Path, tmp_path: Path) -> tuple[Proc, int]:
    """A long run, once its flow run has begun on the local API; with that API's PID."""
    proc = runner.start(*LONG_RUN, "--out", str(tmp_path / "out"), data=tmp_path / "data")
    wait_until(lambda: "Beginning flow run" in proc.err(), "the flow run to begin", proc, 300)
    (server,) = api_servers(home)
    assert os.getsid(server) != os.getsid(proc.popen.pid)  # not in the terminal's session
    return proc, server


def assert_stopped_cleanly(proc: Proc, status: int, word: str) -> None:
    err = proc.err()
    assert proc.rc == status, err[-3000:]
    assert f"image-search: error: {word}; {RESUME}" in err
    assert "Traceback" not in err + proc.out()
    assert session_members(proc.popen.pid) == []  # the command left nothing in its session


def assert_announced_and_stops_when_unused(proc: Proc, home: Path, server: int) -> None:
    """The API outlived the command as announced, and stops by itself once unused."""
    err = proc.err()
    assert STARTED in err or "image-search: using the local Prefect API at" in err, err[-3000:]
    assert LASTS in err
    wait_until(lambda: not Path(f"/proc/{server}").exists(), "the unused API to stop", timeout=60)
    assert api_servers(home) == [] and state(home) is None


def _stop(proc: Proc, sig: signal.Signals, group: bool) -> float:
    started = time.monotonic()
    (os.killpg if group else os.kill)(proc.popen.pid, sig)
    proc.wait(timeout=120)
    return time.monotonic() - started


def test_ctrl_c_in_a_terminal_exits_130_within_seconds(
    own_api: Runner, shared_home: Path, tmp_path: Path
) -> None:
    """SIGINT to the whole process group, as a terminal sends it: the local API lives on in its
    own session, so the run records its end and stops at once."""
    proc, server = start_mid_run(own_api, shared_home, tmp_path)
    elapsed = _stop(proc, signal.SIGINT, group=True)
    assert_stopped_cleanly(proc, 130, "interrupted")
    assert elapsed < 30, f"took {elapsed:.1f} s"
    assert_announced_and_stops_when_unused(proc, shared_home, server)


def test_sigterm_exits_143_and_the_api_stops_when_unused(
    own_api: Runner, shared_home: Path, tmp_path: Path
) -> None:
    proc, server = start_mid_run(own_api, shared_home, tmp_path)
    elapsed = _stop(proc, signal.SIGTERM, group=False)
    assert_stopped_cleanly(proc, 143, "terminated")
    assert elapsed < 30, f"took {elapsed:.1f} s"
    assert_announced_and_stops_when_unused(proc, shared_home, server)


def test_kill_9_leaves_no_api_behind(own_api: Runner, shared_home: Path, tmp_path: Path) -> None:
    """An OOM kill gives the command line no chance to clean up: the kernel drops its lease,
    and the API stops itself once unused."""
    proc, server = start_mid_run(own_api, shared_home, tmp_path)
    proc.kill()
    wait_until(lambda: not Path(f"/proc/{server}").exists(), "the unused API to stop", timeout=60)
    assert state(shared_home) is None


def test_first_run_on_a_fresh_home_then_a_rerun_starts_no_server(
    fresh_home: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first command starts the API (creating its database) and waits for it; the next
    one finds it running and is recorded on it too; ``prefect server stop`` stops it."""
    home = tmp_path / "fresh-prefect-home"
    missing = tmp_path / "missing"
    args = ["--source", str(missing), "--out", str(tmp_path / "o")]
    first = fresh_home.run(*args, data=tmp_path / "data")
    err = first.err()
    assert first.rc == 1, err[-3000:]
    assert "image-search: starting a local Prefect API" in err and STARTED in err
    assert f"image-search: error: Source '{missing}' is neither a URL" in err
    assert err.rstrip().endswith("or --source sample.")  # the command line names options
    assert "Timed out" not in err and "Traceback" not in err
    assert (home / "prefect.db").stat().st_size > 0
    (server,) = api_servers(home)

    monkeypatch.setenv("IMAGE_SEARCH_API_IDLE_MINUTES", "1")  # not the running server's
    again = fresh_home.run(*args, data=tmp_path / "data")
    err = again.err()
    assert again.rc == 1, err[-3000:]
    assert "starting a local Prefect API" not in err
    assert "image-search: using the local Prefect API at http://127.0.0.1:" in err
    assert LASTS in err  # the server's own idle time
    assert api_servers(home) == [server]
    url = str((state(home) or {})["url"])
    runs = _flow_runs(url)
    assert [r["parameters"]["source"] for r in runs] == [str(missing)] * 2
    assert all(r["state_type"] == "FAILED" for r in runs)

    stop = subprocess.run(
        [Path(sys.executable).parent / "prefect", "server", "stop"],
        capture_output=True,
        text=True,
        env={**os.environ, "PREFECT_HOME": str(home)},
        timeout=60,
    )
    assert stop.returncode == 0, stop.stderr
    wait_until(lambda: not Path(f"/proc/{server}").exists(), "the API to stop", timeout=30)
    assert state(home) is None and not (home / "server.pid").exists()


def _flow_runs(url: str) -> list[dict[str, object]]:
    import httpx

    with httpx.Client(trust_env=False, timeout=30) as client:
        resp = client.post(f"{url}/flow_runs/filter", json={"limit": 10})
        resp.raise_for_status()
        return list(resp.json())


def test_two_commands_at_once_start_one_api(fresh_home: Runner, tmp_path: Path) -> None:
    home = tmp_path / "fresh-prefect-home"
    procs = [
        fresh_home.start(
            "--source",
            str(tmp_path / f"missing{n}"),
            "--out",
            str(tmp_path / f"o{n}"),
            data=tmp_path / "data",
        )
        for n in range(2)
    ]
    for proc in procs:
        proc.wait(timeout=300)
    errs = [p.err() for p in procs]
    assert [p.rc for p in procs] == [1, 1], errs
    assert sum(STARTED in e for e in errs) == 1
    assert sum("using the local Prefect API at" in e for e in errs) == 1
    assert len(api_servers(home)) == 1


def test_a_users_start_up_budget_is_honoured_and_named(
    fresh_home: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "1")
    home = tmp_path / "fresh-prefect-home"
    proc = fresh_home.run(
        "--source", "sample", "--out", str(tmp_path / "o"), data=tmp_path / "data"
    )
    err = proc.err()
    assert proc.rc == 1, err[-3000:]
    assert (
        "image-search: error: The local Prefect API did not start within 1 s "
        "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS). On a busy machine raise that setting"
    ) in err
    assert "Traceback" not in err
    assert api_servers(home) == [] and state(home) is None  # the one it started is stopped
    assert not (tmp_path / "o").exists()


# -- a read that never ends does not hold a stop ----------------------------------------------


@pytest.fixture
def trickling() -> Iterator[MisbehavingServer]:
    """Images that arrive at 20 bytes per second: each read returns, none ever completes."""
    with MisbehavingServer() as server:
        server.rate = 20
        for n in range(8):
            server.files[f"/slow{n}.png"] = os.urandom(200_000)
        yield server


def test_sigterm_while_catalog_reads_are_stuck_exits_143_at_once(
    runner: Runner, trickling: MisbehavingServer, tmp_path: Path
) -> None:
    """A list whose URLs trickle: the catalog's reader threads sit in reads that end only at
    their deadline, a minute away. SIGTERM still ends the run within seconds, after its
    clean-up (the flow run is recorded as ended): the stuck readers are not waited for."""

    photos = write_images(tmp_path / "photos", 4)
    listing = tmp_path / "list.csv"
    urls = [trickling.url(f"/slow{n}.png") for n in range(8)]
    listing.write_text("uri\n" + "\n".join([*map(str, photos), *urls]) + "\n")
    proc = runner.start(
        "--source",
        str(listing),
        "--weights",
        "none",
        "--out",
        str(tmp_path / "out"),
        data=tmp_path / "data",
    )
    wait_until(lambda: len(trickling.requests) >= 2, "reads of trickling URLs", proc, 300)
    time.sleep(1)  # the readers are inside their reads now
    elapsed = _stop(proc, signal.SIGTERM, group=False)
    err = proc.err()
    assert proc.rc == 143, err[-3000:]
    assert f"image-search: error: terminated; {RESUME}" in err
    assert "Traceback" not in err + proc.out()
    assert elapsed < 30, f"took {elapsed:.1f} s"  # it took 121-300 s when the readers were joined


def test_sigterm_while_a_query_reads_a_trickling_url_exits_143_at_once(
    trickling: MisbehavingServer,
    tmp_path: Path,
    built: Built,
) -> None:
    from tests.reliability.conftest import REPO

    err_file = tmp_path / "query.err"
    with open(err_file, "wb") as err:
        popen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flows.cli",
                "query",
                trickling.url("/slow0.png"),
                trickling.url("/slow1.png"),
                "--index",
                str(built.out),
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        deadline = time.monotonic() + 120
        while not trickling.requests and time.monotonic() < deadline:
            assert popen.poll() is None, err_file.read_text()
            time.sleep(0.05)
        time.sleep(0.5)
        started = time.monotonic()
        popen.send_signal(signal.SIGTERM)
        rc = popen.wait(timeout=60)
        elapsed = time.monotonic() - started
    finally:
        if popen.poll() is None:
            popen.kill()
    text = err_file.read_text()
    assert rc == 143, text
    assert text.rstrip().endswith("image-search: error: terminated.") and "Traceback" not in text
    assert elapsed < 30, f"took {elapsed:.1f} s"


@pytest.mark.slow
def test_an_adopted_api_that_stops_before_it_answers_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command finds another's server still starting and waits for it; that server goes (an
    idle one stopping itself just then). The command starts its own instead of failing."""
    from flows.local_api import STATE_FILE, LocalApi

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("PREFECT_HOME", str(home))
    going = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    state = {"pid": going.pid, "url": "http://127.0.0.1:9/api", "idle_minutes": 1}
    (home / STATE_FILE).write_text(json.dumps(state))
    api = LocalApi(home, timeout=240, idle=1)
    assert api.find_or_start() is None  # adopted: alive, not answering
    going.wait()
    try:
        server = api.wait_ready()
        assert server.started_here and server.pid != going.pid
        assert api_servers(home) == [server.pid]
    finally:
        api.stop_started()
    wait_until(lambda: api_servers(home) == [], "the replacement server to stop", timeout=60)


# A command whose stop is swallowed (as a library may catch KeyboardInterrupt) or whose exit
# handlers hang: it still ends, at its deadline, with its status and its words.
HELD = """
import sys, time, atexit
from flows.cli import signals
signals.STOP_DEADLINE_S = 1.0
where = sys.argv[1]
if where == "exit":
    atexit.register(time.sleep, 600)
def body():
    while True:
        try:  # ready only once inside: a signal before it would not be swallowed
            print("ready", flush=True)
            time.sleep(600)
        except KeyboardInterrupt:
            if where == "exit":
                raise
stops = signals.stopped_as_errors("run it again")
sys.exit(signals.exit_status(body, traceback=False, stops=stops, leave=True))
"""


@pytest.mark.parametrize(("where", "sig"), [("body", signal.SIGINT), ("exit", signal.SIGTERM)])
def test_a_stop_held_up_by_its_clean_up_ends_at_its_deadline(
    tmp_path: Path, where: str, sig: signal.Signals
) -> None:
    from tests.reliability.conftest import REPO

    popen = subprocess.Popen(
        [sys.executable, "-c", HELD, where],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert popen.stdout is not None and popen.stdout.readline() == "ready\n"
        started = time.monotonic()
        popen.send_signal(sig)
        rc = popen.wait(timeout=60)
        elapsed = time.monotonic() - started
    finally:
        if popen.poll() is None:
            popen.kill()
    err = popen.stderr.read() if popen.stderr else ""
    word, status = ("interrupted", 130) if sig == signal.SIGINT else ("terminated", 143)
    assert rc == status, err
    assert err.count(f"image-search: error: {word}; run it again.") == 1, err
    assert "its clean-up took over 1 s; stopped without the rest of it." in err
    assert 1 <= elapsed < 30, f"took {elapsed:.1f} s"
