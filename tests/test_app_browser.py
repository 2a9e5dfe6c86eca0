"""The app in a real browser: Debian's Chromium driven by Playwright (never `playwright install`).

Types a prompt, presses Run, waits for the CLIP-ranked gallery, sends the best image to the variations tab and
makes variations; sends it to the edit tab, paints a mask with the mouse and edits it, twice (the second time on
an edit, "use as input"); saves screenshots to `$DALLE_HF_SCREENSHOTS` (default: the test's temporary folder).
"""

import os
import re
import time
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


def seed_of(status: str) -> str | None:
    """The seed a finished edit reports ("... in 0.4 s · seed 123"), or None while it runs."""
    found = re.search(r"cells repainted.* · seed (\d+)", status, re.S)
    return found and found.group(1)


def wait_for_canvas(page, unlike: bytes | None = None, timeout: float = 60) -> bytes | None:
    """Wait until the editor's canvas shows a settled picture (two equal screenshots 0.3 s apart), different from
    `unlike`: paint on a canvas that is still loading its image is dropped with the old picture. None on timeout."""
    canvas, last = page.locator("#edit-image canvas").first, None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shot = canvas.screenshot()
        if shot == last and shot != unlike:
            return shot
        last = shot
        time.sleep(0.3)
    return None


def paint_stroke(page, dx: float, dy: float):
    """Drag the brush across the editor's canvas, from its center moved by (dx, dy) of the canvas' size."""
    page.locator("#edit-image button[aria-label='Brush']").click()
    box = page.locator("#edit-image canvas").first.bounding_box()
    x, y = box["x"] + box["width"] * (0.5 + dx), box["y"] + box["height"] * (0.5 + dy)
    page.mouse.move(x, y)
    page.mouse.down()
    for step in range(1, 11):
        page.mouse.move(x + 2 * step, y + step)
    page.mouse.up()
    time.sleep(0.5)  # the editor hands its layers over asynchronously


def test_paint_a_mask_and_edit(server, page, tmp_path):
    shots = Path(os.environ.get("DALLE_HF_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    page.goto(server, timeout=60_000)
    prompt = page.locator("#prompt textarea, #prompt input").first
    prompt.wait_for(timeout=60_000)
    prompt.fill("a red circle left of a blue square")
    page.locator("#run").click()
    page.locator("#status").get_by_text("candidates -> best").wait_for(timeout=60_000)

    page.locator("#send-edit").click()  # the best image, on the edit tab's canvas
    page.locator("#edit-image canvas").first.wait_for(timeout=30_000)
    assert wait_for_canvas(page) is not None
    paint_stroke(page, -0.06, -0.1)
    page.locator("#edit-prompt textarea, #edit-prompt input").first.fill("a red circle left of a green triangle")
    page.locator("#edit-run").click()
    status = page.locator("#edit-status")
    status.get_by_text("cells repainted").wait_for(timeout=60_000)
    first = status.inner_text()
    assert "(ranked by CLIP)" in first and "16/16" not in first  # the default ranking
    assert page.locator("#edit-gallery img").count() >= 3
    captions = page.locator("#edit-gallery").inner_text()
    assert "#1 · CLIP" in captions and "sampling…" not in captions
    page.screenshot(path=str(shots / "app_edit.png"), full_page=True)

    painted = wait_for_canvas(page)
    page.locator("#edit-gallery img").first.click()  # select the best edit, continue editing it
    for _ in range(3):  # the canvas reloads with the edit, unpainted (Gradio's editor sometimes stalls: ask again)
        page.locator("#edit-reuse").click()
        if wait_for_canvas(page, unlike=painted, timeout=30) is not None:
            break
    else:
        raise AssertionError("the edit did not reach the editor")
    paint_stroke(page, 0.05, 0.05)
    page.locator("#edit-run").click()
    deadline = time.monotonic() + 60
    while seed_of(status.inner_text()) in (None, seed_of(first)):  # the seed is randomized: a new one, a new edit
        assert time.monotonic() < deadline, status.inner_text()
        time.sleep(0.3)
    assert "cells repainted" in status.inner_text()
    assert page.locator("#edit-gallery img").count() >= 3
    page.screenshot(path=str(shots / "app_edit_again.png"), full_page=True)
    assert not page.errors, page.errors


def pick(page, dropdown: str, choice: str):
    """Choose `choice` in the Gradio dropdown `#dropdown`, as a user does: open it, click the option."""
    page.locator(f"#{dropdown} input").first.click()
    page.get_by_role("option", name=choice, exact=True).click()


def test_emoji_model_examples_style_selector_and_unseen_words(server, page, tmp_path):
    """Issue 17: the examples, the style selector and the unseen-word note follow the selected model; a style chosen
    writes itself into the prompt, and the emoji model generates from it."""
    from playwright.sync_api import expect

    shots = Path(os.environ.get("DALLE_HF_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    page.goto(server, timeout=60_000)
    prompt = page.locator("#prompt textarea, #prompt input").first
    prompt.wait_for(timeout=60_000)
    examples, style, note = page.locator("#examples"), page.locator("#style"), page.locator("#unseen-words")
    expect(examples).to_contain_text("a blue square and a yellow triangle")  # the shapes model's world.json
    expect(style).to_be_hidden()  # no styles in the shapes world
    prompt.fill("a cat wearing a hat")
    expect(note).to_contain_text('The tiny model never saw "cat", "wearing", "hat" in training', timeout=10_000)

    pick(page, "model", "tiny-emoji")
    expect(examples).to_contain_text("red apple in twemoji style", timeout=10_000)
    expect(examples).not_to_contain_text("a blue square")
    expect(style).to_be_visible()
    expect(note).to_contain_text('The tiny-emoji model never saw "a", "wearing", "hat"')  # "cat" is an emoji word
    prompt.fill("red apple")
    expect(note).to_be_hidden(timeout=10_000)
    pick(page, "style", "twemoji")
    expect(prompt).to_have_value("red apple in twemoji style", timeout=10_000)
    pick(page, "style", "fluent 3d")
    expect(prompt).to_have_value("red apple in fluent 3d style", timeout=10_000)
    pick(page, "style", "(any style)")
    expect(prompt).to_have_value("red apple", timeout=10_000)
    examples.get_by_text("rocket in noto mono style").click()  # the emoji model's example, not the shapes one
    expect(prompt).to_have_value("rocket in noto mono style", timeout=10_000)
    expect(style.locator("input")).to_have_value("noto mono", timeout=10_000)  # the selector follows the prompt
    pick(page, "style", "twemoji")
    expect(prompt).to_have_value("rocket in twemoji style", timeout=10_000)
    expect(note).to_contain_text('never saw "rocket"')  # not a concept of the tiny emoji cache

    page.locator("#run").click()
    page.locator("#status").get_by_text("candidates -> best").wait_for(timeout=60_000)
    assert page.locator("#gallery img").count() >= 3
    assert "#1 · CLIP" in page.locator("#gallery").inner_text()
    page.screenshot(path=str(shots / "app_emoji_style.png"), full_page=True)
    pick(page, "model", "tiny")  # back: the shapes examples, no style selector
    expect(examples).to_contain_text("a blue square and a yellow triangle", timeout=10_000)
    expect(style).to_be_hidden()
    assert not page.errors, page.errors


def test_output_galleries_take_no_upload(server, page):
    """The result galleries are inputs of the "use this image" buttons, and Gradio gives an event's input an upload
    area unless told otherwise: none of them may offer one ("Drop Media Here", a file input)."""
    from playwright.sync_api import expect

    page.goto(server, timeout=60_000)
    page.locator("#prompt textarea, #prompt input").first.wait_for(timeout=60_000)
    for tab, gallery in (("Text to images", "#gallery"), ("Image variations", "#var-gallery"),
                         ("Edit", "#edit-gallery")):
        page.get_by_role("tab", name=tab).click()
        expect(page.locator(gallery)).to_be_visible(timeout=10_000)
        assert page.locator(f"{gallery} input[type=file]").count() == 0, gallery
        expect(page.locator(gallery)).not_to_contain_text("Drop")
        expect(page.locator(gallery)).not_to_contain_text("Click to Upload")
    assert page.locator("#var-image input[type=file]").count() == 1  # the real input still takes an upload
    assert not page.errors, page.errors
