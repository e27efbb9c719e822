"""Processes and paths shared by the deployment tests: a sealed environment, a real Prefect
server on a free 127.0.0.1 port, the CLI, and a copy of the working tree as a fresh clone."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
# The `prefect` command of the interpreter running the tests (also for infra/*.sh).
BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect")
INFRA = REPO / "infra"
POOL_TEMPLATE = INFRA / "work-pool-kubernetes.json"
PREFECT_YAML = REPO / "prefect.yaml"

# Every process a test starts talks to 127.0.0.1 only.
SEALED_ENV = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
    "https_proxy": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "no_proxy": "127.0.0.1,localhost",
}
# Direct connections for the tests' own HTTP calls, whatever the proxy variables say.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def load_pool_template() -> dict[str, Any]:
    """The Kubernetes work pool's base job template, as committed."""
    return json.loads(POOL_TEMPLATE.read_text())


def load_prefect_yaml() -> dict[str, Any]:
    """prefect.yaml with its anchors resolved."""
    return yaml.safe_load(PREFECT_YAML.read_text())


def deployment_config(name: str) -> dict[str, Any]:
    """One deployment of prefect.yaml by name."""
    found = [d for d in load_prefect_yaml()["deployments"] if d["name"] == name]
    assert len(found) == 1, f"prefect.yaml has {len(found)} deployments named {name!r}"
    return found[0]


def load_manifests() -> list[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object in infra/k8s/*.yaml (Helm values files have no `kind`)."""
    docs = []
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and "kind" in doc:
                docs.append((path, doc))
    return docs


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sealed_env(prefect_home: Path, api_url: str | None = None, **extra: str) -> dict[str, str]:
    """This process's environment without any PREFECT_* setting, sealed to 127.0.0.1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(SEALED_ENV)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PREFECT_HOME"] = str(prefect_home)
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    if api_url is not None:
        env["PREFECT_API_URL"] = api_url
    env.update(extra)
    return env


def http_json(url: str, payload: Any = None, timeout: float = 10.0) -> Any:
    """GET (or POST ``payload``) ``url`` directly and decode the JSON answer."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with _DIRECT.open(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


def start_process(
    args: list[str], env: dict[str, str], cwd: Path, log: Path
) -> subprocess.Popen[bytes]:
    """Start ``args`` in its own process group, output to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Stop the process group ``proc`` leads: SIGTERM, then SIGKILL after ``timeout``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        proc.wait(timeout=timeout)


def log_tail(log: Path, chars: int = 4000) -> str:
    """The end of a process log, for assertion messages."""
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


@dataclass
class PrefectServer:
    """A running ``prefect server start`` and how to reach it."""

    url: str
    home: Path
    log: Path
    process: subprocess.Popen[bytes]

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a client of this server (CLI, worker)."""
        return sealed_env(self.home, self.api_url, **extra)

    def get(self, path: str) -> Any:
        return http_json(f"{self.api_url}{path}")

    def post(self, path: str, payload: Any) -> Any:
        return http_json(f"{self.api_url}{path}", payload)


def start_server(home: Path, timeout: float = 120.0) -> PrefectServer:
    """Start a Prefect server on a free 127.0.0.1 port and wait until /api/health answers."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = home / "server.log"
    url = f"http://127.0.0.1:{port}"
    env = sealed_env(
        home,
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port),
        # The UI calls the API at this address (otherwise the default port, 4200).
        PREFECT_SERVER_UI_API_URL=f"{url}/api",
        PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false",
    )
    proc = start_process(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, home, log
    )
    server = PrefectServer(url=url, home=home, log=log, process=proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{log_tail(log)}")
        try:
            if http_json(f"{server.api_url}/health", timeout=2.0) is True:
                return server
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            pass
        time.sleep(0.5)
    stop_process(proc)
    raise TimeoutError(f"prefect server not healthy after {timeout:.0f} s:\n{log_tail(log)}")


def run_cli(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300.0
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; fail with its output when it fails."""
    done = subprocess.run(
        args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, (
        f"{' '.join(args)} exited with {done.returncode}\n"
        f"--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"
    )
    return done


def fresh_clone(dest: Path) -> Path:
    """The working tree (tracked and untracked, minus ignored files) as a new one-commit repo.

    Like a clean clone, but it includes work not yet committed, so the tests check what is here.
    """
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        source = REPO / rel
        if source.is_file():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    git = ["git", "-c", "user.name=tests", "-c", "user.email=tests@127.0.0.1"]
    for step in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "snapshot"]):
        subprocess.run([*git, *step], cwd=dest, check=True, capture_output=True)
    return dest


def git_sha(repo: Path, length: int = 12) -> str:
    """The abbreviated commit ``prefect deploy`` tags the image with."""
    return subprocess.run(
        ["git", "rev-parse", f"--short={length}", "HEAD"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def readme_commands(section: str) -> str:
    """The first ```bash block under README.md's ``## <section>`` heading, as written."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end != -1 else len(text)]
    block = re.search(r"^```bash\n(.*?)^```$", body, re.MULTILINE | re.DOTALL)
    assert block, f"README.md's {section} section has no bash block"
    return block.group(1)


def wait_until(check: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    """Poll ``check`` every half second until it holds; fail with the log's end otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not after {timeout:.0f} s\n{log_tail(log)}")
