"""Reliability fixtures: a local HTTP server that misbehaves on command, real `image-search`
processes that can be killed at a chosen moment, and byte-level snapshots of folders.

Every server binds 127.0.0.1; every process a test starts is stopped by the fixture that
started it, whatever the test's outcome.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tasks.layout import LOCK_FILE, STAGING_DIR, TEMP_PREFIX

REPO = Path(__file__).resolve().parents[2]
VERIFIED = ".verified.json"  # the data cache's record of checked files


@pytest.fixture(scope="session")
def api_url(prefect_harness: None) -> str:
    """The temporary Prefect API of this test session; child processes report to it too."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    assert url and url.startswith("http://127.0.0.1:"), url
    return str(url)


@dataclass
class Proc:
    """One `image-search` process with its output in files (so a kill loses nothing)."""

    popen: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    rc: int | None = None

    def err(self) -> str:
        return self.stderr.read_text(errors="replace")

    def out(self) -> str:
        return self.stdout.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float = 240) -> int:
        self.rc = self.popen.wait(timeout=timeout)
        return self.rc

    def kill(self) -> None:
        """``kill -9`` the whole process group, as an evicted pod or an OOM kill would."""
        if self.alive():
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.rc = self.popen.wait(timeout=30)


@dataclass
class Runner:
    """Starts `image-search run ...` as real processes against the session's Prefect API."""

    api_url: str
    tmp: Path
    procs: list[Proc] = field(default_factory=list)

    def env(self, data: Path, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "PREFECT_API_URL": self.api_url,
                "IMAGE_SEARCH_DATA": str(data),
                "IMAGE_SEARCH_RETRY_BACKOFF": "0.01",
                "PYTHONPATH": str(REPO),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(extra)
        return env

    def start(
        self,
        *args: str,
        data: Path,
        hooks: dict[str, str] | None = None,
        preexec: Callable[[], Any] | None = None,
    ) -> Proc:
        """Start ``image-search run ARGS``; with ``hooks``, through the test driver."""
        n = len(self.procs)
        stdout, stderr = self.tmp / f"proc{n}.out", self.tmp / f"proc{n}.err"
        module = "tests.reliability.driver" if hooks else "flows.cli"
        with open(stdout, "wb") as o, open(stderr, "wb") as e:
            popen = subprocess.Popen(
                [sys.executable, "-m", module, "run", *args],
                cwd=REPO,
                env=self.env(data, **(hooks or {})),
                stdout=o,
                stderr=e,
                start_new_session=True,
                preexec_fn=preexec,
            )
        proc = Proc(popen, stdout, stderr)
        self.procs.append(proc)
        return proc

    def run(self, *args: str, data: Path, timeout: float = 240, **kw: Any) -> Proc:
        proc = self.start(*args, data=data, **kw)
        proc.wait(timeout)
        return proc


@pytest.fixture
def runner(api_url: str, tmp_path: Path) -> Iterator[Runner]:
    r = Runner(api_url, tmp_path / "logs")
    r.tmp.mkdir()
    yield r
    for proc in r.procs:
        proc.kill()


def wait_until(
    condition: Callable[[], bool], what: str, proc: Proc | None = None, timeout: float = 120
) -> None:
    """Poll ``condition`` until it holds; fail if ``proc`` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and not proc.alive():
            raise AssertionError(
                f"process ended (rc={proc.popen.returncode}) before {what}:\n{proc.err()[-3000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def snapshot(*folders: Path) -> dict[Path, str]:
    """SHA-256 of every file under ``folders``, lock files and the staging folder aside (the
    product's own scratch space: what a run may resume from, not an output)."""
    files: dict[Path, str] = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_file() and p.name != LOCK_FILE and STAGING_DIR not in p.parts:
                data = p.read_bytes()
                files[p] = data.decode() if p.name == VERIFIED else hashlib.sha256(data).hexdigest()
    return files


def assert_unchanged(before: dict[Path, str], *folders: Path) -> None:
    """Every file of ``before`` is still there with the same bytes, and no temporary file is
    left; the data cache's verification record may only have gained entries."""
    after = snapshot(*folders)
    for path, digest in before.items():
        assert path in after, f"{path} disappeared"
        if path.name == VERIFIED and after[path] != digest:
            old, new = json.loads(digest), json.loads(after[path])
            assert all(new.get(k) == v for k, v in old.items()), f"{path} lost entries"
            continue
        assert after[path] == digest, f"{path} was changed"
    leftovers = [p for folder in folders for p in folder.rglob(f"{TEMP_PREFIX}*")]
    assert leftovers == [], f"temporary files left behind: {leftovers}"


def latest_flow_run() -> Any:
    """The most recently created flow run on the session's Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=1)
    return runs[0] if runs else None
