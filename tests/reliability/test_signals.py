"""Stopping a run, and the temporary Prefect API it starts, with real ``image-search run``
processes started as a user starts them: without ``PREFECT_API_URL``.

Ctrl-C in a terminal signals the whole process group, SIGTERM is what Kubernetes and systemd
send, ``kill -9`` is an OOM kill: each ends the run within seconds with its exit status and
the resume hint, never a traceback, and leaves no server process behind. A first run on a
fresh ``PREFECT_HOME`` gets the start-up time it needs; a user's own budget is honoured.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.conftest import Proc, Runner, wait_until

pytestmark = pytest.mark.slow

RESUME = "run the same command again to resume where it stopped."
# Long enough that a signal lands mid-run: 2,000 images take minutes to embed on a CPU.
LONG_RUN = ["--source", "sample", "--weights", "none", "--limit", "2000", "--batch-size", "16"]


def api_servers_of(pid: int) -> list[int]:
    """PIDs of the temporary API servers that process ``pid`` started and that still run."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"flows.local_api" in argv and argv[argv.index(b"--parent") + 1] == str(pid).encode():
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One PREFECT_HOME for the signal tests: its database is created once."""
    return tmp_path_factory.mktemp("prefect-home")


def _runner(tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Runner]:
    """A Runner whose processes find no PREFECT_API_URL (empty means unset) and start their
    own API; every process and server it started is gone afterwards."""
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "INFO")  # to see the flow run begin
    monkeypatch.delenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", raising=False)
    runner = Runner(api_url="", tmp=tmp_path / "logs")
    runner.tmp.mkdir()
    yield runner
    for proc in runner.procs:
        pid = proc.popen.pid
        proc.kill()
        for server in api_servers_of(pid):  # only if a test failed before checking this
            os.killpg(server, signal.SIGKILL)


@pytest.fixture
def own_api(tmp_path: Path, shared_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Runner]:
    yield from _runner(tmp_path, shared_home, monkeypatch)


@pytest.fixture
def fresh_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Runner]:
    yield from _runner(tmp_path, tmp_path / "fresh-prefect-home", monkeypatch)


def start_mid_run(runner: Runner, tmp_path: Path) -> tuple[Proc, list[int]]:
    """A long run, once its flow run has begun on its temporary API; with that API's PIDs."""
    proc = runner.start(*LONG_RUN, "--out", str(tmp_path / "out"), data=tmp_path / "data")
    wait_until(lambda: "Beginning flow run" in proc.err(), "the flow run to begin", proc, 300)
    servers = api_servers_of(proc.popen.pid)
    assert len(servers) == 1, servers
    assert os.getsid(servers[0]) != os.getsid(proc.popen.pid)  # not in the terminal's session
    return proc, servers


def assert_stopped_cleanly(proc: Proc, servers: list[int], status: int, word: str) -> None:
    err = proc.err()
    assert proc.rc == status, err[-3000:]
    assert f"image-search: error: {word}; {RESUME}" in err
    assert "Traceback" not in err + proc.out()
    assert api_servers_of(proc.popen.pid) == []
    assert [pid for pid in servers if Path(f"/proc/{pid}").exists()] == []


def _stop(proc: Proc, sig: signal.Signals, group: bool) -> float:
    started = time.monotonic()
    (os.killpg if group else os.kill)(proc.popen.pid, sig)
    proc.wait(timeout=120)
    return time.monotonic() - started


def test_ctrl_c_in_a_terminal_exits_130_within_seconds(own_api: Runner, tmp_path: Path) -> None:
    """SIGINT to the whole process group, as a terminal sends it: the temporary API lives on
    in its own session, so the run records its end and stops at once."""
    proc, servers = start_mid_run(own_api, tmp_path)
    elapsed = _stop(proc, signal.SIGINT, group=True)
    assert_stopped_cleanly(proc, servers, 130, "interrupted")
    assert elapsed < 30, f"took {elapsed:.1f} s"


def test_sigterm_exits_143_and_stops_the_api(own_api: Runner, tmp_path: Path) -> None:
    proc, servers = start_mid_run(own_api, tmp_path)
    elapsed = _stop(proc, signal.SIGTERM, group=False)
    assert_stopped_cleanly(proc, servers, 143, "terminated")
    assert elapsed < 30, f"took {elapsed:.1f} s"


def test_kill_9_leaves_no_api_behind(own_api: Runner, tmp_path: Path) -> None:
    """An OOM kill gives the command line no chance to clean up: the server notices its
    parent is gone and stops itself."""
    proc, servers = start_mid_run(own_api, tmp_path)
    proc.kill()
    wait_until(
        lambda: not any(Path(f"/proc/{pid}").exists() for pid in servers),
        "the orphaned API to stop",
        timeout=20,
    )


def test_first_run_on_a_fresh_prefect_home(fresh_home: Runner, tmp_path: Path) -> None:
    """The temporary API creates its database before it answers: with Prefect's 20 s budget
    this failed on a busy machine; the run's own budget covers it."""
    missing = tmp_path / "missing"
    proc = fresh_home.run(
        "--source", str(missing), "--out", str(tmp_path / "o"), data=tmp_path / "data"
    )
    err = proc.err()
    assert proc.rc == 1, err[-3000:]
    assert "image-search: starting a temporary Prefect API for this run" in err
    assert f"image-search: error: Source '{missing}' is neither a URL" in err
    assert err.rstrip().endswith("or --source sample.")  # the command line names options
    assert "Timed out" not in err and "Traceback" not in err
    assert (tmp_path / "fresh-prefect-home" / "prefect.db").stat().st_size > 0
    assert api_servers_of(proc.popen.pid) == []


def test_a_users_start_up_budget_is_honoured_and_named(
    fresh_home: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "1")
    proc = fresh_home.run(
        "--source", "sample", "--out", str(tmp_path / "o"), data=tmp_path / "data"
    )
    err = proc.err()
    assert proc.rc == 1, err[-3000:]
    assert (
        "image-search: error: The temporary Prefect API did not start within 1 s "
        "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS). On a busy machine raise that setting"
    ) in err
    assert "Traceback" not in err
    assert api_servers_of(proc.popen.pid) == []
    assert not (tmp_path / "o").exists()
