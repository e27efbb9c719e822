"""End to end through the Prefect UI: headless Chromium opens the `local` deployment, clicks
Run → Quick run, a real process worker picks the run up, and the flow completes on the built-in
sample with its files and artifacts. Screenshots go to test-artifacts/deploy/."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flows.params import SearchParams
from tests.deploy.conftest import Deployed
from tests.deploy.helpers import PREFECT, REPO, log_tail, start_process, stop_process

# Also `slow`, so that `-m "not slow"` is the quick tier.
pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = REPO / "test-artifacts" / "deploy"
OUTPUTS = ("samples.png", "split.parquet", "neighbors.parquet", "compare.json", "results.png")
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture
def worker(deployed: Deployed, tmp_path: Path) -> Iterator[Path]:
    """``prefect worker start --pool local`` in the checkout; yields its log, stops it after."""
    log = tmp_path / "worker.log"
    env = deployed.server.env(
        IMAGE_SEARCH_DATA=str(tmp_path / "data"),
        KERAS_HOME=str(tmp_path / "keras"),
        PREFECT_WORKER_QUERY_SECONDS="2",
    )
    proc = start_process(
        [PREFECT, "worker", "start", "--pool", "local", "--type", "process", "--name", "e2e"],
        env,
        deployed.checkout,
        log,
    )
    try:
        deadline = time.monotonic() + 60
        while deployed.server.get("/work_pools/local")["status"] != "READY":
            assert proc.poll() is None, f"worker exited:\n{log_tail(log)}"
            assert time.monotonic() < deadline, f"pool never READY:\n{log_tail(log)}"
            time.sleep(0.5)
        yield log
    finally:
        stop_process(proc)


@pytest.fixture
def browser_page() -> Iterator[Any]:
    """A page of headless Chromium (the system's, not a Playwright download)."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(30_000)
            yield page
        finally:
            browser.close()


def runs_of(deployed: Deployed, deployment_id: str) -> list[dict[str, Any]]:
    return deployed.server.post(
        "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}}
    )


@pytest.mark.timeout(600)
def test_quick_run_from_the_ui_completes(
    deployed: Deployed, worker: Path, browser_page: Any
) -> None:
    """The run form describes every parameter; Run → Quick run starts the deployment's defaults,
    and the worker runs the flow to Completed with all its outputs and artifacts."""
    page = browser_page
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    local = deployed.server.get("/deployments/name/image-search/local")
    assert runs_of(deployed, local["id"]) == []

    page.goto(f"{deployed.server.url}/deployments")
    page.get_by_role("link", name="local", exact=True).click()
    page.wait_for_url(f"**/deployments/deployment/{local['id']}*")

    # The run form shows what every parameter means.
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run", exact=True).click()
    page.wait_for_url(f"**/deployments/deployment/{local['id']}/run*")
    described = {n: f.description for n, f in SearchParams.model_fields.items() if f.description}
    page.get_by_text(described["source"]).wait_for()
    missing = [name for name, text in described.items() if page.get_by_text(text).count() == 0]
    page.screenshot(path=str(SCREENSHOTS / "run-form.png"), full_page=True)
    assert missing == [], f"descriptions not in the run form: {missing}"
    page.go_back()

    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Quick run", exact=True).click()
    page.get_by_text("scheduled to start").first.wait_for()
    page.screenshot(path=str(SCREENSHOTS / "quick-run.png"))

    (run,) = runs_of(deployed, local["id"])
    assert run["parameters"] == local["parameters"]
    deadline = time.monotonic() + 420
    while run["state_type"] not in TERMINAL and time.monotonic() < deadline:
        time.sleep(2)
        run = deployed.server.get(f"/flow_runs/{run['id']}")
    page.goto(f"{deployed.server.url}/runs/flow-run/{run['id']}")
    page.get_by_text(run["state_name"], exact=True).first.wait_for()
    assert run["state_type"] == "COMPLETED", (
        f"flow run ended {run['state_name']}:\n{log_tail(worker, 8000)}"
    )
    # The run's logs reached the server and show in the UI.
    page.get_by_text("Finished in state Completed").last.wait_for()
    page.screenshot(path=str(SCREENSHOTS / "flow-run.png"), full_page=True)
    page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text("local-summary", exact=True).first.wait_for()
    page.screenshot(path=str(SCREENSHOTS / "flow-run-artifacts.png"), full_page=True)

    out = deployed.checkout / local["parameters"]["out"]
    for name in OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert any((out / "features").glob("*.parquet"))
    assert json.loads((out / "compare.json").read_text())

    artifacts = deployed.server.post(
        "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}
    )
    keys = {artifact["key"] for artifact in artifacts}
    # Keyed by the deployment, so `local` and `gpu` keep separate histories.
    assert {"local-backends", "local-summary", "local-results", "local-samples"} <= keys, keys
