"""The README's run command (`python app.py`, no flags) on the shipped checkpoints, in a real browser: both models are
in the selector, and the emoji model draws from a prompt its style selector wrote."""

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_app import REPO, free_port
from tests.test_app_browser import CHROMIUM, CHROMIUM_ARGS, pick

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing: `make browser` installs Chromium"),
]


@pytest.fixture(scope="module")
def shipped_server(tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("shipped-app") / "app.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("DALLE_HF_CHECKPOINTS", None)  # the README's command: checkpoints/ next to app.py
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 150
        try:
            while True:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "app.py did not start:\n" + log_path.read_text()[-3000:]
                try:
                    urllib.request.urlopen(url, timeout=2).close()
                    break
                except OSError:
                    time.sleep(0.3)
            yield url, log_path
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_both_shipped_models_and_the_emoji_model_draws(shipped_server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, log_path = shipped_server
    assert "dalle-emoji" in log_path.read_text() and "dalle-shapes" in log_path.read_text()  # "Models in ...: ..."
    shots = Path(os.environ.get("DALLE_HF_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url, timeout=60_000)
        prompt = page.locator("#prompt textarea, #prompt input").first
        prompt.wait_for(timeout=60_000)
        page.locator("#model input").first.click()
        options = page.get_by_role("option").all_inner_texts()  # the selected one carries a check mark
        assert sorted(o.replace("✓", "").strip() for o in options) == ["dalle-emoji", "dalle-shapes"], options
        page.get_by_role("option", name="dalle-emoji", exact=True).click()  # the open list: choose the emoji model
        expect(page.locator("#examples")).to_contain_text("red apple in twemoji style", timeout=10_000)
        style = page.locator("#style")
        expect(style).to_be_visible()
        prompt.fill("red apple")
        pick(page, "style", "twemoji")
        expect(prompt).to_have_value("red apple in twemoji style", timeout=10_000)
        expect(page.locator("#unseen-words")).to_be_hidden()
        page.locator("#run").click()
        page.locator("#status").get_by_text("candidates -> best").wait_for(timeout=120_000)
        assert page.locator("#gallery img").count() >= 3
        assert "#1 · CLIP" in page.locator("#gallery").inner_text()
        page.screenshot(path=str(shots / "app_shipped_emoji.png"), full_page=True)
        browser.close()
    assert not errors, errors
