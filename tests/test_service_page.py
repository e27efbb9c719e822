"""The page at ``/`` in headless Debian Chromium, on a service that needs its token and sends
its Content-Security-Policy: open ``/?token=`` once, pick an index image, see its neighbours'
thumbnails load with their distances, itself first at distance 0; a non-image shows the
service's message; nothing the page does is blocked by the policy. Screenshots land in
test-artifacts/service/ (the result, and any failure)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.indexes import SELF, Built
from tests.services import Service, copy_index, start_service

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "service"
TOKEN = secrets.token_urlsafe(24)  # random: no secret-looking literal in the repository


@pytest.fixture(scope="module")
def page_service(tmp_path_factory: pytest.TempPathFactory, index: Built) -> Iterator[Service]:
    base = tmp_path_factory.mktemp("page")
    running = start_service(
        copy_index(index.out, base / "index"),
        base / "serve.log",
        env={"IMAGE_SEARCH_TOKEN": TOKEN},
    )
    yield running
    running.proc.terminate()
    running.proc.wait(timeout=60)


@pytest.fixture
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(page_service: Service, browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh page at /, opened once with ``?token=`` (the service sets its cookie and sends
    the browser on to /); a screenshot is saved when the test fails, and the test fails when
    the page's security policy blocked anything."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text))
    page.goto(f"{page_service.url}/?token={TOKEN}")
    assert page.url == page_service.url + "/"  # the token left the address bar
    failed_before = request.session.testsfailed
    yield page
    # The test's own report is counted before its fixtures are torn down.
    if request.session.testsfailed > failed_before:
        page.screenshot(path=str(SCREENSHOTS / f"{request.node.name}-failed.png"))
    assert [line for line in console if "Content Security Policy" in line] == []


def test_pick_an_image_and_see_its_neighbours(page: Any, index: Built) -> None:
    image_id, path = index.some(1)[0]
    page.get_by_text("Index: 22 images").wait_for(timeout=30_000)
    page.fill("#k", "4")
    page.set_input_files("[data-testid=file]", str(path))
    figures = page.locator("[data-testid=results] figure.result")
    figures.nth(3).wait_for(timeout=60_000)
    assert figures.count() == 4
    first = figures.nth(0).locator("figcaption").inner_text()
    rank, word, distance, id_word, shown_id = first.split()[:5]
    assert [rank, word, id_word, shown_id] == ["#1", "distance", "id", str(image_id)]
    assert float(distance) < SELF  # itself, up to the query path's float32 rounding
    assert first.split()[-1] == path.name  # where it is, relative to the source
    # Every tile is a thumbnail fetched from /images/ID?size= and decoded by the browser.
    tiles = page.eval_on_selector_all(
        "[data-testid=results] img",
        "imgs => Promise.all(imgs.map(i => i.decode().then(() => [i.naturalWidth, i.src])))",
    )
    assert len(tiles) == 4 and all(width == 288 and "?size=288" in src for width, src in tiles)
    assert page.locator("#query img").count() == 1
    assert "neighbours in" in page.inner_text("[data-testid=status]")
    page.screenshot(path=str(SCREENSHOTS / "neighbours.png"), full_page=True)


def test_a_non_image_shows_the_services_message(page: Any, tmp_path: Path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("this is text")
    page.set_input_files("[data-testid=file]", str(bad))
    error = page.locator("[data-testid=error]")
    error.get_by_text("Not usable as an image").wait_for(timeout=30_000)
    assert "not an image Pillow can identify" in error.inner_text()
    assert page.locator("[data-testid=results] figure").count() == 0
    assert page.locator("#query img").count() == 0  # no broken preview of the refused file


def test_without_the_token_the_page_is_refused(page_service: Service, browser: Any) -> None:
    page = browser.new_page()
    response = page.goto(page_service.url + "/")
    assert response is not None and response.status == 401
    assert "needs its token" in page.inner_text("body")
    assert page.locator("[data-testid=drop]").count() == 0
