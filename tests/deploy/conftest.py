"""Fixtures of the deployment tests: one fresh clone, one real Prefect server, both work pools
created and both deployments deployed from the clone; all stopped and removed at the end."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.helpers import (
    PREFECT,
    PrefectServer,
    fresh_clone,
    git_sha,
    run_cli,
    start_server,
    stop_process,
)


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
    # No registry, no image build; PWD deliberately stale, as under a process manager.
    env = prefect_server.env(PWD="/")
    for name in ("IMAGE_SEARCH_REGISTRY", "IMAGE_SEARCH_BUILD_IMAGE", "IMAGE_SEARCH_HOME"):
        env.pop(name, None)
    run_cli(["sh", "infra/create-work-pools.sh"], env, checkout, timeout=120)
    done = run_cli([PREFECT, "--no-prompt", "deploy", "--all"], env, checkout, timeout=300)
    return Deployed(
        server=prefect_server,
        checkout=checkout,
        sha=git_sha(checkout),
        deploy_output=done.stdout + done.stderr,
    )
