"""Fixtures of the deployment tests: one fresh clone, one real Prefect server, both work pools
created and both deployments deployed from the clone; README's Deploy commands run as written in
another clone with their own server and worker; all stopped and removed at the end."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.helpers import (
    PREFECT,
    PrefectServer,
    free_port,
    fresh_clone,
    git_sha,
    http_json,
    readme_commands,
    run_cli,
    sealed_env,
    start_process,
    start_server,
    stop_process,
    wait_until,
)

# The registry the `gpu` deployment's image is named in; nothing is pushed or pulled.
REGISTRY = "registry.example.com/team"


@dataclass
class Deployed:
    """The outcome of creating the pools and running ``prefect --no-prompt deploy --all``."""

    server: PrefectServer
    checkout: Path
    sha: str
    deploy_output: str


@pytest.fixture(scope="session")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh clone of the working tree (see ``fresh_clone``)."""
    return fresh_clone(tmp_path_factory.mktemp("clone"))


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """``prefect server start`` on a free 127.0.0.1 port with its own PREFECT_HOME."""
    server = start_server(tmp_path_factory.mktemp("prefect-home"))
    try:
        yield server
    finally:
        stop_process(server.process)


@pytest.fixture(scope="session")
def deployed(prefect_server: PrefectServer, checkout: Path) -> Deployed:
    """Both pools created by infra/create-work-pools.sh, then ``prefect deploy --all``."""
    # A registry but no image build; PWD deliberately stale, as under a process manager.
    env = prefect_server.env(PWD="/", IMAGE_SEARCH_REGISTRY=REGISTRY)
    for name in ("IMAGE_SEARCH_BUILD_IMAGE", "IMAGE_SEARCH_HOME"):
        env.pop(name, None)
    run_cli(["sh", "infra/create-work-pools.sh"], env, checkout, timeout=120)
    done = run_cli([PREFECT, "--no-prompt", "deploy", "--all"], env, checkout, timeout=300)
    return Deployed(
        server=prefect_server,
        checkout=checkout,
        sha=git_sha(checkout),
        deploy_output=done.stdout + done.stderr,
    )


@dataclass
class ReadmeDeploy:
    """README's Deploy commands, running in a fresh clone with a port of their own."""

    checkout: Path
    port: int
    env: dict[str, str]
    log: Path

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def get(self, path: str) -> Any:
        return http_json(f"{self.api_url}{path}")

    def get_workers(self) -> list[dict[str, Any]]:
        """Workers that have polled the `local` pool (a 404 until the pool exists)."""
        return list(http_json(f"{self.api_url}/work_pools/local/workers/filter", {}))


@pytest.fixture(scope="session")
def readme_deploy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReadmeDeploy]:
    """README.md's Deploy block run by bash, as written, in a fresh clone whose `.venv` is the
    test environment (the quick start done), with a fresh PREFECT_HOME, no PREFECT_API_URL, and
    PORT set to a free port instead of 4200: the block is up once its worker polls `local`."""
    commands = readme_commands("Deploy")
    assert commands.count("PORT=4200") == 1 and commands.count("4200") == 1, commands
    port = free_port()
    checkout = fresh_clone(tmp_path_factory.mktemp("readme-clone"))
    (checkout / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    script = checkout.parent / "readme-deploy.sh"
    script.write_text(commands.replace("PORT=4200", f"PORT={port}"))
    home = tmp_path_factory.mktemp("readme-prefect-home")
    env = sealed_env(home)
    for name in ("IMAGE_SEARCH_REGISTRY", "IMAGE_SEARCH_BUILD_IMAGE", "IMAGE_SEARCH_HOME"):
        env.pop(name, None)
    log = home / "readme-deploy.log"
    process = start_process(["bash", "-e", str(script)], env, checkout, log)
    deploy = ReadmeDeploy(checkout=checkout, port=port, env=env, log=log)
    try:
        wait_until(
            lambda: bool(deploy.get_workers()) or process.poll() is not None,
            timeout=420,
            what="a worker polling the local pool",
            log=log,
        )
        assert process.poll() is None, f"the block ended early:\n{log.read_text()[-4000:]}"
        yield deploy
    finally:
        stop_process(process)
