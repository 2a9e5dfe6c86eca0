"""The app in a real browser: Debian's Chromium driven by Playwright (never `playwright install`).

Types a prompt, presses Run, waits for the CLIP-ranked gallery, sends the best image to the variations tab and
makes variations; saves screenshots to `$DALLE_HF_SCREENSHOTS` (default: the test's temporary folder).
"""

import os
from pathlib import Path

import pytest

from tests.test_app import app_server, stop_app_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing: `make browser` installs Chromium"),
]


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    yield app_server(tmp_path_factory)
    stop_app_server()


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.errors = errors
        yield page
        browser.close()


def test_prompt_run_gallery_variations(server, page, tmp_path):
    shots = Path(os.environ.get("DALLE_HF_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    page.goto(server, timeout=60_000)  # not "networkidle": the queue keeps a connection open

    prompt = page.locator("#prompt textarea, #prompt input").first
    prompt.wait_for(timeout=60_000)
    prompt.fill("a red circle left of a blue square")
    page.locator("#run").click()
    status = page.locator("#status")
    status.get_by_text("candidates -> best").wait_for(timeout=60_000)
    images = page.locator("#gallery img")
    assert images.count() >= 3  # the default N=16 -> k=4, CLIP-ranked
    captions = page.locator("#gallery").inner_text()
    assert "#1 · CLIP" in captions and "sampling…" not in captions
    page.screenshot(path=str(shots / "app_text_to_images.png"), full_page=True)

    page.get_by_role("button", name="Make variations of the selected image").click()
    page.locator("#var-image img").first.wait_for(timeout=30_000)  # the best image, in the variations tab
    page.locator("#var-run").click()
    page.get_by_text("rows kept").wait_for(timeout=60_000)
    assert page.locator("#var-gallery img").count() >= 3
    page.screenshot(path=str(shots / "app_variations.png"), full_page=True)
    assert not page.errors, page.errors
