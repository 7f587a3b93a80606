"""The web app in a real browser: Playwright driving Debian's Chromium against the app on 127.0.0.1.

Runs by default (the `browser` marker is only for selection: `pytest -m browser`). Without Chromium
it skips locally and fails in CI (CI=true), where `.ci/run` installs it.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from app_server import launch, wait_until
from conftest import EXAMPLES

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("QIE_CHROMIUM", "/usr/bin/chromium")
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
MISSING = "needs Chromium at {} and the playwright package: apt-get install -y chromium && pip install playwright"


def _require_browser() -> None:
    problem = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problem = MISSING.format(CHROMIUM)
    if problem is None and not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        problem = MISSING.format(CHROMIUM)
    if problem:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(problem)
        pytest.skip(problem)


@pytest.fixture(scope="module")
def page_url(tiny_editor):
    _require_browser()
    demo, url = launch(tiny_editor)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def browser():
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def test_edit_an_uploaded_example_with_a_preset(browser, page_url, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    started = time.perf_counter()
    page.goto(page_url)
    page.locator("#edit-btn").wait_for(state="visible", timeout=60_000)
    load_s = time.perf_counter() - started
    print(f"page load: {load_s:.2f}s")

    page.set_input_files("#image-1 input[type=file]", str(EXAMPLES / "coffee-cup.jpg"))
    page.locator("#image-1 img").first.wait_for(state="visible", timeout=30_000)

    page.locator("#language").get_by_text("中文").click()
    page.locator("#preset-combined").click()
    prompt = page.locator("#prompt textarea")
    wait_until(lambda: "Sale $19.9" in prompt.input_value() and "纯白色" in prompt.input_value())
    page.locator("#language").get_by_text("English").click()
    page.locator("#preset-white_background").click()
    wait_until(lambda: prompt.input_value().startswith("Replace the background with pure white"))

    # Small and quick on the tiny model.
    page.locator("#advanced").get_by_text("Advanced").click()
    _set_number(page, "#steps", 3)
    _set_number(page, "#max-side", 128)
    page.locator("#condition-area").get_by_text("output", exact=False).click()
    assert page.locator("#feature-tile-size input").first.is_disabled() or _live("tile_size")

    page.locator("#edit-btn").click()
    stats = page.locator("#stats textarea")
    wait_until(lambda: "denoise" in stats.input_value(), timeout=120)
    text = stats.input_value()
    assert "text_encode" in text and "decode" in text and "output 128x96" in text
    images = page.locator("#result img")
    wait_until(lambda: images.count() >= 2)
    natural = images.nth(1).evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert natural == [128, 96]

    shot = Path(os.environ.get("QIE_SCREENSHOT") or tmp_path / "screenshot.png")
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000

    # Iterate: the result becomes the input (with a warning), and Enter in the prompt submits.
    page.locator("#use-as-input").click()
    page.get_by_text("Quality decays", exact=False).first.wait_for(timeout=30_000)
    source = page.locator("#image-1 img").first
    wait_until(lambda: source.evaluate("img => img.naturalWidth") == 128)
    prompt.fill("make the cup blue")
    prompt.press("Enter")
    wait_until(lambda: stats.input_value() != text and "denoise" in stats.input_value(), timeout=120)
    page.close()


def _live(name: str) -> bool:
    from qie.app.presets import FEATURES, feature_available

    return feature_available(FEATURES[name])


def _set_number(page, elem_id: str, value: int) -> None:
    box = page.locator(f"{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    box.blur()
